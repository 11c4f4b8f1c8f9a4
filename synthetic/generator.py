"""
synthetic/generator.py — a synthetic 12-lead ECG generator with exact ground truth.

The heart is one electrical dipole, a 3-D vector that sweeps through a fixed sequence of waves every beat
(P, the QRS components, ST, T). Every lead is that vector projected onto the lead's direction, so the
limb-lead identities (III = II - I, aVR = -(I+II)/2, aVL = I - II/2, aVF = II - I/2) hold by construction.
Each wave is a smooth bump with compact support, so the PR, QRS and QT a record claims are exactly the ones
drawn in its samples. Rhythms (sinus with heart-rate variability, AF, flutter, PACs, PVCs) decide *when*
beats happen; beat types (normal, LBBB, RBBB, PAC, PVC) decide *what* each beat looks like. Noise (baseline
wander, mains hum, muscle noise) is added per electrode, so the limb-lead identities survive it too.

Reading order: leads -> wave shapes -> patients -> beat morphology -> rhythms -> rendering -> noise ->
ground truth and report statements -> `synth_ecg` -> patients over time. `python -m synthetic.draw` draws them.
Coordinates: x = patient's left, y = towards the feet, z = anterior.
"""
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from data import STANDARD_LEADS, ECGRecord

LIMB_LEADS, CHEST_LEADS = STANDARD_LEADS[:6], STANDARD_LEADS[6:]
# The thresholds a machine reader applies: the report statements here, the task texts (synthetic/tasks.py) too
SLOW_BPM, FAST_BPM = 60, 100                # sinus bradycardia below, tachycardia above
LONG_PR_MS = 200                            # 1st degree A-V block above
WIDE_QRS_MS = 120                           # a bundle branch block's QRS, at or above
LONG_QTC_MS = 470                           # prolonged QT above
LEFT_AXIS, RIGHT_AXIS = -30, 90             # axis deviation beyond, degrees
LOW_VOLTAGE_MV = 0.5                        # low QRS voltages below, in every limb lead
ST_SHIFT_MV = 0.1                           # ST elevation / depression at or beyond
T_INVERTED_MV = -0.05                       # an inverted T wave, at or below
T_UPRIGHT_LEADS = ["I", "II", "V3", "V4", "V5", "V6"]   # where a normal T is always upright


# --------------------------------------------------------------------------- leads
# Lead I looks along +x, lead II 60 degrees below it (Einthoven's triangle); the other limb leads follow
# from these two. Chest leads use Dower's transform from the vectorcardiogram (Dower et al. 1980, with
# Frank's posterior Z flipped to anterior): V1 looks right-anterior, V6 left-lateral, and V2-V4 are large
# because they sit close.
_I, _II = np.array([1.0, 0.0, 0.0]), np.array([0.5, math.sqrt(3) / 2, 0.0])
LEAD_VECTORS = {   # name -> (3,) projection vector
    "I": _I, "II": _II, "III": _II - _I, "aVR": -(_I + _II) / 2, "aVL": _I - _II / 2, "aVF": _II - _I / 2,
    "V1": np.array([-0.515, 0.157, 0.917]), "V2": np.array([0.044, 0.164, 1.387]),
    "V3": np.array([0.882, 0.098, 1.277]), "V4": np.array([1.213, 0.127, 0.601]),
    "V5": np.array([1.125, 0.127, 0.086]), "V6": np.array([0.831, 0.076, -0.230])}


# --------------------------------------------------------------------------- wave shapes
def bump(u, peak_at=0.5, power=2.0):
    """Smooth hump on u in [0, 1], zero outside, peak 1 at u = peak_at: sin(pi * u**g)**power with g chosen so
    the peak lands at peak_at; power > 1 makes the ends flat (so onset/offset are where the wave really is)."""
    g = math.log(0.5) / math.log(peak_at)
    inside, out = (u > 0) & (u < 1), np.zeros_like(u)
    out[inside] = np.sin(np.pi * u[inside] ** g) ** power
    return out


def plateau(u, taper=0.25):
    """Flat-topped window on [0, 1] with raised-cosine ramps (for ST-segment shifts)."""
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.clip(np.minimum(u, 1 - u) / taper, 0, 1))
    return np.where((u > 0) & (u < 1), ramp, 0.0)


class Wave(NamedTuple):
    kind: str           # "P", "QRS", "ST" or "T"
    start: float        # seconds relative to QRS onset
    end: float
    vector: np.ndarray  # (3,) dipole direction and size, mV
    peak_at: float = 0.5
    power: float = 2.0

    def shape(self, u):
        return plateau(u) if self.kind == "ST" else bump(u, self.peak_at, self.power)


def waves_of(waves, kind):
    return [w for w in waves if w.kind == kind]


# --------------------------------------------------------------------------- patients
FINDINGS = ("brady", "tachy", "af", "flutter", "pac", "pvc", "lbbb", "rbbb", "avb1",
            "st_elev", "st_depr", "t_inv", "long_qt", "low_voltage", "lad", "rad")


@dataclass(frozen=True)
class Patient:
    """Everything that fixes how one simulated person's ECG looks (intervals in ms)."""
    pid: str
    morph_seed: int                 # per-person jitter of wave directions and sizes
    age: int = 60
    sex: str = "male"
    rhythm: str = "sinus"           # sinus | af | flutter
    hr_bpm: float = 72.0
    hrv: float = 0.03               # relative size of respiratory/slow RR modulation
    pr_ms: float = 160.0
    p_ms: float = 100.0
    qrs_ms: float = 90.0
    qtc_ms: float = 410.0
    axis_deg: float = 50.0          # frontal direction of the main QRS force
    conduction: str = "normal"      # normal | lbbb | rbbb
    pac_per_min: float = 0.0
    pvc_per_min: float = 0.0
    st: str = "none"                # none | elev_inferior | elev_anterior | elev_lateral | depr
    st_mv: float = 0.0
    t_inv: str = "none"             # none | diffuse | inferior | anterior
    low_voltage: bool = False
    flutter_rate: float = 300.0     # atrial beats per minute in flutter
    flutter_ratio: int = 2          # conducted 1 in N flutter waves; 0 = variable 2-4


_NOT_TOGETHER = [("af", "flutter"), ("brady", "tachy"), ("lbbb", "rbbb"), ("lad", "rad"), ("st_elev", "st_depr")] + [
    (r, x) for r in ("af", "flutter") for x in ("brady", "tachy", "pac", "avb1")] + [
    (b, x) for b in ("lbbb", "rbbb") for x in ("st_elev", "st_depr", "t_inv")]   # a block's own ST-T wins


def _pick(rng, options, probs):
    return options[rng.choice(len(options), p=probs)]


def make_patient(seed, findings=None, pid=None):
    """A random simulated person; `seed` is an int or np.random.Generator. findings=None draws findings at
    realistic-ish rates; a set of FINDINGS names forces exactly those (e.g. {"af", "lbbb"}). Values keep margins
    from the report thresholds (HR 60/100, PR 200, QRS 120, QTc 470, axis -30/90), so every label is unambiguous."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    f = set(findings) if findings is not None else _draw_findings(rng)
    if unknown := f - set(FINDINGS):
        raise ValueError(f"unknown findings {sorted(unknown)}; known: {FINDINGS}")
    if clash := [(a, b) for a, b in _NOT_TOGETHER if a in f and b in f]:
        raise ValueError(f"findings {clash} are not simulated together")
    u = rng.uniform
    rhythm = "af" if "af" in f else "flutter" if "flutter" in f else "sinus"
    hr = u(42, 54) if "brady" in f else u(106, 145) if "tachy" in f else u(62, 95)
    if rhythm == "af":
        hr = u(65, 130)
    conduction = "lbbb" if "lbbb" in f else "rbbb" if "rbbb" in f else "normal"
    qrs = u(135, 170) if conduction == "lbbb" else u(128, 160) if conduction == "rbbb" else u(78, 104)
    pr = u(220, 320) if "avb1" in f else u(130, 188)
    st = (_pick(rng, ["elev_inferior", "elev_anterior", "elev_lateral"], [0.4, 0.4, 0.2]) if "st_elev" in f
          else "depr" if "st_depr" in f else "none")
    axis = u(-75, -45) if "lad" in f else u(105, 150) if "rad" in f else u(-5, 75)
    return Patient(
        pid=pid or f"p{int(rng.integers(1e9)):09d}", morph_seed=int(rng.integers(2**31)), age=int(u(20, 90)),
        sex=_pick(rng, ["male", "female"], [0.5, 0.5]), rhythm=rhythm, hr_bpm=round(float(hr), 1),
        hrv=u(0.015, 0.05), pr_ms=round(pr), p_ms=round(min(u(85, 110), pr - 35)), qrs_ms=round(qrs),
        qtc_ms=round(u(490, 560) if "long_qt" in f else u(385, 445)), axis_deg=round(axis), conduction=conduction,
        pac_per_min=u(4, 14) if "pac" in f else 0.0, pvc_per_min=u(4, 14) if "pvc" in f else 0.0,
        st=st, st_mv=u(0.15, 0.35) if st != "none" else 0.0,
        t_inv=_pick(rng, ["diffuse", "inferior", "anterior"], [0.4, 0.3, 0.3]) if "t_inv" in f else "none",
        low_voltage="low_voltage" in f, flutter_rate=u(260, 330), flutter_ratio=_pick(rng, [2, 4, 0], [0.4, 0.4, 0.2]))


def _draw_findings(rng):
    """Findings at rates that give every label enough examples to learn from."""
    f = {_pick(rng, ["sinus", "af", "flutter"], [0.74, 0.17, 0.09])}   # None and "sinus" are taken out at the end
    if "sinus" in f:
        f.add(_pick(rng, [None, "brady", "tachy"], [0.6, 0.2, 0.2]))
        f |= {x for x, p in [("avb1", 0.15), ("pac", 0.2)] if rng.random() < p}
    if rng.random() < 0.18:
        f.add("pvc")
    f.add(_pick(rng, [None, "lbbb", "rbbb"], [0.72, 0.14, 0.14]))
    if not f & {"lbbb", "rbbb"}:            # primary ST-T changes only without a block
        f.add(_pick(rng, [None, "st_elev", "st_depr"], [0.76, 0.12, 0.12]))
        if "st_elev" not in f and rng.random() < 0.14:
            f.add("t_inv")
    f |= {x for x, p in [("long_qt", 0.14), ("low_voltage", 0.12)] if rng.random() < p}
    f.add(_pick(rng, [None, "lad", "rad"], [0.82, 0.11, 0.07]))
    return f - {None, "sinus"}


# --------------------------------------------------------------------------- beat morphology
# Times are seconds relative to QRS onset. Each QRS is a few overlapping bumps whose directions rotate like
# the real activation front: septum (right, anterior), apex, free wall (left, inferior), base (up, back).
# Bundle branch blocks reorder and slow it.
def _frontal(angle_deg, size, z=0.0):
    a = math.radians(angle_deg)
    return np.array([size * math.cos(a), size * math.sin(a), z])


def _qrs_waves(p, q):
    """QRS components of a supraventricular beat, spanning exactly [0, q] seconds."""
    if p.conduction == "lbbb":   # septum fires right-to-left, then a slow leftward sweep
        return [Wave("QRS", 0.0, 0.70 * q, _frontal(p.axis_deg - 20, 0.65, -0.55), 0.5, 2.0),
                Wave("QRS", 0.30 * q, q, _frontal(p.axis_deg - 35, 0.8, -0.9), 0.5, 2.0)]
    waves = [Wave("QRS", 0.0, 0.30 * q, np.array([-0.12, 0.02, 0.18]), 0.5, 2.0),
             Wave("QRS", 0.10 * q, 0.55 * q, _frontal(p.axis_deg + 10, 0.40, 0.20), 0.5, 2.0),
             Wave("QRS", 0.22 * q, 0.80 * q, _frontal(p.axis_deg, 1.15, -0.60), 0.5, 2.0)]
    if p.conduction == "rbbb":   # late, slow rightward-anterior force: rsR' in V1, wide S in I
        return waves[:2] + [Wave("QRS", 0.12 * q, 0.58 * q, _frontal(p.axis_deg, 1.1, -0.30), 0.5, 2.0),
                            Wave("QRS", 0.34 * q, 0.68 * q, np.array([-0.12, -0.15, -0.35]), 0.5, 2.0),
                            Wave("QRS", 0.55 * q, q, np.array([-0.45, -0.05, 0.60]), 0.55, 2.0)]
    return waves + [Wave("QRS", 0.52 * q, q, np.array([-0.12, -0.22, -0.30]), 0.5, 2.0)]


def _t_vector(p, rng):
    """Direction of the T wave: concordant with the QRS unless a finding says otherwise."""
    t = _frontal(np.clip(p.axis_deg, 15, 60) + rng.uniform(-10, 10), rng.uniform(0.25, 0.4), 0.12)
    if p.conduction != "normal":   # LBBB: secondary, discordant; RBBB: inverted in V1-V2 only
        return np.array([-0.25, -0.05, 0.35] if p.conduction == "lbbb" else [0.2, 0.2, -0.2])
    return {"diffuse": -t, "inferior": t * np.array([1, -1.6, 1]),
            "anterior": t * np.array([1, 1, -1]) - np.array([0, 0, 0.3])}.get(p.t_inv, t)


_ST_VECTORS = {"elev_inferior": np.array([-0.15, 1.0, 0.0]), "elev_anterior": np.array([0.0, 0.0, 0.8]),
               "elev_lateral": np.array([1.0, -0.35, 0.1]), "depr": np.array([-0.7, -0.7, -0.2])}


def _turn_frontal(a):
    """Rotation by `a` radians about the front-to-back (z) axis, i.e. within the frontal plane."""
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def _jitter(v, rng, size=0.15):
    """Small random rotation and scaling of a dipole direction (person-to-person variety)."""
    a, b = rng.normal(0, size, 2)
    tilt = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return _turn_frontal(a) @ tilt @ v * rng.uniform(1 - size, 1 + size)


def _render_waves_fine(waves, t0, t1, fs=2000.0):
    """(3, n) dipole of some waves on a fine grid from t0 to t1 s (for measuring templates)."""
    t = np.arange(t0, t1, 1 / fs)
    out = np.zeros((3, len(t)))
    for w in waves:
        out += w.vector[:, None] * w.shape((t - w.start) / (w.end - w.start))[None, :]
    return out


def limb_qrs_p2p(qrs_waves):
    """Largest peak-to-peak QRS amplitude over the six limb leads, mV."""
    d = _render_waves_fine(qrs_waves, -0.01, 0.25)
    return max(np.ptp(LEAD_VECTORS[name] @ d) for name in LIMB_LEADS)


def beat_waves(p, qt_s):
    """Wave lists for every beat type of patient `p`, keyed by MIT-BIH symbol: the dominant supraventricular
    beat ('N', 'L' or 'R'), 'A' (PAC: early beat with a differently shaped P), 'V' (PVC: wide, bizarre,
    discordant T, no P), and 'p' (a lone sinus P wave, drawn when a PVC hides the sinus beat it replaced)."""
    rng = np.random.default_rng(p.morph_seed)
    q, pr, p_dur = p.qrs_ms / 1000, p.pr_ms / 1000, p.p_ms / 1000
    qrs = [w._replace(vector=_jitter(w.vector, rng)) for w in _qrs_waves(p, q)]
    turn = _turn_frontal(math.radians(p.axis_deg - frontal_axis(qrs)))   # measured axis = the patient's
    qrs = [w._replace(vector=turn @ w.vector) for w in qrs]
    # voltage: make "low voltage" unmistakable either way (< 0.5 mV vs > 0.8 mV in limb leads)
    p2p = limb_qrs_p2p(qrs)
    target = rng.uniform(0.28, 0.42) if p.low_voltage else max(p2p, rng.uniform(0.8, 1.6))
    qrs = [w._replace(vector=w.vector * target / p2p) for w in qrs]
    # ST segment and T wave fill [q, qt]: an isoelectric ST segment, then an asymmetric T
    t_start = q + 0.18 * (qt_s - q)
    t_wave = Wave("T", t_start, qt_s, _t_vector(p, rng) * (0.5 if p.low_voltage else 1.0), 0.66, 2.0)
    st_end = t_start + 0.55 * (qt_s - t_start)
    st = [Wave("ST", 0.85 * q, st_end, _ST_VECTORS[p.st] * p.st_mv)] if p.st != "none" else []
    sinus_p = Wave("P", -pr, -pr + p_dur, _jitter(np.array([0.09, 0.19, 0.04]), rng))
    ectopic_p = Wave("P", -0.14, -0.06, _jitter(np.array([0.04, -0.10, 0.05]), rng))
    main = {"normal": "N", "lbbb": "L", "rbbb": "R"}[p.conduction]
    return {main: [sinus_p] + qrs + st + [t_wave], "A": [ectopic_p] + qrs + st + [t_wave],
            "V": _pvc_waves(rng, qt_s), "p": [sinus_p]}


def main_beat(waves):
    """The symbol of the dominant supraventricular beat among beat_waves' kinds: 'N', 'L' or 'R'."""
    return next(k for k in waves if k in "NLR")


def _pvc_waves(rng, qt_s):
    """A ventricular beat: wide (140-180 ms), large, with a T opposite to its QRS."""
    q = rng.uniform(0.14, 0.18)
    main = _frontal(rng.choice([-60.0, 100.0]) + rng.uniform(-20, 20), rng.uniform(1.4, 2.2),
                    rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0))
    second = _jitter(main, rng, 0.6) * 0.4
    return [Wave("QRS", 0.0, 0.72 * q, main, 0.5, 2.5), Wave("QRS", 0.4 * q, q, second, 0.5, 2.5),
            Wave("T", q + 0.03, max(qt_s + 0.06, q + 0.2), -0.3 * main, 0.55, 2.0)]


def r_peak_offset(waves):
    """Seconds from QRS onset to the peak of the largest QRS component (the annotation point)."""
    big = max(waves_of(waves, "QRS"), key=lambda w: np.linalg.norm(w.vector))
    return big.start + (big.end - big.start) * big.peak_at


# --------------------------------------------------------------------------- rhythms
# Each returns QRS-onset times (s) and beat kinds ("main", "A", "V"), plus the times of lone sinus P waves
# hidden by PVCs.
def qt_seconds(p):
    """QT from QTc by Bazett (QT = QTc * sqrt(RR)), kept long enough to fit QRS + ST + T."""
    return max(p.qtc_ms / 1000 * math.sqrt(60 / p.hr_bpm), p.qrs_ms / 1000 + 0.16)


def sinus_times(p, duration, rng):
    """Sinus node firing with heart-rate variability: respiration, a 0.1 Hz wave, slow drift."""
    rr0 = 60 / p.hr_bpm
    n = int((duration + 3) / (rr0 * 0.8)) + 4
    t_approx = np.arange(n) * rr0
    drift = np.convolve(rng.normal(0, 0.01, n + 60), np.ones(60) / np.sqrt(60), "valid")[:n]
    rr = rr0 * (1 + p.hrv * np.sin(2 * np.pi * rng.uniform(0.2, 0.33) * t_approx + rng.uniform(0, 6.3))
                + 0.5 * p.hrv * np.sin(2 * np.pi * 0.1 * t_approx + rng.uniform(0, 6.3))
                + 0.3 * drift + rng.normal(0, 0.005, n))
    return rng.uniform(-rr0, 0) + np.concatenate([[0.0], np.cumsum(rr[:-1])])


def place_ectopics(p, sinus, rng):
    """Replace some sinus beats by PACs / PVCs (never the first two beats, the last one, or two in a row).
    A PVC comes early (at 55-72 % of the RR) and leaves the sinus node alone: the next sinus beat is on time, a
    fully compensatory pause (the hidden sinus P still fires). A PAC comes early too but resets the sinus node:
    the next sinus beat follows a little over one cycle after it (the impulse has to reach the node first: 1.08-1.28
    cycles) and every later beat shifts with it, a non-compensatory pause. Both ranges cover the PACs of MIT-BIH
    record 100."""
    n = len(sinus)
    rr = np.diff(sinus, prepend=sinus[0] - 60 / p.hr_bpm)            # (beats,) RR before each beat
    per_beat = np.array([p.pvc_per_min, p.pac_per_min]) * rr.mean() / 60
    draw = rng.random(n)
    kind = np.where(draw < per_beat[0], "V", np.where(draw < per_beat.sum(), "A", "main")).astype(object)
    kind[:2] = kind[-1] = "main"
    for k in range(2, n):                                              # no couplets
        if kind[k] != "main" and kind[k - 1] != "main":
            kind[k] = "main"
    early = kind != "main"
    times = sinus.copy()
    # coupling interval / RR: PVCs 0.55-0.72; PACs only modestly early, 0.62-0.88
    coupling = np.where(kind == "A", rng.uniform(0.62, 0.88, n), rng.uniform(0.55, 0.72, n))
    times[early] = sinus[early] - rr[early] + coupling[early] * rr[early]
    shift = np.zeros(n)                                                # sinus-node resets by PACs
    pac = np.nonzero(kind == "A")[0]
    shift[pac + 1] = times[pac] + rng.uniform(1.08, 1.28, len(pac)) * rr[pac] - sinus[pac + 1]
    total_shift = np.cumsum(shift)
    return times + total_shift, kind, (sinus + total_shift)[kind == "V"]   # last: the hidden sinus P waves


def af_times(p, duration, rng):
    """Atrial fibrillation: irregularly irregular RR, drawn independently (no pattern)."""
    rr0 = 60 / p.hr_bpm
    n = int((duration + 3) / (rr0 * 0.5)) + 4
    rr = np.maximum(0.33, rr0 * rng.lognormal(0, rng.uniform(0.16, 0.24), n))
    return rng.uniform(-rr0, 0) + np.concatenate([[0.0], np.cumsum(rr[:-1])])


def flutter_times(p, duration, rng):
    """Atrial flutter: QRS follows every 2nd/4th (or a varying) flutter wave, after AV delay."""
    cycle = 60 / p.flutter_rate
    n_waves = int((duration + 3) / cycle) + 8
    ratio = np.full(n_waves, p.flutter_ratio) if p.flutter_ratio else rng.choice([2, 3, 4], n_waves)
    conducted = np.cumsum(ratio)
    conducted = conducted[conducted < n_waves]
    phase0 = rng.uniform(0, 1)
    return (conducted - phase0) * cycle - 1.0 + 0.22, phase0


def early_pvcs(p, onsets, rng):
    """PVCs without a sinus rhythm to pause against (AF, flutter): a random beat comes at 60 % of its RR instead."""
    kinds = np.full(len(onsets), "main", dtype=object)
    if len(onsets) > 3:
        kinds[2:-1][rng.random(len(onsets) - 3) < p.pvc_per_min / p.hr_bpm] = "V"
    v = np.nonzero(kinds == "V")[0]
    onsets = onsets.copy()
    onsets[v] = onsets[v - 1] + 0.6 * (onsets[v] - onsets[v - 1])
    return onsets, kinds


# --------------------------------------------------------------------------- rendering
def render_beats(onsets, waves, fs, n, scale=None):
    """Dipole (3, n) of one beat type placed at QRS-onset times `onsets` (s), vectorised:
    every (beat, sample) pair of a wave is evaluated at once and summed with bincount."""
    out = np.zeros((3, n))
    if len(onsets) == 0:
        return out
    scale = np.ones(len(onsets)) if scale is None else scale
    for w in waves:
        start, width = onsets + w.start, w.end - w.start             # start: (beats,)
        idx = np.ceil(start * fs).astype(np.int64)[:, None] + np.arange(int(math.ceil(width * fs)) + 1)
        u = (idx / fs - start[:, None]) / width                      # (beats, wave samples)
        amp = w.shape(u) * scale[:, None]
        keep = (idx >= 0) & (idx < n) & (amp != 0)
        curve = np.bincount(idx[keep], weights=amp[keep], minlength=n)
        out += w.vector[:, None] * curve[None, :]
    return out


def flutter_waves(p, phase0, n, fs):
    """Continuous sawtooth at the atrial rate: negative in II/III/aVF, positive in V1."""
    phase = (np.arange(n) / fs + 1.0) / (60 / p.flutter_rate) + phase0
    saw = sum(np.sin(2 * np.pi * k * phase) / k for k in range(1, 7)) * (2 / np.pi)
    return np.array([0.02, -0.16, 0.10])[:, None] * saw[None, :]


def fibrillation_waves(n, fs, rng):
    """Fibrillatory baseline: 3 drifting 4-9 Hz oscillations, largest in V1 and inferior leads."""
    coarse_t, t = np.arange(0, n / fs + 1.0, 0.5), np.arange(n) / fs
    total = np.zeros(n)
    for _ in range(3):
        freq = np.interp(t, coarse_t, rng.uniform(4.5, 8.5) + np.cumsum(rng.normal(0, 0.15, len(coarse_t))).clip(-2, 2))
        amp = np.interp(t, coarse_t, rng.uniform(0.5, 1.0, len(coarse_t)))
        total += amp * np.sin(2 * np.pi * np.cumsum(freq) / fs + rng.uniform(0, 6.3))
    return rng.uniform(0.015, 0.03) * np.array([0.3, 0.8, 1.0])[:, None] * total[None, :]


# --------------------------------------------------------------------------- noise
DEFAULT_NOISE = {"baseline": 0.08, "hum": 0.01, "emg": 0.01}   # mV at noise=1.0


def noise_levels(noise):
    """noise=0 clean, a float scales DEFAULT_NOISE, a dict sets kinds in mV (others 0)."""
    if isinstance(noise, dict):
        if unknown := set(noise) - set(DEFAULT_NOISE):
            raise ValueError(f"unknown noise kinds {sorted(unknown)}; known: {sorted(DEFAULT_NOISE)}")
        return {k: float(noise.get(k, 0.0)) for k in DEFAULT_NOISE}
    return {k: v * float(noise) for k, v in DEFAULT_NOISE.items()}


def electrode_noise(n, fs, levels, rng, mains_hz):
    """Noise on one recorded channel: baseline wander + mains hum + bursty muscle noise."""
    t, out = np.arange(n) / fs, np.zeros(n)
    if levels["baseline"]:
        for f in [rng.uniform(0.15, 0.35), rng.uniform(0.03, 0.1), rng.uniform(0.05, 0.5)]:
            out += levels["baseline"] * rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3))
    if levels["hum"] and fs > 2.2 * mains_hz:   # below that the recorder's anti-alias filter removes it
        out += levels["hum"] * rng.uniform(0.5, 1.5) * np.sin(2 * np.pi * mains_hz * t + rng.uniform(0, 6.3))
    if levels["emg"]:
        coarse = np.arange(0, t[-1] + 2 if n else 2, 1.0)
        burst = np.interp(t, coarse, rng.uniform(0.3, 1.7, len(coarse)))
        out += levels["emg"] * burst * rng.standard_normal(n)
    return out


# --------------------------------------------------------------------------- ground truth
@dataclass
class Truth:
    """What the record shows, exactly. Intervals in ms; pr_ms is None without P waves."""
    beat_samples: np.ndarray   # (beats,) int64, R-peak sample of every beat in the record
    beat_symbols: list         # MIT-BIH symbols: N L R A V
    rhythm: str                # "sinus rhythm" | "sinus bradycardia" | ... | "atrial flutter"
    hr_bpm: float
    pr_ms: float | None
    qrs_ms: float
    qt_ms: float
    qtc_ms: float
    axis_deg: float
    statements: list           # MIMIC-IV-ECG machine-report style, in report order
    lead_st_mv: dict           # lead -> ST-segment shift of the dominant beat, mV
    lead_t_mv: dict            # lead -> T-wave peak (signed), mV
    leads: list
    fs: float
    duration_s: float


BORDERLINE = {"Premature atrial contractions", "1st degree A-V block", "Left axis deviation", "Right axis deviation"}


def frontal_axis(qrs_waves):
    """Mean QRS axis in degrees from the net QRS area of lead I (x) and (2 II - I)/sqrt 3 (y)."""
    d = _render_waves_fine(qrs_waves, -0.01, 0.25)
    return math.degrees(math.atan2(d[1].sum(), d[0].sum()))


def sees_frontal_plane(leads):
    """Any two limb leads span the frontal plane (none are parallel), so axis and limb-lead voltage can be read."""
    return len(set(leads) & set(LIMB_LEADS)) >= 2


def report_statements(p, waves, hr, symbols, leads):
    """Statements a machine reader would print for this record, given the leads it has, ending with an overall
    verdict. Limb-lead findings (axis, low voltage) need two limb leads; ST/T findings need a lead that shows
    them. Rhythm, rate, ectopy, blocks and QT are visible in any lead."""
    main = waves[main_beat(waves)]
    qrs = waves_of(main, "QRS")
    s = [{"af": "Atrial fibrillation", "flutter": "Atrial flutter"}.get(p.rhythm)
         or ("Sinus bradycardia" if hr < SLOW_BPM else "Sinus tachycardia" if hr > FAST_BPM else "Sinus rhythm")]
    s += ["Premature atrial contractions"] if "A" in symbols else []
    s += ["Premature ventricular contractions"] if "V" in symbols else []
    s += ["1st degree A-V block"] if p.rhythm == "sinus" and p.pr_ms > LONG_PR_MS else []
    s += {"lbbb": ["Left bundle branch block"], "rbbb": ["Right bundle branch block"]}.get(p.conduction, [])
    if sees_frontal_plane(leads):
        axis = frontal_axis(qrs)
        s += ["Left axis deviation"] if axis < LEFT_AXIS else ["Right axis deviation"] if axis > RIGHT_AXIS else []
        s += ["Low QRS voltages"] if limb_qrs_p2p(qrs) < LOW_VOLTAGE_MV else []
    if p.st != "none":   # the ST shift each available lead shows is its projection
        shown = [LEAD_VECTORS[name] @ waves_of(main, "ST")[0].vector for name in leads]
        s += ["ST elevation"] if p.st.startswith("elev") and max(shown) >= ST_SHIFT_MV else []
        s += ["ST depression"] if p.st == "depr" and min(shown) <= -ST_SHIFT_MV else []
    if p.t_inv != "none":
        t = waves_of(main, "T")[0].vector
        inverted = [LEAD_VECTORS[x] @ t <= T_INVERTED_MV for x in leads if x in T_UPRIGHT_LEADS]
        s += ["T wave inversion"] if any(inverted) else []
    s += ["Prolonged QT interval"] if p.qtc_ms > LONG_QTC_MS else []
    findings, sinus = set(s[1:]), s[0].startswith("Sinus")
    if sinus and not findings:
        return s + ["Normal ECG" if s[0] == "Sinus rhythm" else "Normal ECG except for rate"]
    return s + ["Borderline ECG" if sinus and findings <= BORDERLINE else "Abnormal ECG"]


# --------------------------------------------------------------------------- the generator
def synth_ecg(patient, duration_s=10.0, fs=500.0, leads=None, noise=1.0, seed=0, mains_hz=50.0):
    """Simulate one recording of `patient` -> (ECGRecord, Truth); the same (patient, arguments, seed) give
    identical bytes. leads: any subset of STANDARD_LEADS (default all 12), in the order wanted. noise: 0 for a
    clean record, a float to scale DEFAULT_NOISE, or a dict in mV. Each recorded channel draws its noise from
    its own stream, so lead II of a 12-lead record equals a lead-II-only one."""
    leads, n = _checked(leads, duration_s, fs)
    rhythm_rng, beat_rng, atrial_rng = (np.random.default_rng([seed, k]) for k in range(3))
    waves, qt_s, onsets, kinds, hidden_p, flutter_phase = beat_times(patient, duration_s, rhythm_rng)
    # what: the atria's own continuous signal in AF or flutter (whose beats have no P waves), then every beat type,
    # with a small respiratory modulation of beat size
    if patient.rhythm == "af":
        dipole = fibrillation_waves(n, fs, atrial_rng)                       # (3, samples)
    elif patient.rhythm == "flutter":
        dipole = flutter_waves(patient, flutter_phase, n, fs)
    else:
        dipole = np.zeros((3, n))
    breath = 1 + 0.06 * np.sin(2 * np.pi * beat_rng.uniform(0.2, 0.33) * onsets + beat_rng.uniform(0, 6.3))
    for kind, symbol in [("main", main_beat(waves)), ("A", "A"), ("V", "V")]:
        dipole += render_beats(onsets[kinds == kind], waves[symbol], fs, n, breath[kinds == kind])
    dipole += render_beats(hidden_p, waves["p"], fs, n)
    beat_samples, beat_symbols = annotated_beats(waves, onsets, kinds, fs, n)
    signal = _project(dipole, leads, noise_levels(noise), fs, seed, mains_hz)
    truth = _measure(patient, waves, qt_s, beat_samples, beat_symbols, leads, fs, duration_s)
    return ECGRecord(signal, float(fs), leads), truth


def synth_truth(patient, duration_s=10.0, fs=500.0, leads=None, seed=0):
    """synth_ecg's Truth alone, without drawing the record (about half its time): building rows needs only the
    truth, and the signal is made again when a step reads it. Equal to synth_ecg(...)[1] for any noise."""
    leads, n = _checked(leads, duration_s, fs)
    rhythm_rng = np.random.default_rng([seed, 0])   # synth_ecg's first stream: the same beats
    waves, qt_s, onsets, kinds, _, _ = beat_times(patient, duration_s, rhythm_rng)
    beat_samples, beat_symbols = annotated_beats(waves, onsets, kinds, fs, n)
    return _measure(patient, waves, qt_s, beat_samples, beat_symbols, leads, fs, duration_s)


def _checked(leads, duration_s, fs):
    """-> (the leads as a list, the record's samples), or a ValueError naming what a record cannot have."""
    leads = list(STANDARD_LEADS if leads is None else leads)
    bad = [x for x in leads if x not in LEAD_VECTORS]
    if bad or not leads:
        raise ValueError(f"synth_ecg: unknown leads {bad}; choose from {STANDARD_LEADS}")
    if duration_s <= 0 or fs <= 0:
        raise ValueError(f"synth_ecg: duration_s and fs must be positive, got {duration_s}, {fs}")
    return leads, int(round(duration_s * fs))


def beat_times(patient, duration_s, rng):
    """When: each beat's QRS onset (s) and kind ("main", "A", "V") in and just around the record, drawn from the
    rhythm's stream `rng`, with the waves that draw each beat type -> (waves, qt_s, onsets, kinds, hidden_p: the
    blocked P waves' onsets, flutter_phase: where the flutter waves start, None in other rhythms)."""
    qt_s = qt_seconds(patient)
    waves = beat_waves(patient, qt_s)
    hidden_p, flutter_phase = np.zeros(0), None
    if patient.rhythm == "sinus":
        onsets, kinds, hidden_p = place_ectopics(patient, sinus_times(patient, duration_s, rng), rng)
    else:   # AF or flutter: no P waves
        if patient.rhythm == "af":
            onsets = af_times(patient, duration_s, rng)
        else:
            onsets, flutter_phase = flutter_times(patient, duration_s, rng)
        onsets, kinds = early_pvcs(patient, onsets, rng)
        main = main_beat(waves)
        waves[main] = [w for w in waves[main] if w.kind != "P"]
    keep = (onsets > -1.5) & (onsets < duration_s + 0.5)
    return waves, qt_s, onsets[keep], kinds[keep], hidden_p, flutter_phase


def annotated_beats(waves, onsets, kinds, fs, n):
    """The annotation: every beat whose R peak falls inside the n samples -> (R-peak samples, MIT-BIH symbols)."""
    main = main_beat(waves)
    symbols_all = np.array([{"main": main, "A": "A", "V": "V"}[k] for k in kinds])
    r_time = onsets + np.array([r_peak_offset(waves[s]) for s in symbols_all]) if len(onsets) else onsets
    r_sample = np.round(r_time * fs).astype(np.int64)
    inside = (r_sample >= 0) & (r_sample < n)
    return r_sample[inside], [str(s) for s in symbols_all[inside]]


def _project(dipole, leads, levels, fs, seed, mains_hz):
    """(leads, samples) float32. Only I, II and V1-V6 are 'recorded' (with their own
    noise); III, aVR, aVL, aVF are computed from I and II as an ECG machine does."""
    n, recorded = dipole.shape[1], {}
    for name in ["I", "II"] + CHEST_LEADS:
        if name in leads or (name in ("I", "II") and set(leads) & {"III", "aVR", "aVL", "aVF"}):
            rng = np.random.default_rng([seed, 100 + STANDARD_LEADS.index(name)])
            recorded[name] = LEAD_VECTORS[name] @ dipole + electrode_noise(n, fs, levels, rng, mains_hz)
    if "I" in recorded and "II" in recorded:
        i, ii = recorded["I"], recorded["II"]
        recorded |= {"III": ii - i, "aVR": -(i + ii) / 2, "aVL": i - ii / 2, "aVF": ii - i / 2}
    return np.stack([recorded[name] for name in leads]).astype(np.float32)


def _measure(p, waves, qt_s, beat_samples, beat_symbols, leads, fs, duration_s):
    """Ground truth: intervals are the construction's own (exact by compact support);
    HR comes from the annotated beats; QTc by Bazett from the mean RR."""
    main = waves[main_beat(waves)]
    n = len(beat_samples)
    hr = 60 * fs * (n - 1) / (beat_samples[-1] - beat_samples[0]) if n >= 2 else p.hr_bpm
    qt_ms, st = qt_s * 1000, next((w.vector for w in main if w.kind == "ST"), np.zeros(3))
    statements = report_statements(p, waves, hr, beat_symbols, leads)
    return Truth(
        beat_samples=beat_samples, beat_symbols=beat_symbols, rhythm=statements[0].lower(),
        hr_bpm=round(float(hr), 1), pr_ms=float(p.pr_ms) if p.rhythm == "sinus" else None,
        qrs_ms=float(p.qrs_ms), qt_ms=round(qt_ms), qtc_ms=round(qt_ms / math.sqrt(60 / hr)),
        axis_deg=round(frontal_axis(waves_of(main, "QRS"))), statements=statements,
        lead_st_mv={x: round(float(LEAD_VECTORS[x] @ st), 2) for x in leads},
        lead_t_mv={x: round(float(LEAD_VECTORS[x] @ waves_of(main, "T")[0].vector), 2) for x in leads},
        leads=list(leads), fs=float(fs), duration_s=float(duration_s))


# --------------------------------------------------------------------------- patients over time
_NO_ST_T = dict(st="none", st_mv=0.0, t_inv="none")   # a new block brings its own ST-T, replacing a primary change
EVENTS = {   # what can change between two visits, and how
    "new_af": lambda p, r: replace(p, rhythm="af", hr_bpm=r.uniform(80, 130), pac_per_min=0.0),
    "new_lbbb": lambda p, r: replace(p, conduction="lbbb", qrs_ms=round(r.uniform(135, 170)), **_NO_ST_T),
    "new_rbbb": lambda p, r: replace(p, conduction="rbbb", qrs_ms=round(r.uniform(128, 160)), **_NO_ST_T),
    "qt_prolongation": lambda p, r: replace(p, qtc_ms=round(r.uniform(490, 560))),
    "new_avb1": lambda p, r: replace(p, pr_ms=round(r.uniform(220, 320))),
    "rate_up": lambda p, r: replace(p, hr_bpm=round(r.uniform(106, 140), 1)),
    "rate_down": lambda p, r: replace(p, hr_bpm=round(r.uniform(42, 54), 1)),
    "new_st_elevation": lambda p, r: replace(p, st="elev_inferior", st_mv=r.uniform(0.2, 0.35)),
    "new_pvcs": lambda p, r: replace(p, pvc_per_min=r.uniform(8, 16)),
    "low_voltage": lambda p, r: replace(p, low_voltage=True)}


def event_allowed(p, event):
    """Only changes that make sense for this person now (no 'new AF' in AF, no block on a block)."""
    sinus, normal_rate = p.rhythm == "sinus", SLOW_BPM <= p.hr_bpm <= FAST_BPM
    return {"new_af": sinus, "new_lbbb": p.conduction == "normal", "new_rbbb": p.conduction == "normal",
            "qt_prolongation": p.qtc_ms < LONG_QTC_MS, "new_avb1": sinus and p.pr_ms <= LONG_PR_MS,
            "rate_up": sinus and normal_rate, "rate_down": sinus and normal_rate,
            "new_st_elevation": p.st == "none" and p.conduction == "normal",
            "new_pvcs": p.pvc_per_min == 0, "low_voltage": not p.low_voltage}[event]


def patient_history(patient, n_visits, seed, change_prob=0.7):
    """Serial ECG visits of one person: [(day, patient_at_that_visit, event_or_None), ...]. Day 0 is the first
    visit; each later one is 1-1500 days on and, with probability `change_prob`, follows one allowed EVENTS event."""
    rng = np.random.default_rng(seed)
    visits, day, p = [(0, patient, None)], 0, patient
    for _ in range(n_visits - 1):
        day += int(rng.integers(1, 1500))
        allowed = [e for e in EVENTS if event_allowed(p, e)]
        event = str(rng.choice(allowed)) if allowed and rng.random() < change_prob else None
        if event:
            p = EVENTS[event](p, rng)
        visits.append((day, p, event))
    return visits
