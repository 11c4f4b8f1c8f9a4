"""
rule_on_readings.py — is it the reading or the reasoning? An analysis behind docs/RESULTS.md, not part of the library.

A trained model reads every ECG of the held-out ECG-QA and multi-ECG test rows on its own: the report question gives
its statements, the grounded question its heart rate, PR, QRS and QTc. The generator's own rule then answers each
question from those readings, and the answers are scored as eval.py scores the model's. The same rule on the
generator's truth must score 1.0 (a check of this script). If the rule on the model's readings scores far above the
model's own answers, what the model lacks is the step from reading to answer, not the reading.

  python -m docs.analysis.rule_on_readings out/model    # after `python train.py`; about 4 minutes on 2 cores;
                                                        # also each ECG read alone, by its place in the prompt,
                                                        # and the answers given those readings
  python -m docs.analysis.rule_on_readings out/test_predictions.jsonl   # answers that write their reading first:
                                                                        # does the conclusion follow from it? and is
                                                                        # an ECG among several read as well as alone?

The rules are written again here from the question text, since the task builders draw each question and its answer
together (synthetic/tasks.py); synthetic/tasks.py is the reference for them.
"""

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from chat import ECGChat, turns_of
from config import Config
from data import STANDARD_LEADS, STATEMENTS
from eval import (bootstrap, evaluate, find_statements, parse_measurements, per_ecg_parts, row_score,
                  rows_per_task, set_match)
from synthetic.tasks import (ASKED, CHECKED, GROUNDED_QUESTIONS, REPORT_QUESTIONS, RHYTHMS, askable,
                             build_synthetic_dataset, findings_of, listing, reading_of)

BY_LOWER = {s.lower(): s for s in STATEMENTS}


def read_every_ecg(model, ds, paths):
    """{path: a Truth-like reading}: statements (rhythm first), leads, hr_bpm, pr_ms, qrs_ms, qtc_ms."""
    ask = [{"question": q, "answer": "", "ecg_path": [p], "task": task} for p in paths
           for task, q in (("report", REPORT_QUESTIONS[0]), ("grounded", GROUNDED_QUESTIONS[0]))]
    _, preds = evaluate(model, ask, ds.inputs, 16, 256)
    said = {(p["task"], p["ecg_path"][0]): p["prediction"] for p in preds}
    out = {}
    for p in paths:
        st = sorted(find_statements(said["report", p]), key=lambda s: (s not in RHYTHMS, STATEMENTS.index(s)))
        st = st if st and st[0] in RHYTHMS else ["Sinus rhythm"] + st
        m, g = parse_measurements(said["grounded", p]), said["grounded", p]
        qtc = re.search(r"QT/QTc:\s*[\d.]+/([\d.]+)", g)
        out[p] = SimpleNamespace(statements=st, leads=list(ds.specs[p].leads), hr_bpm=m["hr"] or 75, pr_ms=m["pr"],
                                 qrs_ms=m["qrs"] or 90, qtc_ms=float(qtc.group(1)) if qtc else 420)
    return out


def parse_reading(text):
    """A written reading ('Reading: ECG1: 12 leads, 72 bpm, Sinus rhythm, ... ECG2: ...' or a single ECG's, as
    synthetic/tasks.reading_of writes and a model trained on it writes again) -> [a Truth-like reading per ECG].
    The intervals the rules compare are the ones the statements imply (a bundle branch block's QRS is wide, ...)."""
    text = text.split("Reading:", 1)[-1].rsplit("Answer:", 1)[0]
    text = text.split(ASKED, 1)[0].split(CHECKED, 1)[0]   # the reading alone, not the question or the check
    parts = [p for _, p in per_ecg_parts(text)] or [text]
    out = []
    for part in parts:
        m = re.match(r"\s*(?:12 leads|leads? ([^,]+(?:, V\d)?)),\s*(\d+) bpm", part)
        leads = list(STANDARD_LEADS) if m and m.group(1) is None else m.group(1).split(", ") if m else []
        st = sorted(find_statements(part), key=lambda s: (s not in RHYTHMS, STATEMENTS.index(s)))
        st = st if st and st[0] in RHYTHMS else ["Sinus rhythm"] + st
        out.append(SimpleNamespace(statements=st, leads=leads, hr_bpm=float(m.group(2)) if m else 75.0,
                                   pr_ms=250 if "1st degree A-V block" in st else 160,
                                   qrs_ms=130 if any("bundle branch" in s for s in st) else 90,
                                   qtc_ms=500 if "Prolonged QT interval" in st else 420))
    return out


def single_answer(q, t):
    have = set(findings_of(t))
    if m := re.match(r"Does this ECG show (.*)\?$", q):
        return "yes" if BY_LOWER[m.group(1)] in have else "no"
    if "narrow or wide" in q:
        return "wide" if t.qrs_ms >= 120 else "narrow"
    if "slow, normal or fast" in q:
        return "slow" if t.hr_bpm < 60 else "fast" if t.hr_bpm > 100 else "normal"
    if "normal or prolonged" in q:
        return "prolonged" if "Prolonged QT interval" in t.statements else "normal"
    if q.startswith("Which rhythm does") or q == "What is the rhythm of this ECG?":
        return t.statements[0].lower()
    if "premature beats" in q:
        return listing([s for s in findings_of(t) if s.startswith("Premature")])
    if "conduction abnormalities" in q:
        return listing([s for s in findings_of(t) if "block" in s])
    if "numeric features" in q:
        above = [n for n, hit in [("heart rate", t.hr_bpm > 100), ("pr interval", (t.pr_ms or 0) > 200),
                                  ("qrs duration", t.qrs_ms >= 120),
                                  ("qt interval", "Prolonged QT interval" in t.statements)] if hit]
        return ", ".join(above) or "none"
    if "abnormal findings" in q:
        return listing([s for s in findings_of(t) if s not in RHYTHMS])
    raise ValueError(f"no rule for {q!r}")


def series_answer(row, q, ts):
    pool = set(askable(ts))
    seen = [[s for s in findings_of(x) if s in pool] for x in ts]
    if row["task"] == "ecgqa":   # the comparison form, two ECGs
        first, second = seen
        if m := re.match(r"Do both ECGs show (.*)\?$", q):
            return "yes" if BY_LOWER[m.group(1)] in first and BY_LOWER[m.group(1)] in second else "no"
        if "first ECG but absent in the second" in q:
            return listing([s for s in first if s not in second])
        if "second ECG but absent in the first" in q:
            return listing([s for s in second if s not in first])
        return listing([s for s in first if s in second])
    kind = row["question_type"]
    if kind == "per_ecg_report":
        return " ".join(f"ECG{k + 1}: {', '.join(x.statements)}." for k, x in enumerate(ts))
    if kind == "new_findings":
        return listing([s for s in seen[-1] if s not in seen[0]])
    if kind == "resolved_findings":
        return listing([s for s in seen[0] if s not in seen[-1]])
    if kind == "first_appearance":
        s = BY_LOWER[re.search(r"In which ECG does (.*) first appear\?", q).group(1)]
        first = next((k for k, f in enumerate(seen) if s in f), None)
        return f"ECG{first + 1}" if first is not None else "none"
    if kind == "hr_trend":
        d = round(ts[-1].hr_bpm) - round(ts[0].hr_bpm)
        return "increased" if d >= 10 else "decreased" if d <= -10 else "unchanged"
    return "yes" if len({x.statements[0] for x in ts}) > 1 else "no"   # rhythm_change


def answer(row, ts):
    q = row["question"].removesuffix(" Please answer briefly.")
    q = q.split(" days. ", 1)[-1]   # multi-ECG questions open with "These N ECGs ... over D days. "
    return single_answer(q, ts[0]) if len(ts) == 1 else series_answer(row, q, ts)


def main(model_dir):
    model = ECGChat.load(model_dir)
    cfg = Config()   # the default run's test split and rows
    ds = build_synthetic_dataset(cfg.test_patients, split="test")
    rows = [r for r in rows_per_task(ds.rows, cfg.test_rows, cfg.test_rows_per_type) if r["task"] in ("ecgqa", "multi")]
    paths = sorted({p for r in rows for p in r["ecg_path"]})
    print(f"{len(rows)} ECG-QA and multi-ECG test rows, {len(paths)} ECGs")
    readings = read_every_ecg(model, ds, paths)
    for name, get in [("rule on the truth", lambda p: ds.record(p)[1]), ("rule on the model's readings", readings.get)]:
        preds = [answer(r, [get(p) for p in r["ecg_path"]]) for r in rows]
        for task in ("ecgqa", "multi"):
            rr, pp = zip(*[(r, p) for r, p in zip(rows, preds) if r["task"] == task])
            metric, v, lo, hi = bootstrap(list(rr), list(pp))
            per = {t: np.mean([row_score(r, p) for r, p in zip(rr, pp) if r["question_type"] == t])
                   for t in sorted({r["question_type"] for r in rr})}
            print(f"{name}, {task}: {metric} {v:.3f} [{lo:.3f}, {hi:.3f}]; " +
                  ", ".join(f"{t} {s:.3f}" for t, s in per.items()))
    # the same ECGs as the answers' readings (test_predictions.jsonl's by_place), each read alone
    print_places("each ECG read alone, by its place in the prompt", by_place(
        ([ds.record(p)[1] for p in r["ecg_path"]], [readings[p] for p in r["ecg_path"]]) for r in rows if r.get("reading")))
    # would the answers be right if the model read each ECG of a prompt as well as alone? given those readings:
    with torch.no_grad():
        after = answered_after_alone(model, ds, rows, readings)
    for task, f in faithfulness(after).items():
        print(f"{task}, the rows of several ECGs answered after their readings made alone: {f['n']} rows, "
              f"right {f['right']:.3f}; the rule on the given reading right {f['rule_right']:.3f}; the conclusion "
              f"follows it {f['faithful']:.3f}")


def answered_after_alone(model, ds, rows, readings, batch_size=16):
    """The rows of several ECGs answered by the model after a reading it is given: each ECG's reading made alone
    (read_every_ecg), written as a row's reading is ('Reading: ECG1: 12 leads, 72 bpm, ... ECG2: ...'); the model
    writes the check and the answer. -> prediction records as test_predictions.jsonl holds them."""
    rows = [r for r in rows if len(r["ecg_path"]) > 1 and r.get("reading")]
    given = [reading_of([readings[p] for p in r["ecg_path"]]) for r in rows]
    inputs = [ds.inputs(r) for r in rows]
    prompts = [model.prompt(turns_of(r, answered=False), x, add_generation_prompt=True)[0] + model.tokenizer.encode(g)
               for r, x, g in zip(rows, inputs, given)]
    written = []
    for k in range(0, len(rows), batch_size):
        ids = model.generate(prompts[k:k + batch_size], inputs[k:k + batch_size], 160)
        written += [model.tokenizer.decode(w) for w in ids]
    return [{k: r[k] for k in ("task", "question_type", "ecg_path", "question", "answer")} | {"prediction": g + w}
            for r, g, w in zip(rows, given, written)]


def faithfulness(preds):
    """Test answers (a run's test_predictions.jsonl records): of the ECG-QA and multi-ECG answers that write a reading
    first -> {task: {"n", "faithful": the conclusion is the rule applied to the model's own reading, "rule_right": that
    rule's answer is right (the reading holds what the question needs), "right": the answer is right}}."""
    out = {}
    for task in ("ecgqa", "multi"):
        rows = [p for p in preds if p["task"] == task and "Reading:" in p["prediction"]]
        if rows:
            # a reading of another number of ECGs than the question has answers nothing: never faithful, never right
            readings = [parse_reading(r["prediction"]) for r in rows]
            rule = [answer(r, ts) if len(ts) == len(r["ecg_path"]) else "(no reading)" for r, ts in zip(rows, readings)]
            out[task] = {"n": len(rows),
                         "faithful": np.mean([set_match(r["prediction"], a) for r, a in zip(rows, rule)]),
                         "rule_right": np.mean([row_score(r, a) for r, a in zip(rows, rule)]),
                         "right": np.mean([row_score(r, r["prediction"]) for r in rows])}
    return out


def by_place(readings):
    """[(the true readings of a prompt's ECGs, the ones written), ...] -> {place ("one ECG", "ECG1", "ECG2", "ECG3+"):
    (statement F1, heart-rate MAE, ECGs)}, each ECG scored by its place in its prompt."""
    counts = {}   # place -> [statements right, written, true, [rate errors]]
    for true, said in readings:
        for k, (t, s) in enumerate(zip(true, said)):
            c = counts.setdefault("one ECG" if len(true) == 1 else f"ECG{min(k + 1, 3)}" + "+" * (k >= 2),
                                  [0, 0, 0, []])
            c[0] += len(set(t.statements) & set(s.statements))
            c[1], c[2] = c[1] + len(s.statements), c[2] + len(t.statements)
            c[3].append(abs(round(t.hr_bpm) - s.hr_bpm))   # a reading writes the rate rounded
    return {place: (2 * c[0] / (c[1] + c[2]), float(np.mean(c[3])), len(c[3])) for place, c in sorted(counts.items())}


def reading_by_place(preds):
    """Test answers (test_predictions.jsonl records) that write a reading, against the row's true one, by the ECG's
    place in its prompt (by_place): is an ECG among several read as well as one alone?"""
    return by_place((parse_reading(p["reading"]), parse_reading(p["prediction"])) for p in preds
                    if p["task"] in ("ecgqa", "multi") and p.get("reading") and "Reading:" in p["prediction"])


def print_places(what, places):
    print(f"{what} (statement F1, heart-rate MAE, ECGs): " +
          "; ".join(f"{k} {f1:.3f}, {mae:.1f} bpm, {n}" for k, (f1, mae, n) in places.items()))


if __name__ == "__main__":
    arg = sys.argv[1] if len(sys.argv) > 1 else "out/model"
    if arg.endswith(".jsonl"):
        for task, f in faithfulness([json.loads(line) for line in Path(arg).read_text().splitlines()]).items():
            print(f"{task}: {f['n']} answers with a reading; the conclusion follows the own reading "
                  f"{f['faithful']:.3f}; "
                  f"the rule on the own reading right {f['rule_right']:.3f}; the answer right {f['right']:.3f}")
        print_places("the reading in the answer, by the ECG's place",
                     reading_by_place([json.loads(line) for line in Path(arg).read_text().splitlines()]))
    else:
        main(arg)
