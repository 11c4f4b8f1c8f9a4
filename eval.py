"""
eval.py — how good a model is, and how fast.

Read top to bottom:
  1. Metrics       small pure functions on answer texts: localization IoU (anyECG's rule),
                   BLEU-1..4 and ROUGE-L, statement precision/recall/F1 (ECG-Bench style),
                   exact match (ECG-QA, multi-ECG), measurement MAE for grounded answers.
  2. Scoring       `score_rows`: the metrics of each task over a list of rows; `print_table`.
  3. Evaluating    `evaluate(model, rows, ecgs_of)`: batched generation over anyECG rows,
                   with the ECG optionally blanked (--ablate-ecg) to see how much it matters.
  4. Benchmarks    encoder time/memory vs ECG length; LLM speed against transformers; how
                   fast the encoder alone learns (probe-encoder, the loop lives in warmup.py).
  5. Command line

    python eval.py --ckpt DIR --data FILE.json --ecg-root DIR --out results.json
                   [--ablate-ecg] [--batch-size 8] [--max-new-tokens 256] [--limit N]
    python eval.py bench-encoder [--device cpu|cuda] [--durations 10,60,600,3600]
    python eval.py bench-llm [--device cpu|cuda] [--dtype fp32|bf16]   (needs transformers)
    python eval.py probe-encoder [--steps 400]   (the encoder alone on the synthetic truth)
    python eval.py speed [--device cpu|cuda]     (all speed figures in one table; needs transformers)
"""

import argparse
import json
import math
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
from collections import Counter

import numpy as np
import torch
from torch.utils import flop_counter
from tqdm import tqdm

from data import STATEMENTS, encode_chat, is_image, parse_localization
from ecg_encoder import LEADS_12, ECGEncoder, EncoderConfig

# -----------------------------------------------------------------------------
# 1. metrics: pure functions from answer texts to numbers

# --- localization (anyECG): "Duration: 1.3s-2.9s, 6.1s-7.7s" or "No ... Found"


def merge_intervals(spans):
    """[(a, b), ...] -> their union as sorted, disjoint (a, b) spans; touching spans merge."""
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def localization_iou(pred, ref):
    """IoU of the time two localization answers cover. anyECG's rule: both "No ... Found"
    -> 1; only one of them -> 0; an answer with no readable interval -> 0. Each side is
    the union of its intervals, so a prediction that lists a span twice gains nothing."""
    p, r = parse_localization(pred), parse_localization(ref)
    if p is None or r is None:
        return 0.0
    if not p or not r:
        return float(not p and not r)
    p, r = merge_intervals(p), merge_intervals(r)
    inter = sum(max(0.0, min(b1, b2) - max(a1, a2)) for a1, b1 in p for a2, b2 in r)
    union = sum(b - a for a, b in p) + sum(b - a for a, b in r) - inter
    return inter / union if union > 0 else 0.0


def group_mean(values, groups):
    """Micro mean (over all rows), macro mean (over the groups' means) and each group's
    mean. anyECG reports localization IoU both ways: macro over beat types keeps the
    rare ones (a single PVC) from vanishing under the common ones."""
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
    """Corpus BLEU-1..max_n (Papineni et al. 2002) with one reference per hypothesis:
    clipped n-gram matches and n-gram counts are summed over the corpus, BLEU-n is the
    geometric mean of the precisions of orders 1..n times the brevity penalty
    exp(1 - ref_len / hyp_len) when the hypotheses are shorter. -> [BLEU-1, ..., BLEU-n]"""
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


def find_statements(text, vocabulary=STATEMENTS):
    """The statements of `vocabulary` named in `text` (case-insensitive, whole words).
    Longer statements are matched first and blanked out, so "Normal ECG except for rate"
    does not also count as "Normal ECG". Like ECG-Bench's string matching it cannot see
    negation: "no atrial fibrillation" names atrial fibrillation."""
    text, found = text.lower(), set()
    for s in sorted(vocabulary, key=len, reverse=True):
        text, hits = re.subn(r"(?<!\w)" + re.escape(s.lower()) + r"(?!\w)", "|", text)
        if hits:
            found.add(s)
    return found


def statement_prf(preds, refs, vocabulary=STATEMENTS):
    """Each text -> a binary vector over the vocabulary. Micro precision / recall / F1
    over all (text, statement) pairs, and macro F1 over the statements that occur in a
    reference or a prediction (a statement nobody names has no F1)."""
    counts = {s: [0, 0, 0] for s in vocabulary}  # true pos, false pos, false neg
    for p, r in zip(preds, refs):
        p, r = find_statements(p, vocabulary), find_statements(r, vocabulary)
        for s in p | r:
            counts[s][0 if s in p and s in r else 1 if s in p else 2] += 1
    tp, fp, fn = (sum(c[k] for c in counts.values()) for k in range(3))
    used = [c for c in counts.values() if sum(c)]
    return {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "f1": _f1(tp, fp, fn), "macro_f1": sum(_f1(*c) for c in used) / len(used) if used else 0.0}


def _f1(tp, fp, fn):
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0

# --- short answers (ECG-QA, multi-ECG): exact match after normalisation


def normalise_answer(text):
    """Lower case, punctuation -> space, whitespace collapsed: "Sinus rhythm." == "sinus  rhythm"."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def exact_match(pred, ref):
    return float(normalise_answer(pred) == normalise_answer(ref))

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
    out = {}
    for name, (_, pattern) in MEASUREMENTS.items():
        m = re.search(pattern, text, re.IGNORECASE)
        out[name] = float(m.group(1)) if m else None
    return out


def measurement_mae(preds, refs):
    """Per measurement: mean absolute error over the rows whose reference states it and
    whose prediction states it too; `missing` counts the predictions that did not (they
    are left out of the MAE, so read the two together)."""
    out = {}
    for name in MEASUREMENTS:
        pairs = [(parse_measurements(p)[name], parse_measurements(r)[name]) for p, r in zip(preds, refs)]
        pairs = [(p, r) for p, r in pairs if r is not None]
        errors = [abs(p - r) for p, r in pairs if p is not None]
        out[name] = {"mae": sum(errors) / len(errors) if errors else None, "n": len(pairs),
                     "missing": len(pairs) - len(errors)}
    return out


# -----------------------------------------------------------------------------
# 2. scoring: each task's metrics over (row, prediction) pairs

LOCATION_TASKS = ("location", "location_long")


def row_score(row, pred):
    """The per-row number a task has (localization IoU, short-answer correctness), else None."""
    if row["task"] in LOCATION_TASKS:
        return localization_iou(pred, row["answer"])
    if row["task"] == "ecgqa" or (row["task"] == "multi" and "question_type" in row):
        return exact_match(pred, row["answer"])
    return None


def diagnosis_part(text):
    """The statements a grounded answer concludes with ("... Diagnosis: X, Y."), not the
    findings its reasoning mentions on the way; the whole text if there is no such part."""
    return text.rsplit("Diagnosis:", 1)[-1]


def score_task(task, rows, preds):
    """Scores of one task. Localization: IoU micro/macro over beat types. ecgqa and
    multi-ECG rows with a question_type: exact-match accuracy micro/macro over question
    types. Reports: BLEU, ROUGE-L, statement P/R/F1. Grounded: measurement MAE and
    statement F1 of the diagnosis. Anything else (open-ended, free text): BLEU, ROUGE-L.
    The rows of one call share a task (and have, or lack, a question_type together)."""
    refs = [r["answer"] for r in rows]
    out = {"n": len(rows)}
    if task in LOCATION_TASKS or (task in ("ecgqa", "multi") and "question_type" in rows[0]):
        key = "abnormal_type" if task in LOCATION_TASKS else "question_type"
        name = "iou" if task in LOCATION_TASKS else "accuracy"
        g = group_mean([row_score(r, p) for r, p in zip(rows, preds)], [str(r.get(key, "?")) for r in rows])
        return out | {f"{name}_micro": g["micro"], f"{name}_macro": g["macro"], "per_type": g["per_type"]}
    if task == "grounded":
        diag = statement_prf([diagnosis_part(p) for p in preds], [diagnosis_part(r) for r in refs])
        return out | {"measurements": measurement_mae(preds, refs), "statement_f1": diag["f1"]}
    b = bleu(preds, refs)
    out |= {f"bleu{n + 1}": v for n, v in enumerate(b)}
    out["rouge_l"] = sum(rouge_l(p, r) for p, r in zip(preds, refs)) / len(rows)
    if task == "report":
        out |= {f"statement_{k}": v for k, v in statement_prf(preds, refs).items()}
    return out


def score_rows(rows, preds):
    """{task: scores} over answered rows, tasks in order of first appearance; rows that name
    their modality get their own groups ("report [signal]", "report [image]",
    "report [both]"). ecgqa and
    multi rows without a question_type (free-text answers, e.g. anyECG's MIMIC comparisons)
    cannot be matched exactly; they form their own group, scored like open text."""
    groups = {}
    for row, pred in zip(rows, preds):
        free = row["task"] in ("ecgqa", "multi") and "question_type" not in row
        modality = f" [{row['modality']}]" if "modality" in row else ""
        groups.setdefault(row["task"] + modality + (" (free text)" if free else ""), []).append((row, pred))
    return {name: score_task(pairs[0][0]["task"], [r for r, _ in pairs], [p for _, p in pairs])
            for name, pairs in groups.items()}


def prior_answers(train_rows, rows):
    """What a model that never looks at the ECG can score: for each row, the most frequent
    training answer to the same question (same task, same wording), else the task's most
    frequent answer. Scored like a model's answers, this is the chance level that the
    ECG-blanked ablation should fall to."""
    by_question, by_task = {}, {}
    for r in train_rows:
        by_question.setdefault((r["task"], r["question"]), Counter())[r["answer"]] += 1
        by_task.setdefault(r["task"], Counter())[r["answer"]] += 1
    guesses = [by_question.get((r["task"], r["question"])) or by_task.get(r["task"]) for r in rows]
    return [c.most_common(1)[0][0] if c else "" for c in guesses]


def headline(s):
    """One task's scores -> 'name value' pairs for the table."""
    if "iou_micro" in s:
        return [("IoU micro", s["iou_micro"]), ("IoU macro", s["iou_macro"])]
    if "accuracy_micro" in s:
        return [("accuracy", s["accuracy_micro"]), ("macro", s["accuracy_macro"])]
    if "measurements" in s:
        mae = [(f"{k.upper()} MAE ({MEASUREMENTS[k][0]})", v["mae"]) for k, v in s["measurements"].items()]
        return mae + [("diagnosis F1", s["statement_f1"])]
    out = [("BLEU-1", s["bleu1"]), ("BLEU-4", s["bleu4"]), ("ROUGE-L", s["rouge_l"])]
    return out + ([("statement F1", s["statement_f1"])] if "statement_f1" in s else [])


def _fmt(v):
    return "-" if v is None else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def print_table(scores, file=None):
    """Per-task table: rows answered, the task's main metrics, then one line per beat type
    or question type; ends with the rows that were skipped and why."""
    print(f"{'task':<28}{'n':>6}  metrics", file=file)
    for task, s in scores.items():
        if task == "skipped":
            continue
        cells = "  ".join(f"{k} {_fmt(v)}" for k, v in headline(s))
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


# -----------------------------------------------------------------------------
# 3. evaluating a model over anyECG rows


def _skip_reason(err):
    return ("ecg_path not found" if isinstance(err, FileNotFoundError) else
            "longer than the context" if "context allows" in str(err) else "unreadable ECG")


def row_prompt(model, row, ecgs_of, ablate_ecg=False):
    """One row -> (prompt token ids, {"ecgs": [(signal (L, N) tensor, leads), ...],
    "images": [uint8 image tensor, ...]}) for model.generate. Raises FileNotFoundError /
    ValueError when its ECGs cannot be read or do not fit."""
    inputs = ecgs_of(row)
    ecgs, images = [e for e in inputs if not is_image(e)], [e for e in inputs if is_image(e)]
    if ecgs and min(e.signal.shape[1] for e in ecgs) < model.encoder.cfg.patch_size:
        raise ValueError(f"{row['ecg_path']}: ECG shorter than one encoder patch")
    if images and model.image_encoder is None:
        raise ValueError(f"{row['ecg_path']}: the row has images but the model has no image encoder")
    counts = [model.encoder.num_tokens(e.signal.shape[1]) for e in ecgs]
    n_img = [model.image_encoder.num_tokens] * len(images) if images else []
    ids, _ = encode_chat(model.tokenizer, [("user", row["question"])], counts, add_generation_prompt=True,
                         image_token_counts=n_img)
    model.check_fits([e.signal.shape[1] for e in ecgs], len(ids) - sum(counts) + 1)   # room for 1 new token
    signals = [torch.as_tensor(np.asarray(e.signal, dtype=np.float32)) for e in ecgs]
    return ids, {"ecgs": [(torch.zeros_like(x) if ablate_ecg else x, list(e.leads)) for x, e in zip(signals, ecgs)],
                 "images": [torch.full_like(torch.from_numpy(im), 255) if ablate_ecg else torch.from_numpy(im)
                            for im in images]}


@torch.no_grad()
def evaluate(model, rows, ecgs_of, batch_size=8, max_new_tokens=256, ablate_ecg=False, progress=True,
             temperature=0.0, top_k=None, top_p=None, seed=0):
    """Answer every row with `model` (an ECGChat) and score the answers.

    ecgs_of(row) -> [ECGRecord at the model's rate, ...], the row's ECGs in order. A row
    whose ECGs cannot be read (file missing, bad record) or do not fit the context is
    skipped, counted and reported -- one bad row never ends a long run.
    Generation is batched (left padding, see generate.py) and greedy unless temperature > 0.
    ablate_ecg: zero every signal and blank every image (same shapes, so the prompt is unchanged): the
    drop in score is how much the answers depend on the ECG.
    -> (scores, predictions): scores per task (score_rows) plus "skipped"; predictions one
    dict per answered row with its question, reference, prediction and per-row score."""
    was_training = model.training
    model.eval()
    device = model.llm.embed_tokens.weight.device
    generator = torch.Generator(device).manual_seed(seed) if temperature > 0 else None
    # rows of one task have similar ECG lengths: batching them together saves padding
    order = sorted(range(len(rows)), key=lambda i: rows[i]["task"])
    answered, skipped = [], []
    bar = tqdm(total=len(rows), desc="eval" + (" (ECG blanked)" if ablate_ecg else ""), disable=not progress)
    try:
        for start in range(0, len(order), batch_size):
            batch = []  # (row index, prompt ids, ECG inputs)
            for i in order[start:start + batch_size]:
                try:
                    batch.append((i, *row_prompt(model, rows[i], ecgs_of, ablate_ecg)))
                except (FileNotFoundError, ValueError) as e:
                    skipped.append({"index": i, "ecg_path": rows[i].get("ecg_path"), "reason": _skip_reason(e),
                                    "error": str(e)})
            if batch:
                room = model.max_seq_len - max(len(ids) for _, ids, _ in batch)
                new = model.generate([ids for _, ids, _ in batch], [x["ecgs"] for _, _, x in batch],
                                     images=[x["images"] for _, _, x in batch],
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
    keep = ("task", "abnormal_type", "question_type", "ecg_path", "question", "answer")
    predictions = [{"index": i, **{k: rows[i][k] for k in keep if k in rows[i]}, "prediction": p,
                    "score": row_score(rows[i], p)} for i, p in answered]
    return scores, predictions


# -----------------------------------------------------------------------------
# 4. benchmarks
# encoder benchmark: time and peak memory of one single-lead ECG from 10 s to 1 h
# (time per ECG-second should be flat, memory linear), and the windowed encoder on a
# batch of mixed-length ECGs against the same ECGs zero-padded to the longest.


def count_flops(fn):
    """FLOPs of fn() as counted by torch's FlopCounterMode. Its table lacks the CPU
    flash-attention op, so we add it: attention is exactly what windows keep small."""
    def sdpa_cpu(q, k, v, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(q, k, v)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        fn()
    return fc.get_total_flops()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timeit(fn, device, min_reps=3, min_time_s=1.0, max_time_s=60.0):
    """Median wall time of fn() over at least min_reps runs (more while under min_time_s)."""
    times = []
    while len(times) < min_reps or (sum(times) < min_time_s and len(times) < 100):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if sum(times) > max_time_s:
            break
    return statistics.median(times)


def _rss_kib(field):  # current (VmRSS) or peak (VmHWM) resident memory of this process
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])


def _measure_one(preset, seconds, device, threads, what):
    """Runs in a fresh process, so memory figures are this ECG's alone.
    what="memory": FLOPs and peak memory; what="time": median wall time."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    enc = ECGEncoder(getattr(EncoderConfig, preset)()).to(device).eval()
    x = torch.randn(1, round(seconds * enc.cfg.fs), device=device)
    run = lambda: enc([x], [["II"]])  # noqa: E731
    with torch.no_grad():
        flops = count_flops(run)  # doubles as the warm-up (kernels, thread pool)
        if what == "time":
            return dict(time_s=_timeit(run, device))
        # peak memory above the resting state, over one forward
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            rest = torch.cuda.memory_allocated()
            run()
            peak = torch.cuda.max_memory_allocated() - rest
        else:
            rest = _rss_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM (the peak) to the current RSS
            run()
            peak = _rss_kib("VmHWM") * 1024 - rest
    return dict(preset=preset, seconds=seconds, tokens=enc.internal_tokens(x.shape[1], 1),
                out=enc.num_tokens(x.shape[1]), flops=flops, peak_bytes=peak)


def _in_fresh_process(fn, *args, env=None):
    old = dict(os.environ)
    os.environ.update(env or {})  # a spawned child reads these at start-up
    try:
        with mp.get_context("spawn").Pool(1) as pool:
            return pool.apply(fn, args)
    finally:
        os.environ.clear()
        os.environ.update(old)


def _mixed_batch(device, threads):
    """Windowed (dense groups / nested jagged) vs zero-padded to the longest, tiny preset."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    enc = ECGEncoder(EncoderConfig.tiny()).to(device).eval()
    spec = [(12, 8), (12, 10), (12, 10), (12, 25.5), (1, 60), (2, 137), (12, 300), (1, 600)]
    leads = [list(LEADS_12[:n]) if n > 1 else ["II"] for n, _ in spec]
    sigs = [torch.randn(n, round(s * enc.cfg.fs), device=device) for n, s in spec]
    longest = max(x.shape[1] for x in sigs)
    padded = [torch.nn.functional.pad(x, (0, longest - x.shape[1])) for x in sigs]
    rows = []
    with torch.no_grad():
        for name, xs, packed in [("windowed, dense groups", sigs, "dense"),
                                 ("windowed, nested jagged", sigs, "nested"),
                                 ("zero-padded to longest", padded, "dense")]:
            run = lambda: enc(xs, leads, packed=packed)  # noqa: E731
            # FlopCounterMode cannot trace nested tensors; the nested path does the same math
            flops = count_flops(run) if packed == "dense" else None
            tokens = sum(enc.internal_tokens(x.shape[1], len(l)) for x, l in zip(xs, leads))
            rows.append((name, tokens, flops, _timeit(run, device, min_reps=2)))
    return spec, rows


def bench_encoder(device="cpu", durations=(10, 60, 600, 3600), presets=("tiny", "base"),
                  threads=None):
    threads = threads or torch.get_num_threads()
    # for the memory run, big buffers go straight to mmap and back to the OS when freed,
    # so peak RSS tracks live tensors (glibc would otherwise keep freed memory around);
    # timing runs use the default allocator, as a user would
    mem_env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    jobs = [(p, s) for p in presets for s in durations]
    results = []
    for preset, seconds in tqdm(jobs, desc="encoder bench"):
        r = _in_fresh_process(_measure_one, preset, seconds, device, threads, "memory", env=mem_env)
        r |= _in_fresh_process(_measure_one, preset, seconds, device, threads, "time")
        results.append(r)
    spec, rows = _in_fresh_process(_mixed_batch, device, threads)

    mem = "peak CUDA memory allocated" if device == "cuda" else "peak RSS increase"
    print(f"\nOne single-lead ECG, device {device}, {threads} threads, fp32, no_grad. "
          f"Memory: {mem} over one forward (fresh process).")
    print(f"{'preset':<6} {'ECG':>7} {'tok in':>7} {'tok out':>7} {'GFLOP':>8} {'time s':>8} "
          f"{'ms/ECG-s':>9} {'vs longest':>8} {'mem MiB':>8} {'MiB/ECG-min':>11}")
    for p in presets:
        rs = [r for r in results if r["preset"] == p]
        steady = 1e3 * rs[-1]["time_s"] / rs[-1]["seconds"]  # ms per ECG-second, longest ECG
        for r in rs:
            per_s = 1e3 * r["time_s"] / r["seconds"]
            print(f"{p:<6} {r['seconds']:>6g}s {r['tokens']:>7} {r['out']:>7} "
                  f"{r['flops'] / 1e9:>8.2f} {r['time_s']:>8.3f} {per_s:>9.3f} "
                  f"{per_s / steady:>7.2f}x {r['peak_bytes'] / 2**20:>8.1f} "
                  f"{r['peak_bytes'] / 2**20 / (r['seconds'] / 60):>11.2f}")
        if len(rs) > 1:  # time = fixed + marginal * seconds, through shortest and longest
            a, b = rs[0], rs[-1]
            marginal = (b["time_s"] - a["time_s"]) / (b["seconds"] - a["seconds"])
            fixed = a["time_s"] - marginal * a["seconds"]
            print(f"{p:<6} fixed cost per call {1e3 * fixed:.1f} ms, "
                  f"marginal {1e3 * marginal:.3f} ms per ECG-second")
    print(f"\nMixed batch, tiny preset, (leads, seconds): {spec}")
    print(f"{'path':<26} {'tokens':>8} {'GFLOP':>8} {'time s':>8}")
    for name, tokens, flops, sec in rows:
        gflop = f"{flops / 1e9:8.2f}" if flops is not None else f"{'(same)':>8}"
        print(f"{name:<26} {tokens:>8} {gflop} {sec:>8.3f}")
    return results, rows


# -----------------------------------------------------------------------------
# LLM speed: ours vs transformers, same weights, same process, interleaved

def bench_llm(args):
    """Training step (forward + backward) and cached greedy decode, nanoECG's LLM against
    transformers' LlamaForCausalLM on the same random checkpoint. The two are timed in turns,
    rep after rep, and the median of each is printed, so machine noise hits both alike."""
    import tempfile

    import transformers
    from generate import generate
    from model import LLM

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = LLM.from_pretrained(d, dtype=dtype, device=device)
    hf = hf.to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"config: {n_params / 1e6:.1f}M params, dim {args.dim}, {args.layers} layers, "
          f"{args.heads}/{args.kv_heads} heads, vocab {args.vocab}, {dtype}, {device}, "
          f"{torch.get_num_threads()} threads")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    B, T = args.train_batch, args.train_len
    idx = torch.randint(0, args.vocab, (B, T + 1), device=device)

    def train_step_ours():
        ours.train()
        logits = ours(idx[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten()).backward()
        ours.zero_grad(set_to_none=True)

    def train_step_hf():
        hf.train()
        hf(idx[:, :-1], labels=idx[:, :-1]).loss.backward()  # transformers shifts labels itself
        hf.zero_grad(set_to_none=True)

    def decode(model_name, batch):
        prompt = torch.randint(3, args.vocab, (batch, args.prompt_len), device=device)
        n = args.new_tokens
        if model_name == "ours":
            ours.eval()
            return lambda: generate(ours, prompt, max_new_tokens=n)
        hf.eval()
        return lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False, pad_token_id=0)

    rows = [("train step fwd+bwd", B * T, train_step_ours, train_step_hf)]
    for batch in args.decode_batches:
        with torch.no_grad():
            rows.append((f"decode batch {batch}", batch * args.new_tokens, decode("ours", batch), decode("hf", batch)))
    print(f"{'measure':<22}{'ours tok/s':>12}{'transformers tok/s':>20}{'ours/hf':>9}")
    figures = []  # (measure, ours tok/s, transformers tok/s, MFU or None)
    for name, n_tokens, fn_ours, fn_hf in rows:
        grad = torch.enable_grad() if name.startswith("train") else torch.no_grad()
        with grad:
            fn_ours(), fn_hf()  # warm-up
            t_ours, t_hf = [], []
            for _ in range(args.reps):
                t_ours.append(timed(fn_ours))
                t_hf.append(timed(fn_hf))
        a, b = n_tokens / statistics.median(t_ours), n_tokens / statistics.median(t_hf)
        print(f"{name:<22}{a:>12.0f}{b:>20.0f}{a / b:>9.2f}")
        mfu = None
        if device.type == "cuda" and name.startswith("train"):
            peak = {torch.bfloat16: 989e12, torch.float32: 67e12}.get(dtype, 989e12)  # H100 SXM dense
            mfu = 6 * n_params * n_tokens / statistics.median(t_ours) / peak
            print(f"{'':<22}MFU {mfu:.1%} (6·N·tokens/s over {peak / 1e12:.0f} TFLOP/s)")
        figures.append((name, a, b, mfu))
    return figures


def speed(args):
    """Every speed figure the design asks for, in one table: the LLM against transformers
    (train step, cached decode), the encoder's time per ECG-second from 10 s to 1 h, and a
    mixed-length batch windowed against zero-padded. Each part prints its own detail first."""
    llm = bench_llm(args)
    durations = [float(x) for x in args.durations.split(",")]
    enc, mixed = bench_encoder(args.device, durations, ["tiny"], None)
    per_s = {r["seconds"]: 1e3 * r["time_s"] / r["seconds"] for r in enc}
    longest = per_s[max(per_s)]
    table = []  # (measure, value, target, met)
    for name, ours, hf, mfu in llm:
        table.append((f"LLM {name}, ours / transformers", f"{ours / hf:.2f}x", ">= 1.0x", ours >= hf))
        if mfu is not None:
            table.append((f"LLM {name}, MFU", f"{mfu:.1%}", "reported", None))
    for sec, ms in per_s.items():
        table.append((f"encoder ms per ECG-second, {sec:g} s", f"{ms:.3f} ({ms / longest:.2f}x of {max(per_s):g} s)",
                      "flat (<= 1.3x)", ms / longest <= 1.3))
    dense, padded = mixed[0][3], mixed[-1][3]
    table.append(("mixed batch: windowed vs zero-padded time", f"{dense:.3f} s vs {padded:.3f} s",
                  "windowed faster", dense < padded))
    print(f"\n{'measure':<52} {'value':<28} {'target':<16} met")
    for measure, value, target, met in table:
        print(f"{measure:<52} {value:<28} {target:<16} {'-' if met is None else 'yes' if met else 'NO'}")
    return table


# -----------------------------------------------------------------------------
# 5. command line

BENCHMARKS = ("bench-encoder", "bench-llm", "probe-encoder", "speed")


def anyecg_ecgs(root, fs):
    """ecgs_of for an anyECG-format file: a row's records read lazily from `root`
    (data.RowECGReader: clipped on localization rows, resampled to fs, recent ones cached)."""
    from data import RowECGReader
    return RowECGReader(root, fs, cache_size=64)


def write_json(path, obj):
    """Temp file + rename: an interrupted write never leaves half a results file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def eval_main(argv):
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder (what train.py writes)")
    p.add_argument("--data", required=True, help="anyECG-format JSON file: a list of rows")
    p.add_argument("--ecg-root", help="folder the rows' ecg_path are relative to (default: the --data folder)")
    p.add_argument("--out", default="results.json", help="scores and predictions, JSON")
    p.add_argument("--ablate-ecg", action="store_true", help="blank every ECG (zeros) to measure dependence on it")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default, deterministic)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    from data import load_rows
    from model import ECGChat
    try:
        model = ECGChat.load(args.ckpt, device=args.device)
        rows = load_rows(args.data)[:args.limit]
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    root = args.ecg_root or os.path.dirname(os.path.abspath(args.data))
    if not os.path.isdir(root):
        sys.exit(f"error: --ecg-root {root}: no such folder")
    scores, predictions = evaluate(model, rows, anyecg_ecgs(root, model.encoder.cfg.fs), args.batch_size,
                                   args.max_new_tokens, args.ablate_ecg, temperature=args.temperature,
                                   top_p=args.top_p, seed=args.seed)
    print_table(scores)
    write_json(args.out, {"ckpt": args.ckpt, "data": args.data, "ecg_root": root, "ablate_ecg": args.ablate_ecg,
                          "scores": scores, "predictions": predictions})
    print(f"wrote {args.out}", file=sys.stderr)
    return scores


def _llm_bench_args(b):
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    b.add_argument("--vocab", type=int, default=8000)
    b.add_argument("--dim", type=int, default=512, help="hidden size (default ~20M-parameter config)")
    b.add_argument("--ffn", type=int, default=1376, help="MLP intermediate size")
    b.add_argument("--layers", type=int, default=5)
    b.add_argument("--heads", type=int, default=8)
    b.add_argument("--kv-heads", type=int, default=4)
    b.add_argument("--train-batch", type=int, default=4)
    b.add_argument("--train-len", type=int, default=256)
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    b.add_argument("--reps", type=int, default=5)


def bench_main(argv):
    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench-encoder", help="encoder time/memory vs ECG duration")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--durations", default="10,60,600,3600", help="seconds, comma-separated")
    b.add_argument("--presets", default="tiny,base", help="EncoderConfig presets")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    _llm_bench_args(sub.add_parser("bench-llm", help="LLM train step and cached decode, ours vs transformers"))
    b = sub.add_parser("speed", help="bench-llm + bench-encoder (tiny) in one table against the design's targets")
    _llm_bench_args(b)
    b.add_argument("--durations", default="10,60,600,3600", help="encoder: ECG seconds, comma-separated")
    b = sub.add_parser("probe-encoder", help="encoder + linear heads on the synthetic ground truth: "
                                             "how fast it learns statements, HR and beat positions")
    b.add_argument("--steps", type=int, default=400)
    b.add_argument("--lr", type=float, default=1e-3)
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--train-patients", type=int, default=500)
    b.add_argument("--d-model", type=int, default=128, help="encoder width")
    b.add_argument("--layers", type=int, default=4, help="encoder depth")
    b.add_argument("--save", default=None, help="write the trained encoder (safetensors) for train.py --encoder_init")
    args = parser.parse_args(argv)
    if args.command == "probe-encoder":
        from warmup import fit_encoder_to_truth  # the same loop as train.py's encoder warm-up
        return fit_encoder_to_truth(args.steps, args.lr, args.batch_size, args.train_patients, save=args.save,
                                    d_model=args.d_model, n_layers=args.layers)
    if args.command == "bench-llm":
        return bench_llm(args)
    if args.command == "speed":
        return speed(args)
    return bench_encoder(args.device, [float(s) for s in args.durations.split(",")],
                         args.presets.split(","), args.threads)


def main(argv=None):
    """`eval.py bench-...` runs a benchmark; anything else evaluates a checkpoint."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return bench_main(argv) if argv and argv[0] in BENCHMARKS else eval_main(argv)


if __name__ == "__main__":
    main()
