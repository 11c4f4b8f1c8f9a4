"""
warmup.py — the encoders alone, taught the synthetic ground truth directly.

train.py runs this before the curriculum (the encoder warm-up), and `eval.py probe-encoder`
runs it as a benchmark of how fast an encoder learns. Through the LLM's next-token loss
alone the ECG encoder learned so slowly that the default model never read the ECG (README,
"The default run"). With small linear heads on its tokens and the generator's exact truth
as targets, it learns in minutes. The heads are thrown away afterwards; the encoder keeps
what it learned.

  on the mean of an ECG's tokens   the report statements (multi-label), HR, PR, QRS, QT
  on every ECG token               is a beat (any, A, V, L, R) annotated in its time span?
                                   (what localization needs: where each beat is)
  on the mean of an image's tokens the same statements and measurements, from the paper
                                   printout of each 12-lead record (train.py --images)
"""
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from data import STATEMENTS
from ecg_encoder import ECGEncoder, EncoderConfig, save_encoder_weights

BEAT_CHANNELS = ("beat", "A", "V", "L", "R")  # per-token targets
TYPICAL = torch.tensor([80.0, 160.0, 100.0, 400.0])  # HR bpm, PR, QRS, QT ms: the heads predict offsets
SCALE = torch.tensor([30.0, 50.0, 50.0, 50.0])


class Item(NamedTuple):
    signal: torch.Tensor      # (leads, samples) at the encoder's rate, mV
    leads: list
    statements: torch.Tensor  # (S,) 0/1
    measures: torch.Tensor    # (4,) HR, PR (NaN without P waves), QRS, QT
    beats: torch.Tensor       # (tokens, 5) 0/1
    image: np.ndarray | None  # the printout (12-lead records, when images are trained)


def make_items(split, n_patients, seed, encoder, image_encoder=None):
    """One Item per 10 s record of n_patients synthetic patients (their report rows)."""
    from paper import WIDTH_MM, render_ecg
    from tasks import build_synthetic_dataset
    ds = build_synthetic_dataset(n_patients, seed=seed, split=split, tasks=["report"])
    token_s = 1 / encoder.cfg.tokens_per_second
    out = []
    for row in ds.rows:
        rec, truth = ds.record(row["ecg_path"][0])
        ecg = ds.ecgs(row)[0]
        y = torch.zeros(len(STATEMENTS))
        y[[STATEMENTS.index(s) for s in truth.statements]] = 1
        beats = torch.zeros(encoder.num_tokens(ecg.signal.shape[1]), len(BEAT_CHANNELS))
        for at, sym in zip(truth.beat_samples, truth.beat_symbols):
            k = int(at / truth.fs / token_s)
            if k < len(beats):
                beats[k, [0] + ([BEAT_CHANNELS.index(sym)] if sym in BEAT_CHANNELS else [])] = 1
        image = None
        if image_encoder is not None and len(rec.leads) == 12:
            image = render_ecg(rec.signal, rec.fs, list(rec.leads), px_per_mm=image_encoder.cfg.width / WIDTH_MM)
        measures = torch.tensor([truth.hr_bpm, truth.pr_ms or float("nan"), truth.qrs_ms, truth.qt_ms])
        out.append(Item(torch.from_numpy(np.ascontiguousarray(ecg.signal, dtype=np.float32)), list(ecg.leads), y,
                        measures, beats, image))
    return out


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


def fit_encoder_to_truth(steps=400, lr=1e-3, batch_size=16, train_patients=500, test_patients=50,
                         eval_every=100, seed=0, save=None, encoder=None, held_out="test", verbose=True,
                         desc="encoder probe", bar=True, image_encoder=None, **encoder_kw):
    """Train the ECG encoder (and, if given, the image encoder) with linear heads on the
    synthetic ground truth; see the file's docstring for the targets. Scores on the
    `held_out` split: statement micro F1 and HR MAE (and per-token beat F1 when verbose).
    `encoder`: train this one in place (train.py's warm-up) instead of a new tiny one;
    `save`: write the trained ECG encoder there (train.py --encoder_init starts from it).
    -> {"statement_f1", "hr_mae", "beat_f1"} (+ "image_statement_f1", "image_hr_mae" with
    an image encoder)."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    enc = encoder if encoder is not None else ECGEncoder(EncoderConfig.tiny(**encoder_kw))
    train = make_items("train", train_patients, seed, enc, image_encoder)
    test = make_items(held_out, test_patients, seed, enc, image_encoder)
    w = enc.lead_emb.weight
    head = torch.nn.Linear(enc.cfg.d_model, len(STATEMENTS) + 4).to(w.device, w.dtype)
    beat_head = torch.nn.Linear(enc.cfg.d_model, len(BEAT_CHANNELS)).to(w.device, w.dtype)
    params = [*enc.parameters(), *head.parameters(), *beat_head.parameters()]
    if image_encoder is not None:
        image_head = torch.nn.Linear(image_encoder.cfg.d_model, len(STATEMENTS) + 4).to(w.device, w.dtype)
        params += [*image_encoder.parameters(), *image_head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr)
    # PACs and PVCs fill under 2 % of tokens: weigh each channel's positives up to its
    # negatives (capped), or the head learns never to say "A" or "V"
    positives = torch.cat([it.beats for it in train]).mean(0)
    beat_weight = ((1 - positives) / positives.clamp(min=1e-3)).clamp(1, 50)

    def ecg_forward(items):  # -> pooled-head outputs (B, S + 4), per-token beat logits [(n, 5)]
        tokens = enc([it.signal for it in items], [it.leads for it in items])
        return (head(torch.stack([t.mean(0) for t in tokens])).float().cpu(),
                [beat_head(t).float().cpu() for t in tokens])

    def image_forward(items):  # -> pooled-head outputs (B, S + 4) from the printouts
        return image_head(image_encoder([it.image for it in items]).mean(1)).float().cpu()

    def evaluate():
        enc.eval()
        with torch.no_grad():
            outs = [ecg_forward(test[i:i + 64]) for i in range(0, len(test), 64)]
            f1, hr_mae, P, Y = scores(torch.cat([o[0] for o in outs]), test)
            bp, by = torch.cat([b for o in outs for b in o[1]]) > 0, torch.cat([it.beats for it in test]) > 0
            beat_f1 = [2 * (bp & by)[:, c].sum().item() / max(1, bp[:, c].sum().item() + by[:, c].sum().item())
                       for c in range(len(BEAT_CHANNELS))]
            result = {"statement_f1": f1, "hr_mae": hr_mae, "beat_f1": beat_f1, "P": P, "Y": Y}
            with_image = [it for it in test if it.image is not None]
            if image_encoder is not None and with_image:
                image_encoder.eval()
                out = torch.cat([image_forward(with_image[i:i + 32]) for i in range(0, len(with_image), 32)])
                result["image_statement_f1"], result["image_hr_mae"], _, _ = scores(out, with_image)
                image_encoder.train()
        enc.train()
        return result

    say = print if verbose else (lambda *a, **k: None)
    say_now = tqdm.write if verbose else say     # under the progress bar
    say(f"encoder probe: {len(train)} training ECGs, {len(test)} {held_out} ECGs, "
        f"{sum(p.numel() for p in enc.parameters()) / 1e6:.2f}M encoder parameters")
    rng, t0 = np.random.default_rng(seed), time.time()
    for step in tqdm(range(1, steps + 1), desc=desc, leave=False, disable=not bar):
        batch = [train[i] for i in rng.integers(len(train), size=batch_size)]
        out, beats = ecg_forward(batch)
        loss = pooled_loss(out, batch) + F.binary_cross_entropy_with_logits(
            torch.cat(beats), torch.cat([it.beats for it in batch]), pos_weight=beat_weight)
        with_image = [it for it in batch if it.image is not None]
        if image_encoder is not None and with_image:
            loss = loss + pooled_loss(image_forward(with_image), with_image)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            r = evaluate()
            image = (f"  image: F1 {r['image_statement_f1']:.3f} HR MAE {r['image_hr_mae']:.1f}"
                     if "image_statement_f1" in r else "")
            say_now(f"step {step:5d}  loss {loss.item():.3f}  statement micro F1 {r['statement_f1']:.3f}  HR MAE "
                f"{r['hr_mae']:.1f} bpm  beat-token F1 " + " ".join(
                    f"{c} {v:.2f}" for c, v in zip(BEAT_CHANNELS, r["beat_f1"])) + image +
                f"  ({time.time() - t0:.0f} s)")
    P, Y = r.pop("P"), r.pop("Y")
    tp, fp, fn = (P & Y).sum(0), (P & ~Y).sum(0), (~P & Y).sum(0)
    for i, name in enumerate(STATEMENTS):
        say(f"  {name:<36} n={int(Y[:, i].sum()):3d}  F1 {2 * tp[i] / max(1, 2 * tp[i] + fp[i] + fn[i]):.2f}")
    if save:
        save_encoder_weights(enc, save, enc.cfg)
        say(f"encoder saved to {save} (python train.py --encoder_init {save})")
    return r
