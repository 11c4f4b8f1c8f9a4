"""
span_probe.py — can the default tiny LLM learn localization's last step as text: from a listing of a clip's beats
and their times to anyECG's span? An analysis behind docs/RESULTS.md (issue 29), not part of the library.

The default run's model says that a PVC is there and not where (many answers `Duration: 0.0s-1.6s`), and time marks
written into the ECG blocks did not help (RESULTS, "Time marks in the ECG blocks"). This probe isolates the step
after the beats are found: the generator's 10 s localization clips (synthetic/tasks.py, the dataset's mix of beat
types and asked beats) as text, the question, then 'Beats: N 0.4s, N 1.2s, V 2.0s, ... Answer: Duration: 1.2s-2.9s'
(the clip's beats in order, one decimal; the span by anyECG's rule, data.localization_answer, which also uses the
beats just outside the clip, so the listing's first and last beats end at the clip's edges), laid out as a chat,
the loss on every token, packed as skills_probe.py packs. Every --eval_every steps the model writes the answer after
the given listing on held-out clips (greedy), scored by IoU as eval.py scores localization, and by exact match.

  python -m docs.analysis.span_probe --clips 20000 --steps 2000 --eval_every 250 [--worked]
"""

import argparse
import time

import numpy as np
import torch

from chat import ANSWER, FORMATS
from docs.analysis.skills_probe import (packed_stream, stream_summary, text_chat, text_optimizer, text_tokenizer,
                                        texts_seen, train_step, training_args)
from eval import localization_iou
from synthetic.generator import make_patient
from synthetic.skills import answer_prompt
from synthetic.tasks import CHECKED, clip_chance, location_clip


def clip_beats(truth, start, end):
    """The clip's beats as (seconds from its start, symbol), in order."""
    return [((x - start) / truth.fs, s) for x, s in zip(truth.beat_samples, truth.beat_symbols) if start <= x < end]


def beat_listing(beats):
    """'Beats: N 0.4s, V 1.2s, ...'"""
    return "Beats: " + ", ".join(f"{s} {t:.1f}s" for t, s in beats) + "."


def span_check(beats, length, symbol):
    """The worked step (--worked): each asked beat with the beats before and after it, the clip's edges where it has
    none: 'Check: V 2.0s from 1.2s to 2.9s; V 5.1s from 4.4s to 5.9s.' or 'Check: no V.'"""
    times = [t for t, _ in beats]
    spans = [f"{symbol} {t:.1f}s from {times[k - 1] if k else 0.0:.1f}s to "
             f"{times[k + 1] if k + 1 < len(times) else length:.1f}s" for k, (t, s) in enumerate(beats) if s == symbol]
    return f"{CHECKED} " + ("; ".join(spans) if spans else f"no {symbol}") + "."


def span_texts(n, seed, worked=False):
    """n clip texts {"question", "answer" (listing, then the span), "final"} drawn as the dataset draws its clips:
    mostly from people with ectopic beats, some from blocks and beat-free records."""
    rows, i = [], 0
    while len(rows) < n:
        rng = np.random.default_rng([9, seed, i])
        i += 1
        p = make_patient(rng, pid=f"span{i}")
        if rng.random() >= clip_chance(p):
            continue
        specs = {}
        row = location_clip(specs, "clip", p, 10.0, rng, "location")
        truth = specs["clip"].generate()[1]
        beats = clip_beats(truth, row["ecg_start"], row["ecg_end"])
        listing = beat_listing(beats)
        if worked:
            listing += " " + span_check(beats, (row["ecg_end"] - row["ecg_start"]) / truth.fs, row["abnormal_type"])
        rows.append({"question": row["question"], "answer": f"{listing} {ANSWER} {row['answer']}",
                     "final": row["answer"], "symbol": row["abnormal_type"]})
    return rows


@torch.no_grad()
def span_scores(chat, rows, budget):
    """(mean IoU, share exact, mean IoU of the clips that have the asked beat): the model writes the answer after
    the given listing."""
    chat.eval()
    prompts = [answer_prompt(chat, r) for r in rows]   # up to the worked step, which is the model's to write
    written = []
    for k in range(0, len(prompts), 32):
        written += chat.generate(prompts[k:k + 32], [[] for _ in prompts[k:k + 32]], max_new_tokens=budget)
    chat.train()
    answers = [chat.tokenizer.decode(w).split(ANSWER)[-1].strip() for w in written]
    ious = [localization_iou(a, r["final"]) for r, a in zip(rows, answers)]
    found = [x for x, r in zip(ious, rows) if r["final"].startswith("Duration")]
    exact = [a == r["final"] for r, a in zip(rows, answers)]
    return float(np.mean(ious)), float(np.mean(exact)), float(np.mean(found))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=20000, help="training clips (texts)")
    ap.add_argument("--held", type=int, default=200, help="held-out clips scored")
    ap.add_argument("--vocab", type=int, default=400, help="tokenizer size")
    ap.add_argument("--worked", action="store_true", help="each asked beat and its neighbours written before the "
                                                          "answer (span_check); the model writes it when scored")
    training_args(ap)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.time()
    rows, held = span_texts(args.clips, 0, args.worked), span_texts(args.held, 1, args.worked)
    print("a training text:", rows[0]["question"], "|", rows[0]["answer"])
    print(f"{len(rows)} training texts in {time.time() - t0:.0f} s; asked beat present in "
          f"{np.mean([r['final'].startswith('Duration') for r in rows]):.2f}")
    tok = text_tokenizer(rows, args.vocab)
    stream = packed_stream(rows, tok, FORMATS["nanoecg"], np.random.default_rng(args.seed), args.seq * args.whole)
    print(stream_summary(stream, len(rows), args))
    chat = text_chat(tok, 192, 4)
    opt = text_optimizer(chat.llm, args.lr)
    rng, t0 = np.random.default_rng(args.seed + 1), time.time()
    for step in range(1, args.steps + 1):
        loss = train_step(chat.llm, opt, stream, rng, step, args)
        if step % args.eval_every == 0 or step == args.steps:
            iou, exact, found = span_scores(chat, held, 256 if args.worked else 48)   # a block's check: every beat
            print(f"step {step:5d}  loss {loss.item():.3f}  texts seen "
                  f"{texts_seen(step, args, stream, len(rows)):7.0f}  {time.time() - t0:5.0f} s  "
                  f"IoU {iou:.3f}  exact {exact:.2f}  IoU where the beat is {found:.3f}", flush=True)


if __name__ == "__main__":
    main()
