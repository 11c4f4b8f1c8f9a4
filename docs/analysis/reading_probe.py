"""
reading_probe.py — is reading each ECG of a multi-ECG prompt a matter of practice? An analysis behind docs/RESULTS.md
(issue 29, "Each ECG of a multi-ECG prompt is read worse than alone"), not part of the library.

A trained model writes each ECG's reading worse when the ECG is one of several in the prompt than when it is read
alone (rule_on_readings.py). Here the model goes on training on the training rows of several ECGs only (ECG-QA
comparisons and multi-ECG questions; stage 3's loss, on the answers; the encoder frozen, the projector and the LLM
trained, AdamW at a constant --lr), and every --every steps its readings of the test rows of several ECGs are scored
by the ECG's place (rule_on_readings.reading_by_place), beside the answers' accuracy. Step 0 is the model as it is.

  python -m docs.analysis.reading_probe runs/hrcheck/model --steps 600 --every 200   # ~15 min on one thread
"""
import argparse
import time

import numpy as np
import torch

from chat import ECGChat, turns_of
from config import Config
from docs.analysis.rule_on_readings import reading_by_place
from eval import evaluate, rows_per_task
from synthetic.tasks import build_synthetic_dataset
from train import collate


def several(rows):
    """The ECG-QA and multi-ECG rows of several ECGs (per-ECG reports too: their answer is the readings)."""
    return [r for r in rows if r["task"] in ("ecgqa", "multi") and len(r["ecg_path"]) > 1]


def scores(model, rows, ds):
    """-> ({place: (statement F1, heart-rate MAE)}, {task: accuracy}) of the model's answers to `rows`."""
    _, preds = evaluate(model, rows, ds.inputs, 16, 256, progress=False)
    places = reading_by_place(preds)
    right = {t: float(np.mean([float(p["score"]) for p in preds if p["task"] == t])) for t in ("ecgqa", "multi")}
    return {k: (round(f1, 3), round(mae, 1)) for k, (f1, mae, _) in places.items()}, \
        {t: round(v, 3) for t, v in right.items()}


def batch_of(model, rows, ds, rng, size):
    examples = []
    for i in rng.choice(len(rows), size):
        inputs = ds.inputs(rows[i])
        ids, labels = model.prompt(turns_of(rows[i]), inputs)
        examples.append({"input_ids": ids, "labels": labels, "inputs": inputs})
    return collate(examples, model.tokenizer.pad_id)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a checkpoint folder train.py wrote (out_dir/model)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train_patients", type=int, default=1000, help="as the default run's (its seed too)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = ECGChat.load(args.model)
    model.cache_encoder_tokens(20000)   # the encoder stays frozen
    cfg = Config()
    train_ds = build_synthetic_dataset(args.train_patients, seed=cfg.seed, split="train")
    test_ds = build_synthetic_dataset(cfg.test_patients, split="test")
    train = several(train_ds.rows)
    test = [r for r in several(rows_per_task(test_ds.rows, cfg.test_rows, cfg.test_rows_per_type)) if r.get("reading")]
    print(f"{len(train)} training rows of several ECGs; {len(test)} test rows", flush=True)
    print("step 0", *scores(model, test, test_ds), flush=True)
    model.set_trainable(encoder=False, projector=True, llm=True, lora=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rng, t0 = np.random.default_rng(0), time.time()
    for step in range(1, args.steps + 1):
        model.train()
        b = batch_of(model, train, train_ds, rng, args.batch)
        _, loss = model(b["input_ids"], b["inputs"], labels=b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f} s", *scores(model, test, test_ds),
                  flush=True)


if __name__ == "__main__":
    main()
