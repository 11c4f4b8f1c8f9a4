"""
ecgbench/score.py — ECG-Bench answers scored offline, each subset twice: `compatible` and `corrected`.

ECG-Bench rows are LLaVA-style ({"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}); answers are
JSONL, one {"question_id" or "id", "text"} a line, as LLaVA's evaluators write them. The published scorer
(PULSE's evaluation/evaluate_ecgbench.py; GEM's copy and ECG-R1's compute_metrics.py share it) has six faults.
`compatible` keeps them, so a figure can be set beside a paper's table; `corrected` fixes them:
  1. Labels found as case-sensitive substrings ("NORM" in "ABNORMAL", "MI" in "IMI", "AF" in "AFL"; an answer that
     echoes the option list names every label; "conduction disturbance" names none). Corrected: whole words, any
     case, by code or by the full name the prompt gives it; prompt lines echoed in the answer are not read.
  2. "AUC" from 0/1 answers, which is balanced accuracy (a constant answer scores 0.5). Corrected: a real ROC AUC
     from per-label scores the caller passes (the model's probability of naming each label), else None.
  3. Labels fitted on the gold answers only, so a predicted label no gold row has vanishes. Corrected: it is kept
     and counts as a false positive.
  4. Multiple choice: the first of "A." ... "H." anywhere ("ECG." is G), else a capital after "Answer:"; an
     unparsable answer becomes a random letter, scored as the model's. Corrected: "Answer: X" or a lone letter
     only; anything else is wrong and counted (`parse_failures`). compatible guesses with a fixed seed and counts
     the guesses (`guessed`).
  5. A multiple-choice result file of the wrong length is skipped without a word. Both: the row count is reported
     beside the published size, and rows without an answer are counted (`missing`).
  6. ECG-QA candidates found as substrings of the lower-cased answer ("no" in "not sure" and in "normal").
     Corrected: the answer's items, normalised, compared as a set with the gold items.

Where compatible and the published code meet rows without an answer, it does what that code does: it scores only
the answers it was given. corrected scores every row, an unanswered one as an empty (wrong) answer.
"""
import argparse
import json
import random
import re
import sys

import numpy as np
import torch

from chat import turns_of
from data import atomic_write, read_json

# PTB-XL's superclass names: PTB-XL's own descriptions. The ptb-test prompt was not found in public copies, so these
# are the fallback; a prompt that lists "CODE(name)" pairs overrides them row by row.
PTB_NAMES = {"NORM": "Normal ECG", "MI": "Myocardial Infarction", "STTC": "ST/T change",
             "CD": "Conduction Disturbance", "HYP": "Hypertrophy"}
# CPSC 2018's nine classes as the cpsc-test prompt lists them (ECGBench cpsc-test.json on Hugging Face).
CPSC_NAMES = {"NORM": "Normal ECG", "AF": "Atrial fibrillation", "I-AVB": "First-degree atrioventricular block",
              "LBBB": "Left bundle branch block", "RBBB": "Right bundle branch block",
              "PAC": "Premature atrial contraction", "PVC": "Premature ventricular contraction",
              "STD": "ST-segment depression", "STE": "ST-segment elevated"}
# code15-test's prompt asks for "NORM or ABNORMAL"; the gold answer is one of the two.
CODE15_NAMES = {"NORM": "normal", "ABNORMAL": "abnormal"}
# The published code15 scorer also looks for these six CODE-15 codes; they never reach a figure (fault 3).
CODE15_EXTRA = ["1dAVb", "RBBB", "LBBB", "SB", "ST", "AF"]

# Id prefixes: code15-, cpsc-, g12- seen in the published files; ptb-, csn-, mmmu-, ecgqa- assumed from the subset
# names. mmmu-ecg rows are keyed by "No" in the published scorer, so a row without "id" is keyed by its "No".
SUBSETS = {
    "ptb": {"file": "ptb-test", "prefix": "ptb-", "kind": "labels", "size": 2082, "labels": PTB_NAMES},
    "code15": {"file": "code15-test", "prefix": "code15-", "kind": "labels", "size": 1400, "labels": CODE15_NAMES},
    "cpsc": {"file": "cpsc-test", "prefix": "cpsc-", "kind": "labels", "size": 2061, "labels": CPSC_NAMES},
    "csn": {"file": "csn-test-no-cot", "prefix": "csn-", "kind": "choice", "size": 1611, "options": "ABCDEFGH"},
    "g12": {"file": "g12-test-no-cot", "prefix": "g12-", "kind": "choice", "size": 2026, "options": "ABCDEFGH"},
    "mmmu": {"file": "mmmu-ecg", "prefix": "mmmu-", "kind": "choice", "size": 200, "options": "ABCD"},
    "ecgqa": {"file": "ecgqa-test", "prefix": "ecgqa-", "kind": "sets", "size": 1317},
}
SEED = 42                         # the published scorer's random.seed(42)
ECHO_MIN_CHARS = 20               # a prompt line this long, repeated in an answer, is an echo, not an answer
ECGQA_TAIL = "Only answer based on the given Options without any explanation."


# --------------------------------------------------------------------------- subsets, rows, answers files
def resolve_bench(name):
    """'ptb', 'ptb-test', 'csn-test-no-cot', ... -> the SUBSETS key."""
    for key, spec in SUBSETS.items():
        if name in (key, spec["file"]):
            return key
    raise ValueError(f"unknown ECG-Bench subset {name!r}; one of {', '.join(SUBSETS)}")


def subset_of(row_id):
    """'code15-1109348' -> 'code15'; None when no subset's prefix fits. (ECG-QA rows named after PTB-XL records,
    'ptb-xl-...', would read as ptb: pass the subset by name when ids are ambiguous.)"""
    for key, spec in sorted(SUBSETS.items(), key=lambda kv: -len(kv[1]["prefix"])):
        if str(row_id).startswith(spec["prefix"]):
            return key
    return None


def row_id(row):
    return str(row["id"] if "id" in row else row["No"])


def turn_value(row, speaker):
    """The first turn's value from 'human' or 'gpt'; '' when there is none."""
    return next((t["value"] for t in row.get("conversations", []) if t.get("from") == speaker), "")


def read_rows(path):
    """A benchmark's rows file: a JSON list of LLaVA-style rows, or one error naming the file."""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA-style rows")
    return rows


def read_answers(path):
    """An answers JSONL file -> {id: text}. Ids from "question_id", else "id"; text from "text", else "response"
    (the published scorer reads both). A bad line is one error naming the file and the line."""
    answers = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read ({e.strerror})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
        key = item.get("question_id", item.get("id")) if isinstance(item, dict) else None
        text = item.get("text", item.get("response")) if isinstance(item, dict) else None
        if key is None or not isinstance(text, str):
            raise ValueError(f"{path}, line {number}: needs a question_id (or id) and a text (or response)")
        answers[str(key)] = text
    return answers


# --------------------------------------------------------------------------- metrics
def average_ranks(values):
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2)[inverse]


def roc_auc(truth, scores):
    """ROC AUC by ranks (Mann-Whitney U), ties counting one half; None when truth holds a single class."""
    truth = np.asarray(truth, dtype=bool)
    positives, negatives = truth.sum(), (~truth).sum()
    if positives == 0 or negatives == 0:
        return None
    rank_sum = average_ranks(np.asarray(scores, dtype=float))[truth].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def binarize(label_sets, columns):
    """(rows, columns) 0/1 matrix; labels outside columns are dropped."""
    matrix = [[label in labels for label in columns] for labels in label_sets]
    return np.array(matrix, dtype=int).reshape(len(label_sets), len(columns))


def f1_per_column(truth, pred):
    """F1 of each column, None where it is undefined (no gold and no predicted positive)."""
    tp = (truth & pred).sum(0)
    wrong = (truth ^ pred).sum(0)
    return [None if 2 * t + w == 0 else float(2 * t / (2 * t + w)) for t, w in zip(tp, wrong)]


def mean_defined(values):
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


# --------------------------------------------------------------------------- label subsets (ptb, code15, cpsc)
def substring_labels(text, labels):
    """The published rule: every label that occurs anywhere in the text, case-sensitive."""
    return [label for label in labels if label in text]


def code15_labels_as_published(text):
    """The published code15 rule: after the last 'Answer:'; NORM only when ABNORMAL is absent; plus the six codes."""
    text = text.split("Answer:")[-1]
    head = ["NORM"] if "NORM" in text and "ABNORMAL" not in text else ["ABNORMAL"] if "ABNORMAL" in text else []
    return head + substring_labels(text, CODE15_EXTRA)


def names_in_prompt(prompt, default_names):
    """{code: full name}: the defaults, overridden by the 'CODE(name)' pairs the prompt lists."""
    listed = dict(re.findall(r"([A-Za-z0-9/-]+)\(([^()]+)\)", prompt))
    return {code: listed.get(code, name) for code, name in default_names.items()}


def whole_word(term):
    """A term found only where letters and digits do not run on either side (so MI is not found in IMI), any case."""
    return re.compile(r"(?<![A-Za-z0-9_])" + re.escape(term) + r"(?![A-Za-z0-9_])", re.IGNORECASE)


def after_answer_marker(text):
    """What follows the last 'Answer:', when an answer writes its reading first."""
    parts = re.split(r"answer\s*:", text, flags=re.IGNORECASE)
    return parts[-1]


def without_echoed_prompt(text, prompt):
    """The answer with every long prompt line it repeats removed: repeating the option list is not choosing."""
    for line in prompt.splitlines():
        if len(line.strip()) >= ECHO_MIN_CHARS:
            text = text.replace(line.strip(), " ")
    return text


def labels_named(text, names):
    """Corrected rule: the codes whose code or full name appears as whole words, any case."""
    return {code for code, name in names.items() if whole_word(code).search(text) or whole_word(name).search(text)}


def label_blocks(spec, rows, answers, label_scores):
    """compatible and corrected figures of a multi-label subset."""
    compatible_truth, compatible_pred, truth, pred = [], [], [], []
    for row in rows:
        gold, text, prompt = turn_value(row, "gpt"), answers.get(row_id(row)), turn_value(row, "human")
        names = names_in_prompt(prompt, spec["labels"])
        truth.append(labels_named(gold, names))
        pred.append(labels_named(after_answer_marker(without_echoed_prompt(text or "", prompt)), names))
        if text is None:
            continue   # the published scorer reads the answers file, so a row without an answer is not scored
        if spec["file"] == "code15-test":
            compatible_truth.append([gold] if gold in CODE15_NAMES else substring_labels(gold, CODE15_EXTRA))
            compatible_pred.append(code15_labels_as_published(text))
        else:
            compatible_truth.append(substring_labels(gold, spec["labels"]))
            compatible_pred.append(substring_labels(text, spec["labels"]))
    scores = label_score_matrix(rows, spec["labels"], label_scores)
    return (labels_as_published(compatible_truth, compatible_pred),
            labels_corrected(truth, pred, list(spec["labels"]), scores))


def labels_as_published(truth_lists, pred_lists):
    """F1, Hamming loss and their 'AUC' over the labels the gold answers use, as the published scorer computes them:
    AUC from the 0/1 answers, and NaN (here None) when a label's gold column holds one class."""
    columns = sorted(set().union(*truth_lists)) if truth_lists else []
    if not columns:
        return {"f1": None, "hamming": None, "auc": None}
    truth, pred = binarize(truth_lists, columns), binarize(pred_lists, columns)
    aucs = [roc_auc(truth[:, i], pred[:, i]) for i in range(len(columns))]
    return {"f1": mean_defined(f1_per_column(truth.astype(bool), pred.astype(bool))),
            "hamming": float((truth != pred).mean()),
            "auc": None if None in aucs else float(np.mean(aucs))}


def labels_corrected(truth_sets, pred_sets, columns, scores):
    """Macro F1 over the subset's labels (those with a gold or a predicted positive: F1 is undefined for the rest),
    Hamming loss over all of them, and the ROC AUC from the per-label scores (None without scores)."""
    truth, pred = binarize(truth_sets, columns).astype(bool), binarize(pred_sets, columns).astype(bool)
    auc = None
    if scores is not None:
        auc = mean_defined([roc_auc(truth[:, i], scores[:, i]) for i in range(len(columns))])
    return {"f1": mean_defined(f1_per_column(truth, pred)),
            "hamming": float((truth != pred).mean()) if truth.size else None, "auc": auc}


def label_score_matrix(rows, labels, label_scores):
    """(rows, labels) scores from {row id: {label: score}}; a score not given ranks lowest (the model gave the label
    no support). None when no scores were passed."""
    if label_scores is None:
        return None
    return np.array([[float(label_scores.get(row_id(row), {}).get(label, -np.inf)) for label in labels]
                     for row in rows]).reshape(-1, len(labels))


# --------------------------------------------------------------------------- multiple choice (csn, g12, mmmu)
def letter_as_published(text):
    """The published extract(): an exact letter; the first of 'A.'...'H.' anywhere; 'The correct option is X';
    the first of A...H (alphabetically) anywhere after the last 'Answer:'. None: unparsable."""
    letters = "ABCDEFGH"
    if len(text) == 1 and text in letters:
        return text
    for letter in letters:
        if letter + "." in text:
            return letter
    if "The correct option is " in text:
        letter = text.split("The correct option is ")[-1][:1]
        return letter if letter and letter in letters else None
    if "Answer:" in text:
        tail = text.split("Answer:")[-1].strip()
        return next((letter for letter in letters if letter in tail), None)
    return None


def letter_strict(text, options):
    """Corrected: a lone option letter ('C', 'C.', '(C)'), else the letter right after the last 'Answer:' when no
    letter or digit follows it ('Answer: C. IAVB' is C, 'Answer: ECG' is nothing). None: unparsable."""
    lone = re.fullmatch(r"\s*\(?([A-H])[.)]?\s*", text)
    found = [lone.group(1)] if lone else re.findall(r"(?i:answer)\s*:\s*\(?([A-H])(?![A-Za-z0-9])", text)
    return found[-1] if found and found[-1] in options else None


def choice_blocks(spec, rows, answers):
    """compatible and corrected accuracy of a multiple-choice subset."""
    options, guesser = spec["options"], random.Random(SEED)
    compatible_right, guessed, right, parse_failures = [], 0, [], 0
    for row in rows:
        gold, text = turn_value(row, "gpt"), answers.get(row_id(row))
        gold_letter = gold.strip()[:1]
        letter = letter_strict(text, options) if text is not None else None
        parse_failures += text is not None and letter is None
        right.append(letter is not None and letter == gold_letter)
        if text is None:
            continue
        published = letter_as_published(text)
        if published is None:
            published, guessed = guesser.choice(options), guessed + 1
        # the published gold: the value's first character (csn, g12), the whole value (mmmu)
        compatible_right.append(published == (gold if spec["file"] == "mmmu-ecg" else gold[:1]))
    compatible = {"accuracy": mean_defined(compatible_right), "guessed": guessed,
                  # the published scorer prints nothing for a file whose length is not the published size
                  "their_scorer_would_skip": len(compatible_right) != spec["size"]}
    return compatible, {"accuracy": mean_defined(right), "parse_failures": parse_failures}


# --------------------------------------------------------------------------- ECG-QA
def ecgqa_candidates(prompt):
    """The options, as the published scorer cuts them from the prompt: after 'Options:', split on commas."""
    return [c.strip() for c in prompt.split("Options:")[-1].replace(ECGQA_TAIL, "").split(",")]


def normalised_items(text):
    """'Not sure.' -> {'not sure'}: lower case, spaces collapsed, outer punctuation dropped, split on , ; and lines."""
    items = (" ".join(part.lower().split()).strip(" .!?:'\"") for part in re.split(r"[,;\n]", text))
    return {item for item in items if item}


def ecgqa_blocks(rows, answers):
    """compatible and corrected accuracy of ECG-QA: the set of answered items against the gold set."""
    compatible_right, right = [], []
    for row in rows:
        gold, text = turn_value(row, "gpt"), answers.get(row_id(row))
        gold = gold if isinstance(gold, list) else [gold]
        right.append(text is not None and normalised_items(after_answer_marker(text)) ==
                     normalised_items("\n".join(gold)))
        if text is None:
            continue
        found = [c for c in ecgqa_candidates(turn_value(row, "human")) if c in text.lower()]
        compatible_right.append(set(found) == set(gold))
    return {"accuracy": mean_defined(compatible_right)}, {"accuracy": mean_defined(right)}


# --------------------------------------------------------------------------- score, command line
def score(bench, rows, answers, label_scores=None):
    """One subset's answers scored both ways.
    rows: the benchmark's LLaVA-style rows; answers: {row id: text}; label_scores: {row id: {label: score}} or None
    -> {"bench", "n", "published_n", "missing", "extra", "compatible": {...}, "corrected": {...}}"""
    name = resolve_bench(bench)
    spec, ids = SUBSETS[name], {row_id(row) for row in rows}
    if spec["kind"] == "labels":
        compatible, corrected = label_blocks(spec, rows, answers, label_scores)
    elif spec["kind"] == "choice":
        compatible, corrected = choice_blocks(spec, rows, answers)
    else:
        compatible, corrected = ecgqa_blocks(rows, answers)
    return {"bench": name, "n": len(rows), "published_n": spec["size"],
            "missing": sum(row_id(row) not in answers for row in rows),
            "extra": len(set(answers) - ids),   # answers for no row of this file
            "compatible": compatible, "corrected": corrected}


def score_model(bench, model, rows, file_rows, predictions, inputs_of):
    """eval.py --bench: its answers to a subset's rows scored both ways, and for a subset of labels the corrected AUC
    from the model's own label scores (label_scores). rows: the rows eval.py asked, as data.load_rows reads them
    (an unreadable one counts as missing); file_rows: the file's rows as written (LLaVA-style); predictions:
    eval.evaluate's, each with its row's position in the file ("index"). bench "auto": told from the row ids."""
    asked = [file_rows[r["file_index"]] for r in rows]
    name = subset_name(bench, asked)
    answers = {row_id(file_rows[p["index"]]): p["prediction"] for p in predictions}
    spec = SUBSETS[name]
    scores = label_scores(model, rows, inputs_of, list(spec["labels"])) if spec["kind"] == "labels" else None
    return score(name, asked, answers, scores)


@torch.no_grad()
def label_scores(model, rows, inputs_of, labels):
    """{row id: {label: score}}: the model's teacher-forced log-probability of answering with each label code first
    ("NORM", before any end of turn), after the row's own question: a score per label that a real ROC AUC can rank,
    where 0/1 answers give only balanced accuracy. A row whose ECG cannot be read gets none (it ranks lowest)."""
    out, device = {}, next(model.parameters()).device
    for row in rows:
        try:
            inputs = inputs_of(row)
        except (FileNotFoundError, ValueError):
            continue
        encoded = [model.prompt(turns_of(row, answered=False) + [("assistant", label)], inputs) for label in labels]
        width = max(len(ids) for ids, _ in encoded)   # right-padded: causal attention keeps padding out of the past
        ids = torch.tensor([i + [model.tokenizer.pad_id] * (width - len(i)) for i, _ in encoded], device=device)
        logp = model(ids, [inputs] * len(labels)).float().log_softmax(-1)                        # (labels, T, V)
        out[str(row["id"])] = {label: named_logp(logp[k], target) for k, (label, (_, target)) in
                               enumerate(zip(labels, encoded))}
    return out


def named_logp(logp, target):
    """Sum of log p over an answer's tokens but its last (the end of turn): logp (T, V) of one sequence; target: its
    labels, -100 where no loss."""
    positions = [t for t, tok in enumerate(target) if tok != -100][:-1]
    return float(sum(logp[t - 1, target[t]] for t in positions))


def subset_name(bench, rows):
    """--bench's value -> the SUBSETS key: a subset's name, or "auto", told from the rows' ids."""
    return bench_from_ids(rows) if bench == "auto" else resolve_bench(bench)


def bench_from_ids(rows):
    names = {subset_of(row_id(row)) for row in rows}
    if len(names) != 1 or None in names:
        raise ValueError(f"cannot tell the subset from the row ids (found {sorted(map(str, names))}); pass --bench")
    return names.pop()


def table(result):
    """The two blocks side by side, one metric a line."""
    def shown(block, key):   # "-": the block has no such figure; "n/a": it has, and it cannot be computed
        value = result[block].get(key, "-")
        return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
    size = "" if result["n"] == result["published_n"] else " (not the published size: reported, not skipped)"
    lines = [f"ECG-Bench {result['bench']}: {result['n']} rows, published {result['published_n']}{size}; "
             f"{result['missing']} without an answer; {result['extra']} answers for no row",
             f"{'metric':<26}{'compatible':>12}{'corrected':>12}"]
    for key in dict.fromkeys([*result["compatible"], *result["corrected"]]):
        lines.append(f"{key:<26}{shown('compatible', key):>12}{shown('corrected', key):>12}")
    if "auc" in result["corrected"] and result["corrected"]["auc"] is None:
        lines.append("corrected auc needs each row's per-label scores (--label-scores); compatible's is from 0/1")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Score ECG-Bench answers: the published rules and corrected ones.")
    parser.add_argument("--bench", help=f"one of {', '.join(SUBSETS)} (default: told from the row ids)")
    parser.add_argument("--data", required=True, help="the subset's rows (LLaVA-style JSON list)")
    parser.add_argument("--answers", required=True, help="JSONL, one {question_id or id, text} a line")
    parser.add_argument("--label-scores", help="JSON {row id: {label: score}}: the corrected AUC's scores")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    rows = read_rows(args.data)
    label_scores = read_json(args.label_scores) if args.label_scores else None
    result = score(args.bench or bench_from_ids(rows), rows, read_answers(args.answers), label_scores)
    print(table(result))
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
