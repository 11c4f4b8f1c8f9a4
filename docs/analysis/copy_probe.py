"""
copy_probe.py — does the default tiny LLM learn to repeat its own measurement line in its reasoning, as text? An
analysis behind docs/RESULTS.md (issue 29), not part of the library.

A grounded answer (synthetic/tasks.py's `grounded_answer`, GEM's form) states the measurements, then reasons from them:
'Measurements: Heart rate: 72 bpm, PR: 164 ms, QRS: 98 ms, QT/QTc: 380/402 ms. Reasoning: ... QRS 98 ms is narrow.
QTc 402 ms is normal. Diagnosis: ...'. The trained default model repeats its own figures in only a quarter of
cases (docs/analysis/mitdb_numbers.py). Here the LLM of the default run learns grounded answers alone, as text, from
the generator's truth (the question, then the answer; the loss on every token; texts packed end to end, as
skills_probe.py trains). Every --eval_every steps, held-out answers are given up to and including "Reasoning:" and
the model writes the rest (greedy): the share of the figures its reasoning repeats that equal the measurement line's,
and the share of answers in which every one does.

    python -m docs.analysis.copy_probe --steps 600 --eval_every 100     # a few CPU minutes
    python -m docs.analysis.copy_probe --steps 600 --eval_every 100 --quote   # 'QRS: 98 ms is narrow'
    python -m docs.analysis.copy_probe --steps 2000 --skills 1000   # the skill texts too: does copying come sooner?
    python -m docs.analysis.copy_probe --steps 1200 --then single-verify   # then membership: sooner after copying?
    python -m docs.analysis.copy_probe --steps 0 --then single-verify      # (the same family from scratch)
    python -m docs.analysis.copy_probe --steps 600 --no_figures --then single-verify   # (text with nothing to copy)
"""
import argparse
import re
import time

import numpy as np
import torch

from chat import FORMATS
from docs.analysis.mitdb_numbers import consistency
from docs.analysis.skills_probe import (packed_stream, stream_summary, text_chat, text_optimizer, text_tokenizer,
                                        texts_seen, train_step, training_args)
from synthetic.generator import make_patient, synth_ecg
from synthetic.skills import SKILL_VAL_PATIENTS, skill_accuracy, skill_rows
from synthetic.tasks import GROUNDED_QUESTIONS, LEAD_SETS, grounded_answer

REASONING = "Reasoning:"


def grounded_texts(n, seed, quote=""):
    """n grounded rows from n simulated people, each in a lead set drawn as the dataset draws them. quote: the
    reasoning writes each figure as the measurement line does ("colon": "QRS: 98 ms is narrow", not "QRS 98 ms ..."),
    or without its figure ("none": "QRS is narrow", nothing to copy)."""
    rng, rows = np.random.default_rng(seed), []
    for _ in range(n):
        leads = list(LEAD_SETS[rng.choice(len(LEAD_SETS), p=[s for _, s in LEAD_SETS])][0])
        truth = synth_ecg(make_patient(rng), 10.0, 100.0, leads, noise=0, seed=int(rng.integers(2**31)))[1]
        answer = grounded_answer(truth)
        head, sep, reasoning = answer.partition(REASONING)
        if quote == "colon":
            answer = head + sep + re.sub(r"\b(PR|QRS|QTc|Axis) (-?\d+)", r"\1: \2", reasoning)
        elif quote == "none":   # a control: the same text with nothing to copy
            answer = head + sep + re.sub(r"\b(PR|QRS|QTc|Axis) -?\d+(?: ms|°)", r"\1", reasoning)
        rows.append({"question": str(rng.choice(GROUNDED_QUESTIONS)), "answer": answer})
    return rows


@torch.no_grad()
def copy_score(chat, rows, show=0):
    """Each held-out answer given up to "Reasoning:", the rest written greedily -> (share of repeated figures equal
    to the measurement line's, share of answers with every repeated figure equal). show: print that many answers."""
    chat.llm.eval()
    given = [r["answer"][:r["answer"].index(REASONING) + len(REASONING)] for r in rows]
    prompts = [chat.prompt([("user", r["question"])], [], add_generation_prompt=True)[0] +
               chat.tokenizer.encode(g, special=False) for r, g in zip(rows, given)]
    out = []
    for i in range(0, len(prompts), 32):
        out += chat.generate(prompts[i:i + 32], [[]] * len(prompts[i:i + 32]), max_new_tokens=120)
    answers = [g + " " + chat.tokenizer.decode(o) for g, o in zip(given, out)]
    for a in answers[:show]:
        print("   ", a)
    counts = np.array([consistency(a) for a in answers])
    chat.llm.train()
    return counts[:, 1].sum() / max(1, counts[:, 0].sum()), float(np.mean(counts[:, 0] == counts[:, 1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=3000, help="training texts, one per simulated person")
    ap.add_argument("--held", type=int, default=200, help="held-out texts scored")
    training_args(ap)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000, help="the default run's tokenizer size")
    ap.add_argument("--skills", type=int, default=0, help="also the skill texts of this many people (8 each)")
    ap.add_argument("--no_figures", action="store_true", help="a control: the reasoning without its figures")
    ap.add_argument("--then", default="", help="then train this skill family alone (e.g. single-verify)")
    ap.add_argument("--then_steps", type=int, default=400)
    ap.add_argument("--show", type=int, default=3, help="held-out answers printed at the end")
    ap.add_argument("--quote", action="store_true", help="the reasoning writes each figure as the measurement line "
                                                         "does ('QRS: 98 ms is narrow')")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.time()
    quote = "colon" if args.quote else "none" if args.no_figures else ""
    rows, held = grounded_texts(args.patients, 0, quote), grounded_texts(args.held, 1, quote)
    print(f"{len(rows)} training texts in {time.time() - t0:.0f} s; one: {rows[0]['answer']}")
    n_grounded = len(rows)
    if args.skills:   # other steps that look back (membership, set comparison...): do they bring copying sooner?
        rows += skill_rows(args.skills, seed=0)
        print(f"+ {len(rows) - n_grounded} skill texts (synthetic/skills.py) from {args.skills} people")
    then = None
    if args.then:   # the family's texts, as skills_probe.py --form written makes them
        then = [[r for r in skill_rows(n, seed=seed, questions=q) if r["family"] == args.then]
                for n, seed, q in [(2000, 0, 64), (SKILL_VAL_PATIENTS, 1, 8)]]
        print(f"then: {len(then[0])} {args.then} texts, {len(then[1])} held out")
    texts = rows + (then[0] if then else [])   # one tokenizer for both phases, with or without the first
    tok = text_tokenizer(texts, args.vocab)
    stream = packed_stream(rows, tok, FORMATS["nanoecg"], np.random.default_rng(args.seed), args.seq * args.whole)
    print(stream_summary(stream, len(rows), args))
    chat = text_chat(tok, args.dim, args.layers)
    opt = text_optimizer(chat.llm, args.lr)
    rng, t0 = np.random.default_rng(args.seed + 1), time.time()
    for step in range(1, args.steps + 1):
        loss = train_step(chat.llm, opt, stream, rng, step, args)
        if step % args.eval_every == 0 or step == args.steps:
            figures, answers = copy_score(chat, held, args.show if step == args.steps else 0)
            seen = texts_seen(step, args, stream, len(rows))
            print(f"step {step:5d}  loss {loss.item():.3f}  texts seen {seen:7.0f} (grounded "
                  f"{seen * n_grounded / len(rows):6.0f})  {time.time() - t0:5.0f} s  "
                  f"figures repeated right {figures:.2f}  answers all right {answers:.2f}", flush=True)
    if args.then:
        then_family(chat, then, args)


def then_family(chat, then, args):
    """Go on with one skill family alone (a fresh optimizer and schedule of --then_steps), scored on held-out people
    as skills_probe.py scores it: does a model that copies learn the family sooner than one that does not?"""
    rows, held = then
    stream = packed_stream(rows, chat.tokenizer, FORMATS["nanoecg"], np.random.default_rng(args.seed),
                           args.seq * args.whole)
    opt = text_optimizer(chat.llm, args.lr)
    sched = argparse.Namespace(**{**vars(args), "steps": args.then_steps})
    rng, t0 = np.random.default_rng(args.seed + 2), time.time()
    for step in range(1, args.then_steps + 1):
        loss = train_step(chat.llm, opt, stream, rng, step, sched)
        if step % 100 == 0 or step == args.then_steps:
            acc = skill_accuracy(chat, held, per_family=args.held)
            print(f"then {args.then} step {step:4d}  loss {loss.item():.3f}  {time.time() - t0:5.0f} s  "
                  + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)


if __name__ == "__main__":
    main()
