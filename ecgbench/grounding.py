"""
ecgbench/grounding.py — judge-free grounding metrics for GEM-style ECG interpretations (ECG-Grounding test rows).

Rows are LLaVA-style ({"id", "ecg", "conversations", "report", "machine_measurements"}); answers are {row id: text}
(an answers JSONL as ecgbench/score.py reads it). GEM scores these answers with GPT-4o; those criteria are out of
scope here. Four figures that need no judge:
  lead coverage   which of the 12 standard leads (I, II, III, aVR, aVL, aVF, V1-V6) an answer names, as
                  mentioned / 12 per answer, averaged over rows. Whole words; aVR/aVL/aVF and V1-V6 in any case; the
                  Roman numerals upper-case, or any case after "lead(s)" (so "i.e." is not lead I), and not after
                  "type", "Mobitz", "grade", "class", "degree" (so "Mobitz II" is not lead II); a range "V1-V3",
                  "V1–V3", "V1 to V3", "V1-3" names every lead in it. (A capital "I" used as a word,
                  the pronoun, still reads as lead I: interpretations rarely use it.)
  diagnosis       micro precision / recall / F1 of the answer's statements against the report's, each text's statements
                  found by data.find_statements (whole words, any case) over the project's STATEMENTS vocabulary
                  (data.STATEMENTS); a finding outside that vocabulary is not counted on either side. Rows without a
                  report are left out of this figure.
  numbers         HR (bpm), PR, QRS, QT, QTc (ms) and the QRS axis (degrees) read from the answer, each compared with
                  the row's machine measurement within TOLERANCE: per field, `stated` = rows whose answer states it / n,
                  `within` = rows within tolerance / rows that state it and have a measurement. An answer that states no
                  number counts as not stated, never as wrong.
  length          answer length in words (whitespace-separated): mean and median.

machine_measurements shapes (GEM's gem_evaluation/ code passes the field through unread, and its test file is not in
public code copies, so the shapes are those MIMIC-IV-ECG's machine_measurements.csv defines, plus two simpler ones):
  1. MIMIC-IV-ECG's columns: rr_interval, p_onset, p_end, qrs_onset, qrs_end, t_end (ms from the record start, so
     intervals are differences), p_axis, qrs_axis, t_axis (degrees); 29999 (or -29999) where the cart measured nothing
     (columns: mimic.mit.edu's table page; 29999: public copies of the CSV's rows). HR = 60000 / rr_interval,
     PR = qrs_onset - p_onset, QRS = qrs_end - qrs_onset, QT = t_end - qrs_onset, QTc = QT / sqrt(RR in s)
     (Bazett; carts differ).
  2. a dict of ready numbers: {"heart_rate" | "hr": 72, "pr": 160, "qrs": 98, "qt": 380, "qtc": 420, "qrs_axis" |
     "axis": 45}, numbers or numeric strings ("72 bpm").
  3. a text, "Heart Rate: 70 bpm, PR: 160 ms, ...": read by the same extraction as the answers.

Run: python -m ecgbench.grounding --data ROWS.json --answers ANSWERS.jsonl [--out R.json]
"""
import argparse
import json
import math
import re
import sys

import numpy as np

from data import atomic_write, find_statements
from ecgbench.score import read_answers, read_rows, row_id

# --------------------------------------------------------------------------- lead coverage
LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
_ROMAN = re.compile(r"(?<!\w)(III|II|I)(?!\w)")                      # upper case only: "i.e." is not lead I
_LEAD_ROMAN = re.compile(r"\bleads?\s+(iii|ii|i)(?!\w)", re.IGNORECASE)  # "lead ii": any case after "lead"
_NOT_A_LEAD = re.compile(r"\b(?:type|mobitz|grade|class|degree|stage)\s*$", re.IGNORECASE)  # "Mobitz II", "type I"
_AUGMENTED = re.compile(r"(?<!\w)(aVR|aVL|aVF)(?!\w)", re.IGNORECASE)
_CHEST = re.compile(r"(?<!\w)V([1-6])(?!\w)", re.IGNORECASE)
_CHEST_RANGE = re.compile(r"(?<!\w)V([1-6])\s*(?:-|–|—|to|through)\s*V?([1-6])(?!\w)", re.IGNORECASE)


def leads_mentioned(text):
    """The standard leads `text` names, in LEADS order."""
    found = {m.group(1) for m in _ROMAN.finditer(text) if not _NOT_A_LEAD.search(text[:m.start()])}
    found |= {m.group(1).upper() for m in _LEAD_ROMAN.finditer(text)}
    found |= {"aV" + m.group(1)[2].upper() for m in _AUGMENTED.finditer(text)}
    found |= {f"V{m.group(1)}" for m in _CHEST.finditer(text)}
    for m in _CHEST_RANGE.finditer(text):
        lo, hi = sorted((int(m.group(1)), int(m.group(2))))
        found |= {f"V{k}" for k in range(lo, hi + 1)}
    return [lead for lead in LEADS if lead in found]


def lead_coverage(text):
    """mentioned / 12."""
    return len(leads_mentioned(text)) / len(LEADS)


# --------------------------------------------------------------------------- numbers
# Within this much of the machine measurement an answer's number counts as grounded: about one small box on paper
# (40 ms) halved for PR and QRS, whose normal ranges are narrow; QT and QTc vary more between carts and formulas
# (Bazett vs the cart's own); ±5 bpm is what beat-to-beat variation moves a 10 s HR; ±15° is one axis-wheel step.
TOLERANCE = {"hr": 5.0, "pr": 20.0, "qrs": 20.0, "qt": 30.0, "qtc": 30.0, "axis": 15.0}
FIELDS = list(TOLERANCE)
UNITS = {"hr": "bpm", "pr": "ms", "qrs": "ms", "qt": "ms", "qtc": "ms", "axis": "deg"}
MIMIC_MISSING = 29999   # MIMIC-IV-ECG writes ±29999 where the cart measured nothing

_NUM = r"(\d+(?:\.\d+)?)"
_MS = r"\s*(ms|msec|milliseconds?|seconds?|sec|s)(?!\w)"   # seconds are turned to ms
# Between a name and its number: up to 40 characters with no digit, no sentence end and no other measurement's name,
# so "QRS complexes are narrow, PR 160 ms" does not read 160 as the QRS duration.
_GAP = r"(?:(?!PR\b|QRS\b|QTc?\b|RR\b|heart rate|axis)[^\d;.\n]){0,40}?"
PATTERNS = {
    "hr": [r"(?:heart rate|ventricular rate|\bHR\b)" + _GAP + _NUM + r"\s*(?:bpm|beats\s*(?:per|/)\s*min)",
           _NUM + r"\s*(?:bpm|beats\s*(?:per|/)\s*min)"],                     # "sinus rhythm at 75 bpm"
    "pr": [r"\bPR\b(?:\s*interval)?" + _GAP + _NUM + _MS],
    "qrs": [r"\bQRS\b(?:\s*(?:duration|width|interval|complex(?:es)?))?" + _GAP + _NUM + _MS],
    "qt": [r"\bQT\b(?:\s*/\s*QTc\b)?(?:\s*interval)?" + _GAP + _NUM + r"(?:\s*/\s*\d+(?:\.\d+)?)?" + _MS],
    "qtc": [r"\bQTc\b(?:\s*interval)?" + _GAP + _NUM + _MS,
            r"\bQT\s*/\s*QTc\b" + _GAP + r"\d+(?:\.\d+)?\s*/\s*" + _NUM + _MS],   # "QT/QTc: 400/430 ms"
    # "QRS axis", "electrical axis", or a bare "axis" that is not the P or T axis ("left axis deviation (-45°)")
    "axis": [r"(?:\bQRS\s+axis|\b(?:electrical|cardiac|frontal|mean)\s+(?:plane\s+)?axis"
             r"|(?<!\b[PT]\s)(?<!\b[PT]-)\baxis)\b" + _GAP + r"([-+−–]?\s*\d+(?:\.\d+)?)\s*(?:°|degrees?\b|deg\b)"],
}
_COMPILED = {name: [re.compile(p, re.IGNORECASE) for p in pats] for name, pats in PATTERNS.items()}


def _value(match, name):
    """A match -> its number, in bpm, ms or degrees."""
    value = float(re.sub(r"\s", "", match.group(1)).replace("−", "-").replace("–", "-"))
    unit = match.group(2).lower() if match.re.groups > 1 else ""
    return value * 1000 if unit.startswith("s") and name != "axis" else value


def extract_numbers(text):
    """Answer text -> {field: number or None (not stated)}; per field the first pattern that matches, its first
    match."""
    out = {}
    for name, patterns in _COMPILED.items():
        match = next((m for p in patterns for m in [p.search(text)] if m), None)
        out[name] = _value(match, name) if match else None
    return out


# --------------------------------------------------------------------------- the machine's numbers
READY_KEYS = {"hr": ["heart_rate", "hr", "heart_rate_bpm", "ventricular_rate", "rate"],
              "pr": ["pr", "pr_interval"], "qrs": ["qrs", "qrs_duration"], "qt": ["qt", "qt_interval"],
              "qtc": ["qtc", "qtc_interval"], "axis": ["qrs_axis", "axis"]}


def _number(value):
    """A measurement value -> float, or None when absent, unreadable or MIMIC's 29999."""
    if isinstance(value, str):
        m = re.match(r"\s*([-+]?\d+(?:\.\d+)?)", value)
        value = float(m.group(1)) if m else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return None if abs(value) == MIMIC_MISSING else float(value)


def _minus(a, b):
    return a - b if a is not None and b is not None else None


def _derived(mm):
    """MIMIC-IV-ECG's fiducial points (ms from the record start) -> intervals; None where a point is missing."""
    rr, p_on, q_on, q_end, t_end = (_number(mm.get(k)) for k in ("rr_interval", "p_onset", "qrs_onset", "qrs_end",
                                                                   "t_end"))
    qt = _minus(t_end, q_on)
    return {"hr": 60000 / rr if rr else None, "pr": _minus(q_on, p_on), "qrs": _minus(q_end, q_on), "qt": qt,
            "qtc": qt / math.sqrt(rr / 1000) if qt is not None and rr else None}


def reference_numbers(mm):
    """A row's machine_measurements (any shape above) -> {field: number or None}."""
    if isinstance(mm, str):
        return extract_numbers(mm)
    if not isinstance(mm, dict):
        return dict.fromkeys(FIELDS)
    mm = {str(k).strip().lower().replace(" ", "_"): v for k, v in mm.items()}
    derived = _derived(mm)
    out = {}
    for name in FIELDS:   # a ready number wins over one derived from fiducial points
        ready = next((n for k in READY_KEYS[name] for n in [_number(mm.get(k))] if n is not None), None)
        out[name] = ready if ready is not None else derived.get(name)
    return out


def number_scores(answers, references):
    """Per field: stated (fraction of all rows), within (fraction of stated-and-measured rows within tolerance; None
    when there are none), and the two counts behind them."""
    out = {}
    for name in FIELDS:
        stated = [(a[name], r[name]) for a, r in zip(answers, references) if a[name] is not None]
        compared = [abs(a - r) <= TOLERANCE[name] for a, r in stated if r is not None]
        out[name] = {"stated": len(stated) / len(answers) if answers else 0.0,
                     "within": float(np.mean(compared)) if compared else None,
                     "n_stated": len(stated), "n_compared": len(compared)}
    return out


# --------------------------------------------------------------------------- all together
def report_text(row):
    """The row's report as one text (a list of lines is joined), or None when it has none."""
    report = row.get("report")
    if isinstance(report, list):
        report = ". ".join(str(line) for line in report)
    return report if isinstance(report, str) else None


def diagnosis_prf(pairs):
    """[(answer, report)] -> micro precision, recall, F1 of the answers' statements against the reports' (each a
    set of STATEMENTS, data.find_statements); 0.0 where nothing is counted."""
    tp = fp = fn = 0
    for answer, report in pairs:
        said, true = find_statements(answer), find_statements(report)
        tp, fp, fn = tp + len(said & true), fp + len(said - true), fn + len(true - said)
    return {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0}


def grounding_scores(rows, answers):
    """rows: LLaVA-style ECG-Grounding rows; answers: {row id: text}; a row without an answer is scored as ""
    -> {"n", "missing", "lead_coverage", "diagnosis": {"precision", "recall", "f1", "n"},
        "numbers": {field: {"stated", "within", "n_stated", "n_compared"}}, "length": {"mean", "median"}}"""
    texts = [answers.get(row_id(row), "") for row in rows]
    with_report = [(t, report_text(row)) for t, row in zip(texts, rows) if report_text(row) is not None]
    prf = diagnosis_prf(with_report)
    lengths = [len(t.split()) for t in texts]
    return {"n": len(rows), "missing": sum(row_id(row) not in answers for row in rows),
            "lead_coverage": float(np.mean([lead_coverage(t) for t in texts])) if texts else 0.0,
            "diagnosis": {k: prf[k] for k in ("precision", "recall", "f1")} | {"n": len(with_report)},
            "numbers": number_scores([extract_numbers(t) for t in texts],
                                     [reference_numbers(row.get("machine_measurements")) for row in rows]),
            "length": {"mean": float(np.mean(lengths)) if lengths else 0.0,
                       "median": float(np.median(lengths)) if lengths else 0.0}}


def table(result):
    """A few lines: coverage, diagnosis, one line per measured field, length."""
    d, show = result["diagnosis"], lambda v: "n/a" if v is None else f"{v:.3f}"
    lines = [f"ECG-Grounding: {result['n']} rows, {result['missing']} without an answer",
             f"lead coverage (leads named / 12)  {result['lead_coverage']:.3f}",
             f"diagnosis ({d['n']} rows with a report)  precision {d['precision']:.3f}  recall {d['recall']:.3f}  "
             f"f1 {d['f1']:.3f}",
             f"{'field':<6}{'unit':>5}{'tolerance':>11}{'stated':>8}{'within':>8}{'compared':>10}"]
    for name, s in result["numbers"].items():
        lines.append(f"{name:<6}{UNITS[name]:>5}{'±' + format(TOLERANCE[name], 'g'):>11}{s['stated']:>8.3f}"
                     f"{show(s['within']):>8}{s['n_compared']:>10}")
    lines.append(f"length (words)  mean {result['length']['mean']:.1f}  median {result['length']['median']:.1f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Judge-free grounding metrics for GEM-style ECG interpretations.")
    parser.add_argument("--data", required=True, help="ECG-Grounding test rows (LLaVA-style JSON list)")
    parser.add_argument("--answers", required=True, help="JSONL, one {question_id or id, text} a line")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    rows = read_rows(args.data)
    result = grounding_scores(rows, read_answers(args.answers))
    print(table(result))
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
