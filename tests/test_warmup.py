"""Tests for synthetic/warmup.py, the encoder alone on the synthetic ground truth (train.py's warm-up,
and `python -m synthetic.warmup` as a probe): it trains the encoders it is given, and its command line
saves an encoder that train.py --encoder_init reads."""

import copy

import torch

from synthetic import warmup
from ecg_encoder import ECGEncoder, EncoderConfig, load_encoder_config
from images.vit import ImageEncoder, ImageEncoderConfig


def test_thirty_steps_read_the_held_out_ecgs_better_than_the_untrained_encoder():
    torch.manual_seed(0)
    enc = ECGEncoder(EncoderConfig(d_model=32, n_layers=1, n_heads=2))
    untrained = copy.deepcopy(enc)
    kw = dict(train_patients=8, test_patients=4, lr=3e-3)
    r0 = warmup.fit_encoder_to_truth(untrained, warmup.WarmupConfig(steps=0, **kw), desc=None, report=False)
    r1 = warmup.fit_encoder_to_truth(enc, warmup.WarmupConfig(steps=30, eval_every=30, **kw), desc=None, report=False)
    # the same held-out records and the same head initialisation (seeded): only the 30 steps differ
    assert r1["hr_mae"] < r0["hr_mae"] - 5 and r1["statement_f1"] > r0["statement_f1"] + 0.05
    assert r1["beat_f1"][0] > r0["beat_f1"][0] + 0.1                  # where the beats are, token by token


def test_trains_the_image_encoder_beside_the_ecg_encoder():
    torch.manual_seed(0)
    enc = ECGEncoder(EncoderConfig(d_model=32, n_layers=1, n_heads=2))
    alone = copy.deepcopy(enc)
    img = ImageEncoder(ImageEncoderConfig(height=32, width=64, d_model=16, n_layers=1, n_heads=2))
    before = copy.deepcopy(img.state_dict())
    cfg = warmup.WarmupConfig(steps=2, train_patients=6, test_patients=6, eval_every=2, seed=1)
    r = warmup.fit_encoder_to_truth(enc, cfg, img, desc=None)
    r_alone = warmup.fit_encoder_to_truth(alone, cfg, desc=None, report=False)
    # the image encoder learns, every weight of it, from its own head; the ECG encoder learns exactly what it learns
    # without one (the two losses share no weights)
    assert [k for k, v in img.state_dict().items() if torch.equal(v, before[k])] == []
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), alone.state_dict().values()))
    assert (r["statement_f1"], r["hr_mae"]) == (r_alone["statement_f1"], r_alone["hr_mae"])
    assert 0 <= r["image_statement_f1"] <= 1 and 0 <= r["image_hr_mae"] < 100 and "image_hr_mae" not in r_alone


def test_the_image_scores_are_the_image_heads_answers_on_the_printouts():
    enc = ECGEncoder(EncoderConfig(d_model=32, n_layers=1, n_heads=2))
    img = ImageEncoder(ImageEncoderConfig(height=32, width=64, d_model=16, n_layers=1, n_heads=2))
    test = warmup.make_items("val", 4, 0, enc, img)
    heads = warmup.Heads(enc, img)
    with torch.no_grad():   # whatever the encoders give: the ECG head names no statement, the image head all of them
        heads.pooled.weight.zero_()
        heads.pooled.bias.fill_(-1.0)
        heads.image.weight.zero_()
        heads.image.bias.fill_(1.0)   # and a heart rate of 80 + 30 * 1 bpm
    r = warmup.score_heads(enc, img, heads, test)
    printed = [it for it in test if it.image is not None]
    true = torch.stack([it.statements for it in printed])
    hr = torch.stack([it.measures[0] for it in printed])
    assert printed and r["statement_f1"] == 0.0
    assert abs(r["image_statement_f1"] - 2 * true.sum().item() / (true.numel() + true.sum().item())) < 1e-9
    assert abs(r["image_hr_mae"] - (110.0 - hr).abs().mean().item()) < 1e-4


def test_command_line_saves_an_encoder_with_its_config(tmp_path, capsys):
    path = tmp_path / "enc.safetensors"
    warmup.main(["--steps", "2", "--train-patients", "3", "--test-patients", "2", "--eval-every", "2",
                 "--d-model", "32", "--layers", "1", "--save", str(path)])
    out = capsys.readouterr().out
    assert "statement micro F1" in out and "Sinus rhythm" in out and "--encoder_init" in out
    assert load_encoder_config(path) == EncoderConfig(d_model=32, n_layers=1)


def test_beat_f1_interval_is_the_f1_of_ecgs_drawn_again():
    counts = torch.tensor([[[2, 2, 2]], [[0, 1, 1]], [[0, 0, 0]]], dtype=torch.float64).transpose(1, 2)  # (3, 3, 1)
    f1, ci = warmup.beat_f1_interval(counts, draws=500)
    assert f1 == [2 * 2 / (3 + 3)]                          # all hits over all said and true
    assert 0 <= ci[0][0] < f1[0] < ci[0][1] == 1.0           # drawing the first ECG alone gives 1


def test_beat_tokens_are_decided_at_the_threshold_of_the_weighted_loss():
    # the loss weighs positives by w, so "beat" is logit > log(w): the same logits give a positive at
    # threshold 0 and none at a threshold above them
    enc = ECGEncoder(EncoderConfig(d_model=32, n_layers=1, n_heads=2))
    test = warmup.make_items("val", 3, 0, enc)
    heads = warmup.Heads(enc)
    with torch.no_grad():
        heads.beats.weight.zero_()
        heads.beats.bias.fill_(1.0)
    r = warmup.score_heads(enc, None, heads, test)
    n_tokens = sum(len(it.beats) for it in test)
    assert r["beat_n"][0] == sum(int(it.beats[:, 0].sum()) for it in test) > 0
    assert abs(r["beat_f1"][0] - 2 * r["beat_n"][0] / (n_tokens + r["beat_n"][0])) < 1e-9   # every token said "beat"
    lo, hi = r["beat_f1_95"][0]
    assert lo <= r["beat_f1"][0] <= hi and hi - lo > 0    # the ECGs drawn again: an interval around it
    heads.beat_threshold = torch.full((len(warmup.BEAT_CHANNELS),), 1.5)
    assert warmup.score_heads(enc, None, heads, test)["beat_f1"] == [0.0] * len(warmup.BEAT_CHANNELS)
