"""
realdata/prepare.py — downloaded databases -> anyECG-format training rows, with one command each.

The anyECG-chat release ships its rows but not the code that built them; this file is that code, so the rows can be
rebuilt from the databases (and built for databases it left out). Every builder returns (rows, skipped): anyECG rows,
each with a "split" (train / val / test) fixed per patient or record, so no patient lands in two splits, and the
records or lines that could not be used, with why.

Read top to bottom:
  1. Holter localization  MIT-BIH Arrhythmia, European ST-T, MIT-BIH ST Change: 10 s and long clips around the
                          annotated beats, asking for a beat type present ("Duration: ...") or absent ("No ... Found").
  2. PTB-XL               report rows from ptbxl_database.csv; strat_fold 9 / 10 -> val / test, as PTB-XL recommends.
  3. MIMIC-IV-ECG         report rows from machine_measurements.csv, multi-ECG rows from each patient's serial ECGs.
  4. ECG-QA               its PTB-XL question files -> ecgqa rows.
  5. Command line         python -m realdata.prepare {mitdb,edb,stdb,ptbxl,mimic,ecgqa} --root DIR --out rows.json
Training streams the records these rows name (data.RowECGReader + parallel reads in train.py); how fast
they read: `python -m bench.speed read`.
"""
import argparse
import ast
import csv
import json
import sys
import zlib
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import numpy as np

from data import BEAT_NAMES, MITBIH_BEATS, atomic_write, localization_answer
from synthetic.tasks import BRIEF, LOCATION_QUESTIONS, REPORT_QUESTIONS

HOLTER_DATASETS = {"mitdb": "mit_bih_arrhythmia", "edb": "european_st_t", "stdb": "mit_bih_st_change"}


def split_of(key, val=0.1, test=0.1):
    """A patient or record id -> its split, fixed by crc32 (not Python's salted hash): ~10 % val, ~10 % test."""
    u = zlib.crc32(str(key).encode()) / 2 ** 32
    return "test" if u < test else "val" if u < test + val else "train"


def read_csv(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is --root the database's top folder?)")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- 1. Holter localization
def record_names(root):
    """A PhysioNet database's records: its RECORDS file, else every .hea below root."""
    root = Path(root)
    if (root / "RECORDS").is_file():
        names = [line.strip() for line in open(root / "RECORDS") if line.strip()]
    else:
        names = sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.hea"))
    if not names:
        raise FileNotFoundError(f"{root}: no RECORDS file and no .hea headers -- not a WFDB database folder")
    return names


def holter_rows(root, dataset, clips=10, long_clips=5, long_seconds=(10.0, 60.0), not_found=0.25, seed=0,
                records=None, prefix=""):
    """Localization rows from the beat annotations (`atr`) of every record under root. For each beat type of
    BEAT_NAMES a record has: `clips` 10 s clips (task "location") and `long_clips` clips of long_seconds (task
    "location_long"), each placed at random around a random beat of that type. Then "not found" rows, `not_found` of
    all rows: random clips asked about a type they do not contain. Every answer is data.localization_answer, so it
    follows anyECG's rule exactly."""
    rng = np.random.default_rng(seed)
    rows, skipped = [], []
    for name in records or record_names(root):
        try:
            rows += record_location_rows(Path(root) / name, name, dataset, rng, clips, long_clips, long_seconds,
                                         not_found, prefix)
        except Exception as e:  # wfdb raises many kinds for a bad file: skip the record, say why
            skipped.append(f"{name}: {type(e).__name__}: {e}")
    return rows, skipped


def record_location_rows(path, name, dataset, rng, clips, long_clips, long_seconds, not_found, prefix):
    """One record's localization rows (see holter_rows); only its header and `atr` file are read, never its samples."""
    import wfdb
    header = wfdb.rdheader(str(path))
    ann = wfdb.rdann(str(path), "atr")
    fs, n = float(header.fs), int(header.sig_len)
    is_beat = np.isin(np.asarray(ann.symbol, dtype=str), list(MITBIH_BEATS))
    beats, symbols = np.asarray(ann.sample)[is_beat], np.asarray(ann.symbol, dtype=str)[is_beat]
    split = split_of(f"{dataset}/{name}")

    def row(start, length, symbol, task):
        end = start + length
        return {"question": str(rng.choice(LOCATION_QUESTIONS)).format(name=BEAT_NAMES[symbol]),
                "answer": localization_answer(beats, symbols, start, end, fs, symbol),
                "ecg_path": prefix + name, "dataset": dataset, "task": task, "abnormal_type": symbol,
                "ecg_start": int(start), "ecg_end": int(end), "split": split}

    out = []
    for task, count, seconds in [("location", clips, (10.0, 10.0)), ("location_long", long_clips, long_seconds)]:
        for symbol in sorted(BEAT_NAMES):
            at = beats[symbols == symbol]
            for _ in range(count if len(at) else 0):
                length = min(n, int(round(rng.uniform(*seconds) * fs)))
                beat = int(rng.choice(at))       # the clip [start, start + length) holds this beat
                start = int(rng.integers(max(0, beat - length + 1), min(beat, n - length) + 1))
                out.append(row(start, length, symbol, task))
    for _ in range(round(max(len(out), clips) * not_found / (1 - not_found))):   # the "not found" rows
        task = "location" if rng.random() < 0.6 else "location_long"
        length = min(n, int(round((10.0 if task == "location" else rng.uniform(*long_seconds)) * fs)))
        start = int(rng.integers(0, n - length + 1))
        absent = sorted(set(BEAT_NAMES) - set(symbols[(beats >= start) & (beats < start + length)]))
        if absent:
            out.append(row(start, length, str(rng.choice(absent)), task))
    return out


# --------------------------------------------------------------------------- 2. PTB-XL
def ptbxl_path(ecg_id, rate=500):
    """PTB-XL's file layout: records500/05000/05942_hr (500 Hz) or records100/05000/05942_lr."""
    return f"records{rate}/{ecg_id // 1000 * 1000:05d}/{ecg_id:05d}_{'hr' if rate == 500 else 'lr'}"


def scp_descriptions(root):
    """SCP code -> its description in scp_statements.csv, first letter capitalised."""
    out = {}
    for r in read_csv(Path(root) / "scp_statements.csv"):
        code = r.get("") or next(iter(r.values()))     # the code is the unnamed first column
        desc = (r.get("description") or "").strip()
        if code and desc:
            out[code.strip()] = desc[0].upper() + desc[1:]
    return out


def ptbxl_rows(root, rate=500, report="statements", seed=0, prefix=""):
    """One report row per ECG of ptbxl_database.csv. report="statements": its SCP codes'
    descriptions, most likely first ("Report: Normal ECG, Sinus rhythm"); "text": the
    free-text report column (mostly German, as recorded). strat_fold 9 -> val, 10 -> test."""
    if rate not in (100, 500):
        raise ValueError(f"PTB-XL has records at 100 or 500 Hz, not {rate}")
    rng = np.random.default_rng(seed)
    names = scp_descriptions(root) if report == "statements" else {}
    rows, skipped = [], []
    for k, r in enumerate(read_csv(Path(root) / "ptbxl_database.csv")):
        try:
            if report == "statements":
                codes = ast.literal_eval(r["scp_codes"])       # a dict literal; literal_eval never runs code
                codes = sorted(codes.items(), key=lambda kv: -float(kv[1]))
                text = ", ".join(names[c] for c, _ in codes if c in names)
            else:
                text = r["report"].strip().rstrip(".")
            fold = int(float(r["strat_fold"]))
            path = r["filename_hr" if rate == 500 else "filename_lr"].strip() or ptbxl_path(int(float(r["ecg_id"])), rate)
        except (KeyError, ValueError, SyntaxError, TypeError, AttributeError) as e:
            skipped.append(f"ptbxl_database.csv line {k + 2}: {type(e).__name__}: {e}")
            continue
        if not text:
            skipped.append(f"ptbxl_database.csv line {k + 2}: no statement or report text")
            continue
        rows.append({"question": str(rng.choice(REPORT_QUESTIONS)), "answer": "Report: " + text,
                     "ecg_path": prefix + path, "dataset": "ptbxl", "task": "report",
                     "split": "val" if fold == 9 else "test" if fold == 10 else "train"})
    return rows, skipped


# --------------------------------------------------------------------------- 3. MIMIC-IV-ECG
# MIMIC-IV-ECG orders its limb leads I, II, III, aVR, aVF, aVL; here and in data.prepare_ecg leads go by header name.
def mimic_path(subject_id, study_id):
    """MIMIC-IV-ECG's layout: files/p1000/p10000032/s40689238/40689238."""
    return f"files/p{str(subject_id)[:4]}/p{subject_id}/s{study_id}/{study_id}"


def mimic_statements(r):
    """The machine report lines of one machine_measurements.csv row (report_0..report_17)."""
    lines = [(r.get(f"report_{k}") or "").strip().rstrip(".").strip() for k in range(18)]
    return [x for x in lines if x]


def mimic_rows(root, multi_per_patient=2, max_ecgs=3, seed=0, prefix=""):
    """A report row per ECG with a machine report, and for every patient with several ECGs, `multi_per_patient`
    multi-ECG rows over 2..max_ecgs consecutive ECGs in time order: the findings of each ("ECG1: ... ECG2: ..."),
    or which findings are new / no longer present (answers checkable exactly from the reports)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    listed = root / "record_list.csv"   # optional; without it, paths follow mimic_path
    paths = {r["study_id"]: r["path"] for r in read_csv(listed)} if listed.is_file() else {}
    rows, skipped, by_patient = [], [], defaultdict(list)
    for k, r in enumerate(read_csv(root / "machine_measurements.csv")):
        try:
            subject, study = str(int(r["subject_id"])), str(int(r["study_id"]))
            when = datetime.fromisoformat(r["ecg_time"].strip())
        except (KeyError, ValueError, AttributeError) as e:
            skipped.append(f"machine_measurements.csv line {k + 2}: {type(e).__name__}: {e}")
            continue
        statements = mimic_statements(r)
        if not statements:
            skipped.append(f"machine_measurements.csv line {k + 2}: no report text")
            continue
        path = prefix + (paths.get(study) or mimic_path(subject, study))
        rows.append({"question": str(rng.choice(REPORT_QUESTIONS)), "answer": "Report: " + ", ".join(statements),
                     "ecg_path": path, "dataset": "mimic", "task": "report", "split": split_of(f"mimic/{subject}")})
        by_patient[subject].append((when, path, statements))
    for subject, ecgs in by_patient.items():
        ecgs.sort(key=lambda e: e[0])
        for _ in range(multi_per_patient if len(ecgs) > 1 else 0):
            n = int(rng.integers(2, min(max_ecgs, len(ecgs)) + 1))
            first = int(rng.integers(0, len(ecgs) - n + 1))
            rows.append(mimic_multi_row(ecgs[first:first + n], rng, split_of(f"mimic/{subject}")))
    return rows, skipped


def mimic_multi_row(ecgs, rng, split):
    reports = [s for _, _, s in ecgs]
    days = (ecgs[-1][0] - ecgs[0][0]).days
    kind = str(rng.choice(["per_ecg_report", "new_findings", "resolved_findings"]))
    if kind == "per_ecg_report":   # anyECG's own wording for this question
        q = "What are the key findings in each ECG report?"
        a = " ".join(f"ECG{k + 1}: {', '.join(s)}." for k, s in enumerate(reports))
    else:
        first, last = [{x.lower() for x in s} for s in (reports[0], reports[-1])]
        new = [x.lower() for x in reports[-1] if x.lower() not in first] if kind == "new_findings" else \
            [x.lower() for x in reports[0] if x.lower() not in last]
        q = ("Which findings appear in the last ECG that were not in the first ECG?" if kind == "new_findings" else
             "Which findings of the first ECG are no longer present in the last ECG?")
        q = f"These {len(ecgs)} ECGs of one patient were recorded over {days} days. {q}{BRIEF}"
        a = ", ".join(new) if new else "none"
    return {"question": q, "answer": a, "ecg_path": [p for _, p, _ in ecgs], "dataset": "mimic", "task": "multi",
            "question_type": kind, "split": split}


# --------------------------------------------------------------------------- 4. ECG-QA
ECGQA_SPLITS = {"train": "train", "valid": "val", "val": "val", "test": "test"}


def ecgqa_rows(root, rate=500, prefix=""):
    """ECG-QA's PTB-XL questions (a file, or a folder such as ecgqa/ptbxl/paraphrased with train/valid/test
    subfolders) -> ecgqa rows; the answer list is joined with ", " and the split is the subfolder's (ECG-QA's own)."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(root.rglob("*.json"))
    if not files:
        raise FileNotFoundError(f"{root}: no ECG-QA .json files")
    rows, skipped = [], []
    for path in files:
        split = next((ECGQA_SPLITS[p] for p in reversed(path.parts[:-1]) if p in ECGQA_SPLITS), "train")
        try:
            items = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            skipped.append(f"{path}: {type(e).__name__}: {e}")
            continue
        for k, q in enumerate(items if isinstance(items, list) else []):
            try:
                question = q["question"].strip()
                answer = ", ".join(str(a) for a in q["answer"])
                ecgs = [prefix + ptbxl_path(int(e), rate) for e in q["ecg_id"]]
                kind = str(q.get("question_type", ""))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                skipped.append(f"{path} item {k}: {type(e).__name__}: {e}")
                continue
            rows.append({"question": question if question.endswith(BRIEF.strip()) else question + BRIEF,
                         "answer": answer, "ecg_path": ecgs, "dataset": "ptbxl", "task": "ecgqa",
                         "question_type": kind, "template_id": q.get("template_id"), "split": split})
    return rows, skipped


# --------------------------------------------------------------------------- 5. command line
EPILOG = """examples:
  python -m realdata.prepare mitdb --root ~/physionet/mitdb --out data/mitdb.json
  python -m realdata.prepare ptbxl --root ~/physionet/ptb-xl --out data/ptbxl.json --rate 100
  python -m realdata.prepare mimic --root ~/physionet/mimic-iv-ecg --out data/mimic.json
  python -m realdata.prepare ecgqa --root ~/ecgqa/ptbxl/paraphrased --out data/ecgqa.json
then: python train.py --data data/mitdb.json --ecg_root ~/physionet/mitdb
Several files share one --ecg_root when built with --prefix (e.g. --prefix mitdb/)."""


def build(args):
    if args.source in HOLTER_DATASETS:
        rows, skipped = holter_rows(args.root, HOLTER_DATASETS[args.source], args.clips, args.long_clips,
                                    (10.0, args.long_max), args.not_found, args.seed, prefix=args.prefix)
    elif args.source == "ptbxl":
        rows, skipped = ptbxl_rows(args.root, args.rate, args.report, args.seed, args.prefix)
    elif args.source == "mimic":
        rows, skipped = mimic_rows(args.root, args.multi_per_patient, args.max_ecgs, args.seed, args.prefix)
    else:
        rows, skipped = ecgqa_rows(args.root, args.rate, args.prefix)
    for line in skipped[:10]:
        print(f"skipped {line}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} records or lines in all", file=sys.stderr)
    if not rows:
        raise SystemExit(f"{args.root}: no rows could be built ({len(skipped)} skipped)")
    atomic_write(args.out, json.dumps(rows, indent=0))   # an interrupted build never leaves half a file
    counts = Counter((r["task"], r["split"]) for r in rows)
    print(f"{args.out}: {len(rows)} rows")
    for task in sorted({t for t, _ in counts}):
        print(f"  {task:14s} " + "  ".join(f"{s} {counts[task, s]}" for s in ("train", "val", "test")))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m realdata.prepare", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=[*HOLTER_DATASETS, "ptbxl", "mimic", "ecgqa"],
                   help="mitdb / edb / stdb: MIT-BIH Arrhythmia / European ST-T / MIT-BIH ST Change "
                        "localization; ptbxl, mimic: reports (+ multi-ECG for mimic); ecgqa: ECG-QA questions")
    p.add_argument("--root", help="the database's top folder (ecgqa: a question file or folder)")
    p.add_argument("--out", default="rows.json", help="anyECG-format JSON written here")
    p.add_argument("--prefix", default="", help="put before every ecg_path (to share one --ecg_root)")
    p.add_argument("--seed", type=int, default=0, help="clip positions and question wording")
    g = p.add_argument_group("localization (mitdb, edb, stdb)")
    g.add_argument("--clips", type=int, default=10, help="10 s clips per beat type a record has")
    g.add_argument("--long-clips", type=int, default=5, help="long clips per beat type a record has")
    g.add_argument("--long-max", type=float, default=60.0, help="long clips last 10 s to this many seconds")
    g.add_argument("--not-found", type=float, default=0.25, help="share of rows asking for an absent type")
    g = p.add_argument_group("ptbxl, ecgqa")
    g.add_argument("--rate", type=int, default=500, choices=[100, 500], help="PTB-XL records at 100 or 500 Hz")
    g.add_argument("--report", default="statements", choices=["statements", "text"],
                   help="ptbxl answers: SCP statement descriptions or the free-text report")
    g = p.add_argument_group("mimic")
    g.add_argument("--multi-per-patient", type=int, default=2, help="multi-ECG rows per patient with several ECGs")
    g.add_argument("--max-ecgs", type=int, default=3, help="most ECGs in one multi-ECG row")
    args = p.parse_args(argv)
    if not args.root:
        p.error(f"{args.source} needs --root (the database's top folder)")
    if not 0 <= args.not_found < 1:
        p.error("--not-found must be in [0, 1)")
    try:
        build(args)
    except (OSError, ValueError) as e:   # a missing CSV or folder: one line naming it, no traceback
        raise SystemExit(f"realdata.prepare {args.source}: {e}") from None


if __name__ == "__main__":
    main()
