"""
eval.py — how good a model is.

Read top to bottom:
  1. Metrics       pure functions on answer texts: localization IoU (anyECG's rule), BLEU-1..4 and ROUGE-L, statement
                   precision/recall/F1 (ECG-Bench style), exact match (ECG-QA, multi-ECG), grounded measurement MAE.
  2. Scoring       `score_rows`: each task's metrics over rows, with bootstrap intervals; the chance level
                   `prior_answers`; paired differences; `print_table`.
  3. Evaluating    `evaluate(model, rows, inputs_of)`: batched generation over anyECG rows, the ECG optionally blanked
                   (--ablate-ecg) to see how much it matters; `evaluate_held_out`: the tables train.py ends with.
  4. Command line  python eval.py --ckpt DIR --data FILE.json --ecg-root DIR --out results.json
                   [--ablate-ecg] [--batch-size 8] [--max-new-tokens 256] [--limit N] [--bench NAME]
                   python eval.py --bench NAME --data ROWS.json --answers ANSWERS.jsonl: ECG-Bench answers scored
                   (ecgbench/score.py: the published rules beside corrected ones)
How fast a model is: python -m bench.speed. How fast the encoder alone learns: python -m synthetic.warmup.
"""
import argparse
import json
import math
import os
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from chat import ANSWER, turns_of
from data import (LOCATION_TASKS, STATEMENTS, TASKS, ECGRecord, RowECGReader, atomic_write, find_statements, load_rows,
                  merge_intervals, parse_localization, read_json, row_paths)
from ecgbench import score as ecgbench
from images.chat import ImageChat, load_chat
from images.rows import PrintoutReader
from model import choose_device


# --------------------------------------------------------------------------- 1. metrics: answer texts -> numbers
# --- localization (anyECG): "Duration: 1.3s-2.9s, 6.1s-7.7s" or "No ... Found"
def localization_iou(pred, ref):
    """IoU of the time two localization answers cover. Both "No X Found" -> 1 if they name the same beat (asked about
    RBBB, an answer about PVCs is wrong), only one -> 0, an answer with no readable interval -> 0. Each side is the
    union of its intervals: listing a span twice gains nothing."""
    p, r = parse_localization(pred), parse_localization(ref)
    if p is None or r is None:
        return 0.0
    if not p or not r:
        return float(not p and not r and _named_beat(pred) == _named_beat(ref))
    p, r = merge_intervals(p), merge_intervals(r)
    inter = sum(max(0.0, min(b1, b2) - max(a1, a2)) for a1, b1 in p for a2, b2 in r)
    union = sum(b - a for a, b in p) + sum(b - a for a, b in r) - inter
    return inter / union if union > 0 else 0.0


def _named_beat(text):
    """The beat a "No X Found" answer names, normalised."""
    return normalise_answer(re.search(r"\bno\b(.*)\bfound\b", text, re.IGNORECASE | re.DOTALL).group(1))


def anyecg_iou(pred, ref):
    """anyECG-chat's own localization score, so figures compare with its paper: identical texts -> 1; otherwise both
    must parse as "Duration: as-bs, ..." (anything else -> 0), the intersection sums the overlap of every predicted
    span with every reference span (so overlapping predicted spans count twice, and a score can pass 1), over the
    length of the union of all spans. localization_iou instead intersects the two unions."""
    if pred == ref:
        return 1.0
    try:   # their parser: drop "Duration: ", split spans on ", ", ends on "-", drop each end's last character
        p, r = ([tuple(float(x[:-1]) for x in span.split("-", 1)) for span in text.replace("Duration: ", "").split(", ")]
                for text in (pred, ref))
    except ValueError:
        return 0.0
    if any(len(span) != 2 for span in p + r):   # a span with no "-" ("Duration: 3.2s"): their parser fails too
        return 0.0
    inter = sum(max(0.0, min(b1, b2) - max(a1, a2)) for a1, b1 in p for a2, b2 in r)
    union = sum(b - a for a, b in merge_intervals(p + r))
    return inter / union if union > 0 else 0.0


def group_mean(values, groups):
    """Micro mean (over all rows), macro mean (over the groups' means) and each group's mean: macro over beat types
    keeps the rare ones (a single PVC) from vanishing under the common ones."""
    per = {}
    for v, g in zip(values, groups):
        per.setdefault(g, []).append(v)
    means = {g: sum(v) / len(v) for g, v in per.items()}
    return {"micro": sum(values) / len(values) if values else 0.0,
            "macro": sum(means.values()) / len(means) if means else 0.0,
            "per_type": {g: {"n": len(per[g]), "mean": means[g]} for g in sorted(per)}}


# --- report text: BLEU and ROUGE-L on lower-case words (punctuation dropped)
def words(text):
    return re.findall(r"\w+", text.lower())


def ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hyps, refs, max_n=4):
    """Corpus BLEU-1..max_n (Papineni et al. 2002), one reference per hypothesis: clipped n-gram matches and counts
    summed over the corpus; BLEU-n = the geometric mean of the precisions of orders 1..n x the brevity penalty."""
    match, total, hyp_len, ref_len = [0] * max_n, [0] * max_n, 0, 0
    for h, r in zip(hyps, refs):
        h, r = words(h), words(r)
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            ref_counts = ngrams(r, n)
            match[n - 1] += sum(min(c, ref_counts[g]) for g, c in ngrams(h, n).items())
            total[n - 1] += max(0, len(h) - n + 1)
    if hyp_len == 0:
        return [0.0] * max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    out, log_sum = [], 0.0
    for n in range(max_n):
        if match[n] == 0:  # log 0: this order and every higher one score 0
            return out + [0.0] * (max_n - n)
        log_sum += math.log(match[n] / total[n])
        out.append(bp * math.exp(log_sum / (n + 1)))
    return out


def lcs_length(a, b):
    """Length of the longest common subsequence of two token lists (one DP row)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b):
            prev_diag, row[j + 1] = row[j + 1], prev_diag + 1 if x == y else max(row[j + 1], row[j])
    return row[-1]


def rouge_l(hyp, ref):
    """ROUGE-L F1 of one hypothesis: LCS / len(hyp) and LCS / len(ref), harmonic mean."""
    h, r = words(hyp), words(ref)
    lcs = lcs_length(h, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    return 2 * p * rec / (p + rec)


# --- statements (ECG-Bench style): which known statements a text names
def statement_counts(preds, refs, vocabulary=STATEMENTS):
    """{statement: [true pos, false pos, false neg]} over (prediction, reference) text pairs."""
    counts = {s: [0, 0, 0] for s in vocabulary}
    for p, r in zip(preds, refs):
        p, r = find_statements(p, vocabulary), find_statements(r, vocabulary)
        for s in p | r:
            counts[s][0 if s in p and s in r else 1 if s in p else 2] += 1
    return counts


def statement_prf(preds, refs, vocabulary=STATEMENTS):
    """Each text -> a binary vector over the vocabulary. Micro precision / recall / F1 over all (text, statement)
    pairs, and macro F1 over the statements that occur in a reference or a prediction (one nobody names has no F1)."""
    counts = statement_counts(preds, refs, vocabulary)
    tp, fp, fn = (sum(c[k] for c in counts.values()) for k in range(3))
    used = [c for c in counts.values() if sum(c)]
    return {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "f1": _f1(tp, fp, fn), "macro_f1": sum(_f1(*c) for c in used) / len(used) if used else 0.0}


def _f1(tp, fp, fn):
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


# --- short answers (ECG-QA, multi-ECG): exact match after normalisation, and as sets of items
def normalise_answer(text):
    """Lower case, punctuation -> space, whitespace collapsed: "Sinus rhythm." == "sinus  rhythm"."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def final_answer(text):
    """What follows the last "Answer:" (an answer that writes its reading first), else the whole text."""
    return text.rsplit(ANSWER, 1)[-1]


def exact_match(pred, ref):
    return float(normalise_answer(final_answer(pred)) == normalise_answer(ref))


def set_match(pred, ref):
    """Short answers compared as sets of comma-separated items, each normalised: a list of findings is right in any
    order ("pvcs, sinus rhythm" == "Sinus rhythm, PVCs"); a one-item answer ("yes", "ECG2") is plain exact match.
    An answer written after its reading is scored on what follows "Answer:"."""
    pred, ref = (frozenset(normalise_answer(item) for item in text.split(",")) - {""}
                 for text in (final_answer(pred), ref))
    return float(pred == ref)


# --- per-ECG reports of serial ECGs: "ECG1: Sinus rhythm, Normal ECG. ECG2: ..."
def per_ecg_parts(text):
    """-> [(ECG number, its part of the text), ...] in the order written."""
    bits = re.split(r"\bECG ?(\d+)\s*:", text)
    return [(int(k), part) for k, part in zip(bits[1::2], bits[2::2])]


def per_ecg_f1(pred, ref):
    """Each ECG's part scored as a report, matched by ECG number: F1 over (ECG number, statement) pairs."""
    p, r = ({(k, s) for k, part in per_ecg_parts(text) for s in find_statements(part)} for text in (pred, ref))
    return _f1(len(p & r), len(p - r), len(r - p))


def one_part_per_ecg(pred, n_ecgs):
    """Does the answer hold exactly one part for each of the n ECGs, numbered 1..n?"""
    return sorted(k for k, _ in per_ecg_parts(pred)) == list(range(1, n_ecgs + 1))


# --- grounded answers (GEM): measurements read back from the text
_NUMBER = r"(\d+(?:\.\d+)?)"
MEASUREMENTS = {  # name -> (unit, pattern); the first match in the text counts
    "hr": ("bpm", r"heart rate\s*(?:is|of|[:=])?\s*" + _NUMBER + r"\s*(?:bpm|/\s*min)"),
    "pr": ("ms", r"\bPR(?: interval)?\s*(?:is|of|[:=])?\s*" + _NUMBER + r"\s*ms"),
    "qrs": ("ms", r"\bQRS(?: duration)?\s*(?:is|of|[:=])?\s*" + _NUMBER + r"\s*ms"),
    # "QT/QTc: 400/430 ms" and "QT 400 ms", never the QTc of "QTc 430 ms"
    "qt": ("ms", r"\bQT(?:/QTc)?(?: interval)?\s*(?:is|of|[:=])?\s*" + _NUMBER + r"\s*(?:/\s*[\d.]+\s*)?ms"),
}


def parse_measurements(text):
    """Grounded answer text -> {"hr": 72.0, "pr": None (not stated, e.g. "PR: n/a"), ...}"""
    found = {name: re.search(pattern, text, re.IGNORECASE) for name, (_, pattern) in MEASUREMENTS.items()}
    return {name: float(m.group(1)) if m else None for name, m in found.items()}


def measurement_mae(preds, refs):
    """Per measurement: mean absolute error over the rows whose reference and prediction both state it; `missing`
    counts the predictions that did not (they are left out of the MAE, so read the two together)."""
    out = {}
    for name in MEASUREMENTS:
        pairs = [(parse_measurements(p)[name], parse_measurements(r)[name]) for p, r in zip(preds, refs)]
        pairs = [(p, r) for p, r in pairs if r is not None]
        errors = [abs(p - r) for p, r in pairs if p is not None]
        out[name] = {"mae": sum(errors) / len(errors) if errors else None, "n": len(pairs),
                     "missing": len(pairs) - len(errors)}
    return out


# --------------------------------------------------------------------------- 2. scoring: each task's metrics
def row_score(row, pred):
    """The per-row number a task has, else None: localization IoU; for short answers, right or wrong as sets of
    items (set_match); for a per-ECG report, its statement F1 (per_ecg_f1)."""
    if row["task"] in LOCATION_TASKS:
        return localization_iou(pred, row["answer"])
    if row.get("question_type") == "per_ecg_report":
        return per_ecg_f1(pred, row["answer"])
    if row["task"] == "ecgqa" or (row["task"] == "multi" and "question_type" in row):
        return set_match(pred, row["answer"])
    return None


def score_task(task, rows, preds):
    """Scores of rows of one task. Localization: IoU micro/macro over beat types. ecgqa and multi rows with a
    question_type: accuracy micro/macro over question types (row_score; exact match beside). Reports: BLEU, ROUGE-L,
    statement P/R/F1. Grounded: measurement MAE, the diagnosis' statement F1. Anything else: BLEU, ROUGE-L."""
    refs = [r["answer"] for r in rows]
    out = {"n": len(rows)}
    if task in LOCATION_TASKS or (task in ("ecgqa", "multi") and "question_type" in rows[0]):
        key, name = ("abnormal_type", "iou") if task in LOCATION_TASKS else ("question_type", "accuracy")
        groups = [str(r.get(key, "?")) for r in rows]
        g = group_mean([row_score(r, p) for r, p in zip(rows, preds)], groups)
        out |= {f"{name}_micro": g["micro"], f"{name}_macro": g["macro"], "per_type": g["per_type"]}
        if task in LOCATION_TASKS:   # anyECG-chat's own score beside ours
            theirs = group_mean([anyecg_iou(p, r["answer"]) for r, p in zip(rows, preds)], groups)
            out |= {"anyecg_iou_micro": theirs["micro"], "anyecg_iou_macro": theirs["macro"]}
        else:   # the stricter rule beside: the text exactly as the reference; and per-ECG reports' shape
            out["exact_match"] = sum(exact_match(p, r) for p, r in zip(preds, refs)) / len(rows)
            per_ecg = [one_part_per_ecg(p, len(r["ecg_path"])) for r, p in zip(rows, preds)
                       if r.get("question_type") == "per_ecg_report"]
            if per_ecg:
                out["one_part_per_ecg"] = sum(per_ecg) / len(per_ecg)
        return out
    if task == "grounded":
        # only the statements it concludes with ("... Diagnosis: X, Y."), not the findings named on the way there
        conclusions = [[t.rsplit("Diagnosis:", 1)[-1] for t in texts] for texts in (preds, refs)]
        return out | {"measurements": measurement_mae(preds, refs), "statement_f1": statement_prf(*conclusions)["f1"]}
    out |= {f"bleu{n + 1}": v for n, v in enumerate(bleu(preds, refs))}
    out["rouge_l"] = sum(rouge_l(p, r) for p, r in zip(preds, refs)) / len(rows)
    if task == "report":
        out |= {f"statement_{k}": v for k, v in statement_prf(preds, refs).items()}
    return out


def task_groups(rows):
    """{group name: row indices}, in order of first appearance: the task; rows naming their modality get their own
    groups ("report [signal]", "report [image]", "report [both]"). ecgqa and multi rows without a question_type (free
    text, e.g. anyECG's MIMIC comparisons) cannot be matched exactly: they form their own group, scored as open text."""
    groups = {}
    for i, row in enumerate(rows):
        free = row["task"] in ("ecgqa", "multi") and "question_type" not in row
        modality = f" [{row['modality']}]" if "modality" in row else ""
        groups.setdefault(row["task"] + modality + (" (free text)" if free else ""), []).append(i)
    return groups


def score_rows(rows, preds):
    """{group: scores} over answered rows (task_groups), each with its main metric's 95 % bootstrap interval."""
    out = {}
    for name, idx in task_groups(rows).items():
        out[name] = score_task(rows[idx[0]]["task"], [rows[i] for i in idx], [preds[i] for i in idx])
        metric, value, lo, hi = bootstrap([rows[i] for i in idx], [preds[i] for i in idx])
        out[name]["main"] = {"metric": metric, "value": value, "interval95": [lo, hi]}
    return out


# --- how sure a figure is: bootstrap over the test rows
def metric_parts(row, pred):
    """(metric name, one row's share of it): every main metric is a ratio of sums over rows. A mean of per-row values
    (localization IoU, exact match, ROUGE-L): (value, 1, 0); the reports' micro statement F1: (tp, fp, fn); the
    grounded HR MAE over the answers that state it: (|error|, 1, 0), or zeros when the answer does not."""
    score = row_score(row, pred)
    if score is not None:
        return ("IoU micro" if row["task"] in LOCATION_TASKS else "accuracy"), (score, 1, 0)
    if row["task"] == "report":
        p, r = find_statements(pred), find_statements(row["answer"])
        return "statement F1", (len(p & r), len(p - r), len(r - p))
    if row["task"] == "grounded":
        p, r = parse_measurements(pred)["hr"], parse_measurements(row["answer"])["hr"]
        return "HR MAE (bpm)", ((abs(p - r), 1, 0) if p is not None and r is not None else (0, 0, 0))
    return "ROUGE-L", (rouge_l(pred, row["answer"]), 1, 0)


def _from_sums(metric, s):   # s (..., 3): summed metric_parts -> the metric
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "statement F1":
            return np.where(s[..., 0] > 0, 2 * s[..., 0] / (2 * s[..., 0] + s[..., 1] + s[..., 2]), 0.0)
        return s[..., 0] / s[..., 1]   # NaN when no row counts (no answer stated a heart rate)


def bootstrap_weights(n, draws=2000, seed=0):
    """(1 + draws, n) weights of n scored items: row 0 counts each once, each later row is the n items drawn again
    with replacement. Weights @ per-item counts = the statistic's counts as measured, then `draws` times resampled."""
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=draws)  # (draws, n)
    return np.vstack([np.ones(n), counts])


def bootstrap_interval(statistic, *parts, draws=2000, seed=0):
    """A statistic of sums over items, as measured and with its 95 % percentile interval over the items drawn again
    with replacement `draws` times: every interval nanoECG reports. parts: per-item arrays (n, k), the same draws for
    all; statistic(*sums) maps their sums (1 + draws, k) to values (1 + draws, ...). -> (value, lo, hi)"""
    weights = bootstrap_weights(len(parts[0]), draws, seed)   # (1 + draws, n): the items as they are, then the draws
    values = statistic(*(weights @ p for p in parts))
    drawn = values[1:]
    lo, hi = np.nanpercentile(drawn, [2.5, 97.5], axis=0) if np.isfinite(drawn).any() else (np.nan, np.nan)
    return values[0], lo, hi


def bootstrap(rows, preds, baseline=None, draws=2000, seed=0):
    """The main metric of rows of one task, and its 95 % interval over the rows drawn again. With `baseline` (other
    answers to the same rows, e.g. with the ECG blanked): the paired difference preds - baseline and its interval,
    the same draws for both. -> (metric, value, lo, hi)"""
    metric = metric_parts(rows[0], preds[0])[0]
    answers = [preds] + ([baseline] if baseline is not None else [])
    parts = [np.array([metric_parts(r, a)[1] for r, a in zip(rows, these)], dtype=np.float64) for these in answers]

    def difference(*sums):   # the metric of the answers, minus the baseline's
        return _from_sums(metric, sums[0]) - (_from_sums(metric, sums[1]) if len(sums) > 1 else 0)
    value, lo, hi = bootstrap_interval(difference, *parts, draws=draws, seed=seed)
    return metric, float(value), float(lo), float(hi)


def paired_difference(answers, baseline):
    """{group: (metric, answers - baseline, lo, hi)}: each task's main metric over the same rows answered two ways
    (with the ECG and with it blanked; asked second in a chat and asked first), paired by row index, with its 95 %
    bootstrap interval. answers, baseline: `evaluate`'s predictions (each carries its row's task, answer, type)."""
    for name, preds in (("answers", answers), ("baseline", baseline)):
        seen = Counter(p["index"] for p in preds)
        twice = sorted(i for i, n in seen.items() if n > 1)
        if twice:   # a dict would keep one of them and pair the other rows with a stranger's answer
            raise ValueError(f"paired_difference: {name} repeat row indices {twice[:5]}; number the rows uniquely")
    other = {p["index"]: p["prediction"] for p in baseline}
    rows = [p for p in answers if p["index"] in other]
    return {name: bootstrap([rows[i] for i in idx], [rows[i]["prediction"] for i in idx],
                            [other[rows[i]["index"]] for i in idx]) for name, idx in task_groups(rows).items()}


def print_difference(difference, title="difference", file=None):
    print(f"{'task':<28}{'metric':<16}{title:>20}  95 % interval", file=file)
    for task, (metric, diff, lo, hi) in difference.items():
        print(f"{task:<28}{metric:<16}{_fmt(diff):>20}  {_fmt(lo)} to {_fmt(hi)}", file=file)


def as_followups(rows, all_rows):
    """Each single-ECG ECG-QA row of `rows` asked second in a chat: after the report question about the same ECG and
    its reference answer (found in all_rows). Its file_index is its place in `rows`, so that paired_difference
    matches it with the same row asked first."""
    reports = {tuple(row_paths(r)): r for r in all_rows if r["task"] == "report" and "modality" not in r}
    out = []
    for i, r in enumerate(rows):
        first = reports.get(tuple(row_paths(r)))
        if r["task"] == "ecgqa" and len(row_paths(r)) == 1 and first and not r.get("history"):
            out.append({**r, "history": [[first["question"], first["answer"]]], "file_index": r.get("file_index", i)})
    return out


def prior_answers(train_rows, rows):
    """What a model that never looks at the ECG can score: for each row, the most frequent training answer to the
    same question (same task, same wording), else the task's most frequent answer. Scored like a model's answers,
    this is the chance level that the ECG-blanked ablation should fall to."""
    by_question, by_task = {}, {}
    for r in train_rows:
        by_question.setdefault((r["task"], r["question"]), Counter())[r["answer"]] += 1
        by_task.setdefault(r["task"], Counter())[r["answer"]] += 1
    guesses = [by_question.get((r["task"], r["question"])) or by_task.get(r["task"]) for r in rows]
    return [c.most_common(1)[0][0] if c else "" for c in guesses]


def headline(s):
    """One task's scores -> 'name value' pairs for the table."""
    if "iou_micro" in s:
        theirs = [("anyECG IoU micro", s["anyecg_iou_micro"])] if "anyecg_iou_micro" in s else []
        return [("IoU micro", s["iou_micro"]), ("IoU macro", s["iou_macro"])] + theirs
    if "accuracy_micro" in s:
        shape = [("one part per ECG", s["one_part_per_ecg"])] if "one_part_per_ecg" in s else []
        return [("accuracy", s["accuracy_micro"]), ("macro", s["accuracy_macro"]), ("exact", s["exact_match"])] + shape
    if "measurements" in s:
        mae = [(f"{k.upper()} MAE ({MEASUREMENTS[k][0]})", v["mae"]) for k, v in s["measurements"].items()]
        return mae + [("diagnosis F1", s["statement_f1"])]
    out = [("BLEU-1", s["bleu1"]), ("BLEU-4", s["bleu4"]), ("ROUGE-L", s["rouge_l"])]
    return out + ([("statement F1", s["statement_f1"])] if "statement_f1" in s else [])


def _fmt(v):
    return "-" if v is None or v != v else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def print_table(scores, file=None):
    """Per task: rows answered, its main metrics, then one line per beat or question type; last the skipped rows."""
    print(f"{'task':<28}{'n':>6}  metrics", file=file)
    for task, s in scores.items():
        if task == "skipped":
            continue
        cells = "  ".join(f"{k} {_fmt(v)}" for k, v in headline(s))
        if "main" in s:
            m = s["main"]
            cells += f"  ({m['metric']} 95 % interval {_fmt(m['interval95'][0])} to {_fmt(m['interval95'][1])})"
        print(f"{task:<28}{s['n']:>6}  {cells}", file=file)
        for t, g in s.get("per_type", {}).items():
            print(f"  {t:<26}{g['n']:>6}  {g['mean']:.3f}", file=file)
        for k, m in s.get("measurements", {}).items():
            if m["missing"]:
                print(f"  {k.upper()} not stated in {m['missing']} of {m['n']} answers", file=file)
    skipped = scores.get("skipped", {})
    if skipped.get("n"):
        print(f"skipped {skipped['n']} rows: " + ", ".join(f"{r} {k}" for r, k in skipped["by_reason"].items()),
              file=file)
        for r in skipped["rows"][:3]:
            print(f"  row {r['index']}: {r['error']}", file=file)


# --------------------------------------------------------------------------- 3. evaluating a model over anyECG rows
def _skip_reason(err):
    return ("ecg_path not found" if isinstance(err, FileNotFoundError) else
            "longer than the context" if "context allows" in str(err) else
            "outside the ECG root" if "outside the ECG root" in str(err) else "unreadable ECG")


def blank(inputs):
    """The ablation: the same ECG shapes and leads with every sample zero, images blank paper. The prompt stays the
    same, so only what the model reads changes."""
    return [ECGRecord(np.zeros_like(x.signal), x.fs, x.leads) if isinstance(x, ECGRecord) else np.full_like(x, 255)
            for x in inputs]


@torch.no_grad()
def evaluate(model, rows, inputs_of, batch_size=8, max_new_tokens=256, ablate_ecg=False, progress=True,
             temperature=0.0, top_k=None, top_p=None, seed=0):
    """Answer every row with `model` (an ECGChat) and score the answers. inputs_of(row) -> the row's ECGRecords at the
    model's rate (and images). A row whose ECGs cannot be read or do not fit the context is skipped, counted and
    reported: one bad row never ends a long run. Generation is batched (left padding) and greedy unless
    temperature > 0. ablate_ecg: answer from blank(inputs) instead. -> (scores per task (score_rows) plus "skipped",
    predictions: one dict per answered row with its question, reference, prediction and per-row score)"""
    was_training = model.training
    model.eval()
    device = model.llm.embed_tokens.weight.device
    generator = torch.Generator(device).manual_seed(seed) if temperature > 0 else None
    # rows of one task have similar ECG lengths: batching them together saves padding
    order = sorted(range(len(rows)), key=lambda i: rows[i]["task"])
    answered, skipped = [], []
    bar = tqdm(total=len(rows), desc="eval" + (" (ECG blanked)" if ablate_ecg else ""),
               disable=not progress or not sys.stderr.isatty())   # a log file gets no \r frames
    try:
        for start in range(0, len(order), batch_size):
            batch = []  # (row index, prompt ids, inputs)
            for i in order[start:start + batch_size]:
                try:
                    inputs = blank(inputs_of(rows[i])) if ablate_ecg else inputs_of(rows[i])
                    batch.append((i, model.prompt(turns_of(rows[i], answered=False), inputs, True)[0], inputs))
                except (FileNotFoundError, ValueError) as e:
                    skipped.append({"index": rows[i].get("file_index", i), "ecg_path": rows[i].get("ecg_path"),
                                    "reason": _skip_reason(e), "error": str(e)})
            if batch:
                room = model.max_seq_len - max(len(ids) for _, ids, _ in batch)
                new = model.generate([ids for _, ids, _ in batch], [x for _, _, x in batch],
                                     max_new_tokens=min(max_new_tokens, room), temperature=temperature,
                                     top_k=top_k, top_p=top_p, generator=generator)
                answered += [(i, model.tokenizer.decode(t).strip()) for (i, _, _), t in zip(batch, new)]
            bar.update(len(order[start:start + batch_size]))
    finally:
        bar.close()
        model.train(was_training)
    answered.sort()
    done_rows, preds = [rows[i] for i, _ in answered], [p for _, p in answered]
    scores = score_rows(done_rows, preds)
    scores["skipped"] = {"n": len(skipped), "by_reason": dict(Counter(s["reason"] for s in skipped)),
                         "rows": skipped}
    keep = ("task", "modality", "abnormal_type", "question_type", "ecg_path", "question", "reading", "answer")
    predictions = [{"index": rows[i].get("file_index", i), **{k: rows[i][k] for k in keep if k in rows[i]},
                    "prediction": p, "score": row_score(rows[i], p)} for i, p in answered]
    return scores, predictions


def rows_per_task(rows, n, per_type=0, seed=0):
    """At most n rows of each task (0: all), in a fixed order; with per_type, ECG-QA and multi rows are drawn per
    question type instead, at most per_type of each, so that the rare types are measured too."""
    if not n:
        return rows
    rng, out = np.random.default_rng(seed), []
    for t in TASKS:
        mine = [r for r in rows if r["task"] == t]
        kinds = sorted({r.get("question_type", "") for r in mine}) if per_type and t in ("ecgqa", "multi") else [None]
        for kind in kinds:
            pool = [r for r in mine if kind is None or r.get("question_type", "") == kind]
            out += [pool[i] for i in sorted(rng.permutation(len(pool))[:per_type if kind is not None else n])]
    return out


def unique_indices(rows):
    """rows, each with a file_index no other row has: rows read from several files (train.py --data a.json,b.json)
    repeat positions, and the answers are paired by that index. Repeating ones are renumbered by place in rows."""
    indices = [r.get("file_index", i) for i, r in enumerate(rows)]
    if len(set(indices)) == len(indices):
        return rows
    return [{**r, "file_index": i} for i, r in enumerate(rows)]


def drop_duplicates(rows, source):
    """rows without those that repeat an earlier row exactly (every field but file_index): each would be scored again
    and weigh twice in the means and their intervals. The first of each is kept, and one warning says how many went."""
    seen, kept, dropped = set(), [], []
    for r in rows:
        key = json.dumps({k: v for k, v in r.items() if k != "file_index"}, sort_keys=True, default=str)
        (dropped if key in seen else kept).append(r)
        seen.add(key)
    if dropped:
        shown = ", ".join(str(r.get("file_index", "?")) for r in dropped[:10]) + (" ..." if len(dropped) > 10 else "")
        warnings.warn(f"{source}: dropped {len(dropped)} duplicate rows (the same as an earlier row in every field; "
                      f"rows {shown}): each row is scored once")
    return kept


def evaluate_held_out(model, rows, inputs_of, train_rows, all_rows, out_dir, log, batch_size=8, max_new_tokens=256):
    """The tables a training run ends with, on the held-out `rows`: the model's answers, the same with every ECG
    blanked and the paired difference (how much each task reads the ECG), the single-ECG ECG-QA rows asked second in a
    chat after a report exchange (as_followups; all_rows: where the reports are found), and the chance level (the
    most frequent answer in train_rows). Each is printed, logged, and the answers written to out_dir."""
    rows = unique_indices(rows)
    answers = {}
    for name, ablate in [("test", False), ("test_ecg_blanked", True)]:
        t0 = time.time()
        scores, preds = evaluate(model, rows, inputs_of, batch_size, max_new_tokens, ablate_ecg=ablate)
        log({"event": name, "scores": scores, "seconds": time.time() - t0})
        print(f"\n{name} ({len(rows)} rows, {time.time() - t0:.0f} s)")
        print_table(scores)
        atomic_write(Path(out_dir) / f"{name}_predictions.jsonl", "".join(json.dumps(p) + "\n" for p in preds))
        answers[name] = preds
    effect = paired_difference(answers["test"], answers["test_ecg_blanked"])
    log({"event": "test_ecg_effect", "scores": effect})
    print("\nhow much each task reads the ECG: its main metric with the ECG minus with it blanked, same rows")
    print_difference(effect, "with ECG - blanked")
    followups = as_followups(rows, all_rows)
    if followups:
        _, preds = evaluate(model, followups, inputs_of, batch_size, max_new_tokens)
        second = paired_difference(preds, answers["test"])
        log({"event": "test_followup", "rows": len(followups), "scores": second})
        print(f"\nasked second in a chat ({len(followups)} ECG-QA rows, after a report exchange), minus asked first")
        print_difference(second, "second - first")
    scores = score_rows(rows, prior_answers(train_rows, rows))
    log({"event": "test_prior", "scores": scores})
    print(f"\ntest_prior: chance level, the most frequent training answer to each question ({len(rows)} rows)")
    print_table(scores)


# --------------------------------------------------------------------------- 4. command line
def parse_args(argv=None):
    """The command line, checked before anything is read: the --out path too, not after the whole evaluation."""
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint folder (what train.py writes); not needed with --answers")
    p.add_argument("--data", required=True, help="JSON file: a list of rows, anyECG-format or LLaVA-style")
    p.add_argument("--ecg-root", help="folder the rows' ecg_path are relative to (default: the --data folder)")
    p.add_argument("--image-root", help="a model trained with --images: the folder the rows' image paths are under "
                                        "(default: each printout drawn from the row's record)")
    p.add_argument("--out", default="results.json", help="scores and predictions, JSON")
    p.add_argument("--ablate-ecg", action="store_true", help="blank every ECG (zeros) to measure dependence on it")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default, deterministic)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA, then Apple's MPS, then the CPU) | cpu | cuda | mps")
    p.add_argument("--bench", help="also score the rows as an ECG-Bench subset, by the published rules and corrected "
                                   "ones: ptb, code15, cpsc, csn, g12, mmmu, ecgqa, or auto (told from the row ids)")
    p.add_argument("--answers", help="with --bench: score these answers (JSONL, one {question_id or id, text} a line, "
                                     "as LLaVA's evaluators write them) instead of running a model")
    args = p.parse_args(argv)
    if args.answers and not args.bench:
        p.error("--answers scores an ECG-Bench subset: add --bench NAME (or auto)")
    if not args.ckpt and not args.answers:
        p.error("--ckpt is required (or --bench with --answers, to score answers already written)")
    for name in ("batch_size", "max_new_tokens", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < (name != "limit"):
            p.error(f"--{name.replace('_', '-')} must be at least {int(name != 'limit')}")
    if args.image_root and not os.path.isdir(args.image_root):
        p.error(f"--image-root {args.image_root}: no such folder")
    out_folder = Path(args.out).resolve().parent
    problem = ("a folder; give the path of a .json file" if os.path.isdir(args.out) else
               f"its folder {out_folder} does not exist" if not out_folder.is_dir() else
               f"its folder {out_folder} is not writable" if not os.access(out_folder, os.W_OK | os.X_OK) else None)
    if problem:
        p.error(f"--out {args.out}: {problem}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.answers:   # answers written already (a published model's): scoring alone, no model
            bench = [] if args.bench == "auto" else ["--bench", args.bench]
            return ecgbench.main(["--data", args.data, "--answers", args.answers, "--out", args.out, *bench])
        model = load_chat(args.ckpt, device=choose_device(args.device))
        images = isinstance(model, ImageChat)   # a model that reads printouts: LLaVA rows' images too
        rows = drop_duplicates(load_rows(args.data, images=images), args.data)[:args.limit]
        file_rows = read_json(args.data) if args.bench else None   # as written: ECG-Bench's scorer reads its ids
        if args.bench:   # the subset named before the evaluation, not after it
            ecgbench.subset_name(args.bench, [file_rows[r["file_index"]] for r in rows])
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not rows:
        sys.exit(f"error: {args.data}: no rows to evaluate")
    other = sorted({r["task"] for r in rows} - set(TASKS) - {"open-ended"})
    if other:
        warnings.warn(f"{args.data}: tasks {other} are not nanoECG's; their rows are scored as free text "
                      "(BLEU, ROUGE-L)")
    root = args.ecg_root or os.path.dirname(os.path.abspath(args.data))
    if not os.path.isdir(root):
        sys.exit(f"error: --ecg-root {root}: no such folder")
    reader = (PrintoutReader(root, model.encoder.cfg.fs, 64, args.image_root, model.image_encoder.cfg.width)
              if images else RowECGReader(root, model.encoder.cfg.fs, cache_size=64))   # read lazily, recent kept
    scores, predictions = evaluate(model, rows, reader, args.batch_size, args.max_new_tokens, args.ablate_ecg,
                                   temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print_table(scores)
    bench = ecgbench.score_model(args.bench, model, rows, file_rows, predictions, reader) if args.bench else None
    if bench:
        print(ecgbench.table(bench))
    atomic_write(args.out, json.dumps({"ckpt": args.ckpt, "data": args.data, "ecg_root": root,
                                       "ablate_ecg": args.ablate_ecg, "scores": scores, "bench": bench,
                                       "predictions": predictions}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return scores


if __name__ == "__main__":
    main()
