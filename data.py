"""
data.py — ECG records and the files they come from. The ground floor: it imports nothing of the project.

Read top to bottom:
  1. Records      `ECGRecord` (mV (leads, samples), fs, leads), the lead, task, beat and report-statement names and
                  `find_statements` (which a text names), `atomic_write` (every file write), `read_json`.
  2. Lead names   the aliases real files use (MLII, D3, lower case, a lone "ECG", ...).
  3. Reading      `load_ecg`: WFDB records (any format, multi-file ones), .npy, .csv; one clear error per bad file.
  4. Cleaning     flat/empty leads, NaN/Inf repair, FFT resampling, `prepare_ecg` (as the model reads it), `cut_ecg`.
  5. Localization the anyECG answer rule ("Duration: 1.3s-2.9s"), interval merging, the parser.
  6. Rows         `load_rows`: anyECG rows and LLaVA-style ones (GEM, ECGInstruct, ECG-Bench) in one form, bad rows
                  skipped and counted; `RowECGReader` (a row's ECG(s), lazily, cached).
                  nanoECG adds two optional fields: `history` and `followups`, [question, answer] pairs asked
                  before / after the row's own in the same chat (chat.turns_of).
"""
import json
import math
import os
import re
import tempfile
import warnings
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np


# --------------------------------------------------------------------------- 1. records
STANDARD_LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
TASKS = ("report", "location", "location_long", "ecgqa", "multi", "grounded")   # the tasks nanoECG trains
LOCATION_TASKS = ("location", "location_long")   # rows that name a clip [ecg_start, ecg_end) of their record
STATEMENTS = [   # the report statements (MIMIC-IV-ECG machine-report style) the generator writes and eval.py scores
    "Sinus rhythm", "Sinus bradycardia", "Sinus tachycardia", "Atrial fibrillation", "Atrial flutter",
    "Premature atrial contractions", "Premature ventricular contractions", "1st degree A-V block",
    "Left bundle branch block", "Right bundle branch block", "Left axis deviation", "Right axis deviation",
    "Low QRS voltages", "ST elevation", "ST depression", "T wave inversion", "Prolonged QT interval",
    "Normal ECG", "Normal ECG except for rate", "Borderline ECG", "Abnormal ECG"]


def find_statements(text, vocabulary=STATEMENTS):
    """The statements of `vocabulary` named in `text` (case-insensitive, whole words). Longer statements are matched
    first and blanked out, so "Normal ECG except for rate" does not also count as "Normal ECG". Like ECG-Bench's
    string matching it cannot see negation: "no atrial fibrillation" names atrial fibrillation."""
    text, found = text.lower(), set()
    for s in sorted(vocabulary, key=len, reverse=True):
        text, hits = re.subn(r"(?<!\w)" + re.escape(s.lower()) + r"(?!\w)", "|", text)
        if hits:
            found.add(s)
    return found


class ECGRecord(NamedTuple):
    signal: np.ndarray  # (leads, samples) float32, millivolts
    fs: float           # samples per second
    leads: list         # lead names, canonical where known


def atomic_write(path, content):
    """Write `content` (str, bytes, or a function that writes the path it is given) to `path` through a temp file in
    the same folder and one rename: a crash leaves the old file or the new one, never half of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        if callable(content):
            content(tmp)
        else:
            Path(tmp).write_bytes(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)   # only still there if something failed
    return path


def read_json(path):
    """A JSON file's content; a missing file or invalid JSON is one error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# --------------------------------------------------------------------------- 2. lead names
_ALIASES = {   # lower-case, spaces/dashes/underscores removed -> canonical
    **{a: "I" for a in ["i", "di", "d1", "mli", "ml1", "leadi"]},
    **{a: "II" for a in ["ii", "dii", "d2", "mlii", "ml2", "leadii"]},
    **{a: "III" for a in ["iii", "diii", "d3", "mliii", "ml3", "leadiii"]},
    "avr": "aVR", "avl": "aVL", "avf": "aVF",
    **{f"{p}v{k}": f"V{k}" for k in range(1, 7) for p in ["", "m", "lead"]},
}
OTHER_CHANNELS = {"vx", "vy", "vz", "x", "y", "z", "bp", "abp", "art", "resp", "pleth", "spo2", "cvp",
                  "pap", "edr", "ecg1", "ecg2"}   # known non-12-lead channels: kept without a warning


def canonical_lead(name):
    """Canonical 12-lead name for `name`, or None when it is not one (Frank X/Y/Z, BP, ...)."""
    return _ALIASES.get(re.sub(r"[\s\-_]", "", str(name)).lower())


def normalise_leads(names, source=""):
    """Canonical names for a record's channels; non-ECG channels keep their own name. A lone "ECG" channel is lead I
    (anyECG's rule), several stay unnamed leads; a second channel mapping to the same lead gets a suffix ("II_2") so
    nothing is silently overwritten."""
    if len(names) == 1 and str(names[0]).strip().lower() == "ecg":
        return ["I"]
    out, unknown = [], []
    for name in names:
        lead = canonical_lead(name) or str(name)
        if canonical_lead(name) is None and lead.lower() not in OTHER_CHANNELS:
            unknown.append(lead)
        base, k = lead, 2
        while lead in out:
            lead, k = f"{base}_{k}", k + 1
        out.append(lead)
    if unknown:
        warnings.warn(f"{source}: channel names {unknown} are not ECG leads I..V6; kept under their own "
                      "names (pass drop_unknown=True to drop them, or lead_names=[...] to rename)")
    return out


# --------------------------------------------------------------------------- 3. reading ECGs
_WFDB_BYTES = {"8": 1, "16": 2, "24": 3, "32": 4, "61": 2, "80": 1, "160": 2, "212": 1.5, "310": 4 / 3, "311": 4 / 3}
_WFDB_FLAC = {"508", "516", "524"}
_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "v": 1e3, "nu": 1.0, "": 1.0}


def load_ecg(path, leads=None, drop_unknown=False, fs=None, lead_names=None, start=None, end=None, units=None,
             root=None):
    """Read an ECG file -> ECGRecord(signal float32 (leads, samples) in mV, fs, lead names).

    path: a WFDB record (with or without .hea/.dat; multi-file records such as PTB's .dat + .xyz are read whole),
    a .npy array or a .csv table.
    leads: pick and order these canonical leads (error if one is missing).
    drop_unknown: drop channels that are not ECG leads I..V6.
    fs, lead_names: needed for .npy; fs also for .csv without a time column; lead_names overrides stored names.
    start, end: read only samples [start, end) (WFDB reads just that part of the file, so a 10 s clip of a 24 h
    Holter costs what a 10 s record does).
    units: the unit of the file's values, "mV", "uV" or "V" (default: a WFDB header's units, mV for .npy/.csv).
    root: refuse the record if a file it is read from (a WFDB header, a signal file it names) lies outside this
    folder once links are resolved: a row names a record under its data root, never any file the process can open.
    Leads with no finite sample and flat leads are dropped, partly missing samples interpolated (repair_nonfinite),
    with a warning; amplitudes a thousand times off (µV or V read as mV) are warned about, and ones no ECG reaches
    refused (check_amplitude)."""
    path = str(path)
    suffix = Path(path).suffix.lower()
    if units is not None and str(units).lower() not in _TO_MV:
        raise ValueError(f"{path}: units {units!r} unknown; use mV, uV or V")
    if suffix in (".npy", ".csv"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        if root is not None:
            _check_inside(root, path)
        signal, fs, names = (_read_npy if suffix == ".npy" else _read_csv)(path, fs, lead_names)
        signal = signal * _TO_MV[str(units or "mV").lower()]
        if start is not None or end is not None:
            signal = signal[:, _clip(path, signal.shape[1], start, end)]
    else:
        signal, fs, names = _read_wfdb(_record_name(path), lead_names, start, end, units, root)
    if signal.shape[1] == 0:
        raise ValueError(f"{path}: record has zero samples")
    if fs is None or not 0 < fs < math.inf:   # NaN fails both comparisons
        raise ValueError(f"{path}: sampling rate must be positive and finite, got {fs}")
    names = normalise_leads(names, path)
    if drop_unknown:
        keep = [i for i, n in enumerate(names) if n in STANDARD_LEADS]
        if not keep:
            raise ValueError(f"{path}: no ECG lead I..V6 among the channels {names}")
        signal, names = signal[keep], [names[i] for i in keep]
    signal, names = drop_unusable_leads(signal, names, path)
    signal = repair_nonfinite(signal, names, path)
    check_amplitude(signal, names, path)
    if leads is not None:
        missing = [x for x in leads if x not in names]
        if missing:
            raise ValueError(f"{path}: leads {missing} requested but the record has {names}")
        signal, names = signal[[names.index(x) for x in leads]], list(leads)
    return ECGRecord(np.ascontiguousarray(signal, dtype=np.float32), float(fs), names)


def _clip(name, n, start, end, fs=None):
    """Slice [start, end) of a record of n samples (None: its start / end); an error naming `name` if not inside.
    Every part of a record nanoECG takes is checked here. With fs the error gives the times too."""
    start, end = 0 if start is None else int(start), n if end is None else int(end)
    if not 0 <= start < end <= n:
        secs = f" ({start / fs:g}-{end / fs:g} s of {n / fs:.2f} s)" if fs else ""
        raise ValueError(f"{name}: clip [{start}, {end}) is not inside the record's {n} samples{secs}")
    return slice(start, end)


def _record_name(path):
    """A WFDB record's name: its path without the header's or a signal file's extension."""
    return path[:-4] if Path(path).suffix.lower() in (".hea", ".dat", ".xyz") else path


def record_length(path):
    """(samples, fs) of a WFDB record from its header alone, before any sample is read (a part of a 24 h Holter is
    checked and read without the rest); None for .npy/.csv, whose length is known only once read, and for a header
    without a usable length or rate (reading the record then says what is wrong)."""
    path = str(path)
    if Path(path).suffix.lower() in (".npy", ".csv"):
        return None
    h = _rdheader(_record_name(path))
    return (h.sig_len, float(h.fs)) if h.sig_len and 0 < h.fs < math.inf else None


def _rdheader(record):
    """wfdb's parse of a record's header (no sample read), or one clear error naming the header."""
    import wfdb   # imported here: it pulls in pandas, seconds that `import data` should not cost
    header = record + ".hea"
    if not os.path.isfile(header):
        raise FileNotFoundError(f"{header}: no such WFDB header (record '{record}')")
    try:
        return wfdb.rdheader(record)
    except Exception as e:
        raise ValueError(f"{header}: cannot parse WFDB header ({type(e).__name__}: {e})") from None


def _read_wfdb(record, lead_names, start=None, end=None, units=None, root=None):
    """One pass of wfdb over header and samples: parsing a header costs more than reading a 10 s record, so it is
    parsed once (twice for a clip or under a root). When wfdb fails or returns fewer samples than asked,
    _diagnose_wfdb says precisely what is wrong."""
    import wfdb
    header = record + ".hea"
    if not os.path.isfile(header):
        raise FileNotFoundError(f"{header}: no such WFDB header (record '{record}')")
    h = None if root is None else _check_wfdb_inside(root, record)   # before wfdb opens a file outside the root
    try:   # a clip outside the record fails here too, and _diagnose_wfdb names it (_clip)
        rec = wfdb.rdrecord(record, sampfrom=int(start or 0), sampto=None if end is None else int(end))
    except Exception as e:
        _diagnose_wfdb(record, start, end)
        raise ValueError(f"{record}: wfdb could not read the record ({type(e).__name__}: {e})") from None
    n = 0 if rec.p_signal is None else rec.p_signal.shape[0]
    if not rec.n_sig or n == 0 or (end is not None and n != end - (start or 0)):
        _diagnose_wfdb(record, start, end)
        raise ValueError(f"{header}: record has zero samples or no signals")
    # a header whose format or length does not fit its files reads as garbage, not as an error: check the sizes
    # (a clip's record knows only the clip's length, so the header is parsed again for the whole one)
    whole = not start and end is None
    _check_signal_files(record, rec if whole else h if h is not None else wfdb.rdheader(record))
    stated = [str(units or u or "").strip().lower() for u in rec.units]   # the caller's units win over the header's
    bad = sorted({u for u in stated if u not in _TO_MV})
    if bad:
        warnings.warn(f"{header}: unknown units {bad}; assumed mV")
    scale = np.array([_TO_MV.get(u, 1.0) for u in stated])[:, None]
    names = lead_names or rec.sig_name
    _check_names(names, rec.n_sig, header)
    return rec.p_signal.T * scale, float(rec.fs), list(names)                  # (leads, samples)


def _diagnose_wfdb(record, start, end):
    """Raise the clear error for a record wfdb could not read, if one of the usual causes: a bad header, a signal
    file missing, short or in an unknown format (wfdb's own errors for these are cryptic), a clip outside the record."""
    h = _rdheader(record)
    if not h.n_sig or not h.sig_len:
        raise ValueError(f"{record}.hea: record has zero samples or no signals")
    _check_signal_files(record, h)
    _clip(record, h.sig_len, start, end, h.fs)


def _check_signal_files(record, h):
    """Every signal file must exist and hold what the header h says: sig_len samples of each signal in its format.
    A file too short is truncated; one too long means the header's format or length is wrong (16 for 212, say)."""
    if not getattr(h, "file_name", None):   # a multi-segment record: its segments are records of their own
        return
    spf = h.samps_per_frame or [1] * h.n_sig
    offsets = h.byte_offset or [None] * h.n_sig
    for fname in dict.fromkeys(h.file_name):
        mine = [i for i, n in enumerate(h.file_name) if n == fname]
        unknown = [h.fmt[i] for i in mine if h.fmt[i] not in _WFDB_BYTES and h.fmt[i] not in _WFDB_FLAC]
        if unknown:
            raise ValueError(f"{record}.hea: unsupported WFDB storage format(s) {unknown} for {fname}; "
                             f"known: {sorted(_WFDB_BYTES) + sorted(_WFDB_FLAC)}")
        path = os.path.join(os.path.dirname(record), fname)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: signal file named in {record}.hea is missing")
        if any(h.fmt[i] in _WFDB_FLAC for i in mine):
            continue                                                        # compressed: size unknown
        frame = sum(_WFDB_BYTES[h.fmt[i]] * (spf[i] or 1) for i in mine)                # bytes per sample time
        need = max(int(offsets[i] or 0) for i in mine) + math.floor(h.sig_len * frame)
        size = os.path.getsize(path)
        if size < need:
            raise ValueError(f"{path}: truncated, {size} bytes but the header promises {h.sig_len} samples "
                             f"x {len(mine)} signals = {need} bytes")
        if size > need + math.ceil(frame):
            raise ValueError(f"{path}: {size} bytes, but format(s) {sorted(set(h.fmt[i] for i in mine))} and "
                             f"{h.sig_len} samples in {record}.hea make {need}: the header's format or length is wrong")


def _check_wfdb_inside(root, record):
    """Refuse a WFDB record any of whose files -- its header, each signal file it names, a multi-segment record's
    segments -- lies outside root once links are resolved (the record's own name may be no file, so checking it
    follows no link). Each header is checked before wfdb parses it, every file before wfdb reads a sample.
    -> the parsed header"""
    _check_inside(root, record + ".hea")
    h = _rdheader(record)
    folder = os.path.dirname(record)
    for name in dict.fromkeys(getattr(h, "file_name", None) or []):
        _check_inside(root, os.path.join(folder, name))
    for segment in getattr(h, "seg_name", None) or []:
        if segment != "~":                                                  # "~": a gap in the record, no file
            _check_wfdb_inside(root, os.path.join(folder, segment))
    return h


def _check_inside(root, path):
    """Refuse `path` unless it lies inside root once every link is resolved. is_relative_to compares whole path
    components: a sibling folder "data2" is not inside "data", which a string prefix would let through."""
    base = Path(root or ".").resolve()
    if not Path(path).resolve().is_relative_to(base):
        raise ValueError(f"{path}: outside the ECG root {base} once links are resolved; rows name records under it")


def _read_npy(path, fs, lead_names):
    if fs is None or lead_names is None:
        raise ValueError(f"{path}: a .npy file stores no sampling rate or lead names; "
                         "pass load_ecg(path, fs=..., lead_names=[...])")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{path}: expected a 2-D numeric array (leads x samples), got {x.dtype} {x.shape}")
    if x.shape[0] != len(lead_names) and x.shape[1] == len(lead_names):
        x = x.T                                                             # stored (samples, leads)
    _check_names(lead_names, x.shape[0], path)
    return x.astype(np.float64), float(fs), list(lead_names)


def _read_csv(path, fs, lead_names):
    """Header row = lead names; an optional time column (seconds) gives the rate."""
    with open(path, newline="") as f:
        header = [h.strip() for h in f.readline().strip().split(",")]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)          # empty table: our own error below
                x = np.loadtxt(f, delimiter=",", ndmin=2, dtype=np.float64)
        except ValueError as e:   # numpy's message quotes the cell: say where it is, never what the file holds
            where = re.search(r"row (\d+), column (\d+)", str(e))
            at = f" (line {int(where[1]) + 2}, column {where[2]})" if where else ""   # numpy: row from 0, column from 1
            raise ValueError(f"{path}: non-numeric value in the table{at}") from None
    x = x.reshape(-1, len(header)).T                                       # (columns, samples)
    is_time = [h.lower() in ("time", "t", "time_s", "time (s)", "seconds") for h in header]
    if any(is_time):
        t = x[is_time.index(True)]
        if len(t) > 1 and fs is None:
            step = float(np.median(np.diff(t)))
            if not step > 0:   # a time that stands still or runs back gives no rate (and 1/0 no message)
                raise ValueError(f"{path}: the time column does not advance (median step {step:g} s); "
                                 "it cannot give the sampling rate")
            fs = 1.0 / step
        x, header = x[[not b for b in is_time]], [h for h, b in zip(header, is_time) if not b]
    if fs is None:
        raise ValueError(f"{path}: no time column and no fs given; pass load_ecg(path, fs=...)")
    names = lead_names or header
    _check_names(names, x.shape[0], path)
    return x, float(fs), list(names)


def _check_names(names, n, source):
    if len(names) != n:
        raise ValueError(f"{source}: {n} signals but {len(names)} lead names {list(names)}")


# --------------------------------------------------------------------------- 4. cleaning
MAX_MV = 1e6   # 1 kV: an ECG in µV read as mV reaches some 1e4 (1e5 with a large electrode offset); nothing beyond


def check_amplitude(signal, leads, source=""):
    """Warn when the ECG leads' amplitudes are a thousand times off: a lead in mV spans about 0.3 to 10 mV, so one
    spanning hundreds is almost surely in µV (and one spanning hundredths in V). Read as mV, such a record is still
    answered, but from the wrong ECG, so the warning names the factor and the repair. Values beyond MAX_MV are no
    ECG in any unit (garbage, or a wrong file): refused."""
    ecg = [i for i, name in enumerate(leads) if name in STANDARD_LEADS]
    if not ecg:
        return
    level = float(np.median(np.percentile(np.abs(signal[ecg]), 99.5, axis=1)))   # a few glitches are not the record
    if level > MAX_MV:
        raise ValueError(f"{source}: the leads reach {level:.3g} mV (median), beyond what any unit of an ECG "
                         f"explains (µV read as mV reach some 1e4): not an ECG")
    span = float(np.median(np.percentile(signal[ecg], 99.5, axis=1) - np.percentile(signal[ecg], 0.5, axis=1)))
    if span > 100:
        warnings.warn(f"{source}: the leads span {span:.0f} mV (median), about 1000x an ECG's 1-5 mV: the values look "
                      "like µV; read them with units='uV' (generate.py --units uV) to divide by 1000")
    elif span < 0.02:
        warnings.warn(f"{source}: the leads span {span:.4f} mV (median), about 1/1000 of an ECG's 1-5 mV: the values "
                      "look like V; read them with units='V' (generate.py --units V) to multiply by 1000")


def drop_unusable_leads(signal, leads, source=""):
    """Drop leads that carry nothing -- no finite sample, or flat (a disconnected electrode, a zero-filled missing
    lead) -- with a warning. They become *absent* leads, which the encoder handles; a flat line would say 'this lead
    reads 0 mV'."""
    finite = np.isfinite(signal)
    none_finite = ~finite.any(axis=1)                                      # all NaN, all inf, or both
    masked = np.where(finite, signal, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        flat = ~none_finite & (np.nanmax(masked, axis=1) - np.nanmin(masked, axis=1) < 1e-6)
    bad = none_finite | flat
    if bad.all():
        raise ValueError(f"{source}: every lead is empty (not finite: NaN or inf) or flat: {leads}")
    if bad.any():
        warnings.warn(f"{source}: dropped leads {[x for x, b in zip(leads, none_finite) if b]} (not finite: NaN or "
                      f"inf) and {[x for x, b in zip(leads, flat) if b]} (flat); they are treated as absent")
    return signal[~bad], [x for x, b in zip(leads, bad) if not b]


def repair_nonfinite(signal, leads=None, source=""):
    """Replace NaN/Inf samples by linear interpolation between finite neighbours (held constant at the ends), with a
    warning that counts them. Interpolation, not 0: a lead with a baseline offset would get a spike at every 0."""
    bad = ~np.isfinite(signal)
    if not bad.any():
        return signal
    signal = signal.astype(np.float64, copy=True)
    where = [leads[i] if leads else i for i in np.nonzero(bad.any(axis=1))[0]]
    warnings.warn(f"{source}: {int(bad.sum())} NaN/Inf samples in leads {where} replaced by linear interpolation")
    t = np.arange(signal.shape[1])
    for i in np.nonzero(bad.any(axis=1))[0]:
        ok = ~bad[i]
        signal[i] = np.interp(t, t[ok], signal[i, ok]) if ok.any() else 0.0
    return signal


def resample(signal, fs_in, fs_out):
    """Resample (leads, samples) from fs_in to fs_out Hz with numpy FFTs: the spectrum is cut (or zero-padded) at the
    lower Nyquist rate, the ideal anti-aliasing filter, with a short raised-cosine taper against ringing. Against the
    wrap-around an FFT assumes, each lead is first extended by an odd reflection of ~1 s at each end; pads are chosen
    so every sample time maps exactly. Content near Nyquist can leave a small transient in the last output samples."""
    signal = np.asarray(signal, dtype=np.float64)
    if fs_in == fs_out:
        return signal.copy()
    up, down = Fraction(fs_out / fs_in).limit_denominator(10000).as_integer_ratio()   # fs_out/fs_in = up/down
    n = signal.shape[-1]
    n_out = int(math.ceil(n * up / down))
    # ~1 s of reflection, a whole number of `down`-sample periods so output times stay exact
    pad = down * min(max(1, round(fs_in / down)), (n - 1) // down)
    extended = _reflect_pad(signal, pad)
    extended = np.pad(extended, [(0, 0), (0, (-extended.shape[-1]) % down)], mode="edge")
    m_in, m_out = extended.shape[-1], extended.shape[-1] * up // down
    spec = np.fft.rfft(extended, axis=-1)
    keep = min(spec.shape[-1], m_out // 2 + 1)
    taper = np.ones(keep)
    edge = max(1, keep // 20)                                              # top 5 % of the kept band
    taper[-edge:] = 0.5 + 0.5 * np.cos(np.linspace(0, np.pi, edge))
    out_spec = np.zeros(signal.shape[:-1] + (m_out // 2 + 1,), dtype=complex)
    out_spec[..., :keep] = spec[..., :keep] * taper
    out = np.fft.irfft(out_spec, n=m_out, axis=-1) * (m_out / m_in)
    start = pad * up // down
    return out[..., start:start + n_out]


def _reflect_pad(x, pad):
    """Odd reflection about the end samples: continues level and slope, so no step."""
    if pad == 0:
        return x
    return np.concatenate([2 * x[..., :1] - x[..., pad:0:-1], x, 2 * x[..., -1:] - x[..., -2:-pad - 2:-1]], axis=-1)


MIN_FS, MAX_FS = 50.0, 10000.0


def prepare_ecg(record, fs=100, name="ECG", max_seconds=None):
    """A record for the model: standard leads only (others dropped, warned), in standard order, finite, at `fs`."""
    signal, fs_in, leads = record
    if not MIN_FS <= fs_in <= MAX_FS:
        raise ValueError(f"{name}: sampling rate {fs_in:g} Hz is outside {MIN_FS:g}-{MAX_FS:g} Hz")
    if signal.ndim != 2 or signal.shape[1] == 0:
        raise ValueError(f"{name}: expected a (leads, samples) signal with samples, got shape {signal.shape}")
    if max_seconds is not None and signal.shape[1] / fs_in > max_seconds:
        raise ValueError(f"{name}: {signal.shape[1] / fs_in:.1f} s is longer than the {max_seconds:g} s "
                         "the model's context allows; cut it (e.g. ecg_start/ecg_end) first")
    order = [leads.index(x) for x in STANDARD_LEADS if x in leads]
    if not order:
        raise ValueError(f"{name}: no standard ECG lead among {leads}")
    other = [x for x in leads if x not in STANDARD_LEADS]
    if other:
        warnings.warn(f"{name}: leads {other} are not among the 12 standard leads and are dropped")
    signal, leads = signal[order], [leads[i] for i in order]
    signal, leads = drop_unusable_leads(signal, leads, name)
    signal = repair_nonfinite(signal, leads, name)
    return ECGRecord(resample(signal, fs_in, fs).astype(np.float32), float(fs), leads)


def cut_ecg(rec, start, end, name="ECG"):
    """Samples [start, end) of a record (None: its start / its end); an error naming `name` if not inside it."""
    return ECGRecord(rec.signal[:, _clip(name, rec.signal.shape[1], start, end, rec.fs)], rec.fs, rec.leads)


# --------------------------------------------------------------------------- 5. localization
MITBIH_BEATS = set("NLRBAaJSVrFejnE/fQ?")   # beat annotations; rhythm '+', noise '~' etc. are not
BEAT_NAMES = {"A": "Atrial premature beat", "V": "Premature ventricular contraction",
              "L": "Left bundle branch block beat", "R": "Right bundle branch block beat",
              "S": "Supraventricular premature or ectopic beat (atrial or nodal)"}


def merge_intervals(spans):
    """[(a, b), ...] -> their union as sorted, disjoint (a, b) spans; touching spans merge."""
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def localization_answer(beat_samples, beat_symbols, start, end, fs, symbol):
    """anyECG's rule: every beat of type `symbol` in the clip [start, end) spans from the previous beat annotation to
    the next one (anywhere in the record -- the clip edge only clips), in seconds from the clip start, clipped to
    [0, clip length]; overlapping or touching spans merge. -> 'Duration: 1.3s-2.9s, 6.1s-7.7s' (one decimal, as
    '%.1f' prints it) or 'No Premature ventricular contraction Found'."""
    if symbol not in BEAT_NAMES:
        raise ValueError(f"unknown beat symbol {symbol!r}; known: {sorted(BEAT_NAMES)}")
    samples, symbols = np.asarray(beat_samples, dtype=np.int64), np.asarray(beat_symbols, dtype=str)
    is_beat = np.isin(symbols, list(MITBIH_BEATS))
    samples, symbols = samples[is_beat], symbols[is_beat]
    order = np.argsort(samples, kind="stable")
    samples, symbols = samples[order], symbols[order]
    length = (end - start) / fs
    spans = []
    for i in np.nonzero((symbols == symbol) & (samples >= start) & (samples < end))[0]:
        prev = samples[i - 1] if i > 0 else start
        nxt = samples[i + 1] if i + 1 < len(samples) else end
        spans.append((max(0.0, (prev - start) / fs), min(length, (nxt - start) / fs)))
    spans = merge_intervals(spans)
    if not spans:
        return f"No {BEAT_NAMES[symbol]} Found"
    return "Duration: " + ", ".join(f"{a:.1f}s-{b:.1f}s" for a, b in spans)


_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*s?\s*-\s*(\d+(?:\.\d+)?)\s*s")


def parse_localization(text):
    """Answer text -> [(start_s, end_s), ...]; [] for '... Not Found'/'No ... Found';
    None when nothing in it can be read (the metric scores that as 0)."""
    if re.search(r"\bno\b.*\bfound\b", text, re.IGNORECASE | re.DOTALL):
        return []
    return [(float(a), float(b)) for a, b in _SPAN.findall(text) if float(b) >= float(a)] or None


# --------------------------------------------------------------------------- 6. anyECG rows
_LOCATION_FIELDS = {"abnormal_type": str, "ecg_start": int, "ecg_end": int}


MODALITIES = ("signal", "image", "both")   # what a row is answered from: its ECGs, their printout, or both


def row_problem(row, images=False):
    """Why an anyECG row is unusable, or None if it is fine. images: the model reads paper printouts too, so rows of
    modality "image" and "both" may be read (images/rows.py reads their `image`, or draws it from the record)."""
    if not isinstance(row, dict):
        return f"not an object ({type(row).__name__})"
    for key in ("question", "answer", "dataset", "task"):
        if not isinstance(row.get(key), str):
            return f"field {key!r} missing or not a string"
    modality, image = row.get("modality", "signal"), row.get("image")
    if modality not in MODALITIES:
        return f"modality {modality!r}: not one of {', '.join(MODALITIES)}"
    if modality != "signal" and not images:
        return (f"modality {modality!r}: read only by a model that reads paper printouts too (train.py --images, "
                "or eval.py with such a checkpoint)")
    if image is not None and not (isinstance(image, str) and image):
        return "field 'image' is not a path (a non-empty string)"
    paths = row.get("ecg_path")
    printout_alone = modality == "image" and image and paths in ([], "")   # a printout with no record beside it
    if not printout_alone and not (isinstance(paths, str) and paths) and not (
            isinstance(paths, list) and paths and all(isinstance(p, str) and p for p in paths)):
        return "field 'ecg_path' missing or not a path / non-empty list of paths"
    for key in ("history", "followups"):   # nanoECG's additions: earlier / later exchanges about the same ECGs
        turns = row.get(key, [])
        if not isinstance(turns, list) or not all(isinstance(x, list) and len(x) == 2 and
                                                  all(isinstance(s, str) for s in x) for x in turns):
            return f"field {key!r} is not a list of [question, answer] pairs"
    if row["task"] in LOCATION_TASKS:
        for key, kind in _LOCATION_FIELDS.items():
            if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                return f"location row needs {key!r} as {kind.__name__}"
        if row["ecg_end"] <= row["ecg_start"]:
            return "ecg_end <= ecg_start"
    return None


def load_rows(path, images=False):
    """Read a JSON file of rows (a list): anyECG rows, or LLaVA-style rows (GEM's ECG-Grounding, PULSE's ECGInstruct,
    ECG-Bench) converted to the same form (llava_row); one file may mix them. Malformed rows are skipped, counted and
    named in one warning; `ecg_path` becomes a list (a single string -> [string]) so multi-ECG rows and single ones are
    handled alike, and each row keeps its position in the file as `file_index` (what reports about a row refer to).
    images: for a model that reads paper printouts too (see row_problem, llava_row)."""
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    read = [read_row(row, images) for row in data]
    rows = [dict(row, ecg_path=row_paths(row), file_index=i) for i, (row, problem) in enumerate(read) if not problem]
    skipped = [(i, problem) for i, (_, problem) in enumerate(read) if problem]
    if skipped:
        shown = "; ".join(f"row {i}: {p}" for i, p in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        warnings.warn(f"{path}: skipped {len(skipped)} of {len(data)} malformed rows ({shown})")
    return rows


def read_row(row, images=False):
    """(the row in anyECG form, None), or (anything, why it is unusable)."""
    if is_llava(row):
        try:
            row = llava_row(row, images)
        except ValueError as e:
            return None, str(e)
    return row, row_problem(row, images)


def row_paths(row):
    """The records a row names, as a list ([] for a printout read alone)."""
    return [row["ecg_path"]] if isinstance(row["ecg_path"], str) and row["ecg_path"] else list(row["ecg_path"])


# --- LLaVA-style rows: {"id", "image", "ecg", "conversations": [{"from": "human" | "gpt", "value"}, ...]}, as GEM and
# PULSE train on them (one WFDB record, "ecg", under the ECG folder; "image" a printout of it under the image folder).
# ECG-Bench's arena rows hold {"question", "answer"} turns, its ecgqa rows a list of answers as the gpt value; GEM's
# test rows add "report" and "machine_measurements". Each becomes one anyECG row: the first exchange its question and
# answer, later ones its `followups` (so every answer trains; evaluation asks the first question), the other fields
# kept as they are. A model that reads printouts too (GEM's) answers from the record and its printout ("modality":
# "both"), or from the printout alone when a row names no record ("image"); images/rows.py reads them.
LLAVA_MARKER = re.compile(r"\s*(?:<(?:image|ecg)>\s*)+")   # where their model put its features; nanoECG puts its own
CLOSED_ANSWER_WORDS = 6   # a first answer this short (a label, an option letter, yes/no) is scored as a set match
LIST_SEPARATOR = ", "     # a list of answers is joined as synthetic ECG-QA lists are, and as eval.set_match splits


def is_llava(row):
    """Has conversations, or names its record as "ecg"/"image" rather than anyECG's ecg_path."""
    return isinstance(row, dict) and ("conversations" in row or
                                      ("ecg_path" not in row and ("ecg" in row or "image" in row)))


def llava_row(row, images=False):
    """A LLaVA-style row in anyECG form; ValueError says what makes it unusable. The task: "ecgqa" when the first
    answer is closed (a list, or at most CLOSED_ANSWER_WORDS words: ECG-Bench's labels and option letters), with the
    dataset as its question_type so eval scores it by set match per subset; else "report" (free text: GEM's grounded
    interpretations, ECGInstruct's reports and chats), scored by BLEU, ROUGE-L and statement F1, and in every stage's
    default task mix. images: the model reads printouts too, so the row's modality is "both" (its record, then the
    printout), or "image" when it names an image and no record."""
    pairs = llava_pairs(row.get("conversations"))
    texts = [(llava_text(q, f"conversations exchange {k} question"),
              llava_text(a, f"conversations exchange {k} answer", answer=True))
             for k, (q, a) in enumerate(pairs)]
    dataset = row["dataset"] if isinstance(row.get("dataset"), str) else llava_dataset(row.get("id"))
    closed = isinstance(pairs[0][1], list) or len(texts[0][1].split()) <= CLOSED_ANSWER_WORDS
    out = {k: v for k, v in row.items() if k != "conversations"}
    ecg_path = llava_ecg(row, images)
    out |= {"ecg_path": ecg_path, "question": texts[0][0], "answer": texts[0][1], "dataset": dataset,
            "task": "ecgqa" if closed else "report"}
    if images:
        out["modality"] = "both" if ecg_path else "image"
    if closed and not isinstance(out.get("question_type"), str):
        out["question_type"] = dataset
    if len(texts) > 1:
        out["followups"] = [list(pair) for pair in texts[1:]]
    return out


def llava_pairs(turns):
    """[(question, answer), ...] of a conversation, values as written: {"from", "value"} turns alternating human,
    gpt; or ECG-Bench arena's {"question", "answer"} turns, one exchange each."""
    if not isinstance(turns, list) or not turns:
        raise ValueError("field 'conversations' missing or not a non-empty list of turns")
    if all(isinstance(t, dict) and "question" in t and "answer" in t for t in turns):
        return [(t["question"], t["answer"]) for t in turns]
    for k, turn in enumerate(turns):
        expected = ("human", "gpt")[k % 2]
        if not isinstance(turn, dict) or "value" not in turn:
            raise ValueError(f"conversations turn {k}: not a {{from, value}} or {{question, answer}} object")
        if turn.get("from") != expected:
            raise ValueError(f"conversations turn {k}: from {turn.get('from')!r}, expected {expected!r} "
                             "(turns alternate human, gpt)")
    if len(turns) % 2:
        raise ValueError(f"conversations turn {len(turns) - 1}: a human turn with no gpt answer after it")
    return [(q["value"], a["value"]) for q, a in zip(turns[::2], turns[1::2])]


def llava_text(value, where, answer=False):
    """A turn's text without <image>/<ecg> markers (nanoECG writes its ECG blocks before the first user message); an
    answer given as a list of strings (ECG-Bench's ecgqa) is joined with LIST_SEPARATOR."""
    if answer and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = LIST_SEPARATOR.join(v.strip() for v in value if v.strip())
    if not isinstance(value, str):
        raise ValueError(f"{where}: not a string" + (" or a list of strings" if answer else ""))
    text = LLAVA_MARKER.sub(" ", value).strip()
    if not text:
        raise ValueError(f"{where}: empty" + (" besides its <image>/<ecg> marker" if value.strip() else ""))
    return text


def llava_ecg(row, images=False):
    """The row's WFDB record as its ecg_path (read under the ECG root like any row's); "" for a printout alone, which
    a model that reads printouts answers from."""
    ecg = row.get("ecg")
    if isinstance(ecg, str) and ecg.strip():
        return ecg
    if ecg in (None, "") and row.get("image"):
        if images:
            return ""
        raise ValueError(f"no 'ecg' record, only the image {row['image']!r}: a printout alone is read only by a model "
                         "that reads printouts too (train.py --images, --image_root)")
    raise ValueError("field 'ecg' missing" if ecg is None else "field 'ecg' is not a record path (a non-empty string)")


def llava_dataset(row_id):
    """ECG-Bench's ids name their subset before the first '-' ("code15-1109348" -> "code15"); else "llava"."""
    match = re.match(r"([A-Za-z][\w.]*)-", row_id) if isinstance(row_id, str) else None
    return match.group(1) if match else "llava"


class RowECGReader:
    """The ECG(s) anyECG rows name, read lazily from `root`, clipped to [ecg_start, ecg_end) on localization rows,
    prepared for the model. Only the last `cache_size` prepared records are kept (an LRU cache), so a dataset of any
    size streams from disk. `prefetch` reads records in parallel in a pool of processes (most of a read is wfdb
    parsing the header in Python, which threads would serialise on the GIL)."""

    def __init__(self, root, fs=100, cache_size=1024):
        self.root, self.fs, self.cache_size = str(root or ""), fs, cache_size
        self.cache = OrderedDict()   # (path, start, end) -> ECGRecord, least recently used first
        self.pending = {}            # (path, start, end) -> Future of a read in a worker process
        self.reads = 0

    def keys(self, row):
        clip = row.get("task") in LOCATION_TASKS
        return [(rel, row["ecg_start"] if clip else None, row["ecg_end"] if clip else None) for rel in row_paths(row)]

    def __call__(self, row):
        return [self.get(key) for key in self.keys(row)]

    def get(self, key):
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        future = self.pending.pop(key, None)
        rec = future.result() if future else None    # a failed read in a worker: read here, raise here
        rec = rec if rec is not None else read_clip(self.root, self.fs, key)
        self.reads += 1
        if self.cache_size:
            self.cache[key] = rec
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return rec

    def prefetch(self, rows, pool):
        """Start reading the records of `rows` that are neither cached nor on their way, in the worker processes of
        `pool`; get() waits for them. Returns at once, so the reads overlap with what the caller does next."""
        todo = [k for k in dict.fromkeys(k for row in rows for k in self.keys(row))
                if k not in self.cache and k not in self.pending]
        for key in todo[:self.cache_size]:
            self.pending[key] = pool.submit(try_read_clip, (self.root, self.fs, key))


def read_clip(root, fs, key):
    rel, start, end = key
    path = inside(root, rel)
    return prepare_ecg(load_ecg(path, start=start, end=end, root=root), fs, name=path)


def inside(root, rel):
    """root/rel, refused when it leads outside root (an absolute path, '..', or a link out): a row names a record
    under the data root it came with, never any file the reading process could open. "rec/100" names no file, so
    the links of the files it is read from (100.hea, 100.dat) are load_ecg(root=)'s to check."""
    base = Path(root or ".").resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise ValueError(f"{rel}: outside the ECG root {base}; rows name records under it")
    return str(path)


def try_read_clip(args):
    """read_clip for a worker process: None instead of an exception."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # the main process warns when it reads the record itself
            return read_clip(*args)
    except (OSError, ValueError):
        return None
