"""
mitdb_numbers.py — the step from what the encoder sees to a number, on real records (issue 29). An analysis behind
docs/RESULTS.md, not part of the library.

Ten 10 s windows spread through MIT-BIH record 100 (one every 180 s from 0 s), each asked "Give a grounded
interpretation of this ECG." (greedy). Per window: the heart rate from the record's beat annotations, the rate the
answer's measurement line states, the rate the encoder's own QRS detector gives (ecg_encoder.beat_times: what the
encoder is handed as rhythm features), and whether the answer's reasoning repeats its measurement line's figures
(PR, QRS, QTc, axis) or writes new ones. Then the whole 38.4 s PTB record s0010_re asked for a report in each of
the task's phrasings: is the answer a whole report ("Report: " and a list of known statements)? With --samples N,
the README's generate command (the PAC at 876-886 s) is sampled N times as generate.py samples (seeds 0..N-1; the
README's own is seed 0), and its question answered greedily, as eval.py answers: how many samples, and does the
greedy answer, name a span overlapping the reference 6.1-7.7 s. The same consistency is counted on the grounded
answers of the synthetic test split (out/test_predictions.jsonl) when that file is given.

    python -m docs.analysis.mitdb_numbers --ckpt out/model [--root ../shared/data/physionet] \
        [--predictions out/test_predictions.jsonl] [--samples 60]
"""
import argparse
import json
import re

import numpy as np
import torch
import wfdb

from data import STATEMENTS, load_ecg, parse_localization, prepare_ecg
from ecg_encoder import beat_times
from images.chat import load_chat
from synthetic.tasks import REPORT_QUESTIONS

WINDOWS = [180 * k for k in range(10)]   # seconds: 0, 180, ..., 1620 of the 30-minute record
GROUNDED = "Give a grounded interpretation of this ECG."
PAC_QUESTION = "Locate the Atrial premature beat on this ECG."
# a figure in the measurement line, and the same figure where the reasoning repeats it
# (the reasoning may write the figure with a colon, as copy_probe.py --quote does)
MEASURED = {"pr": r"PR: (\d+) ms", "qrs": r"QRS: (\d+) ms", "qtc": r"QT/QTc: \d+/(\d+) ms", "axis": r"Axis: (-?\d+)°"}
REPEATED = {"pr": r"PR:? (\d+) ms", "qrs": r"QRS:? (\d+) ms", "qtc": r"QTc:? (\d+) ms", "axis": r"Axis:? (-?\d+)°"}


def annotated_rate(record, start_s, seconds=10.0):
    """Beats per minute over a window, from the annotated beats in it (first to last)."""
    ann = wfdb.rdann(record, "atr")
    fs = wfdb.rdheader(record).fs
    beats = np.array([s for s, sym in zip(ann.sample, ann.symbol) if sym in "NLRBAaJSVrFejnE/fQ?"]) / fs
    t = beats[(beats >= start_s) & (beats < start_s + seconds)]
    return 60 * (len(t) - 1) / (t[-1] - t[0])


def detector_rate(ecg):
    """Beats per minute from the encoder's QRS detector on the prepared window."""
    t = beat_times(torch.as_tensor(ecg.signal), ecg.fs).numpy() / ecg.fs
    return 60 * (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else float("nan")


def stated_rate(answer):
    m = re.search(r"Heart rate: (\d+) bpm", answer)
    return float(m.group(1)) if m else float("nan")


def consistency(answer):
    """(figures the reasoning repeats, of them those equal to the measurement line's) in one grounded answer."""
    measured = {k: m.group(1) for k, p in MEASURED.items() if (m := re.search(p, answer))}
    reasoning = answer.split("Reasoning:", 1)[1] if "Reasoning:" in answer else ""
    repeated = [(k, v) for k, p in REPEATED.items() for v in re.findall(p, reasoning)]
    return len(repeated), sum(measured.get(k) == v for k, v in repeated)


def is_whole_report(answer):
    """'Report: A, B, C' with every item one of the statements the generator writes."""
    items = answer.removeprefix("Report: ").rstrip(".").split(", ")
    return answer.startswith("Report: ") and all(i in STATEMENTS for i in items)


def ask(model, question, ecg, max_new_tokens=256):
    ids = model.prompt([("user", question)], [ecg], add_generation_prompt=True)[0]
    return model.tokenizer.decode(model.generate([ids], [[ecg]], max_new_tokens=max_new_tokens)[0])


def overlaps_pac(answer):
    """Does a localization answer name a span overlapping the reference PAC span 6.1-7.7 s?"""
    return any(a < 7.7 and b > 6.1 for a, b in parse_localization(answer) or [])


def pac_samples(model, record, n):
    """The README's generate command (MIT-BIH 100, 876-886 s, T 0.6, top-p 0.9) with seeds 0..n-1 (the README's is
    seed 0), and its question answered greedily: the answers that name a span overlapping the reference 6.1-7.7 s."""
    ecg = prepare_ecg(load_ecg(record, start=876 * 360, end=886 * 360), 100, name="100 876-886 s")
    ids = model.prompt([("user", PAC_QUESTION)], [ecg], add_generation_prompt=True)[0]
    answers = [model.tokenizer.decode(model.generate([ids], [[ecg]], max_new_tokens=64, temperature=0.6, top_p=0.9,
                                                     generator=torch.Generator().manual_seed(s))[0])
               for s in range(n)]
    greedy = model.tokenizer.decode(model.generate([ids], [[ecg]], max_new_tokens=64)[0])   # as eval.py answers
    hits = [overlaps_pac(x) for x in answers]
    print(f"\nthe README's PAC command, {n} samples: a span overlapping 6.1-7.7 s in {sum(hits)}; seed 0 (the "
          f"README's) answers {answers[0]!r}; greedy: {greedy!r} ({'' if overlaps_pac(greedy) else 'not '}overlapping)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/model")
    p.add_argument("--root", default="../shared/data/physionet")
    p.add_argument("--predictions", help="test_predictions.jsonl of the same run: consistency on synthetic answers")
    p.add_argument("--samples", type=int, default=0, help="sample the README's PAC command this many times")
    args = p.parse_args(argv)
    model = load_chat(args.ckpt).eval()
    record = f"{args.root}/100"
    print("| window | annotated bpm | stated bpm | detector bpm | reasoning figures equal / repeated |")
    print("|---|---|---|---|---|")
    errors, det_errors, same, total = [], [], 0, 0
    with torch.no_grad():
        for start in WINDOWS:
            raw = load_ecg(record, start=start * 360, end=(start + 10) * 360)
            ecg = prepare_ecg(raw, 100, name=f"100 {start}-{start + 10} s")
            answer, true = ask(model, GROUNDED, ecg), annotated_rate(record, start)
            stated, detected = stated_rate(answer), detector_rate(ecg)
            n, ok = consistency(answer)
            errors.append(abs(stated - true))
            det_errors.append(abs(detected - true))
            same, total = same + ok, total + n
            print(f"| {start}-{start + 10} s | {true:.1f} | {stated:.0f} | {detected:.1f} | {ok} / {n} |")
        print(f"\nheart-rate MAE: the answers {np.nanmean(errors):.1f} bpm, the encoder's detector "
              f"{np.nanmean(det_errors):.1f} bpm; reasoning figures equal to the measurement line: {same} of {total}")
        ptb = prepare_ecg(load_ecg(f"{args.root}/s0010_re"), 100, name="s0010_re")
        reports = [ask(model, q, ptb, max_new_tokens=64) for q in REPORT_QUESTIONS]
        whole = [is_whole_report(r) for r in reports]
        print(f"\nPTB s0010_re ({ptb.signal.shape[1] / 100:.1f} s): whole reports {sum(whole)} of {len(reports)}")
        for q, r in zip(REPORT_QUESTIONS, reports):
            print(f"  {q!r}: {r!r}")
        if args.samples:
            pac_samples(model, record, args.samples)
    if args.predictions:
        rows = [json.loads(line) for line in open(args.predictions)]
        grounded = [r for r in rows if r.get("task") == "grounded"]
        counts = np.array([consistency(r["prediction"]) for r in grounded])
        whole = sum(a == b for a, b in counts)
        print(f"\nsynthetic test, {len(grounded)} grounded answers: reasoning figures equal to the measurement line "
              f"{counts[:, 1].sum()} of {counts[:, 0].sum()}; answers with every repeated figure equal: {whole}")


if __name__ == "__main__":
    main()
