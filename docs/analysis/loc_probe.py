"""
loc_probe.py — is localization short of rows, or of something rows cannot give? An analysis behind docs/RESULTS.md
(issue 29), not part of the library.

A trained run's model answers "where are the PVCs?" with a span unrelated to them (IoU 0.04-0.18 on the test clips
that have the asked beat, against 0.5-1.0 for everything else). The run trains on ~1,100 distinct 10 s localization
clips, each seen several times. This probe takes a saved model (encoder frozen, as in the run's stages) and trains it
on localization rows alone, the ECG stages' way (projector and LLM, batch 16, lr 1e-3, the loss on the answer), from
either a pool of --pool distinct clips drawn again and again (the run's situation) or a new clip every time (--pool 0),
and every --eval_every steps scores the run's own 150 test clips (eval.py's rows and IoU), split by whether the clip
has the asked beat. If fresh clips lift the PVC rows where repeated ones do not, the run needs more distinct clips;
if neither does, the step from the ECG tokens to a time is what is missing.

  python -m docs.analysis.loc_probe runs/x/model --pool 1100 --steps 800 --eval_every 200
  python -m docs.analysis.loc_probe runs/x/model --pool 0 --steps 800 --eval_every 200
  python -m docs.analysis.loc_probe runs/x/model --pool 1100 --oracle 5   # each token told its beats' kinds
  python -m docs.analysis.loc_probe runs/x/model --pool 1100 --oracle 5 --second_digits --save answers.jsonl

--oracle S: which of the two steps fails, finding the asked beat's token or writing the span from it? Each ECG token
gets S added to one of its first five channels per kind of beat whose R peak falls in it (any, A, V, L, R: the
warm-up's beat targets, from the generator's truth), before the projector; a token then says its beats' kinds
plainly. If the PVC rows rise to the others' level, the encoder's beat classes are what localization lacks; if not,
the LLM's step from a marked token to its time is. --second_digits adds, after the projector, the LLM's own
embedding of the digit each token's whole second ends in.
"""

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from chat import ecg_key
from config import Config
from eval import evaluate, rows_per_task
from images.chat import load_chat
from synthetic.tasks import build_synthetic_dataset
from synthetic.warmup import token_beats
from train import Split, collate, example, make_optimizer


def location_rows(n_rows, seed):
    """n_rows 10 s localization rows (and the dataset that renders their records) from new simulated people."""
    n_patients = int(n_rows * 1.2) + 50   # about one clip a person
    ds = build_synthetic_dataset(n_patients, seed=seed, split="train", tasks={"location"}, worked=True)
    ds.rows = ds.rows[:n_rows]
    if len(ds.rows) < n_rows:
        raise ValueError(f"{len(ds.rows)} rows from {n_patients} people, {n_rows} asked")
    return ds


def test_rows():
    """The 150 test localization rows the run scores (train.finish's rows_per_task of the test split)."""
    cfg = Config()
    ds = build_synthetic_dataset(cfg.test_patients, split="test", worked=True)
    chosen = rows_per_task(ds.rows, cfg.test_rows, cfg.test_rows_per_type)
    return [r for r in chosen if r["task"] == "location"], ds


def beat_marks(model, datasets_rows):
    """{ecg_key: (n_tokens, 5)} the warm-up's beat targets of each row's clip, for every (dataset, rows) given."""
    marks = {}
    for ds, rows in datasets_rows:
        for row in rows:
            ecg, truth = ds.inputs(row)[0], ds.specs[row["ecg_path"][0]].truth()
            marks[ecg_key(ecg)] = token_beats(truth, model.encoder.num_tokens(ecg.signal.shape[1]),
                                              1 / model.encoder.cfg.tokens_per_second, row["ecg_start"], row["ecg_end"])
    return marks


def mark_tokens(model, marks, strength):
    """model's frozen encoder tokens, each told its beats' kinds: strength added to its first five channels."""
    plain = model.cached_tokens

    def marked(ecg):
        tokens = plain(ecg)
        return torch.cat([tokens[:, :5] + strength * marks[ecg_key(ecg)].to(tokens), tokens[:, 5:]], 1)
    model.cached_tokens = marked


def add_second_digits(model):
    """Each projected ECG token gets the LLM's own embedding of the digit its whole second ends in ('2' on the tokens
    of 2.0-2.9 s and 12.0-12.9 s), so writing a time could be a copy from the beat's token."""
    encode, tok = model.encode_ecgs, model.tokenizer
    digit_ids = torch.tensor([tok.encode(str(d))[-1] for d in range(10)])
    token_s = 1 / model.encoder.cfg.tokens_per_second

    def with_digits(ecgs):                                 # [(n_tokens_i, C_llm)]
        out = []
        for x in encode(ecgs):
            seconds = (torch.arange(len(x)) * token_s).long() % 10
            out.append(x + model.llm.embed_tokens(digit_ids[seconds].to(x.device)))
        return out
    model.encode_ecgs = with_digits


def scored(model, rows, inputs_of, save=""):
    """{"all", "present", "V+", "A+", "absent"}: mean IoU of the model's answers on rows (save: their JSONL too)."""
    _, preds = evaluate(model, rows, inputs_of, batch_size=16, max_new_tokens=32, progress=False)
    if save:
        Path(save).write_text("".join(json.dumps(p) + "\n" for p in preds))
    by = defaultdict(list)
    for p in preds:
        present = p["answer"].startswith("Duration")
        by["all"].append(p["score"])
        by["present" if present else "absent"].append(p["score"])
        if present and p["abnormal_type"] in "AV":
            by[p["abnormal_type"] + "+"].append(p["score"])
    return {k: (float(np.mean(v)), len(v)) for k, v in by.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--pool", type=int, default=1100, help="distinct clips drawn again and again (0: a new one each)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--eval_every", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--save", default="", help="the last scoring's answers, as JSONL")
    ap.add_argument("--second_digits", action="store_true", help="each token gets the LLM's embedding of its "
                                                                     "second's last digit (add_second_digits)")
    ap.add_argument("--oracle", type=float, default=0, help="add this to each token's channel of each beat kind in "
                                                            "it, from the truth (0: off)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = load_chat(args.model)
    model.set_trainable(encoder=False, projector=True, llm=True, lora=False)
    model.cache_encoder_tokens(200000)
    test, test_ds = test_rows()
    n_rows = args.pool or args.steps * args.batch
    ds = location_rows(n_rows, seed=args.seed)
    split = Split(ds.rows, ds.inputs)
    if args.second_digits:
        add_second_digits(model)
    if args.oracle:
        mark_tokens(model, beat_marks(model, [(ds, ds.rows), (test_ds, test)]), args.oracle)
    opt = make_optimizer(model, Config(), args.lr)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    print(f"pool {args.pool or 'fresh'} ({n_rows} clips): step 0 {scored(model, test, test_ds.inputs)}", flush=True)
    for step in range(1, args.steps + 1):
        model.train()
        ids = rng.choice(n_rows, args.batch) if args.pool else range((step - 1) * args.batch, step * args.batch)
        batch = collate([e for e in (example(split, int(i), model, False) for i in ids) if e], model.tokenizer.pad_id)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 50)
        _, loss = model(batch["input_ids"], batch["inputs"], labels=batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0:
            s = scored(model, test, test_ds.inputs, args.save if step == args.steps else "")
            print(f"step {step} ({step * args.batch} clips seen, {time.time() - t0:.0f} s) loss {loss.item():.3f} "
                  + "  ".join(f"{k} {v:.3f} (n={n})" for k, (v, n) in sorted(s.items())), flush=True)


if __name__ == "__main__":
    main()
