"""Tests for realdata/prepare.py: each builder on a small tree the test writes in the database's real
layout (WFDB files through wfdb.wrsamp / wrann, CSVs with the real column names), and the
localization rows of the real MIT-BIH record 100 checked against its own `atr` file."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import wfdb

from data import MITBIH_BEATS, RowECGReader, load_rows, parse_localization, row_problem
from realdata import prepare as realdata

ROOT = Path(__file__).resolve().parent.parent
PHYSIONET = ROOT.parent / "shared" / "data" / "physionet"
TWELVE = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def write_record(folder, name, fs, signal, names, fmt="16"):
    folder.mkdir(parents=True, exist_ok=True)
    n = signal.shape[1]
    wfdb.wrsamp(name, fs=fs, units=["mV"] * n, sig_name=names, p_signal=signal, fmt=[fmt] * n,
                adc_gain=[200.0] * n, baseline=[0] * n, write_dir=str(folder))


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def by_the_rule(samples, symbols, start, end, fs, kind):
    """DESIGN §3's localization rule written out again here, apart from data.py, so that a mistake there cannot hide
    behind itself: every beat of `kind` in [start, end) spans from the previous beat to the next (MIT-BIH beat
    symbols only: rhythm '+' and noise '~' marks are not beats), in seconds from the clip start, clipped to the clip;
    spans that touch or overlap merge; one decimal."""
    beats = sorted((int(s), y) for s, y in zip(samples, symbols) if y in "NLRBAaJSVrFejnE/fQ?")
    spans = []
    for k, (s, y) in enumerate(beats):
        if y == kind and start <= s < end:
            before = beats[k - 1][0] if k > 0 else start
            after = beats[k + 1][0] if k + 1 < len(beats) else end
            a, b = max(0.0, (before - start) / fs), min((end - start) / fs, (after - start) / fs)
            if spans and a <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], b)
            else:
                spans.append([a, b])
    names = {"A": "Atrial premature beat", "V": "Premature ventricular contraction", "L": "Left bundle branch block beat",
             "R": "Right bundle branch block beat", "S": "Supraventricular premature or ectopic beat (atrial or nodal)"}
    return "Duration: " + ", ".join(f"{a:.1f}s-{b:.1f}s" for a, b in spans) if spans else f"No {names[kind]} Found"


def assert_consistent_with_annotations(row, samples, symbols, fs):
    """The answer is the anyECG rule applied to the annotations read here, and each
    annotated beat of the asked type inside the clip lies in one of the answer's spans."""
    start, end, kind = row["ecg_start"], row["ecg_end"], row["abnormal_type"]
    assert row["answer"] == by_the_rule(samples, symbols, start, end, fs, kind)
    spans = parse_localization(row["answer"])
    inside = [(s - start) / fs for s, y in zip(samples, symbols) if y == kind and start <= s < end]
    assert (spans == []) == (not inside)
    for t in inside:
        assert any(a - 0.05 <= t <= b + 0.05 for a, b in spans), (row, t)

# ----------------------------------------------------------------------------- Holter localization


@pytest.fixture(scope="module")
def mitdb(tmp_path_factory):
    """Two 60 s MIT-BIH-style records at 360 Hz (leads MLII, V1; format 212) with beats every
    0.8 s, rhythm and noise marks that are not beats, plus a RECORDS entry with no files."""
    root = tmp_path_factory.mktemp("mitdb")
    fs, n = 360, 360 * 60
    rng = np.random.default_rng(0)
    for name, odd in [("100", "AV"), ("101", "L")]:
        write_record(root, name, fs, rng.normal(0, 0.1, (n, 2)), ["MLII", "V1"], fmt="212")
        beats = np.arange(100, n - 100, 288)
        symbols = ["N"] * len(beats)
        for k in range(5, len(symbols), 9):
            symbols[k] = odd[k % len(odd)]
        sample = np.concatenate([[0, 5000], beats])           # '+' rhythm and '~' noise are not beats
        symbol = ["+", "~"] + symbols
        order = np.argsort(sample, kind="stable")
        wfdb.wrann(name, "atr", sample=sample[order], symbol=[symbol[i] for i in order], write_dir=str(root))
    (root / "RECORDS").write_text("100\n101\nmissing\n")
    return root


def test_holter_rows_follow_the_annotations_and_skip_a_missing_record(mitdb):
    rows, skipped = realdata.holter_rows(mitdb, "mit_bih_arrhythmia", clips=6, long_clips=3, seed=1)
    assert len(skipped) == 1 and skipped[0].startswith("missing:")
    for name in ("100", "101"):
        ann = wfdb.rdann(str(mitdb / name), "atr")
        mine = [r for r in rows if r["ecg_path"] == name]
        assert {r["split"] for r in mine} == {realdata.split_of(f"mit_bih_arrhythmia/{name}")}
        for r in mine:
            assert row_problem(r) is None
            assert_consistent_with_annotations(r, ann.sample, ann.symbol, 360)
            seconds = (r["ecg_end"] - r["ecg_start"]) / 360
            assert seconds == 10 if r["task"] == "location" else 10 <= seconds <= 60
    # every beat type a record has is asked about, found, in 10 s and long clips
    found = {(r["ecg_path"], r["abnormal_type"], r["task"]) for r in rows if r["answer"].startswith("Duration")}
    assert found == {(p, t, task) for p, types in [("100", "AV"), ("101", "L")] for t in types
                     for task in ("location", "location_long")}
    absent = [r for r in rows if r["answer"].startswith("No ")]
    assert 0.15 < len(absent) / len(rows) < 0.35                       # --not-found 0.25


def test_holter_rows_read_back_as_two_named_leads(mitdb):
    rows, _ = realdata.holter_rows(mitdb, "mit_bih_arrhythmia", clips=1, long_clips=1, records=["100"])
    row = next(r for r in rows if r["task"] == "location")
    (ecg,) = RowECGReader(mitdb, fs=100)(row)
    assert ecg.leads == ["II", "V1"] and ecg.signal.shape == (2, 1000)


@pytest.mark.skipif(not (PHYSIONET / "100.atr").exists(), reason="../shared/data/physionet/100 is not here")
def test_rows_from_real_mitbih_100_agree_with_its_atr_file():
    rows, skipped = realdata.holter_rows(PHYSIONET, "mit_bih_arrhythmia", clips=20, long_clips=10, records=["100"])
    ann = wfdb.rdann(str(PHYSIONET / "100"), "atr")
    assert not skipped and len(rows) >= 60
    assert {r["abnormal_type"] for r in rows if r["answer"].startswith("Duration")} == {"A", "V"}  # 33 A, 1 V
    for r in rows:
        assert_consistent_with_annotations(r, ann.sample, ann.symbol, 360)
    beats = [s for s, y in zip(ann.sample, ann.symbol) if y in MITBIH_BEATS]
    assert len(beats) == 2273                                        # record 100's beat count


def test_cli_writes_rows_and_counts(mitdb, tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "-m", "realdata.prepare", "mitdb", "--root", str(mitdb), "--out", str(out),
                        "--prefix", "mitdb/"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = load_rows(out)
    assert rows and all(p.startswith("mitdb/") for row in rows for p in row["ecg_path"])
    assert f"{out}: {len(rows)} rows" in r.stdout and "skipped 1 records" in r.stderr
    bad = subprocess.run([sys.executable, "-m", "realdata.prepare", "ptbxl", "--root", str(tmp_path / "nothing")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "nothing/scp_statements.csv: no such file" in bad.stderr
    assert "Traceback" not in bad.stderr

# ----------------------------------------------------------------------------- PTB-XL


PTBXL_COLUMNS = ["ecg_id", "patient_id", "age", "sex", "height", "weight", "nurse", "site", "device", "recording_date",
                 "report", "scp_codes", "heart_axis", "infarction_stadium1", "infarction_stadium2", "validated_by",
                 "second_opinion", "initial_autogenerated_report", "validated_by_human", "baseline_drift",
                 "static_noise", "burst_noise", "electrodes_problems", "extra_beats", "pacemaker", "strat_fold",
                 "filename_lr", "filename_hr"]


@pytest.fixture(scope="module")
def ptbxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("ptbxl")
    write_csv(root / "scp_statements.csv", ["", "description", "diagnostic", "form", "rhythm", "diagnostic_class",
                                            "diagnostic_subclass", "Statement Category"],
              [["NORM", "normal ECG", 1, "", "", "NORM", "NORM", "Normal/abnormal"],
               ["SR", "sinus rhythm", "", "", 1, "", "", "Rhythm"],
               ["IMI", "inferior myocardial infarction", 1, "", "", "MI", "IMI", "Myocardial infarction"]])
    rows = []
    for ecg_id, codes, fold in [(1, "{'NORM': 100.0, 'SR': 0.0}", 3), (2, "{'SR': 0.0, 'IMI': 80.0}", 9),
                                (1003, "{'NORM': 100.0}", 10), (4, "{'NORM': 10", 1)]:   # the last is malformed
        lr, hr = realdata.ptbxl_path(ecg_id, 100), realdata.ptbxl_path(ecg_id, 500)
        row = dict.fromkeys(PTBXL_COLUMNS, "")
        row.update(ecg_id=f"{ecg_id}.0", patient_id="15709.0", report="sinusrhythmus normales ekg", scp_codes=codes,
                   strat_fold=str(fold), filename_lr=lr, filename_hr=hr)
        rows.append([row[c] for c in PTBXL_COLUMNS])
        write_record(root / Path(hr).parent, Path(hr).name, 500, np.random.default_rng(ecg_id).normal(0, 0.2, (5000, 12)), TWELVE)
    write_csv(root / "ptbxl_database.csv", PTBXL_COLUMNS, rows)
    return root


def test_ptbxl_reports_in_likelihood_order_with_the_recommended_folds(ptbxl):
    rows, skipped = realdata.ptbxl_rows(ptbxl)
    assert len(skipped) == 1 and "line 5" in skipped[0]
    assert [(r["ecg_path"], r["answer"], r["split"]) for r in rows] == [
        ("records500/00000/00001_hr", "Report: Normal ECG, Sinus rhythm", "train"),
        ("records500/00000/00002_hr", "Report: Inferior myocardial infarction, Sinus rhythm", "val"),
        ("records500/01000/01003_hr", "Report: Normal ECG", "test")]
    (ecg,) = RowECGReader(ptbxl, fs=100)(rows[0])
    assert ecg.leads == TWELVE and ecg.signal.shape == (12, 1000)
    text, _ = realdata.ptbxl_rows(ptbxl, rate=100, report="text")
    assert text[0]["ecg_path"] == "records100/00000/00001_lr" and text[0]["answer"] == "Report: sinusrhythmus normales ekg"

# ----------------------------------------------------------------------------- MIMIC-IV-ECG


MIMIC_LEADS = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]   # MIMIC's own order


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic")
    header = ["subject_id", "study_id", "cart_id", "ecg_time"] + [f"report_{k}" for k in range(18)] + [
        "bandwidth", "filtering", "rr_interval", "p_onset", "p_end", "qrs_onset", "qrs_end", "t_end", "p_axis",
        "qrs_axis", "t_axis"]
    studies = [  # (subject, study, time, report lines), written out of time order
        ("10000032", "40689238", "2180-07-23 09:00:00", ["Sinus rhythm", "Borderline ECG"]),
        ("10000032", "40000001", "2180-07-20 08:00:00", ["Sinus rhythm", "Possible right atrial abnormality."]),
        ("10000032", "40000002", "2180-08-01 08:00:00", ["Atrial fibrillation", "Abnormal ECG"]),
        ("10000099", "41000000", "2181-01-01 10:00:00", []),                           # no report text
        ("10000099", "41000001", "not a time", ["Sinus rhythm"])]                       # malformed
    lines, records = [], []
    for subject, study, when, report in studies:
        lines.append([subject, study, "1", when] + report + [""] * (18 - len(report)) + ["0.005-150 Hz"] + [""] * 10)
        path = realdata.mimic_path(subject, study)
        records.append([subject, study, f"{path}.hea", when, path])
        # lead k carries a sine of amplitude k + 1 mV, so the test can tell the leads apart
        t = np.arange(5000) / 500
        write_record(root / Path(path).parent, Path(path).name, 500,
                     np.stack([(k + 1) * np.sin(2 * np.pi * t) for k in range(12)], 1), MIMIC_LEADS)
    write_csv(root / "machine_measurements.csv", header, lines)
    write_csv(root / "record_list.csv", ["subject_id", "study_id", "file_name", "ecg_time", "path"], records)
    return root


def test_mimic_reports_and_serial_ecgs_in_time_order(mimic):
    rows, skipped = realdata.mimic_rows(mimic, multi_per_patient=6, seed=0)
    assert len(skipped) == 2
    reports = {r["ecg_path"]: r["answer"] for r in rows if r["task"] == "report"}
    assert reports["files/p1000/p10000032/s40000001/40000001"] == \
        "Report: Sinus rhythm, Possible right atrial abnormality"
    order = ["s40000001", "s40689238", "s40000002"]                             # by ecg_time
    multi = [r for r in rows if r["task"] == "multi"]
    assert len(multi) == 6 and {r["split"] for r in rows} == {realdata.split_of("mimic/10000032")}
    for r in multi:
        positions = [order.index(p.split("/")[-2]) for p in r["ecg_path"]]
        assert positions == sorted(positions) and positions == list(range(positions[0], positions[-1] + 1))
        if r["question_type"] == "new_findings" and positions == [0, 1, 2]:
            assert r["answer"] == "atrial fibrillation, abnormal ecg"
        if r["question_type"] == "per_ecg_report" and positions[:2] == [0, 1]:
            assert r["answer"].startswith("ECG1: Sinus rhythm, Possible right atrial abnormality. ECG2: Sinus rhythm")


def test_mimic_limb_leads_are_read_by_name_not_position(mimic):
    rows, _ = realdata.mimic_rows(mimic)
    (ecg,) = RowECGReader(mimic, fs=100)(next(r for r in rows if r["task"] == "report"))
    assert ecg.leads == TWELVE
    amplitude = np.abs(ecg.signal).max(1)
    for lead in TWELVE:   # the file's column for this name, wherever it stood
        assert amplitude[TWELVE.index(lead)] == pytest.approx(MIMIC_LEADS.index(lead) + 1, rel=0.02)

# ----------------------------------------------------------------------------- ECG-QA


def test_ecgqa_questions_keep_their_split_and_point_into_ptbxl(tmp_path):
    item = {"template_id": 1, "question_id": 0, "sample_id": 0, "question_type": "single-verify",
            "attribute_type": "scp_code", "question": "Does this ECG show non-diagnostic t abnormalities?",
            "answer": ["yes"], "ecg_id": [12662], "attribute": ["non-diagnostic t abnormalities"]}
    pair = dict(item, question_type="comparison_consecutive-query", answer=["sinus rhythm", "inverted t-waves"],
                ecg_id=[5942, 4660], question="Which symptoms are in the first ECG but not the second?")
    for split, items in [("train", [item, {"question": "broken"}]), ("valid", [pair]), ("test", [item])]:
        (tmp_path / "paraphrased" / split).mkdir(parents=True)
        (tmp_path / "paraphrased" / split / "00000.json").write_text(json.dumps(items))
    rows, skipped = realdata.ecgqa_rows(tmp_path / "paraphrased")
    assert len(skipped) == 1 and [r["split"] for r in rows] == ["test", "train", "val"]
    val = rows[2]
    assert val["ecg_path"] == ["records500/05000/05942_hr", "records500/04000/04660_hr"]
    assert val["answer"] == "sinus rhythm, inverted t-waves" and val["question"].endswith("Please answer briefly.")
    assert all(row_problem(r) is None and r["task"] == "ecgqa" for r in rows)

# ----------------------------------------------------------------------------- streaming


def test_reader_keeps_only_cache_size_records(mitdb):
    rows, _ = realdata.holter_rows(mitdb, "mit_bih_arrhythmia", clips=10, long_clips=0, not_found=0, records=["100"])
    reader = RowECGReader(mitdb, fs=100, cache_size=4)
    for row in rows:
        reader(row)
    assert len(rows) == 20 and len(reader.cache) == 4 and reader.reads == 20
    for row in rows[-4:]:       # the last four are cached: read again, nothing is read from disk
        reader(row)
    assert reader.reads == 20


def test_prefetch_in_worker_processes_equals_reading_in_order(mitdb):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    rows, _ = realdata.holter_rows(mitdb, "mit_bih_arrhythmia", clips=3, long_clips=0, not_found=0, records=["100"])
    rows.append(dict(rows[0], ecg_path="gone"))
    serial, parallel = RowECGReader(mitdb, cache_size=0), RowECGReader(mitdb)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        parallel.prefetch(rows, pool)
        assert len(parallel.pending) == len(rows) and parallel.reads == 0     # started, not waited for
        for row in rows[:-1]:
            assert all(np.array_equal(a.signal, b.signal) and a.leads == b.leads
                       for a, b in zip(serial(row), parallel(row)))
        with pytest.raises(FileNotFoundError, match="gone.hea"):   # a worker's failed read raises here
            parallel(rows[-1])
    assert not parallel.pending and len(parallel.cache) == len(rows) - 1
