"""Tests for ecg_encoder.py: batch invariance, lead handling, lengths, absolute time,
window independence, gradients, bad input, weights I/O. Tiny preset, CPU, fp32."""

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bench.speed import count_flops, internal_tokens
from data import STANDARD_LEADS, load_ecg, prepare_ecg
from ecg_encoder import (ECGEncoder, EncoderConfig, Projector, beat_templates, beat_times, load_encoder_config,
                         load_encoder_weights, rhythm_features, save_encoder_weights, template_span)

PHYSIONET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "physionet"
FS = 100  # the tiny preset's rate; the tests state expectations in seconds and samples


def make_encoder(seed=0, **kw):
    torch.manual_seed(seed)
    return ECGEncoder(EncoderConfig(**kw)).eval()


def ecg(n_leads, seconds, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_leads, round(seconds * FS), generator=g)


def encode(enc, signals, leads, **kw):
    with torch.no_grad():
        return enc(signals, leads, **kw)


def maxdiff(a, b):
    return (a - b).abs().max().item()


# --- batch invariance --------------------------------------------------------

MIXED = [  # (leads, seconds): lengths not multiples of the window, various lead sets
    (list(STANDARD_LEADS), 23.7),
    (["II"], 65.43),
    (["I", "V1"], 8.0),
    (list(STANDARD_LEADS), 10.0),
    (list(STANDARD_LEADS), 37.3),
    (["V5", "II", "aVF"], 0.55),
]


def test_alone_equals_mixed_batch():
    enc = make_encoder()
    signals = [ecg(len(l), s, seed=i) for i, (l, s) in enumerate(MIXED)]
    leads = [l for l, _ in MIXED]
    batch = encode(enc, signals, leads)
    for x, l, y in zip(signals, leads, batch):
        alone = encode(enc, [x], [l])[0]
        assert alone.shape == y.shape
        assert maxdiff(alone, y) <= 1e-5


# --- leads ---------------------------------------------------------------------

def test_dropping_a_lead_is_not_zeroing_it():
    enc = make_encoder()
    x = ecg(12, 10, seed=1)
    zeroed = x.clone()
    zeroed[6] = 0.0  # V1 flat
    keep = [i for i in range(12) if i != 6]
    t_zeroed = encode(enc, [zeroed], [list(STANDARD_LEADS)])[0]
    t_dropped = encode(enc, [x[keep]], [[STANDARD_LEADS[i] for i in keep]])[0]
    assert t_zeroed.shape == t_dropped.shape  # output count does not depend on lead count
    assert maxdiff(t_zeroed, t_dropped) > 1e-2


def test_lead_order_does_not_matter():
    enc = make_encoder()
    x = ecg(3, 12, seed=2)
    a = encode(enc, [x], [["I", "II", "V2"]])[0]
    b = encode(enc, [x[[2, 0, 1]]], [["V2", "I", "II"]])[0]
    assert maxdiff(a, b) <= 1e-5


def test_one_lead_costs_less_than_twelve():
    enc = make_encoder()
    n = 10 * FS
    # 0.5 s patches per lead: 10 s is 20 tokens per lead
    assert internal_tokens(enc, n, 1) == 20
    assert internal_tokens(enc, n, 12) == 240

    def flops(n_leads):
        return count_flops(lambda: encode(enc, [ecg(n_leads, 10, seed=3)], [list(STANDARD_LEADS[:n_leads])]))

    one, twelve = flops(1), flops(12)
    # measured, not computed by the encoder: 12x the tokens, 144x the attention pairs
    assert one > 0 and twelve > 12 * one


def test_amplitude_and_offset_are_seen():
    # no per-lead min-max: low voltage and an ST-like level shift must change the tokens
    enc = make_encoder()
    x = ecg(2, 10, seed=4)
    base = encode(enc, [x], [["I", "II"]])[0]
    assert maxdiff(base, encode(enc, [0.3 * x], [["I", "II"]])[0]) > 1e-2
    assert maxdiff(base, encode(enc, [x + 0.2], [["I", "II"]])[0]) > 1e-2


# --- lengths -------------------------------------------------------------------

@pytest.mark.parametrize("tps", [2.0, 1.0, 0.5])
def test_num_tokens_matches_forward(tps):
    enc = make_encoder(tokens_per_second=tps)
    samples_per_token = FS / tps
    lengths = [50, 51, 99, 100, 101, 999, 1000, 1001, 1999, 2000, 2001, 2049, 4567]
    outs = encode(enc, [ecg(1, n / FS, seed=n) for n in lengths], [["II"]] * len(lengths))
    for n, y in zip(lengths, outs):
        expected = math.ceil(n / samples_per_token)
        assert enc.num_tokens(n) == expected
        assert y.shape == (expected, enc.cfg.d_model)


def test_flops_grow_linearly_with_duration_and_none_go_to_padding():
    enc = make_encoder()
    flops = {s: count_flops(lambda: encode(enc, [ecg(1, s, seed=1)], [["II"]])) for s in (10, 60, 600)}
    assert flops[60] == 6 * flops[10] and flops[600] == 60 * flops[10]          # counted, not computed by the encoder
    # a batch of mixed lengths and lead sets costs exactly what its ECGs cost one by one: no padded attention
    batch = [(ecg(12, 23.7, 1), list(STANDARD_LEADS)), (ecg(1, 65.4, 2), ["II"]), (ecg(2, 8.0, 3), ["I", "V1"])]
    alone = sum(count_flops(lambda: encode(enc, [x], [names])) for x, names in batch)
    together = count_flops(lambda: encode(enc, [x for x, _ in batch], [names for _, names in batch]))
    assert together == alone


def test_output_length_scales_with_duration():
    enc = make_encoder()
    t10, t60 = encode(enc, [ecg(1, 10, 5), ecg(1, 60, 6)], [["I"], ["I"]])
    assert len(t10) == 20 and len(t60) == 6 * len(t10)  # 2 tokens per second


# --- time ----------------------------------------------------------------------

def test_absolute_time_is_encoded():
    # the same 10 s of signal at 0 s and at 10 s: windows are independent, so only
    # the time code can tell them apart
    enc = make_encoder()
    x = ecg(1, 10, seed=7)
    early = encode(enc, [x], [["II"]])[0]
    late = encode(enc, [torch.cat([ecg(1, 10, seed=8), x], dim=1)], [["II"]])[0][20:]
    assert early.shape == late.shape and maxdiff(early, late) > 1e-2
    # an hour later is also distinguishable
    hour = encode(enc, [torch.cat([torch.zeros(1, 3600 * FS), x], dim=1)], [["II"]])[0][-20:]
    assert maxdiff(early, hour) > 1e-2 and maxdiff(late, hour) > 1e-2


@pytest.mark.parametrize("tps", [2.0, 1.0])
def test_absolute_time_code_is_added_at_the_output(tps):
    # with the final LayerNorm zeroed, everything the blocks compute is gone and what remains at the output is the
    # time code of each token's start, written out here from its definition: sin and cos of 2 pi t / P for periods P
    # geometric from twice the patch length (1 s) to 4 h
    enc = make_encoder(tokens_per_second=tps)
    with torch.no_grad():
        enc.ln_f.weight.zero_()
        enc.ln_f.bias.zero_()
    out = encode(enc, [ecg(2, 25, seed=1)], [["I", "II"]])[0].double()                # (n, C)
    t = torch.arange(len(out), dtype=torch.float64) / tps                             # token start times, s
    periods = torch.logspace(0, math.log10(4 * 3600), enc.cfg.d_model // 2, dtype=torch.float64)
    angle = 2 * math.pi * t[:, None] / periods[None, :]
    assert len(out) == 25 * tps and (out - torch.cat([angle.sin(), angle.cos()], dim=1)).abs().max() < 1e-5


@pytest.mark.parametrize("tps, seconds", [(1.0, 10.5), (0.5, 10.5), (0.5, 21.0)])
def test_a_short_last_token_is_the_mean_of_its_own_patches(tps, seconds):
    # the final LayerNorm set to give 1 for every patch: each token, before its time code, is a mean of ones = 1,
    # the last one too though it holds fewer patches than the pool (10.5 s: one 0.5 s patch after the 10 s window)
    enc = make_encoder(tokens_per_second=tps)
    with torch.no_grad():
        enc.ln_f.weight.zero_()
        enc.ln_f.bias.fill_(1.0)
    out = encode(enc, [ecg(2, seconds, seed=3)], [["I", "II"]])[0].double()
    t = torch.arange(len(out), dtype=torch.float64) / tps                             # token start times, s
    periods = torch.logspace(0, math.log10(4 * 3600), enc.cfg.d_model // 2, dtype=torch.float64)
    angle = 2 * math.pi * t[:, None] / periods[None, :]
    tokens = out - torch.cat([angle.sin(), angle.cos()], dim=1)                       # the time code taken off
    assert len(out) == math.ceil(seconds * tps) and seconds * tps % 1                 # a short last token, indeed
    assert (tokens - 1).abs().max() < 1e-5


def test_windows_are_independent():
    enc = make_encoder(rhythm=False, template=False)  # the attention; the beat features measure across borders
    x = ecg(2, 45, seed=9)
    y = x.clone()
    y[:, 2000:3000] += 1.0  # change samples of window 3 only (20-30 s)
    a, b = encode(enc, [x, y], [["I", "II"]] * 2)
    assert maxdiff(a[:40], b[:40]) <= 1e-6   # windows 1 and 2: tokens 0-39
    assert maxdiff(a[60:], b[60:]) <= 1e-6   # windows 4 and 5
    assert maxdiff(a[40:60], b[40:60]) > 1e-2


# --- beat timing (rhythm features) ----------------------------------------------

def pulse_train(onsets_s, seconds, n_leads=2):
    """A flat ECG with a 60 ms, 1 mV triangular QRS at each onset (s)."""
    x = torch.zeros(n_leads, round(seconds * FS))
    for t in onsets_s:
        i = round(t * FS)
        x[:, i:i + 3] += torch.tensor([0.5, 1.0, 0.5])
    return x


def test_rhythm_features_measure_an_early_beat_and_a_pause():
    onsets = [0.2 + k for k in range(5)] + [4.9] + [5.9 + k for k in range(4)]  # RR 1 s; the 6th comes at 0.7 s
    f = rhythm_features(pulse_train(onsets, 10), FS, 50, 20)  # (20 patches of 0.5 s, 5)
    assert f[:, 0].sum() == len(onsets) and f[9, 0] == 1  # each beat in its patch: 4.9 s is patch 9
    assert f[9, 1] == pytest.approx(-3, abs=0.2)         # 0.7 of the median RR: 3 tenths early
    assert f[9, 2] == pytest.approx(0, abs=0.2)          # reset: the next RR is normal
    assert f[8, 2] == pytest.approx(-3, abs=0.2)         # the beat before it (4.2 s) is followed early
    assert f[9, 3] == pytest.approx(10 - 8, abs=0.2)     # the local median RR, 1 s, in tenths from 0.8 s
    assert f[9, 4] == pytest.approx(10 * 0.6 / 8, abs=0.05)  # RR changes 0.3 s twice in 8 changes
    assert (f[[0, 2, 4], 1:3].abs() < 0.2).all() and (f[[1, 3, 5]] == 0).all()  # on time; no beat
    compensated = [0.2 + k for k in range(5)] + [4.9, 6.2, 7.2, 8.2, 9.2]  # a PVC's full compensatory pause
    assert rhythm_features(pulse_train(compensated, 10), FS, 50, 20)[9, 2] == pytest.approx(3, abs=0.2)


def test_rhythm_features_change_the_tokens_and_can_be_left_out():
    x = pulse_train([0.2 + k for k in range(10)], 10)
    y = pulse_train([0.2 + k for k in range(5)] + [4.9] + [5.9 + k for k in range(4)], 10)
    a, b = encode(make_encoder(), [x, y], [["I", "II"]] * 2)
    assert maxdiff(a[9:11], b[9:11]) > 1e-2  # the early beat's tokens
    assert ECGEncoder(EncoderConfig(rhythm=False)).rhythm_proj is None


def test_beat_templates_average_each_windows_beats_over_its_baseline():
    onsets = [0.5 + 0.8 * k for k in range(12)]  # 12 beats in the first 10 s window, none in the second
    x = pulse_train(onsets, 15)
    x[1] += 0.3  # lead 2 sits 0.3 mV up: the baseline is taken off
    for t in onsets:  # an ST shift of +0.2 mV, 100-200 ms after each QRS, in lead 1 only
        x[0, round((t + 0.1) * FS):round((t + 0.2) * FS)] += 0.2
    beats = beat_times(x, FS)
    tpl = beat_templates(x, beats, FS, window=10 * FS)  # (2 leads, 2 windows, samples)
    a, b = template_span(FS)
    assert tpl.shape == (2, 2, a + b)
    assert (tpl[:, 1] == 0).all()  # no beat in the second window
    peak = tpl[1, 0].argmax().item()
    assert abs(peak - a) <= 2 and tpl[1, 0, peak] == pytest.approx(1.0, abs=1e-5)  # the QRS at its place, its height
    st = slice(peak + 10, peak + 18)  # inside each beat's 100-200 ms after its onset
    assert torch.allclose(tpl[0, 0, st], torch.full((8,), 0.2)) and (tpl[1, 0, st].abs() < 1e-6).all()
    assert tpl[:, 0, :peak - 3].abs().max() < 1e-6  # flat before the QRS: the baseline is 0 in both leads


def test_beat_templates_change_the_tokens_and_can_be_left_out():
    onsets = [0.5 + 0.8 * k for k in range(12)]
    x, y = pulse_train(onsets, 10), pulse_train(onsets, 10)
    for t in onsets:  # the same beats with an ST shift: the same beat timing, another average beat
        y[:, round((t + 0.1) * FS):round((t + 0.2) * FS)] += 0.2
    with_t = make_encoder()
    a, b = encode(with_t, [x, y], [["I", "II"]] * 2)
    assert maxdiff(a, b) > 1e-2
    without = make_encoder(template=False)
    assert without.template_proj is None and set(without.state_dict()) < set(with_t.state_dict())


def test_beat_times_find_the_synthetic_beats():
    from synthetic.tasks import build_synthetic_dataset
    ds = build_synthetic_dataset(40, seed=3, split="train", tasks=["report"])
    found = total = extra = 0
    for row in ds.rows:
        _, truth = ds.record(row["ecg_path"][0])
        ecg = ds.inputs(row)[0]
        t = beat_times(torch.from_numpy(ecg.signal.astype("float32")), FS).numpy()
        true = np.asarray(truth.beat_samples) / truth.fs * FS
        near = np.abs(true[:, None] - t[None, :]) < 0.15 * FS  # (true, found): within a wide QRS
        found, total, extra = found + near.any(1).sum(), total + len(true), extra + (~near.any(0)).sum()
    assert found >= 0.96 * total and extra <= 0.04 * total, (found, extra, total)


@pytest.mark.skipif(not (PHYSIONET / "100.atr").exists(), reason="../shared/data/physionet/100 is not here")
def test_beat_times_find_every_beat_of_mit_bih_100():
    wfdb = pytest.importorskip("wfdb")
    rec = prepare_ecg(load_ecg(PHYSIONET / "100"), fs=FS)
    t = beat_times(torch.from_numpy(rec.signal), FS).numpy()
    ann = wfdb.rdann(str(PHYSIONET / "100"), "atr")
    beat = np.isin(ann.symbol, list("NLRAaJSVEFjfe/Q"))
    true = ann.sample[beat] / 360 * FS
    nearest = np.abs(true[:, None] - t[None, :]).min(1)  # (beats,)
    assert len(t) == len(true) and (nearest < 0.1 * FS).all()
    pacs = [np.abs(t - s).argmin() for s in true[np.array(ann.symbol)[beat] == "A"]]
    f = rhythm_features(torch.from_numpy(rec.signal), FS, 50, -(-rec.signal.shape[1] // 50))
    assert (f[t[pacs] // 50, 1] < -1.2).all()  # every one of its 33 PACs is measured early


# --- training ------------------------------------------------------------------

def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    enc = ECGEncoder(EncoderConfig(dropout=0.1)).train()
    proj = Projector(enc.cfg.d_model, 48)
    out = enc([ecg(12, 12.5, 10), ecg(1, 3, 11)], [list(STANDARD_LEADS), ["aVR"]])
    loss = proj(torch.cat(out)).pow(2).mean()
    loss.backward()
    for name, p in list(enc.named_parameters()) + list(proj.named_parameters()):
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# --- bad input -----------------------------------------------------------------

def test_shorter_than_one_patch():
    enc = make_encoder()
    with pytest.raises(ValueError, match="shorter than one patch.*50 samples"):
        enc([torch.randn(1, 49)], [["I"]])


def test_unknown_lead():
    enc = make_encoder()
    with pytest.raises(ValueError, match="unknown lead 'MLII'.*aVR"):
        enc([torch.randn(2, 500)], [["I", "MLII"]])


def test_lead_count_mismatch():
    enc = make_encoder()
    with pytest.raises(ValueError, match="3 signal rows but 2 lead names"):
        enc([torch.randn(3, 500)], [["I", "II"]])
    with pytest.raises(ValueError, match="duplicate"):
        enc([torch.randn(2, 500)], [["I", "I"]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input(bad):
    enc = make_encoder()
    x = torch.randn(1, 500)
    x[0, 123] = bad
    with pytest.raises(ValueError, match="ECG 1: .*NaN or Inf"):
        enc([torch.randn(1, 500), x], [["I"], ["II"]])


# --- weights -------------------------------------------------------------------

def test_weights_round_trip(tmp_path):
    enc = make_encoder(seed=0)
    path = tmp_path / "enc.safetensors"
    save_encoder_weights(enc, path, enc.cfg)
    other = make_encoder(seed=1)
    x = [ecg(3, 11, 12)]
    names = [["I", "II", "V6"]]
    assert maxdiff(encode(enc, x, names)[0], encode(other, x, names)[0]) > 1e-3
    load_encoder_weights(other, path)
    assert maxdiff(encode(enc, x, names)[0], encode(other, x, names)[0]) == 0.0
    assert load_encoder_config(path) == enc.cfg


def test_a_file_from_before_the_beat_templates_loads_as_it_was_written(tmp_path):
    old = make_encoder(template=False)
    cfg = {k: v for k, v in asdict(old.cfg).items() if k != "template"}  # as such files hold it
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(path), {"config": json.dumps(cfg)})
    assert load_encoder_config(path).template is False
    load_encoder_weights(ECGEncoder(load_encoder_config(path)), path)


def test_mismatched_weights_name_the_keys(tmp_path):
    path = tmp_path / "enc.safetensors"
    save_encoder_weights(make_encoder(n_layers=4), path)
    with pytest.raises(ValueError, match=r"unexpected keys: \['blocks\.3\.ln1\.bias'"):
        load_encoder_weights(make_encoder(n_layers=3), path)
    with pytest.raises(ValueError, match=r"missing keys: \['blocks\.4\.ln1\.bias'"):
        load_encoder_weights(make_encoder(n_layers=5), path)
    msg = r"shape mismatches: \['lead_emb\.weight: file \(12, 128\) vs model \(3, 128\)"
    with pytest.raises(ValueError, match=msg):
        load_encoder_weights(make_encoder(leads=("I", "II", "III")), path)
    poisoned = make_encoder(n_layers=4)
    with torch.no_grad():
        poisoned.blocks[1].proj.weight[0, 0] = float("nan")
    save_encoder_weights(poisoned, path)
    with pytest.raises(ValueError, match=r"enc\.safetensors: non-finite values \(NaN/Inf\) in \['blocks\.1\.proj\.weight'\]"):
        load_encoder_weights(make_encoder(n_layers=4), path)
