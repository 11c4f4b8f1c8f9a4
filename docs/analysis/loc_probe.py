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
"""

import argparse
import time
from collections import defaultdict

import numpy as np
import torch

from config import Config
from eval import evaluate, rows_per_task
from images.chat import load_chat
from synthetic.tasks import build_synthetic_dataset
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


def scored(model, rows, inputs_of):
    """{"all", "present", "V+", "A+", "absent"}: mean IoU of the model's answers on rows."""
    _, preds = evaluate(model, rows, inputs_of, batch_size=16, max_new_tokens=32, progress=False)
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
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = load_chat(args.model)
    model.set_trainable(encoder=False, projector=True, llm=True, lora=False)
    model.cache_encoder_tokens(200000)
    test, test_ds = test_rows()
    n_rows = args.pool or args.steps * args.batch
    ds = location_rows(n_rows, seed=args.seed)
    split = Split(ds.rows, ds.inputs)
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
            s = scored(model, test, test_ds.inputs)
            print(f"step {step} ({step * args.batch} clips seen, {time.time() - t0:.0f} s) loss {loss.item():.3f} "
                  + "  ".join(f"{k} {v:.3f} (n={n})" for k, (v, n) in sorted(s.items())), flush=True)


if __name__ == "__main__":
    main()
