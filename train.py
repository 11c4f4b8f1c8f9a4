"""
train.py — the curriculum that turns a language model and an ECG encoder into an ECG chat model.

The stages (each with its own task mix, trainable parts, learning rate and number of steps):

  warm-up  encoder    synthetic data only: the encoder alone, with small linear heads, learns
                      the generator's ground truth: statements, HR/PR/QRS/QT, where each beat
                      is (warmup.py).
  stage 0  language   only when the LLM is built from scratch: the tiny LLM learns to write by
                      predicting the task text (questions and answers, no ECG).
  stage 1  report     ECG encoder + projector learn to write reports.
  stage 2  localize   + localization (10 s and long clips).
  stage 3  all        every task: reports, localization, ECG-QA, multi-ECG comparison, grounded.

What trains in stages 1-3 depends on the LLM. A pretrained LLM (--llm) follows anyECG: frozen
in stage 1, LoRA on q_proj and k_proj from stage 2. The tiny LLM built from scratch has only
read the task text, so it is fine-tuned whole in every stage: frozen, it never learned to read
the ECG at all (in the measured default run, its scores equalled those with the ECG blanked).

Run it:

  python train.py                                  # synthetic ECGs, tiny LLM from scratch, CPU ~14 min
  python train.py --stage1_steps 300 --out_dir runs/a   # any config field is a flag
  python train.py --config my.json                 # the same fields as JSON (data, never executed)
  python train.py --resume                          # continue from the newest checkpoint in out_dir
  python train.py --llm path/to/TinyLlama --encoder base   # a Hugging Face Llama: anyECG's recipe,
                                                           # stage 0 skipped (lr 1e-4, wd 1e-4)
  python train.py --data rows.json --ecg_root DIR  # anyECG-format rows and WFDB records (comma list:
                                                   # several files; realdata.py builds them)
  python train.py --encoder_init enc.safetensors   # start from a saved encoder, e.g. one warmed up by
                                                   # python eval.py probe-encoder --save enc.safetensors
  python train.py --images --image_init CLIP_DIR    # GEM: paper printouts too, read by a frozen CLIP tower
  torchrun --nproc_per_node 4 train.py ...          # DDP: one process per GPU (gloo on CPU)

The run writes out_dir/log.jsonl (every figure), out_dir/checkpoints/step_N/ (resumable:
weights with LoRA unmerged, optimizer, RNG and sampler state, all safetensors + JSON), and
at the end out_dir/model/, the folder that generate.py and eval.py take as --ckpt.
"""

import argparse
import contextlib
import difflib
import inspect
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model

from data import RowECGReader, collate, encode_chat, is_image, load_rows, make_example
from ecg_encoder import (ECGEncoder, EncoderConfig, ImageEncoder, ImageEncoderConfig, clip_vision_config,
                         load_clip_vision, load_encoder_config, load_encoder_weights, save_encoder_weights)
from eval import evaluate as evaluate_rows, print_table, prior_answers, score_rows
from model import LLM, ECGChat, LLMConfig, Tokenizer, add_lora, lora_layers, train_tokenizer
from warmup import fit_encoder_to_truth

ALL_TASKS = ("report", "location", "location_long", "ecgqa", "multi", "grounded")

# -----------------------------------------------------------------------------
# config: every field is a command-line flag (--name value); its comment is its --help


@dataclass
class Config:
    out_dir: str = "out"  # where log.jsonl, checkpoints/ and model/ go
    seed: int = 1337  # model init and the batch stream
    device: str = "auto"  # auto | cpu | cuda
    # data: synthetic unless --data is given
    data: str = ""  # anyECG-format JSON of training rows (empty: synthetic ECGs)
    ecg_root: str = ""  # folder the rows' ecg_path values are relative to
    test_data: str = ""  # anyECG-format JSON evaluated at the end (synthetic: the held-out split)
    workers: int = 4  # processes reading records in parallel (real data; 0 or 1: in the main process)
    ecg_cache: int = 1024  # prepared records kept in memory (real data; the rest streams from disk)
    train_patients: int = 1000  # synthetic patients for training (about 9 rows each)
    val_patients: int = 40  # synthetic patients for validation loss and the in-training eval
    test_patients: int = 50  # synthetic patients of the fixed held-out test split
    # model
    llm: str = ""  # Hugging Face Llama folder; empty: a tiny LLM from scratch (+ stage 0)
    vocab_size: int = 1000  # sentencepiece vocabulary trained on the task text (from scratch)
    dim: int = 192  # tiny LLM width
    n_layers: int = 4  # tiny LLM depth
    n_heads: int = 4  # tiny LLM attention heads
    n_kv_heads: int = 2  # tiny LLM key/value heads (grouped-query attention)
    max_seq_len: int = 512  # context length (text + ECG tokens)
    encoder: str = "tiny"  # ECG encoder preset: tiny | base (anyECG's ViT-Base shape)
    encoder_dim: int = 0  # override the preset's width (0: keep)
    encoder_layers: int = 0  # override the preset's depth (0: keep)
    encoder_init: str = ""  # encoder weights to start from (safetensors with config, e.g. eval.py probe-encoder --save)
    images: bool = False  # GEM's image modality: report + grounded rows also from paper printouts (synthetic)
    image_init: str = ""  # with --images: a Hugging Face CLIP folder (GEM: clip-vit-large-patch14-336), kept frozen
    encoder_warmup_steps: int = 2400  # synthetic data: first the encoder alone learns the ground truth (warmup.py; 0: off)
    lora_targets: str = "q_proj,k_proj"  # LLM linears that get LoRA (anyECG: q_proj,k_proj)
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.1  # dropout on the LoRA input
    # curriculum. tasks: comma list of task[:weight] or "all"; train: parts of encoder,projector,llm,lora
    stage0_steps: int = 500  # language pretraining steps (skipped with --llm)
    stage0_lr: float = 2e-3  # stage 0 peak learning rate
    stage0_tasks: str = "all"  # stage 0 text comes from these tasks
    stage0_train: str = "llm"  # stage 0 trainable parts
    stage1_steps: int = 250  # report stage steps
    stage1_lr: float = 1e-3  # stage 1 peak learning rate
    stage1_tasks: str = "report"  # stage 1 task mix
    stage1_train: str = "projector,llm"  # stage 1 trainable parts (+ encoder when not pretrained; --llm: anyECG's)
    stage2_steps: int = 250  # localization stage steps
    stage2_lr: float = 1e-3  # stage 2 peak learning rate
    stage2_tasks: str = "report,location:2,location_long:4"  # stage 2 task mix
    stage2_train: str = "projector,llm"  # stage 2 trainable parts (+ encoder when not pretrained; --llm: anyECG's)
    stage3_steps: int = 900  # all-task stage steps
    stage3_lr: float = 1e-3  # stage 3 peak learning rate
    stage3_tasks: str = "all"  # stage 3 task mix
    stage3_train: str = "projector,llm"  # stage 3 trainable parts (+ encoder when not pretrained; --llm: anyECG's)
    # optimization
    batch_size: int = 16  # examples per micro-batch (per process)
    bucket_steps: int = 8  # steps drawn from one length-sorted pool of rows (1: no length grouping)
    grad_accum: int = 1  # micro-batches per optimizer step, over all processes
    weight_decay: float = 0.01  # AdamW decay on matrices (never on norms and biases)
    beta2: float = 0.99  # AdamW beta2
    warmup_frac: float = 0.1  # linear warmup, share of each stage's steps
    min_lr_frac: float = 0.1  # cosine decays to this share of the peak
    grad_clip: float = 1.0  # clip the global gradient norm (0: off)
    max_nan_steps: int = 3  # stop (checkpoint kept) after this many non-finite steps in a row
    dtype: str = "auto"  # weights: auto (fp32, bf16 for --llm on CUDA) | float32 | bfloat16
    compile: bool = False  # torch.compile the LLM
    grad_checkpoint: bool = False  # recompute LLM activations in backward (less memory)
    # logging, evaluation, checkpoints
    log_interval: int = 10  # steps between log lines
    eval_interval: int = 200  # steps between validation losses
    eval_batches: int = 4  # micro-batches per validation loss
    gen_eval_rows: int = 4  # val rows per task generated at each stage's end (0: off)
    test_rows: int = 0  # cap on held-out rows per task at the end (0: all)
    max_new_tokens: int = 256  # generation budget in evaluation
    ckpt_interval: int = 500  # steps between checkpoints (and one at each stage end)
    keep_ckpts: int = 2  # checkpoint folders kept
    resume: bool = False  # continue from the newest checkpoint in out_dir
    stop_after: int = 0  # stop (checkpoint written) after this many steps in this run (0: never)


# anyECG's recipe, applied when --llm is given (explicit flags still win)
ANYECG = dict(stage1_lr=1e-4, stage2_lr=1e-4, stage3_lr=1e-4, weight_decay=1e-4, beta2=0.999, encoder="base",
              stage1_train="encoder,projector", stage2_train="encoder,projector,lora",
              stage3_train="encoder,projector,lora")
# An encoder nothing trained before the curriculum (real data or no warm-up, no --encoder_init)
# learns in the stages. A warmed-up or pretrained one stays frozen, as GEM keeps its encoders:
# training it on through the LLM's loss was no better (README) and made steps 2x slower.
UNTRAINED_ENCODER = dict(stage1_train="encoder,projector,llm", stage2_train="encoder,projector,llm",
                         stage3_train="encoder,projector,llm")


def _field_help():
    src = inspect.getsource(Config)
    return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", src, re.M))


def _bool(s):
    if isinstance(s, bool):
        return s
    if str(s).lower() in ("1", "true", "yes", "on"):
        return True
    if str(s).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _unknown_key(key, source):
    names = [f.name for f in fields(Config)]
    close = difflib.get_close_matches(key.replace("-", "_"), names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see python train.py --help"
    return ValueError(f"{source}: unknown config key {key!r}{hint}")


def parse_config(argv=None):
    """defaults < --llm preset < --config file.json < command-line flags."""
    helps, types = _field_help(), {f.name: f.type for f in fields(Config)}
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file of config fields (read as data)")
    for f in fields(Config):
        flags = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
        h = f"{helps.get(f.name, '')} (default: {f.default})"
        if types[f.name] in (bool, "bool"):
            p.add_argument(*flags, dest=f.name, type=_bool, nargs="?", const=True, help=h)
        else:
            p.add_argument(*flags, dest=f.name, type=_type(f), help=h)
    args, unknown = p.parse_known_args(argv)
    for u in unknown:
        raise _unknown_key(u.split("=")[0].lstrip("-"), "command line") if u.startswith("--") else \
            ValueError(f"command line: unexpected argument {u!r}")
    given = vars(args)
    from_file = {}
    if "config" in given:
        path = given.pop("config")
        try:
            from_file = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read config JSON ({e})") from None
        if not isinstance(from_file, dict):
            raise ValueError(f"{path}: expected a JSON object of config fields")
        for k, v in from_file.items():
            if k not in types:
                raise _unknown_key(k, path)
            from_file[k] = _type(next(f for f in fields(Config) if f.name == k))(v)
    merged = {**from_file, **given}
    pretrained = merged.get("encoder_init") or not (merged.get("data") or merged.get("encoder_warmup_steps", 1) == 0)
    preset = ANYECG if merged.get("llm") else {} if pretrained else UNTRAINED_ENCODER
    return Config(**{**preset, **merged})


def _type(f):
    t = {"int": int, "float": float, "str": str, "bool": _bool}.get(f.type, f.type)
    return _bool if t is bool else t

# -----------------------------------------------------------------------------
# the curriculum


@dataclass
class Stage:
    index: int
    name: str
    steps: int
    lr: float
    tasks: dict  # task -> sampling weight per row
    train: set  # trainable parts


def parse_tasks(spec):
    out = {}
    for item in spec.split(","):
        name, _, w = item.strip().partition(":")
        for t in (ALL_TASKS if name == "all" else [name]):
            if t not in ALL_TASKS:
                raise ValueError(f"unknown task {t!r} in {spec!r}; tasks: {', '.join(ALL_TASKS)}")
            out[t] = float(w or 1)
    return out


def curriculum(cfg):
    stages = []
    for k, name in enumerate(["language", "report", "localize", "all"]):
        if k == 0 and cfg.llm:
            continue  # a pretrained LLM already writes
        parts = {s.strip() for s in getattr(cfg, f"stage{k}_train").split(",") if s.strip()}
        bad = parts - {"encoder", "projector", "llm", "lora"}
        if bad:
            raise ValueError(f"stage{k}_train: unknown parts {sorted(bad)}; use encoder, projector, llm, lora")
        stages.append(Stage(k, name, getattr(cfg, f"stage{k}_steps"), getattr(cfg, f"stage{k}_lr"),
                            parse_tasks(getattr(cfg, f"stage{k}_tasks")), parts))
    return stages


def prepare_stage(model, stage, cfg):
    """Add LoRA the first time a stage trains it, then freeze/unfreeze the parts."""
    if "lora" in stage.train and not lora_layers(model.llm):
        add_lora(model.llm, [t.strip() for t in cfg.lora_targets.split(",")], cfg.lora_r, cfg.lora_alpha,
                 cfg.lora_dropout)
    model.set_trainable(**{part: part in stage.train for part in ("encoder", "projector", "llm", "lora")},
                        image_encoder=False if cfg.image_init else None)  # GEM keeps CLIP frozen

# -----------------------------------------------------------------------------
# data: rows in anyECG format + a function that fetches a row's ECGs


class Split:
    """Rows and the function that fetches a row's ECGs. Synthetic splits keep whole examples
    in memory (`keep_ecgs`); real data keeps only the token ids and reads the ECGs again
    through the reader's LRU cache, so a dataset of any size streams from disk. A row whose
    record cannot be read is skipped for good and counted in `bad`."""

    def __init__(self, rows, ecgs_of, keep_ecgs=True, pool=None):
        self.rows, self.ecgs_of, self.keep_ecgs, self.pool, self.cache, self.bad = rows, ecgs_of, keep_ecgs, pool, {}, {}

    def weights(self, tasks, required=True):
        """Sampling probability of each row under a stage's task weights (None: no such rows)."""
        w = np.array([tasks.get(r["task"], 0.0) for r in self.rows])
        if w.sum() == 0 and required:
            raise ValueError(f"no rows of tasks {sorted(tasks)} in the training data")
        return w / w.sum() if w.sum() else None


def load_data(cfg, log):
    if cfg.data:
        return load_real_data(cfg, log)
    from paper import WIDTH_MM
    from tasks import add_image_rows, build_synthetic_dataset
    out = {}
    for split, n in [("train", cfg.train_patients), ("val", cfg.val_patients), ("test", cfg.test_patients)]:
        ds = build_synthetic_dataset(n, seed=cfg.seed, split=split)
        if cfg.images:  # printouts drawn at exactly the image encoder's input width
            add_image_rows(ds, image_config(cfg).width / WIDTH_MM)
        out[split] = Split(ds.rows, ds.ecgs)
        log({"event": "data", "split": split, "patients": n, "rows": len(ds.rows)})
    return out


def load_real_data(cfg, log):
    """--data a.json[,b.json...]: anyECG rows (malformed ones skipped with a warning). Rows
    with a "split" field (realdata.py writes one) go to their split; without one, every
    50th row is validation. The test split: --test_data, else the rows marked test, else val."""
    rows = []
    for path in cfg.data.split(","):
        kept = load_rows(path)
        with open(path) as f:
            log({"event": "data", "file": path, "rows": len(kept), "skipped": len(json.load(f)) - len(kept)})
        rows += kept
    marked = {s: [r for r in rows if r.get("split") == s] for s in ("val", "test")}
    train = [r for r in rows if r.get("split") not in ("val", "test")]
    val = marked["val"] or train[::50]
    train = train if marked["val"] else [r for i, r in enumerate(train) if i % 50]
    test = load_rows(cfg.test_data) if cfg.test_data else marked["test"] or val
    reader = RowECGReader(cfg.ecg_root, fs=100, cache_size=cfg.ecg_cache)
    # worker processes, spawned (safe next to CUDA and threads), that read records in parallel
    pool = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) if cfg.workers > 1 else None
    log({"event": "splits", "train": len(train), "val": len(val), "test": len(test)})
    return {name: Split(r, reader, keep_ecgs=False, pool=pool) for name, r in [("train", train), ("val", val), ("test", test)]}


def example(split, i, model, text_only):
    """Row i -> token ids, loss labels, ECGs and images (None if its record cannot be read
    or the example does not fit the context). Text only (stage 0): the question and the
    answer as plain text, loss on every token."""
    key = (i, text_only)
    ex = split.cache.get(key)
    if ex is not None and (text_only or split.keep_ecgs):
        return ex
    if i in split.bad and not text_only:
        return None
    row = split.rows[i]
    if text_only:
        ids, _ = encode_chat(model.tokenizer, [("user", row["question"]), ("assistant", row["answer"])], [])
        ex = split.cache[key] = {"input_ids": ids, "labels": [-100] + ids[1:], "ecgs": []}
        return ex
    try:
        inputs = split.ecgs_of(row)   # its ECGs (and paper images, for image rows)
    except (OSError, ValueError) as e:   # missing, truncated or unreadable record: load_ecg names it
        split.bad[i] = str(e)
        return None
    if ex is None:
        ex = make_example(row, inputs, model.tokenizer, model.encoder.num_tokens,
                          model.image_encoder.num_tokens if model.image_encoder else 0)
        if len(ex["input_ids"]) > model.max_seq_len:  # e.g. a long clip: skipped like an unreadable record
            split.bad[i] = f"{len(ex['input_ids'])} tokens exceed max_seq_len={model.max_seq_len}"
            return None
        split.cache[key] = ex if split.keep_ecgs else {k: v for k, v in ex.items() if k not in ("ecgs", "images")}
        return ex
    return dict(ex, ecgs=[x for x in inputs if not is_image(x)], images=[x for x in inputs if is_image(x)])


def examples(split, indices, model, text_only):
    """example() for many rows; with a pool of reader processes, their records are first
    read in parallel into the reader's cache."""
    if split.pool and not text_only:
        split.ecgs_of.prefetch([split.rows[i] for i in indices if i not in split.bad], split.pool)
    return [example(split, int(i), model, text_only) for i in indices]


def micro_batch(cfg, split, probs, model, stage, step, micro):
    """The micro-batch of global index `micro` in step `step` of `stage`: a pure function of
    (seed, stage, step, micro), so resuming needs no sampler state beyond the step and each
    DDP rank simply takes its own micro indices. `bucket_steps` consecutive steps share one
    pool of rows sorted by length, each step one slice of it: similar lengths, less padding."""
    k, B = cfg.bucket_steps, cfg.batch_size
    if split.pool and stage.index and step % k == 0:
        # real data: start reading the next pool's records now, so they load while this pool trains
        nxt = np.random.default_rng([cfg.seed, stage.index, step // k + 1, micro])
        split.ecgs_of.prefetch([split.rows[i] for i in nxt.choice(len(split.rows), k * B, p=probs)], split.pool)
    rng = np.random.default_rng([cfg.seed, stage.index, step // k, micro])
    pool = examples(split, rng.choice(len(split.rows), k * B, p=probs), model, stage.index == 0)
    while None in pool:  # unreadable records: draw others (the same rows always fail, so resume is exact)
        if len(split.bad) == len(split.rows):
            raise RuntimeError(f"no record of the {len(split.rows)} rows could be read; first error: "
                               f"{next(iter(split.bad.values()))}")
        pool = [e for e in pool if e is not None]
        pool += examples(split, rng.choice(len(split.rows), k * B - len(pool), p=probs), model, stage.index == 0)
    pool.sort(key=lambda e: len(e["input_ids"]))
    j = rng.permutation(k)[step % k]  # the slices in random order, so lengths do not cycle
    return collate(pool[j * B:(j + 1) * B], model.tokenizer.pad_id)


def to_device(batch, device):
    """-> input_ids, labels, {"ecgs": ..., "images": ...}: the model's inputs beside the text."""
    ecgs = [[(s.to(device), leads) for s, leads in sample] for sample in batch["ecgs"]]
    images = [[im.to(device) for im in sample] for sample in batch["images"]]
    return batch["input_ids"].to(device), batch["labels"].to(device), {"ecgs": ecgs, "images": images}


def ecg_seconds(batch, fs):
    return sum(s.shape[1] for sample in batch["ecgs"] for s, _ in sample) / fs

# -----------------------------------------------------------------------------
# model, optimizer, schedule


def build_tokenizer(cfg, data, rank):
    if cfg.llm:
        return Tokenizer(cfg.llm)
    tok_dir = Path(cfg.out_dir) / "tokenizer"
    if rank == 0 and not (tok_dir / "tokenizer.model").is_file():
        train_tokenizer((t for r in data["train"].rows for t in (r["question"], r["answer"])), tok_dir,
                        cfg.vocab_size)
    if dist.is_initialized():
        dist.barrier()  # the other ranks read the file rank 0 wrote
    return Tokenizer(tok_dir)


def build_model(cfg, tok, device, dtype):
    torch.manual_seed(cfg.seed)
    if cfg.llm:
        llm = LLM.from_pretrained(cfg.llm, dtype=dtype, device=device)  # names the file if not a Llama
    else:
        ffn = 32 * round(8 * cfg.dim / 3 / 32)  # SwiGLU's 8/3 width, rounded
        llm = LLM(LLMConfig(vocab_size=tok.vocab_size, hidden_size=cfg.dim, intermediate_size=ffn,
                            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                            num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                            bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)).to(device, dtype)
    if cfg.encoder_init:  # a pretrained encoder brings its own config (GEM starts from one too)
        encoder = load_encoder_weights(ECGEncoder(load_encoder_config(cfg.encoder_init)), cfg.encoder_init)
    else:
        over = {k: v for k, v in [("d_model", cfg.encoder_dim), ("n_layers", cfg.encoder_layers)] if v}
        encoder = ECGEncoder(getattr(EncoderConfig, cfg.encoder)(**over))
    encoder = encoder.to(device, dtype)
    image_encoder = None
    if cfg.images:
        image_encoder = load_clip_vision(cfg.image_init) if cfg.image_init else ImageEncoder(image_config(cfg))
        image_encoder = image_encoder.to(device, dtype)
    return ECGChat(llm, encoder, tok, cfg.max_seq_len, image_encoder)


def image_config(cfg):
    """The image encoder's shape: the tiny ViT trained here, or the pretrained CLIP tower's."""
    return clip_vision_config(cfg.image_init) if cfg.image_init else ImageEncoderConfig.tiny()


def make_optimizer(model, cfg, lr):
    """AdamW over the trainable parameters; matrices decay, norms and biases (1-D) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, cfg.beta2), fused=fused or None)


def lr_at(step, stage, cfg):
    """Linear warmup over warmup_frac of the stage, then cosine down to min_lr_frac * lr."""
    warmup = max(1, int(cfg.warmup_frac * stage.steps))
    if step < warmup:
        return stage.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, stage.steps - warmup)
    return stage.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def checkpoint_activations(llm):
    from torch.utils.checkpoint import checkpoint
    for block in llm.layers:
        block.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=False))(block.forward)

# -----------------------------------------------------------------------------
# checkpoints: one folder per save, written in a temp folder and renamed into place


def save_checkpoint(cfg, model, opt, state):
    """out_dir/checkpoints/step_N/: model.safetensors (LoRA unmerged), optimizer.safetensors,
    state.json (stage, step, config, python/numpy RNG) + rng.safetensors (torch RNG). The
    folder appears by one rename, so a crash leaves the older checkpoints as they were."""
    root = Path(cfg.out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state['global_step']:07d}"
    if final.exists():
        return final
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp_"))
    save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
    names = {p: n for n, p in model.named_parameters()}
    opt_state = {f"{names[p]}::{k}": v.detach().cpu().contiguous() for p, s in opt.state.items() for k, v in s.items()}
    save_file(opt_state, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    np_state = np.random.get_state()
    meta = {**state, "config": asdict(cfg), "python_rng": list(random.getstate()),
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, final)  # atomic: the checkpoint exists whole or not at all
    for old in sorted(root.glob("step_*"))[:-cfg.keep_ckpts]:
        shutil.rmtree(old)  # only after the new one is complete
    return final


def latest_checkpoint(out_dir):
    found = sorted((Path(out_dir) / "checkpoints").glob("step_*"))  # temp folders start with "."
    return found[-1] if found else None


def load_checkpoint(path, model, opt):
    """Weights and optimizer state into an already built model/optimizer of the same stage;
    restores every RNG; returns state.json."""
    load_model(model, str(path / "model.safetensors"))  # strict: mismatched keys are named
    params = dict(model.named_parameters())
    for key, v in load_file(str(path / "optimizer.safetensors")).items():
        name, k = key.split("::")
        opt.state[params[name]][k] = v.to(params[name].device) if k != "step" else v
    meta = json.loads((path / "state.json").read_text())
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate((meta["python_rng"][0], tuple(meta["python_rng"][1]), meta["python_rng"][2]))
    n = meta["numpy_rng"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    return meta

# -----------------------------------------------------------------------------
# evaluation (the metrics live in eval.py)


def evaluate(model, rows, ecgs_of, cfg):
    was = model.training
    model.eval()
    try:
        return evaluate_rows(model, rows, ecgs_of, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
    finally:
        model.train(was)


def rows_per_task(rows, n, seed=0):
    """At most n rows of each task (0: all), in a fixed order."""
    if not n:
        return rows
    rng, out = np.random.default_rng(seed), []
    for t in ALL_TASKS:
        mine = [r for r in rows if r["task"] == t]
        out += [mine[i] for i in sorted(rng.permutation(len(mine))[:n])]
    return out


def blanked(ecgs_of):
    """The ablation: the same ECG shapes and leads, every sample zero; images blank paper."""
    from data import ECGRecord
    return lambda row: [np.full_like(e, 255) if is_image(e) else ECGRecord(np.zeros_like(e.signal), e.fs, e.leads)
                        for e in ecgs_of(row)]


@torch.no_grad()
def val_loss(cfg, model, split, probs, stage, device, ctx):
    model.eval()
    losses = []
    for j in range(cfg.eval_batches):  # fixed batches: no stage has 10**9 steps
        ids, labels, inputs = to_device(micro_batch(cfg, split, probs, model, stage, 10**9 + j, 0), device)
        with ctx:
            losses.append(model(ids, labels=labels, **inputs)[1].item())
    model.train()
    return float(np.mean(losses))

# -----------------------------------------------------------------------------
# encoder warm-up: the encoder alone learns the synthetic truth (the loop is in warmup.py)


def warm_up_encoder(cfg, encoder, out, log, rank, image_encoder=None):
    """Before the curriculum, on synthetic data: the encoder alone (and the image encoder,
    with --images) learns the generator's ground truth through small linear heads
    (warmup.fit_encoder_to_truth: statements, HR/PR/QRS/QT, and where each kind of beat is).
    Through the LLM's loss alone the encoder learned so slowly that the default model never
    read the ECG (README, "The default run"). The result is kept as
    out_dir/encoder_warmup.safetensors (and image_warmup.safetensors); a run that finds
    them loads them instead of training again. Every DDP rank trains the same copy (same
    seed); DDP broadcasts rank 0's weights anyway."""
    path, image_path = out / "encoder_warmup.safetensors", out / "image_warmup.safetensors"
    if path.exists() and (image_encoder is None or image_path.exists()):
        load_encoder_weights(encoder, str(path))
        if image_encoder is not None:
            load_encoder_weights(image_encoder, str(image_path))
        return
    r = fit_encoder_to_truth(cfg.encoder_warmup_steps, cfg.stage1_lr, cfg.batch_size, cfg.train_patients,
                             cfg.val_patients, eval_every=cfg.encoder_warmup_steps, seed=cfg.seed,
                             save=str(path) if rank == 0 else None, encoder=encoder, held_out="val",
                             verbose=False, desc="encoder warm-up", bar=rank == 0, image_encoder=image_encoder)
    if image_encoder is not None and rank == 0:
        save_encoder_weights(image_encoder, str(image_path), image_encoder.cfg)
    log({"event": "encoder_warmup", "steps": cfg.encoder_warmup_steps, **{f"val_{k}": v for k, v in r.items()}})
    if rank == 0:
        image = (f"; image encoder F1 {r['image_statement_f1']:.3f}, HR MAE {r['image_hr_mae']:.1f} bpm"
                 if "image_statement_f1" in r else "")
        print(f"encoder warm-up: {cfg.encoder_warmup_steps} steps, validation statement F1 {r['statement_f1']:.3f}, "
              f"HR MAE {r['hr_mae']:.1f} bpm{image}")


# -----------------------------------------------------------------------------
# the training loop


def setup_env(cfg):
    """Process group (under torchrun), device, weight dtype and autocast context."""
    ddp = "RANK" in os.environ
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    if cfg.grad_accum % world:
        raise ValueError(f"grad_accum={cfg.grad_accum} must be a multiple of the {world} processes")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = {"auto": torch.bfloat16 if cuda and cfg.llm else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    return SimpleNamespace(ddp=ddp, rank=rank, world=world, device=device, dtype=dtype, ctx=ctx)


def forward_backward(cfg, env, train_model, model, split, probs, stage, step):
    """Accumulate the gradients of this process's micro-batches of one step.
    -> (mean loss, text tokens, ECG seconds); gradients are averaged over processes only
    at the last micro-batch (no_sync before it)."""
    n = cfg.grad_accum // env.world
    loss_sum, n_tok, n_ecg_s = torch.zeros((), device=env.device), 0, 0.0
    for m in range(n):
        batch = micro_batch(cfg, split, probs, model, stage, step, env.rank + m * env.world)
        n_tok += int((batch["input_ids"] != model.tokenizer.pad_id).sum())
        n_ecg_s += ecg_seconds(batch, model.encoder.cfg.fs)
        ids, labels, inputs = to_device(batch, env.device)
        sync = not env.ddp or m == n - 1
        with env.ctx, (contextlib.nullcontext() if sync else train_model.no_sync()):
            _, loss = train_model(ids, labels=labels, **inputs)
            (loss / n).backward()
        loss_sum += loss.detach() / n
    return loss_sum, n_tok, n_ecg_s


def train(cfg):
    env = setup_env(cfg)
    rank, world, device, ctx = env.rank, env.world, env.device, env.ctx
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def log(record):  # one JSON object per line, appended (a resumed run continues the file)
        if rank == 0:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    if cfg.image_init and not cfg.images:
        raise ValueError("--image_init is the image encoder of --images; add --images")
    if cfg.llm:  # fail before the data is built if the folder is not a Llama-family checkpoint
        from model import checkpoint_files, read_hf_config
        read_hf_config(cfg.llm), checkpoint_files(cfg.llm)
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise FileNotFoundError(f"{out / 'checkpoints'}: --resume given but no checkpoint there")
    log({"event": "config", **asdict(cfg), "world_size": world, "resume_from": str(resume_from or "")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if rank else "default")
        data = load_data(cfg, log)
    model = build_model(cfg, build_tokenizer(cfg, data, rank), device, env.dtype)
    if cfg.encoder_warmup_steps and not (cfg.data or cfg.encoder_init or resume_from):
        # a pretrained CLIP tower is not warmed up: it stays as loaded, as in GEM
        warm_up_encoder(cfg, model.encoder, out, log, rank, None if cfg.image_init else model.image_encoder)
    if cfg.grad_checkpoint:
        checkpoint_activations(model.llm)
    if cfg.compile:
        model.llm.compile()
    stages = curriculum(cfg)
    start = json.loads((resume_from / "state.json").read_text()) if resume_from else None
    global_step, steps_this_run, losses = 0, 0, []

    for stage in stages:
        prepare_stage(model, stage, cfg)  # LoRA structure must exist before loading a later stage
        if start and stage.index < start["stage"]:
            global_step += stage.steps
            continue
        model.train()
        opt = make_optimizer(model, cfg, stage.lr)
        step = 0
        if start and stage.index == start["stage"]:
            meta = load_checkpoint(resume_from, model, opt)
            step, global_step = meta["step"], meta["global_step"]
            if rank == 0:
                print(f"resumed from {resume_from} (stage {stage.index}, step {step})")
        start = None
        train_model = torch.nn.parallel.DistributedDataParallel(model) if env.ddp else model
        split, probs = data["train"], data["train"].weights(stage.tasks)
        val_probs = data["val"].weights(stage.tasks, required=False)
        from tqdm import tqdm
        bar = tqdm(total=stage.steps, initial=step, desc=f"stage {stage.index} {stage.name}", disable=rank > 0)
        n_bad, t0, n_tok, n_ecg_s, n_unread = 0, time.time(), 0, 0.0, len(split.bad)
        while step < stage.steps:
            lr = lr_at(step, stage, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum, tok, ecg_s = forward_backward(cfg, env, train_model, model, split, probs, stage, step)
            n_tok, n_ecg_s = n_tok + tok, n_ecg_s + ecg_s
            norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                  cfg.grad_clip or float("inf"))
            stats = torch.stack([loss_sum, norm.to(loss_sum)])
            if env.ddp:
                dist.all_reduce(stats)  # mean loss over processes; any non-finite value spreads
                stats /= world
            loss_val, norm_val = stats.tolist()
            finite = math.isfinite(loss_val) and math.isfinite(norm_val)
            if finite:
                opt.step()
                n_bad = 0
            else:  # skip the update: the weights stay as they were, the batch stream moves on
                n_bad += 1
                log({"event": "nan", "stage": stage.index, "step": step, "loss": str(loss_val), "in_a_row": n_bad})
                bar.write(f"stage {stage.index} step {step}: non-finite loss or gradient, step skipped")
            opt.zero_grad(set_to_none=True)
            if n_bad >= cfg.max_nan_steps:
                state = {"stage": stage.index, "step": step, "global_step": global_step}
                path = save_checkpoint(cfg, model, opt, state) if rank == 0 else None
                raise FloatingPointError(f"{n_bad} non-finite steps in a row at stage {stage.index} step {step}; "
                                         f"the last good weights are kept in {path}")
            step, global_step, steps_this_run = step + 1, global_step + 1, steps_this_run + 1
            losses += [loss_val] if finite else []
            bar.update(1)
            if finite and (step % cfg.log_interval == 0 or step == stage.steps):
                dt = time.time() - t0
                rec = {"stage": stage.index, "step": step, "global_step": global_step, "loss": loss_val,
                       "lr": lr, "grad_norm": norm_val, "tok_per_s": n_tok * world / dt,
                       "ecg_s_per_s": n_ecg_s * world / dt}
                log(rec)
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{rec['tok_per_s']:.0f}",
                                ecg_s_s=f"{rec['ecg_s_per_s']:.0f}")
                t0, n_tok, n_ecg_s = time.time(), 0, 0.0
            if len(split.bad) > n_unread:  # rows whose record could not be read: skipped, counted, named
                new = list(split.bad.items())[n_unread:]
                log({"event": "skipped_rows", "total": len(split.bad), "new": [f"row {i}: {e}" for i, e in new]})
                bar.write(f"{len(split.bad)} rows skipped so far: unreadable or too long (latest: {new[-1][1]})")
                n_unread = len(split.bad)
            if rank == 0 and (step % cfg.eval_interval == 0 or step == stage.steps) and cfg.eval_batches \
                    and val_probs is not None:
                v = val_loss(cfg, model, data["val"], val_probs, stage, device, ctx)
                log({"stage": stage.index, "step": step, "global_step": global_step, "val_loss": v})
                bar.write(f"stage {stage.index} step {step}: val loss {v:.4f}")
            state = {"stage": stage.index, "step": step, "global_step": global_step}
            stop = cfg.stop_after and steps_this_run >= cfg.stop_after
            if rank == 0 and (step % cfg.ckpt_interval == 0 or step == stage.steps or stop):
                save_checkpoint(cfg, model, opt, state)
            if stop:
                bar.close()
                if env.ddp:
                    dist.barrier()
                    dist.destroy_process_group()
                return losses
        bar.close()
        if rank == 0 and cfg.gen_eval_rows and stage.index > 0:
            rows = rows_per_task([r for r in data["val"].rows if r["task"] in stage.tasks], cfg.gen_eval_rows)
            scores, _ = evaluate(model, rows, data["val"].ecgs_of, cfg)
            log({"event": "gen_eval", "stage": stage.index, "scores": scores})
            print_table(scores)

    if rank == 0:
        finish(cfg, model, data["test"], data["train"].rows, log)
    if data["train"].pool:
        data["train"].pool.shutdown(cancel_futures=True)
    if env.ddp:
        dist.barrier()
        dist.destroy_process_group()
    return losses


def finish(cfg, model, test, train_rows, log):
    """Held-out evaluation, the ECG-blanked ablation, the chance level (no model: the most
    frequent training answer to each question), and the model folder for generate/eval.py."""
    model.save(Path(cfg.out_dir) / "model")
    rows = rows_per_task(test.rows, cfg.test_rows)
    for name, ecgs_of in [("test", test.ecgs_of), ("test_ecg_blanked", blanked(test.ecgs_of))]:
        t0 = time.time()
        scores, preds = evaluate(model, rows, ecgs_of, cfg)
        log({"event": name, "scores": scores, "seconds": time.time() - t0})
        print(f"\n{name} ({len(rows)} rows, {time.time() - t0:.0f} s)")
        print_table(scores)
        with open(Path(cfg.out_dir) / f"{name}_predictions.jsonl", "w") as f:
            for p in preds:
                f.write(json.dumps(p) + "\n")
    scores = score_rows(rows, prior_answers(train_rows, rows))
    log({"event": "test_prior", "scores": scores})
    print(f"\ntest_prior: chance level, the most frequent training answer to each question ({len(rows)} rows)")
    print_table(scores)
    print(f"\nmodel saved to {Path(cfg.out_dir) / 'model'} (python generate.py --ckpt {Path(cfg.out_dir) / 'model'} ...)")


if __name__ == "__main__":
    try:
        cfg = parse_config()
        train(cfg)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
