"""
Tests of the synthetic ECG generator (synthetic/generator.py): every claim a record makes about itself
is measured back from its samples with simple, independent code written here.

Measurements use clean records (noise=0) at 1 kHz: outside the waves the signal is
exactly 0, so the "runs" of non-zero activity around a beat are its P wave, QRS and T.
"""
import dataclasses
import math

import numpy as np
import pytest

from synthetic.generator import STANDARD_LEADS, make_patient, patient_history, synth_ecg, synth_truth

FS = 1000.0


def clean(findings, seed=0, duration=10.0, leads=None, **changes):
    p = dataclasses.replace(make_patient(seed, findings=findings), **changes)
    return synth_ecg(p, duration, FS, leads=leads, noise=0.0, seed=seed)


def runs(active):
    """[(first, last_exclusive), ...] of consecutive True samples."""
    edges = np.diff(np.r_[0, active.astype(np.int8), 0])
    return list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]))


def waves_around(record, r_sample, eps=1e-3):
    """The P, QRS and T runs of the beat whose R peak is at r_sample (isoelectric PR/ST)."""
    field = np.abs(record.signal).sum(axis=0)          # (samples,) all leads together
    spans = runs(field > eps)
    k = next(i for i, (a, b) in enumerate(spans) if a <= r_sample < b)
    return spans[k - 1], spans[k], spans[k + 1]


def interior_beats(truth, margin_s=1.0):
    s = truth.beat_samples
    return s[(s > margin_s * FS) & (s < truth.duration_s * FS - margin_s * FS)]


# ----------------------------------------------------------------------------- leads

def test_limb_lead_identities_hold_with_noise():
    rec, _ = synth_ecg(make_patient(3), 10, 500, noise=1.5, seed=3)
    x = dict(zip(rec.leads, rec.signal.astype(np.float64)))
    assert np.abs(x["III"] - (x["II"] - x["I"])).max() < 1e-5
    assert np.abs(x["aVR"] + (x["I"] + x["II"]) / 2).max() < 1e-5
    assert np.abs(x["aVL"] - (x["I"] - x["II"] / 2)).max() < 1e-5
    assert np.abs(x["aVF"] - (x["II"] - x["I"] / 2)).max() < 1e-5
    assert np.std(x["II"]) > 0.05                       # not trivially zero


def test_realistic_amplitudes_and_noise_levels():
    rec, truth = clean(set(), seed=5)
    ii = rec.signal[STANDARD_LEADS.index("II")]
    assert 0.5 < np.ptp(ii) < 3.0                       # QRS of a normal lead II, mV
    noisy, _ = synth_ecg(make_patient(5, findings=set()), 10, FS, noise={"emg": 0.05}, seed=5)
    resid = noisy.signal - rec.signal
    assert 0.04 < resid[STANDARD_LEADS.index("V1")].std() < 0.09   # emg at the level asked
    hum, _ = synth_ecg(make_patient(5, findings=set()), 10, FS, noise={"hum": 0.1}, seed=5, mains_hz=60)
    spectrum = np.abs(np.fft.rfft(hum.signal[0] - rec.signal[0]))
    assert abs(np.argmax(spectrum) * FS / hum.signal.shape[1] - 60) < 0.2


# ----------------------------------------------------------------------------- intervals

@pytest.mark.parametrize("findings,seed", [(set(), 1), ({"avb1"}, 2), ({"lbbb"}, 3), ({"rbbb"}, 4), ({"long_qt"}, 5)])
def test_measured_intervals_match_truth(findings, seed):
    rec, t = clean(findings, seed)
    for r in interior_beats(t):
        p, qrs, tw = waves_around(rec, r)
        assert abs((qrs[1] - qrs[0]) - t.qrs_ms) <= 4, "QRS width"
        assert abs((qrs[0] - p[0]) - t.pr_ms) <= 4, "PR interval"
        assert abs((tw[1] - qrs[0]) - t.qt_ms) <= 4, "QT interval"
    rr = np.diff(t.beat_samples).mean() / FS
    assert abs(t.qtc_ms - t.qt_ms / math.sqrt(rr)) <= 3, "QTc by Bazett"
    assert abs(t.hr_bpm - 60 / rr) < 1.0


def test_heart_rate_from_detected_r_peaks():
    for findings, word in [({"brady"}, "Sinus bradycardia"), ({"tachy"}, "Sinus tachycardia"), (set(), "Sinus rhythm")]:
        rec, t = clean(findings, 11)
        ii = rec.signal[STANDARD_LEADS.index("II")]
        peaks = [i for i in range(1, len(ii) - 1)
                 if ii[i] > 0.5 * ii.max() and ii[i] >= ii[i - 1] and ii[i] > ii[i + 1]]
        hr = 60 * FS / np.diff(peaks).mean()
        assert abs(hr - t.hr_bpm) < 3
        assert t.statements[0] == word


def test_axis_matches_truth():
    for axis in (-60, 10, 75, 120):
        rec, t = clean(set(), 2, axis_deg=axis)
        x = dict(zip(rec.leads, rec.signal.astype(np.float64)))
        area_i = area_avf = 0.0
        for r in interior_beats(t):
            _, (a, b), _ = waves_around(rec, r)
            area_i, area_avf = area_i + x["I"][a:b].sum(), area_avf + x["aVF"][a:b].sum()
        measured = math.degrees(math.atan2(area_avf * 2 / math.sqrt(3), area_i))
        assert abs(measured - t.axis_deg) < 3 and abs(t.axis_deg - axis) <= 1
        dev = "Left axis deviation" if axis < -30 else "Right axis deviation" if axis > 90 else None
        assert (dev in t.statements) if dev else not ({"Left axis deviation", "Right axis deviation"} & set(t.statements))


# ----------------------------------------------------------------------------- rhythms and findings

def test_af_irregular_without_p_waves_with_fibrillatory_baseline():
    rec, t = clean({"af"}, 7, duration=60, hr_bpm=70.0)
    rr = np.diff(t.beat_samples) / FS
    assert rr.std() / rr.mean() > 0.1, "irregular"
    assert np.abs(np.diff(rr)).mean() > 0.08, "irregularly irregular: no pattern"
    assert t.pr_ms is None and t.statements[0] == "Atrial fibrillation"
    sinus, ts = clean(set(), 7, duration=60, hr_bpm=70.0)

    def p_bump(record, truth):   # ensemble mean of lead II 300..80 ms before R, long RRs only
        ii = record.signal[STANDARD_LEADS.index("II")]
        r = truth.beat_samples[1:][np.diff(truth.beat_samples) > 0.75 * FS]
        return np.abs(np.mean([ii[x - 300:x - 80] for x in r], axis=0)).max()
    assert p_bump(sinus, ts) > 0.08 and p_bump(rec, t) < 0.04
    v1 = rec.signal[STANDARD_LEADS.index("V1")]
    gaps = [v1[a + 450:b - 250] for a, b in zip(t.beat_samples[:-1], t.beat_samples[1:]) if b - a > 800]
    assert np.mean([g.std() for g in gaps]) > 0.01, "fibrillatory waves between beats"


def test_flutter_sawtooth_at_atrial_rate():
    rec, t = clean({"flutter"}, 8, duration=20, flutter_ratio=4)
    ii = rec.signal[STANDARD_LEADS.index("II")].astype(np.float64)
    between = np.zeros_like(ii)                       # keep only T-end .. next QRS: pure flutter waves
    for r0, r1 in zip(t.beat_samples[:-1], t.beat_samples[1:]):
        between[r0 + int(t.qt_ms):r1 - 80] = 1.0
    spectrum = np.abs(np.fft.rfft((ii - ii.mean()) * between))
    freqs = np.fft.rfftfreq(len(ii), 1 / FS)
    band = (freqs > 3.5) & (freqs < 6.0)
    atrial_hz = freqs[band][np.argmax(spectrum[band])]
    p = make_patient(8, findings={"flutter"})
    assert abs(atrial_hz * 60 - p.flutter_rate) < 6
    assert abs(t.hr_bpm - p.flutter_rate / 4) < 2, "4:1 conduction"
    assert t.statements[0] == "Atrial flutter"


def test_pvc_premature_wide_with_compensatory_pause():
    rec, t = clean({"pvc"}, 9, duration=120, pvc_per_min=8.0)
    s, sym = t.beat_samples, np.array(t.beat_symbols)
    v = [k for k in np.nonzero(sym == "V")[0] if 1 <= k < len(s) - 1 and sym[k - 1] == sym[k + 1] == "N"]
    assert len(v) >= 5
    normal_rr = np.median(np.diff(s)[(sym[1:] == "N") & (sym[:-1] == "N")])
    for k in v:
        assert s[k] - s[k - 1] < 0.8 * normal_rr, "premature"
        assert abs((s[k + 1] - s[k - 1]) / (2 * normal_rr) - 1) < 0.12, "fully compensatory pause"
        _, (a, b), _ = waves_around(rec, s[k])
        assert b - a >= 120, "wide QRS"
    assert "Premature ventricular contractions" in t.statements


def test_pac_premature_narrow_with_non_compensatory_pause():
    rec, t = clean({"pac"}, 10, duration=120, pac_per_min=8.0)
    s, sym = t.beat_samples, np.array(t.beat_symbols)
    a_beats = [k for k in np.nonzero(sym == "A")[0] if 2 <= k < len(s) - 1 and sym[k - 2] == sym[k - 1] == "N"]
    normal_rr = np.median(np.diff(s)[(sym[1:] == "N") & (sym[:-1] == "N")])
    assert len(a_beats) >= 5
    coupling = [(s[k] - s[k - 1]) / (s[k - 1] - s[k - 2]) for k in a_beats]
    # modestly early, as real PACs are (MIT-BIH 100: 0.64-0.84 of the RR before, median 0.74)
    assert max(coupling) < 0.92 and min(coupling) > 0.58 and 0.68 < np.median(coupling) < 0.82
    for k in a_beats:
        local_rr = s[k - 1] - s[k - 2]
        assert 1.05 < (s[k + 1] - s[k]) / local_rr < 1.32, "sinus node reset: a little over one cycle after it"
        _, (a, b), _ = waves_around(rec, s[k])
        assert b - a == pytest.approx(t.qrs_ms, abs=4), "normal QRS"


@pytest.mark.parametrize("block,symbol", [("lbbb", "L"), ("rbbb", "R")])
def test_bundle_branch_blocks_wide_with_typical_shape(block, symbol):
    rec, t = clean({block}, 12)
    assert set(t.beat_symbols) == {symbol}
    x = dict(zip(rec.leads, rec.signal))
    for r in interior_beats(t):
        _, (a, b), _ = waves_around(rec, r)
        assert b - a >= 120
        v1, lead_i, v6 = x["V1"][a:b], x["I"][a:b], x["V6"][a:b]
        if block == "lbbb":   # deep QS in V1; broad R without a septal q in I and V6
            assert v1.min() < -0.5 and v1.max() < 0.1 * -v1.min()
            assert lead_i.min() > -0.05 and v6.min() > -0.05 and lead_i.max() > 0.3
        else:                 # late R' in V1, wide terminal S in I
            tail = slice(int(0.65 * (b - a)), None)
            assert v1[tail].max() > 0.3 and lead_i[tail].min() < -0.1


def test_st_elevation_depression_and_t_inversion():
    rec, t = clean({"st_elev"}, 13, st="elev_inferior", st_mv=0.25)
    reference, _ = clean({"st_elev"}, 13, st="none", st_mv=0.0)   # same beats, isoelectric ST
    x = dict(zip(rec.leads, rec.signal))
    for r in interior_beats(t):
        j = waves_around(reference, r)[1][1] + 40                 # 40 ms after the J point
        assert x["II"][j] > 0.1 and x["aVF"][j] > 0.1 and x["aVL"][j] < -0.05
    assert "ST elevation" in t.statements
    rec, t = clean({"st_depr"}, 14)
    assert "ST depression" in t.statements and t.lead_st_mv["V5"] <= -0.1
    rec, t = clean({"t_inv"}, 15, t_inv="diffuse")
    ii = rec.signal[STANDARD_LEADS.index("II")]
    for r in interior_beats(t):
        _, _, (a, b) = waves_around(rec, r)
        assert ii[a:b].min() < -0.1 and ii[a:b].max() < 0.02
    assert "T wave inversion" in t.statements


def test_low_voltage_and_normal_voltage():
    for low in (True, False):
        rec, t = clean({"low_voltage"} if low else set(), 16)
        limb = rec.signal[:6]
        p2p = [max(np.ptp(limb[i, a:b]) for r in interior_beats(t) for _, (a, b), _ in [waves_around(rec, r)])
               for i in range(6)]
        assert (max(p2p) < 0.5) == low
        assert ("Low QRS voltages" in t.statements) == low


def test_first_degree_block_and_long_qt_statements():
    _, t = clean({"avb1"}, 17)
    assert t.pr_ms > 200 and "1st degree A-V block" in t.statements
    _, t = clean({"long_qt"}, 18)
    assert t.qtc_ms > 470 and "Prolonged QT interval" in t.statements
    _, t = clean(set(), 19)
    assert t.statements == ["Sinus rhythm", "Normal ECG"]


# ----------------------------------------------------------------------------- determinism, leads, sizes

def test_same_seed_same_bytes_different_seed_differs():
    p = make_patient(21)
    a, ta = synth_ecg(p, 10, 500, seed=4)
    b, tb = synth_ecg(p, 10, 500, seed=4)
    c, _ = synth_ecg(p, 10, 500, seed=5)
    assert a.signal.tobytes() == b.signal.tobytes() and ta.beat_samples.tobytes() == tb.beat_samples.tobytes()
    assert a.signal.tobytes() != c.signal.tobytes()
    assert make_patient(21) == p and make_patient(22) != p


@pytest.mark.parametrize("findings", [set(), {"af", "pvc"}, {"flutter"}, {"pac", "lbbb"}, {"low_voltage", "rad"}])
def test_the_truth_alone_is_the_truth_of_the_record(findings):
    # building rows asks synth_truth, training reads synth_ecg's record: the two must tell the same beats and numbers
    for seed in range(3):
        p = make_patient(seed, findings=findings)
        leads = [["II"], ["I", "II", "V1"], list(STANDARD_LEADS)][seed]
        _, truth = synth_ecg(p, 23.5, [100, 257.3, 500][seed], leads=leads, noise=1.3, seed=seed + 40)
        alone = synth_truth(p, 23.5, [100, 257.3, 500][seed], leads=leads, seed=seed + 40)
        for f in dataclasses.fields(truth):
            a, b = getattr(truth, f.name), getattr(alone, f.name)
            assert (a.dtype == b.dtype and np.array_equal(a, b)) if isinstance(a, np.ndarray) else a == b, f.name
        ectopics = {sym for finding, sym in [("pac", "A"), ("pvc", "V")] if finding in findings}
        assert len(truth.beat_samples) > 10 and set(truth.beat_symbols) >= ectopics
    with pytest.raises(ValueError, match="unknown leads"):
        synth_truth(make_patient(0), 10, 500, leads=["V7"])


def test_lead_subsets_match_the_12_lead_record():
    p = make_patient(23)
    full, _ = synth_ecg(p, 10, 250, seed=1)
    for leads in (["II"], ["I"], ["II", "V5"], ["V1", "aVF"]):
        part, truth = synth_ecg(p, 10, 250, leads=leads, seed=1)
        assert part.leads == leads and part.signal.dtype == np.float32
        for k, name in enumerate(leads):
            assert np.array_equal(part.signal[k], full.signal[STANDARD_LEADS.index(name)])
    _, one = synth_ecg(make_patient(0, findings={"low_voltage", "lad"}), 10, 250, leads=["II"], seed=1)
    assert not {"Low QRS voltages", "Left axis deviation"} & set(one.statements), "not visible in one lead"


@pytest.mark.parametrize("fs,duration", [(50, 10), (128, 10), (257.3, 12.5), (10000, 10)])
def test_any_rate_and_duration(fs, duration):
    rec, t = synth_ecg(make_patient(24), duration, fs, leads=["I", "II"], seed=2)
    assert rec.signal.shape == (2, round(duration * fs)) and rec.fs == fs
    assert t.beat_samples.min() >= 0 and t.beat_samples.max() < rec.signal.shape[1]
    assert abs(t.hr_bpm - make_patient(24).hr_bpm) < 8


def test_one_hour_two_lead_holter():
    p = make_patient(25, findings={"pvc"})
    rec, t = synth_ecg(p, 3600, 250, leads=["II", "V5"], seed=3)
    assert rec.signal.shape == (2, 900000)
    assert abs(len(t.beat_samples) - p.hr_bpm * 60) < 0.05 * p.hr_bpm * 60
    assert t.beat_symbols.count("V") > 100 and np.all(np.diff(t.beat_samples) > 0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown leads"):
        synth_ecg(make_patient(0), 10, 500, leads=["II", "V7"])
    with pytest.raises(ValueError, match="unknown findings"):
        make_patient(0, findings={"stemi"})
    with pytest.raises(ValueError, match="not simulated together"):
        make_patient(0, findings={"af", "pac"})
    with pytest.raises(ValueError, match="noise"):
        synth_ecg(make_patient(0), 10, 500, noise={"wind": 1})


def test_patient_history_evolves():
    p = make_patient(26, findings=set())
    visits = patient_history(p, 6, seed=3, change_prob=1.0)
    assert len(visits) == 6 and visits[0] == (0, p, None)
    days = [d for d, _, _ in visits]
    assert days == sorted(days) and len(set(days)) == 6
    events = [e for _, _, e in visits[1:]]
    assert all(events) and len(set(events)) == len(events), "each change happens once"
    first, last = synth_ecg(p, 10, 100, seed=0)[1], synth_ecg(visits[-1][1], 10, 100, seed=0)[1]
    assert first.statements != last.statements


@pytest.mark.parametrize("rhythm", ["af", "flutter"])
def test_pvcs_in_af_and_flutter_come_early(rhythm):
    _, t = clean({rhythm, "pvc"}, 27, duration=120, pvc_per_min=10.0)
    s, sym = t.beat_samples, np.array(t.beat_symbols)
    v = [k for k in np.nonzero(sym == "V")[0] if 1 <= k and sym[k - 1] != "V"]
    assert len(v) >= 5
    assert np.median([s[k] - s[k - 1] for k in v]) < 0.8 * np.median(np.diff(s)[sym[1:] == "N"])
