"""Tests for warmup.py, the encoder alone on the synthetic ground truth (train.py's warm-up,
and `python warmup.py` as a probe): it trains the encoders it is given, and its command line
saves an encoder that train.py --encoder_init reads."""

import torch

import warmup
from ecg_encoder import ECGEncoder, EncoderConfig, ImageEncoder, ImageEncoderConfig, load_encoder_config


def test_trains_the_encoders_it_is_given_and_scores_in_range():
    enc = ECGEncoder(EncoderConfig.tiny(d_model=32, n_layers=1, n_heads=2))
    before = {n: p.detach().clone() for n, p in enc.state_dict().items()}
    r = warmup.fit_encoder_to_truth(enc, warmup.WarmupConfig(steps=3, train_patients=4, test_patients=3, eval_every=3),
                                    desc=None, report=False)
    assert 0.0 <= r["statement_f1"] <= 1.0 and 0.0 <= r["hr_mae"] < 200.0 and len(r["beat_f1"]) == 5
    assert any(not torch.equal(before[n], p) for n, p in enc.state_dict().items())   # trained in place
    img = ImageEncoder(ImageEncoderConfig(height=32, width=64, d_model=16, n_layers=1, n_heads=2))
    before = img.pos_emb.detach().clone()
    r = warmup.fit_encoder_to_truth(enc, warmup.WarmupConfig(steps=2, train_patients=6, test_patients=6,
                                                             eval_every=2, seed=1), img, desc=None)
    assert 0.0 <= r["image_statement_f1"] <= 1.0 and not torch.equal(before, img.pos_emb)    # the image encoder learned


def test_command_line_saves_an_encoder_with_its_config(tmp_path, capsys):
    path = tmp_path / "enc.safetensors"
    warmup.main(["--steps", "2", "--train-patients", "3", "--test-patients", "2", "--eval-every", "2",
                 "--d-model", "32", "--layers", "1", "--save", str(path)])
    out = capsys.readouterr().out
    assert "statement micro F1" in out and "Sinus rhythm" in out and "--encoder_init" in out
    assert load_encoder_config(path) == EncoderConfig.tiny(d_model=32, n_layers=1)
