"""
synthetic/warmup.py — the encoders alone, taught the synthetic ground truth directly.

train.py runs this before the curriculum (the encoder warm-up, `warm_up`), and `python -m synthetic.warmup` runs it
on its own as a probe of how fast an encoder learns. Why it exists: through the LLM's next-token loss alone, the
encoder gets a weak and late signal (the answers are templated, so the language prior explains most tokens), and a
tiny model trained that way answers the same with the ECG as without it. With small linear heads on its tokens and
the generator's exact truth as targets, the encoder learns in minutes. The heads are thrown away afterwards; the
encoder keeps what it learned.

  on the mean of an ECG's tokens   the report statements (multi-label), HR, PR, QRS, QT
  on every ECG token               is a beat (any, A, V, L, R) annotated in its time span?
                                   (what localization needs: where each beat is)
  on the mean of an image's tokens the same statements and measurements, from the paper
                                   printout of each 12-lead record (train.py --images)

    python -m synthetic.warmup [--steps 400] [--train-patients 500] [--save enc.safetensors]
"""
import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from data import STATEMENTS
from ecg_encoder import (ECGEncoder, EncoderConfig, file_metadata, load_encoder_weights, save_encoder_weights)
from eval import bootstrap_interval
from images.paper import WIDTH_MM, render_ecg
from synthetic.tasks import build_synthetic_dataset

BEAT_CHANNELS = ("beat", "A", "V", "L", "R")  # per-token targets
TYPICAL = torch.tensor([80.0, 160.0, 100.0, 400.0])  # HR bpm, PR, QRS, QT ms: the heads predict offsets
SCALE = torch.tensor([30.0, 50.0, 50.0, 50.0])
ECTOPY_SHARE = 0.4   # of each warm-up batch: records with PACs or PVCs (ectopy_first)


@dataclass
class WarmupConfig:
    steps: int = 400
    lr: float = 1e-3
    batch_size: int = 16
    train_patients: int = 500   # synthetic patients to learn from (their 10 s records)
    test_patients: int = 200    # patients of the held-out split it is scored on (~400 ECGs: PACs are rare)
    eval_every: int = 100
    seed: int = 0
    held_out: str = "test"      # the split scored: "test" (a probe), "val" (train.py's warm-up)


class Item(NamedTuple):
    signal: torch.Tensor      # (leads, samples) at the encoder's rate, mV
    leads: list
    statements: torch.Tensor  # (S,) 0/1
    measures: torch.Tensor    # (4,) HR, PR (NaN without P waves), QRS, QT
    beats: torch.Tensor       # (tokens, 5) 0/1
    image: np.ndarray | None  # the printout (12-lead records, when images are trained)


def token_beats(truth, n_tokens, token_s, start=0, end=None):
    """The per-token beat targets of the clip [start, end) of a record (samples at truth.fs; end None: to its end)
    -> (n_tokens, 5) 0/1: does the token's span hold the R peak of a beat, of an A, V, L, R beat (BEAT_CHANNELS)?"""
    beats = torch.zeros(n_tokens, len(BEAT_CHANNELS))
    for at, sym in zip(truth.beat_samples, truth.beat_symbols):
        k = int((at - start) / truth.fs / token_s)
        if start <= at and (end is None or at < end) and k < n_tokens:
            beats[k, [0] + ([BEAT_CHANNELS.index(sym)] if sym in BEAT_CHANNELS else [])] = 1
    return beats


def make_items(split, n_patients, seed, encoder, image_encoder=None):
    """One Item per 10 s record of n_patients synthetic patients (their report rows)."""
    ds = build_synthetic_dataset(n_patients, seed=seed, split=split, tasks=["report"])
    token_s = 1 / encoder.cfg.tokens_per_second
    out = []
    for row in ds.rows:
        path = row["ecg_path"][0]
        truth, ecg = ds.specs[path].truth(), ds.inputs(row)[0]   # the record drawn once, at model rate
        y = torch.zeros(len(STATEMENTS))
        y[[STATEMENTS.index(s) for s in truth.statements]] = 1
        beats = token_beats(truth, encoder.num_tokens(ecg.signal.shape[1]), token_s)
        image = None
        if image_encoder is not None and len(truth.leads) == 12:   # the printout: from the record at its own rate
            rec, _ = ds.record(path)
            image = render_ecg(rec.signal, rec.fs, list(rec.leads), px_per_mm=image_encoder.cfg.width / WIDTH_MM)
        measures = torch.tensor([truth.hr_bpm, truth.pr_ms or float("nan"), truth.qrs_ms, truth.qt_ms])
        out.append(Item(torch.from_numpy(np.ascontiguousarray(ecg.signal, dtype=np.float32)), list(ecg.leads), y,
                        measures, beats, image))
    return out


class Heads(torch.nn.Module):
    """The linear heads the warm-up trains on the encoders' tokens, then throws away."""

    def __init__(self, encoder, image_encoder=None):
        super().__init__()
        w = encoder.lead_emb.weight
        self.pooled = torch.nn.Linear(encoder.cfg.d_model, len(STATEMENTS) + 4).to(w.device, w.dtype)
        self.beats = torch.nn.Linear(encoder.cfg.d_model, len(BEAT_CHANNELS)).to(w.device, w.dtype)
        # decide "beat of kind c" at logit > log(w_c): the loss weighs positives by w_c, which multiplies their
        # odds by w_c, so this is p > 0.5 of the unweighted problem (set by fit_encoder_to_truth)
        self.beat_threshold = torch.zeros(len(BEAT_CHANNELS))
        if image_encoder is not None:
            self.image = torch.nn.Linear(image_encoder.cfg.d_model, len(STATEMENTS) + 4).to(w.device, w.dtype)


def ecg_outputs(encoder, heads, items):
    """-> pooled-head outputs (B, S + 4), per-token beat logits [(n, 5), ...]"""
    tokens = encoder([it.signal for it in items], [it.leads for it in items])
    return (heads.pooled(torch.stack([t.mean(0) for t in tokens])).float().cpu(),
            [heads.beats(t).float().cpu() for t in tokens])


def image_outputs(image_encoder, heads, items):
    """-> pooled-head outputs (B, S + 4) from the items' paper printouts"""
    return heads.image(image_encoder([it.image for it in items]).mean(1)).float().cpu()


def pooled_loss(out, items):
    """Statement BCE + smooth-L1 on HR (/30) and on PR/QRS/QT (/50; PR skipped without P waves)."""
    y = torch.stack([it.statements for it in items])
    m = torch.stack([it.measures for it in items])
    pred = TYPICAL + SCALE * out[:, -4:]
    known = ~m[:, 1:].isnan()
    return (F.binary_cross_entropy_with_logits(out[:, :-4], y) + F.smooth_l1_loss(pred[:, 0], m[:, 0]) / 30
            + F.smooth_l1_loss(pred[:, 1:][known], m[:, 1:][known]) / 50)


def scores(out, items):
    """Statement micro F1 and HR MAE of pooled-head outputs."""
    P = out[:, :-4] > 0
    Y = torch.stack([it.statements for it in items]) > 0
    hr = TYPICAL[0] + SCALE[0] * out[:, -4]
    hr_mae = (hr - torch.stack([it.measures[0] for it in items])).abs().mean().item()
    return 2 * (P & Y).sum().item() / max(1, P.sum().item() + Y.sum().item()), hr_mae, P, Y


@torch.no_grad()
def score_heads(encoder, image_encoder, heads, test):
    """Scores on held-out items: statement micro F1, HR MAE, per-channel beat-token F1 (with a 95 % interval over
    the ECGs, and the count of each channel's positive tokens), the image head's F1 and HR MAE when there is one
    (P, Y: statement predictions)."""
    encoder.eval()
    outs = [ecg_outputs(encoder, heads, test[i:i + 64]) for i in range(0, len(test), 64)]
    f1, hr_mae, P, Y = scores(torch.cat([o[0] for o in outs]), test)
    said = [b > heads.beat_threshold for o in outs for b in o[1]]  # per ECG (tokens, 5)
    counts = torch.stack([torch.stack([(p & y).sum(0), p.sum(0), y.sum(0)])  # (ECGs, 3, 5): hits, said, true
                          for p, y in zip(said, (it.beats > 0 for it in test))]).double()
    beat_f1, beat_f1_95 = beat_f1_interval(counts)
    result = {"statement_f1": f1, "hr_mae": hr_mae, "beat_f1": beat_f1, "beat_f1_95": beat_f1_95,
              "beat_n": counts[:, 2].sum(0).long().tolist(), "P": P, "Y": Y}
    with_image = [it for it in test if it.image is not None]
    if image_encoder is not None and with_image:
        image_encoder.eval()
        out = torch.cat([image_outputs(image_encoder, heads, with_image[i:i + 32])
                         for i in range(0, len(with_image), 32)])
        result["image_statement_f1"], result["image_hr_mae"], _, _ = scores(out, with_image)
        image_encoder.train()
    encoder.train()
    return result


def beat_f1_interval(counts, draws=2000, seed=0):
    """Per-channel token F1 from per-ECG counts (ECGs, 3 = hits / said / true, channels), and its 95 % bootstrap
    interval over the ECGs drawn again with replacement (A beats are few: the interval says how few)."""
    n, _, channels = counts.shape

    def f1(sums):   # (1 + draws, 3 * channels) -> (1 + draws, channels)
        hits, said, true = sums.reshape(-1, 3, channels).transpose(1, 0, 2)
        return 2 * hits / np.maximum(said + true, 1)
    value, lo, hi = bootstrap_interval(f1, np.asarray(counts, dtype=np.float64).reshape(n, -1), draws=draws, seed=seed)
    return value.tolist(), list(zip(lo.tolist(), hi.tolist()))


def ectopy_first(items, share=ECTOPY_SHARE):
    """Sampling probabilities that give records with PACs or PVCs `share` of every batch (uniform within each
    kind). Drawn uniformly they are a few per batch, and a PAC is only modestly early: the beat heads would see
    too few to learn it."""
    columns = [BEAT_CHANNELS.index("A"), BEAT_CHANNELS.index("V")]
    ectopic = np.array([bool(it.beats[:, columns].any()) for it in items])
    if ectopic.all() or not ectopic.any():
        return np.full(len(items), 1 / len(items))
    return np.where(ectopic, share / ectopic.sum(), (1 - share) / (~ectopic).sum())


def fit_encoder_to_truth(encoder, cfg, image_encoder=None, desc="encoder probe", report=True):
    """Train `encoder` (and `image_encoder`, if given) in place with linear heads on the synthetic ground truth;
    see the file's docstring for the targets. desc: the progress bar's name (None: no bar); report: print scores
    as it goes and a per-statement table. -> {"statement_f1", "hr_mae", "beat_f1", "beat_f1_95", "beat_n"} on
    cfg.held_out (+ "image_statement_f1", "image_hr_mae" with an image encoder)."""
    torch.manual_seed(cfg.seed)
    train = make_items("train", cfg.train_patients, cfg.seed, encoder, image_encoder)
    test = make_items(cfg.held_out, cfg.test_patients, cfg.seed, encoder, image_encoder)
    heads = Heads(encoder, image_encoder)
    params = [*encoder.parameters(), *heads.pooled.parameters(), *heads.beats.parameters()]
    if image_encoder is not None:
        params += [*image_encoder.parameters(), *heads.image.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    draw = ectopy_first(train)
    # PACs and PVCs still fill few tokens: weigh each channel's positives up to its negatives
    # (capped), or the head learns never to say "A" or "V"
    rates = torch.stack([it.beats.mean(0) for it in train])                          # (records, 5)
    positives = (torch.tensor(draw, dtype=torch.float32)[:, None] * rates).sum(0)   # as batches are drawn
    beat_weight = ((1 - positives) / positives.clamp(min=1e-3)).clamp(1, 50)
    heads.beat_threshold = beat_weight.log()
    if report:
        print(f"{desc}: {len(train)} training ECGs, {len(test)} {cfg.held_out} ECGs, "
              f"{sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M encoder parameters")
    rng, t0, r = np.random.default_rng(cfg.seed), time.time(), None
    bar = desc is not None and sys.stderr.isatty()   # a log file gets ten plain lines instead of \r frames
    for step in tqdm(range(1, cfg.steps + 1), desc=desc, leave=False, disable=not bar):
        batch = [train[i] for i in rng.choice(len(train), size=cfg.batch_size, p=draw)]
        out, beats = ecg_outputs(encoder, heads, batch)
        loss = pooled_loss(out, batch) + F.binary_cross_entropy_with_logits(
            torch.cat(beats), torch.cat([it.beats for it in batch]), pos_weight=beat_weight)
        with_image = [it for it in batch if it.image is not None]
        if image_encoder is not None and with_image:
            loss = loss + pooled_loss(image_outputs(image_encoder, heads, with_image), with_image)
        if not torch.isfinite(loss):   # stop before the update: the encoder keeps its last finite weights
            raise FloatingPointError(f"{desc or 'encoder warm-up'}: the loss is not finite at step {step} with lr "
                                     f"{cfg.lr:g}; lower it (train.py --encoder_warmup_lr, python -m synthetic.warmup "
                                     "--lr)")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if desc is not None and not bar and step % max(1, cfg.steps // 10) == 0:
            print(f"{desc}: step {step}/{cfg.steps}  loss {loss.item():.3f}  ({time.time() - t0:.0f} s)", flush=True)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            r = score_heads(encoder, image_encoder, heads, test)
            if report:
                tqdm.write(f"step {step:5d}  loss {loss.item():.3f}  {summary(r)}  ({time.time() - t0:.0f} s)")
    r = r or score_heads(encoder, image_encoder, heads, test)
    P, Y = r.pop("P"), r.pop("Y")
    if report:
        tp, fp, fn = (P & Y).sum(0), (P & ~Y).sum(0), (~P & Y).sum(0)
        for i, name in enumerate(STATEMENTS):
            print(f"  {name:<36} n={int(Y[:, i].sum()):3d}  F1 {2 * tp[i] / max(1, 2 * tp[i] + fp[i] + fn[i]):.2f}")
    return r


def summary(r):
    """One line of a score_heads() result."""
    image = f"  image: F1 {r['image_statement_f1']:.3f} HR MAE {r['image_hr_mae']:.1f}" if "image_hr_mae" in r else ""
    beats = " ".join(f"{c} {v:.2f} [{lo:.2f}, {hi:.2f}] (n={n})"
                     for c, v, (lo, hi), n in zip(BEAT_CHANNELS, r["beat_f1"], r["beat_f1_95"], r["beat_n"]))
    return f"statement micro F1 {r['statement_f1']:.3f}  HR MAE {r['hr_mae']:.1f} bpm  beat-token F1 {beats}{image}"


def warm_up(encoder, image_encoder, cfg, out_dir, log, show=True):
    """train.py's warm-up: fit_encoder_to_truth with cfg (a WarmupConfig), the result kept as
    out_dir/encoder_warmup.safetensors (and image_warmup.safetensors), which a later run with the same settings
    loads instead of training again. image_encoder: None to leave it as it is (GEM keeps a pretrained CLIP tower).
    show: this process prints and writes (train.py's rank 0; every rank trains the same copy, same seed)."""
    files = [(encoder, Path(out_dir) / "encoder_warmup.safetensors")] + (
        [(image_encoder, Path(out_dir) / "image_warmup.safetensors")] if image_encoder is not None else [])
    made_by = {"warmup": asdict(cfg), "image": image_encoder is not None,
               "encoder": json.loads(json.dumps(asdict(encoder.cfg)))}  # as the file's JSON reads back
    if all(path.exists() for _, path in files):
        problem = next(filter(None, (warmup_file_problem(path, made_by) for _, path in files)), None)
        if problem is None:
            for module, path in files:
                load_encoder_weights(module, path)
            return
        warnings.warn(f"{problem}: not reused, warming up again")
    r = fit_encoder_to_truth(encoder, cfg, image_encoder, desc="encoder warm-up" if show else None, report=False)
    log({"event": "encoder_warmup", "steps": cfg.steps, **{f"val_{k}": v for k, v in r.items()}})
    if show:
        for module, path in files:
            save_encoder_weights(module, path, module.cfg, made_by)
        print(f"encoder warm-up: {cfg.steps} steps, validation {summary(r)}")


def warmup_file_problem(path, made_by):
    """Why a warm-up file found in out_dir cannot be reused (None: it can): made by other settings, or poisoned."""
    try:
        if json.loads(file_metadata(path).get("made_by", "null")) != made_by:
            return f"{path} was made by another warm-up (its settings differ from this run's)"
        if not all(torch.isfinite(t).all() for t in load_file(str(path)).values()):
            return f"{path} holds non-finite weights (NaN/Inf)"
    except ValueError as e:
        return str(e)
    return None


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m synthetic.warmup",
                                description="The encoder alone on the synthetic ground truth: how fast it learns "
                                "statements, HR and beat positions (train.py's warm-up loop).")
    for name, default in vars(WarmupConfig()).items():
        if name != "held_out":
            p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    p.add_argument("--d-model", type=int, default=128, help="encoder width")
    p.add_argument("--layers", type=int, default=4, help="encoder depth")
    p.add_argument("--template", action=argparse.BooleanOptionalAction, default=True,
                   help="add each lead's average beat per window to its patches (ecg_encoder.beat_templates)")
    p.add_argument("--save", help="write the trained encoder (safetensors) for train.py --encoder_init")
    args = p.parse_args(argv)
    cfg = WarmupConfig(**{k: getattr(args, k) for k in vars(WarmupConfig()) if k != "held_out"})
    torch.manual_seed(cfg.seed)
    encoder = ECGEncoder(EncoderConfig(d_model=args.d_model, n_layers=args.layers, template=args.template))
    result = fit_encoder_to_truth(encoder, cfg)
    if args.save:
        save_encoder_weights(encoder, args.save, encoder.cfg)
        print(f"encoder saved to {args.save} (python train.py --encoder_init {args.save})")
    return result


if __name__ == "__main__":
    main()
