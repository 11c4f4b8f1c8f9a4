"""
pack_cost.py — what stage 0's packing costs a step. An analysis behind docs/RESULTS.md, not part of the library.

Stage 0 draws 64 short texts a step and packs them into rows. Two packings of the same drawn texts, side by side:
end to end in the drawn order into rows of 512 (train.pack before `--text_row_len`), and train.pack's best fit,
longest text first, into rows of --text_row_len. For each: rows a step, the share of computed positions that are real
tokens, and the time of the default LLM's training step (forward, backward, AdamW) on those batches, the two timed in
turns on the same batches so a noisy machine slows both alike.

  python -m docs.analysis.pack_cost            # about a minute on 2 cores: the default run's data and shapes
  python -m docs.analysis.pack_cost --steps 40 --text_row_len 384
"""
import argparse
import time

import numpy as np
import torch

import train
from config import parse_config


def in_drawn_order(examples, length):
    """The packing before: each text appended to the last row while it fits, else a new row."""
    rows = []
    for e in examples:
        if rows and len(rows[-1]["input_ids"]) + len(e["input_ids"]) <= length:
            rows[-1]["input_ids"] += e["input_ids"]
            rows[-1]["labels"] += e["labels"]
        else:
            rows.append({"input_ids": list(e["input_ids"]), "labels": list(e["labels"]), "inputs": []})
    return rows


def drawn_texts(cfg, split, probs, model, step):
    """The texts get_batch draws for stage 0's step `step` (the same rng)."""
    rng = np.random.default_rng([cfg.seed, 0, step, 0])
    drawn = [train.example(split, int(i), model, True) for i in rng.choice(len(split.rows), cfg.text_batch, p=probs)]
    return [e for e in drawn if e is not None]


def step_seconds(model, opt, batch):
    t = time.perf_counter()
    loss = model(batch["input_ids"], batch["inputs"], labels=batch["labels"])[1]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24, help="stage-0 steps sampled (spread over its 1,150)")
    ap.add_argument("--text_row_len", type=int, default=256, help="the new packing's row length")
    args = ap.parse_args(argv)
    cfg = parse_config(argv=["--out_dir", "/tmp/pack_cost", "--overwrite"])
    data = train.load_data(cfg, lambda record: None)
    model = train.build_model(cfg, train.build_tokenizer(cfg, data, 0), torch.device("cpu"), torch.float32)
    opt = torch.optim.AdamW(model.llm.parameters(), lr=1e-4)
    stage = train.curriculum(cfg)[0]
    split, probs, pad = data["train"], data["train"].weights(stage.tasks), model.tokenizer.pad_id
    packings = {"in drawn order, rows of 512": lambda ex: in_drawn_order(ex, 512),
                f"best fit, rows of {args.text_row_len}": lambda ex: train.pack(ex, args.text_row_len)}
    stats = {name: {"rows": [], "fill": [], "seconds": []} for name in packings}
    for step in np.linspace(0, cfg.stage0_steps - 1, args.steps).astype(int):
        texts = drawn_texts(cfg, split, probs, model, int(step))
        for name, pack in packings.items():
            batch = train.collate(pack(texts), pad)
            stats[name]["rows"].append(len(batch["input_ids"]))
            stats[name]["fill"].append(float((batch["input_ids"] != pad).float().mean()))
            stats[name]["seconds"].append(step_seconds(model, opt, batch))
    print(f"stage 0, {args.steps} steps of {cfg.text_batch} texts, {torch.get_num_threads()} threads")
    for name, s in stats.items():   # the first step of each is a warm-up: not timed
        print(f"{name:28s} rows {np.mean(s['rows']):5.1f}  real tokens {np.mean(s['fill']):.0%} of positions  "
              f"step {np.median(s['seconds'][1:]):.3f} s (median)")


if __name__ == "__main__":
    main()
