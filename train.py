"""
train.py — the curriculum that turns a language model and an ECG encoder into an ECG chat model.

  warm-up  encoder    synthetic data only: the encoder alone, with small linear heads, learns the
                      generator's truth (warmup.py); then it stays frozen, as GEM keeps its encoders
  stage 0  language   only for an LLM built from scratch: it learns to write the task text (no ECG)
  stage 1  report     the projector (and the LLM) learn to write reports from the ECG
  stage 2  localize   + localization (10 s and long clips)
  stage 3  all        reports, localization, ECG-QA, multi-ECG comparison, grounded answers

What trains in stages 1-3 depends on the LLM. A pretrained LLM (--llm) follows anyECG: frozen in
stage 1, LoRA on q_proj and k_proj from stage 2. The tiny LLM built from scratch has only read the
task text, so it is fine-tuned whole: frozen, it cannot learn to read what the projector hands it.
An encoder that nothing trained before the curriculum (real data, no warm-up) trains in every stage.

  python train.py                                  # synthetic ECGs, tiny LLM from scratch, CPU
  python train.py --stage1_steps 300 --out_dir runs/a   # any config field is a flag
  python train.py --config my.json                 # the same fields as JSON (data, never executed)
  python train.py --resume                         # continue from the newest checkpoint in out_dir
  python train.py --llm path/to/TinyLlama --encoder base   # a Hugging Face Llama: anyECG's recipe
  python train.py --data rows.json --ecg_root DIR  # anyECG-format rows (realdata.py builds them)
  python train.py --encoder_init enc.safetensors   # start from a saved encoder (warmup.py --save)
  python train.py --images --image_init CLIP_DIR   # GEM: paper printouts too, read by a frozen CLIP tower
  torchrun --nproc_per_node 4 train.py ...         # DDP: one process per GPU (gloo on CPU)
  torchrun --nproc_per_node 8 train.py --parallel fsdp ...  # FSDP2: weights, gradients, AdamW state sharded

It writes out_dir/log.jsonl (every figure), out_dir/checkpoints/step_N/ (weights, optimizer, RNG
states; safetensors + JSON; FSDP: one file of shards per process) and at the end out_dir/model/,
which generate.py and eval.py take. The settings are config.py's `Config`; the checkpoints are written and read
by checkpoints.py.
"""

import contextlib
import json
import math
import multiprocessing
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from chat import SPECIAL_TOKENS, ECGChat, turns_of
from checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from config import check_config, check_resume, parse_config, warms_up_encoder
from data import TASKS, ECGRecord, RowECGReader, atomic_write, load_rows, read_json
from ecg_encoder import (ECGEncoder, EncoderConfig, ImageEncoder, ImageEncoderConfig, clip_vision_config, file_metadata,
                         load_clip_vision, load_encoder_config, load_encoder_weights, save_encoder_weights)
from eval import as_followups, evaluate, paired_difference, print_difference, print_table, prior_answers, score_rows
from model import (LLM, LLMConfig, Tokenizer, add_lora, checkpoint_files, lora_layers, read_hf_config, save_peft_adapter,
                   train_tokenizer)
from paper import WIDTH_MM
from tasks import add_image_rows, build_synthetic_dataset
from warmup import WarmupConfig, fit_encoder_to_truth, summary


# --------------------------------------------------------------------------- the curriculum
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
        for t in (TASKS if name == "all" else [name]):
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r} in {spec!r}; tasks: {', '.join(TASKS)}")
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
        # the adapters' init comes from the seed alone, so it is the same whenever they are added (FSDP: before
        # stage 1) and leaves the run's random stream as it was
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            torch.manual_seed(cfg.seed)
            add_lora(model.llm, [t.strip() for t in cfg.lora_targets.split(",")], cfg.lora_r, cfg.lora_alpha,
                     cfg.lora_dropout)
    model.set_trainable(**{part: part in stage.train for part in ("encoder", "projector", "llm", "lora")},
                        image_encoder=False if cfg.image_init else None)  # GEM keeps CLIP frozen
    # a frozen encoder's tokens: computed once per ECG (not under FSDP, whose ranks must run the encoder together,
    # nor with encoder dropout, which makes every pass differ)
    frozen = "encoder" not in stage.train and cfg.parallel != "fsdp" and not getattr(model.encoder.cfg, "dropout", 0)
    if not frozen or model.token_cache is None:
        model.cache_encoder_tokens(cfg.token_cache if frozen else 0)


# --------------------------------------------------------------------------- data: anyECG rows and their inputs
class Split:
    """Rows and the function that fetches a row's inputs (ECGRecords, paper images). Synthetic splits keep whole
    examples in memory (`keep_inputs`); real data keeps only the token ids and streams its ECGs from disk through the
    reader's LRU cache. A row that cannot be used is skipped for good, its reason in `bad`."""

    def __init__(self, rows, inputs_of, keep_inputs=True, pool=None):
        self.rows, self.inputs_of, self.keep_inputs, self.pool = rows, inputs_of, keep_inputs, pool
        self.cache, self.bad = {}, {}

    def weights(self, tasks, required=True):
        """Sampling probability of each row under a stage's task weights (None: no such rows)."""
        w = np.array([tasks.get(r["task"], 0.0) for r in self.rows])
        if w.sum() == 0 and required:
            zero = sorted(t for t, v in tasks.items() if v == 0)
            raise ValueError(f"the task weights {zero} are 0" if zero else
                             f"no rows of tasks {sorted(tasks)} in the training data")
        return w / w.sum() if w.sum() else None


def load_data(cfg, log):
    if cfg.data:
        return load_real_data(cfg, log)
    out = {}
    for split, n in [("train", cfg.train_patients), ("val", cfg.val_patients), ("test", cfg.test_patients)]:
        ds = build_synthetic_dataset(n, seed=cfg.seed, split=split)
        if cfg.images:  # printouts drawn at exactly the image encoder's input width
            add_image_rows(ds, image_config(cfg).width / WIDTH_MM)
        out[split] = Split(ds.rows, ds.inputs)
        log({"event": "data", "split": split, "patients": n, "rows": len(ds.rows)})
    return out


def load_real_data(cfg, log):
    """--data a.json[,b.json...]: anyECG rows (malformed ones skipped with a warning). Rows with a "split" field
    (realdata.py writes one) go to their split; without one, every 50th row is validation. The test split:
    --test_data, else the rows marked test, else val."""
    rows = []
    for path in cfg.data.split(","):
        kept = load_rows(path)
        log({"event": "data", "file": path, "rows": len(kept), "skipped": len(read_json(path)) - len(kept)})
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
    return {name: Split(r, reader, keep_inputs=False, pool=pool) for name, r in zip(("train", "val", "test"),
                                                                                   (train, val, test))}


def example(split, i, model, text_only):
    """Row i -> {"input_ids", "labels", "inputs"} (None if its record cannot be read or the example does not fit the
    context). Text only (stage 0): the question and the answer as plain text, no inputs, the loss on every token."""
    key = (i, text_only)
    ex = split.cache.get(key)
    if ex is not None and (text_only or split.keep_inputs):
        return ex
    if i in split.bad and not text_only:
        return None
    row = split.rows[i]
    turns = turns_of(row)   # the question and answer, and any follow-up exchanges
    try:
        if text_only:
            ids, _ = model.prompt(turns, [])
            ex = split.cache[key] = {"input_ids": ids, "labels": [-100] + ids[1:], "inputs": []}
            return ex
        inputs = split.inputs_of(row)   # its ECGs (and paper images, for image rows)
        if ex is None:
            ids, labels = model.prompt(turns, inputs)
            ex = {"input_ids": ids, "labels": labels}
            split.cache[key] = dict(ex, inputs=inputs) if split.keep_inputs else ex   # real data: only the ids stay
    except (OSError, ValueError) as e:   # a missing or unreadable record (load_ecg names it), or too long
        split.bad[i] = str(e)
        return None
    return dict(ex, inputs=inputs)


def examples(split, indices, model, text_only):
    """example() for many rows; with a pool of reader processes, their records are first read in parallel."""
    if split.pool and not text_only:
        split.inputs_of.prefetch([split.rows[i] for i in indices if i not in split.bad], split.pool)
    return [example(split, int(i), model, text_only) for i in indices]


def micro_batch(cfg, split, probs, model, stage, step, micro):
    """The micro-batch of global index `micro` in step `step` of `stage`: a pure function of (seed, stage, step,
    micro), so resuming needs no sampler state and each DDP rank takes its own micro indices. `bucket_steps`
    consecutive steps share one pool of rows sorted by length, each step one slice of it: less padding."""
    k, B = cfg.bucket_steps, cfg.batch_size
    if split.pool and stage.index and step % k == 0:
        # real data: start reading the next pool's records now, so they load while this pool trains
        nxt = np.random.default_rng([cfg.seed, stage.index, step // k + 1, micro])
        split.inputs_of.prefetch([split.rows[i] for i in nxt.choice(len(split.rows), k * B, p=probs)], split.pool)
    rng = np.random.default_rng([cfg.seed, stage.index, step // k, micro])
    pool = examples(split, rng.choice(len(split.rows), k * B, p=probs), model, stage.index == 0)
    while None in pool:  # unusable rows: draw others (the same rows always fail, so resume is exact)
        if len(split.bad) == len(split.rows):
            raise RuntimeError(f"no record of the {len(split.rows)} rows could be read; first error: "
                               f"{next(iter(split.bad.values()))}")
        pool = [e for e in pool if e is not None]
        pool += examples(split, rng.choice(len(split.rows), k * B - len(pool), p=probs), model, stage.index == 0)
    pool.sort(key=lambda e: len(e["input_ids"]))
    j = rng.permutation(k)[step % k]  # the slices in random order, so lengths do not cycle
    return collate(pool[j * B:(j + 1) * B], model.tokenizer.pad_id)


def collate(examples, pad_id):
    """Right-pad -> {"input_ids" (B, T), "labels" (B, T) with -100 on padding, "inputs": per example its inputs}."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)                      # (B, T)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)                     # (B, T)
    for b, e in enumerate(examples):
        ids[b, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        labels[b, :len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": ids, "labels": labels, "inputs": [e["inputs"] for e in examples]}


def ecg_seconds(batch):
    return sum(x.signal.shape[1] / x.fs for sample in batch["inputs"] for x in sample if isinstance(x, ECGRecord))


# --------------------------------------------------------------------------- model, optimizer, schedule
def build_tokenizer(cfg, data, rank):
    if cfg.llm:
        return Tokenizer(cfg.llm)   # ECGChat adds the tokens its chat format needs and the vocabulary lacks
    tok_dir = Path(cfg.out_dir) / "tokenizer"
    if rank == 0 and not (tok_dir / "tokenizer.model").is_file():
        try:
            train_tokenizer((t for r in data["train"].rows for t in (r["question"], r["answer"])), tok_dir,
                            cfg.vocab_size, SPECIAL_TOKENS)
        except RuntimeError as e:   # sentencepiece's own message, without its source location
            raise ValueError(f"--vocab_size {cfg.vocab_size}: sentencepiece cannot build it from the text of the "
                             f"{len(data['train'].rows)} training rows: {str(e).split('] ')[-1].strip()}") from None
    if dist.is_initialized():
        dist.barrier()  # the other ranks read the file rank 0 wrote
    return Tokenizer(tok_dir, SPECIAL_TOKENS)


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
    image_encoder = None
    if cfg.images:
        image_encoder = load_clip_vision(cfg.image_init) if cfg.image_init else ImageEncoder(image_config(cfg))
        image_encoder = image_encoder.to(device, dtype)
    return ECGChat(llm, encoder.to(device, dtype), tok, cfg.max_seq_len, image_encoder, cfg.chat_format,
                   cfg.label_ecgs)


def image_config(cfg):
    """The image encoder's shape: the tiny ViT trained here, or the pretrained CLIP tower's."""
    return clip_vision_config(cfg.image_init) if cfg.image_init else ImageEncoderConfig.tiny()


def make_optimizer(model, cfg, lr):
    """AdamW over the trainable parameters; matrices decay, norms and biases (1-D) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, cfg.beta2), fused=next(model.parameters()).is_cuda or None)


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


# --------------------------------------------------------------------------- the phases of a run
# set-up, warm-up, stages (each step: forward/backward, update, logging, checkpoint), final evaluation, teardown
def setup(cfg):
    """Process group (under torchrun), device, weight dtype, autocast context, the log, and the checkpoint to resume
    from. Fails early on a bad --image_init or --llm folder."""
    check_config(cfg)
    fsdp = cfg.parallel == "fsdp"
    distributed = "RANK" in os.environ or fsdp
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if distributed:   # torchrun's processes; --parallel fsdp without torchrun: a group of one (FSDP on one GPU)
        alone = {} if "RANK" in os.environ else dict(rank=0, world_size=1, store=dist.HashStore())
        dist.init_process_group("nccl" if cuda else "gloo", **alone)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if cfg.grad_accum % world:
        raise ValueError(f"grad_accum={cfg.grad_accum} must be a multiple of the {world} processes")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    # FSDP keeps fp32 master weights and computes in bf16 through its mixed-precision policy (shard_model)
    dtype = {"auto": torch.bfloat16 if cuda and cfg.llm and not fsdp else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def log(record):  # one JSON object per line, appended (a resumed run continues the file)
        if rank == 0:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    if cfg.images and fsdp:   # batches with and without images would run different collectives
        raise ValueError("--images is not supported with --parallel fsdp yet; use ddp")
    if cfg.image_init and not cfg.images:
        raise ValueError("--image_init is the image encoder of --images; add --images")
    if cfg.llm:  # fail before the data is built if the folder is not a Llama-family checkpoint
        read_hf_config(cfg.llm), checkpoint_files(cfg.llm)
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise FileNotFoundError(f"{out / 'checkpoints'}: --resume given but no checkpoint there")
    log({"event": "config", **asdict(cfg), "world_size": world, "resume_from": str(resume_from or "")})
    if resume_from:
        check_resume(cfg, resume_from, log)
    return SimpleNamespace(distributed=distributed, fsdp=fsdp, rank=rank, world=world, device=device, dtype=dtype,
                           ctx=ctx, out=out, log=log, resume_from=resume_from)


def warm_up_encoder(cfg, model, env):
    """Before the curriculum, on synthetic data: the encoder alone (and the image encoder, unless it is a pretrained
    CLIP tower, kept as loaded as in GEM) learns the generator's ground truth (warmup.py). The result is kept as
    out_dir/encoder_warmup.safetensors (and image_warmup.safetensors), which a later run loads instead of training
    again. Every DDP rank trains the same copy (same seed)."""
    encoder, image_encoder = model.encoder, None if cfg.image_init else model.image_encoder
    files = [(encoder, env.out / "encoder_warmup.safetensors")] + (
        [(image_encoder, env.out / "image_warmup.safetensors")] if image_encoder is not None else [])
    steps = cfg.encoder_warmup_steps
    wcfg = WarmupConfig(steps, cfg.encoder_warmup_lr, cfg.batch_size, cfg.train_patients,
                        eval_every=steps, seed=cfg.seed, held_out="val")
    made_by = {"warmup": asdict(wcfg), "image": image_encoder is not None,
               "encoder": json.loads(json.dumps(asdict(encoder.cfg)))}  # as the file's JSON reads back
    if all(path.exists() for _, path in files):
        problem = next(filter(None, (warmup_file_problem(path, made_by) for _, path in files)), None)
        if problem is None:
            for module, path in files:
                load_encoder_weights(module, path)
            return
        warnings.warn(f"{problem}: not reused, warming up again")
    r = fit_encoder_to_truth(encoder, wcfg, image_encoder, desc="encoder warm-up" if env.rank == 0 else None,
                             report=False)
    env.log({"event": "encoder_warmup", "steps": steps, **{f"val_{k}": v for k, v in r.items()}})
    if env.rank == 0:
        for module, path in files:
            save_encoder_weights(module, path, module.cfg, made_by)
        print(f"encoder warm-up: {steps} steps, validation {summary(r)}")


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


def forward_backward(cfg, env, train_model, model, split, probs, stage, step):
    """Accumulate the gradients of this process's micro-batches of one step. -> (mean loss, text tokens, ECG
    seconds). DDP averages gradients over processes only at the last micro-batch (no_sync before it); FSDP
    reduce-scatters them at every one: holding whole unsharded gradients would undo what sharding saves."""
    n = cfg.grad_accum // env.world
    loss_sum, n_tok, n_ecg_s = torch.zeros((), device=env.device), 0, 0.0
    for m in range(n):
        batch = micro_batch(cfg, split, probs, model, stage, step, env.rank + m * env.world)
        n_tok += int((batch["input_ids"] != model.tokenizer.pad_id).sum())
        n_ecg_s += ecg_seconds(batch)
        ids, labels = batch["input_ids"].to(env.device), batch["labels"].to(env.device)     # (B, T) each
        no_sync = env.distributed and not env.fsdp and m < n - 1
        with env.ctx, (train_model.no_sync() if no_sync else contextlib.nullcontext()):
            _, loss = train_model(ids, batch["inputs"], labels=labels)
            (loss / n).backward()
        loss_sum += loss.detach() / n
    return loss_sum, n_tok, n_ecg_s


def update(cfg, env, model, opt, loss_sum):
    """Clip, average loss and gradient norm over processes, and step the optimizer if both are finite (a non-finite
    step is skipped: the weights stay as they were). -> (loss, gradient norm, finite)"""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                          cfg.grad_clip or float("inf"))
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm   # FSDP: the norm over all shards
    stats = torch.stack([loss_sum, norm.to(loss_sum)])                                  # (2,)
    if env.distributed:
        dist.all_reduce(stats)  # mean loss over processes; any non-finite value spreads
        stats /= env.world
    loss, norm = stats.tolist()
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, norm, finite


@torch.no_grad()
def val_loss(cfg, model, split, probs, stage, env):
    model.eval()
    losses = []
    for j in range(cfg.eval_batches):  # fixed batches: no stage has 10**9 steps
        batch = micro_batch(cfg, split, probs, model, stage, 10**9 + j, 0)
        with env.ctx:
            losses.append(model(batch["input_ids"].to(env.device), batch["inputs"],
                                labels=batch["labels"].to(env.device))[1].item())
    model.train()
    return float(np.mean(losses))


class Meter:
    """Tokens and ECG-seconds trained on since the last log line, and the time it took."""

    def __init__(self):
        self.t0, self.tokens, self.ecg_s = time.time(), 0, 0.0

    def rates(self, world):
        dt = time.time() - self.t0
        out = {"tok_per_s": self.tokens * world / dt, "ecg_s_per_s": self.ecg_s * world / dt}
        self.__init__()
        return out


def shard_model(cfg, model, env):
    """FSDP2, in place: each LLM block becomes one group whose weights, gradients and AdamW state are split over the
    processes (gathered whole just before the block runs, freed after); the ECG encoder is one group, the root takes
    the rest. The encoder is not split block by block: its blocks run once per group of equal-shaped windows, a count
    that differs between processes, while FSDP's gathers must match call for call. Frozen weights are sharded too.
    A sharded model cannot grow, so every stage's LoRA is added first (B = 0: nothing changes until it trains, though
    --lora_dropout masks are drawn from then on, unlike DDP's). On CUDA: bf16 compute over fp32 master weights."""
    for stage in curriculum(cfg):
        prepare_stage(model, stage, cfg)
    bf16 = torch.bfloat16 if env.device.type == "cuda" else None
    policy = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16)
    for module in [*model.llm.layers, model.encoder, model]:
        fully_shard(module, mp_policy=policy)


def gather_model(cfg, model, env):
    """FSDP, at the end: the whole weights gathered (through CPU memory) into a fresh unsharded model on rank 0,
    which finish() saves and evaluates. -> it (None elsewhere)"""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.rank:
        return None
    whole = build_model(cfg, model.tokenizer, env.device, env.dtype)
    for stage in curriculum(cfg):
        prepare_stage(whole, stage, cfg)   # the same LoRA adapters
    whole.load_state_dict(full)
    return whole


def run_stage(cfg, env, model, data, stage, progress):
    """The steps of one stage, from progress.step on: forward/backward, update, logging, validation loss,
    checkpoints. -> True when --stop_after ends the run here."""
    opt = make_optimizer(model, cfg, stage.lr)
    if progress.resume_stage == stage.index:   # the checkpoint of this stage: weights, optimizer, RNG
        meta = load_checkpoint(env.resume_from, model, opt, env.fsdp)
        progress.step, progress.global_step = meta["step"], meta["global_step"]
        if env.rank == 0:
            print(f"resumed from {env.resume_from} (stage {stage.index}, step {progress.step})")
    train_model = torch.nn.parallel.DistributedDataParallel(model) if env.distributed and not env.fsdp else model
    split, probs = data["train"], data["train"].weights(stage.tasks)
    val_probs = data["val"].weights(stage.tasks, required=False)
    bar = tqdm(total=stage.steps, initial=progress.step, desc=f"stage {stage.index} {stage.name}", disable=env.rank > 0)
    meter, n_bad, n_unread = Meter(), 0, len(split.bad)
    shares = env.rank == 0 or env.fsdp   # takes part in checkpoints and validation (FSDP: every process, in step)
    try:
        while progress.step < stage.steps:
            step = progress.step
            lr = lr_at(step, stage, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum, tok, ecg_s = forward_backward(cfg, env, train_model, model, split, probs, stage, step)
            meter.tokens, meter.ecg_s = meter.tokens + tok, meter.ecg_s + ecg_s
            loss, norm, finite = update(cfg, env, model, opt, loss_sum)
            n_bad = 0 if finite else n_bad + 1
            if not finite:
                env.log({"event": "nan", "stage": stage.index, "step": step, "loss": str(loss), "in_a_row": n_bad})
                bar.write(f"stage {stage.index} step {step}: non-finite loss or gradient, step skipped")
            if n_bad >= cfg.max_nan_steps:
                path = save_checkpoint(cfg, model, opt, progress.at(stage), env.fsdp) if shares else None
                raise FloatingPointError(f"{n_bad} non-finite steps in a row at stage {stage.index} step {step}; "
                                         f"the last good weights are kept in {path}")
            progress.advance(loss if finite else None)
            bar.update(1)
            step = progress.step
            if finite and (step % cfg.log_interval == 0 or step == stage.steps):
                rec = {**progress.at(stage), "loss": loss, "lr": lr, "grad_norm": norm, **meter.rates(env.world)}
                if env.device.type == "cuda":   # the GPU checks read it (docs/RESULTS.md)
                    rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                env.log(rec)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tok_per_s']:.0f}", ecg_s_s=f"{rec['ecg_s_per_s']:.0f}")
            n_unread = report_skipped(split, n_unread, env, bar)
            if shares and (step % cfg.eval_interval == 0 or step == stage.steps) and cfg.eval_batches \
                    and val_probs is not None:
                v = val_loss(cfg, model, data["val"], val_probs, stage, env)
                env.log({**progress.at(stage), "val_loss": v})
                if env.rank == 0:
                    bar.write(f"stage {stage.index} step {step}: val loss {v:.4f}")
            stop = bool(cfg.stop_after) and progress.steps_this_run >= cfg.stop_after
            if shares and (step % cfg.ckpt_interval == 0 or step == stage.steps or stop):
                save_checkpoint(cfg, model, opt, progress.at(stage), env.fsdp)
            if stop:
                return True
    finally:
        bar.close()
    return False


def report_skipped(split, n_unread, env, bar):
    """Log and name the rows found unusable since the last call (unreadable, too long). -> how many are known."""
    if len(split.bad) > n_unread:
        new = list(split.bad.items())[n_unread:]
        env.log({"event": "skipped_rows", "total": len(split.bad),
                 "new": [f"row {split.rows[i].get('file_index', i)}: {e}" for i, e in new]})
        bar.write(f"{len(split.bad)} rows skipped so far: unreadable or too long (latest: {new[-1][1]})")
    return len(split.bad)


@dataclass
class Progress:
    """Where the run is: the step within the current stage, the step over all stages, the steps this process has
    run (for --stop_after), the finite losses so far."""
    step: int = 0
    global_step: int = 0
    steps_this_run: int = 0
    losses: list = field(default_factory=list)
    resume_stage: int | None = None   # the stage the checkpoint resumed from is in

    def advance(self, loss):
        self.step, self.global_step, self.steps_this_run = self.step + 1, self.global_step + 1, self.steps_this_run + 1
        if loss is not None:
            self.losses.append(loss)

    def at(self, stage):   # what the log and the checkpoints record of it
        return {"stage": stage.index, "step": self.step, "global_step": self.global_step}


def run_stages(cfg, env, model, data):
    """Every stage of the curriculum, a resumed run skipping the finished ones. -> (losses, stopped by
    --stop_after)."""
    progress = Progress()
    if env.resume_from:
        progress.resume_stage = json.loads((env.resume_from / "state.json").read_text())["stage"]
    for stage in curriculum(cfg):
        prepare_stage(model, stage, cfg)  # LoRA structure must exist before loading a later stage
        if progress.resume_stage is not None and stage.index < progress.resume_stage:
            progress.global_step += stage.steps
            continue
        model.train()
        progress.step = 0
        if run_stage(cfg, env, model, data, stage, progress):
            return progress.losses, True
        progress.resume_stage = None
        # under FSDP a rank cannot generate alone; the final evaluation, on the gathered model, still runs
        if env.rank == 0 and cfg.gen_eval_rows and stage.index > 0 and not env.fsdp:
            rows = rows_per_task([r for r in data["val"].rows if r["task"] in stage.tasks], cfg.gen_eval_rows)
            scores, _ = evaluate(model, rows, data["val"].inputs_of, cfg.batch_size, cfg.max_new_tokens)
            env.log({"event": "gen_eval", "stage": stage.index, "scores": scores})
            print_table(scores)
    return progress.losses, False


def rows_per_task(rows, n, per_type=0, seed=0):
    """At most n rows of each task (0: all), in a fixed order; with per_type, ECG-QA and multi rows are drawn per
    question type instead, at most per_type of each, so that the rare types are measured too."""
    if not n:
        return rows
    rng, out = np.random.default_rng(seed), []
    for t in TASKS:
        mine = [r for r in rows if r["task"] == t]
        kinds = sorted({r.get("question_type", "") for r in mine}) if per_type and t in ("ecgqa", "multi") else [None]
        for kind in kinds:
            pool = [r for r in mine if kind is None or r.get("question_type", "") == kind]
            out += [pool[i] for i in sorted(rng.permutation(len(pool))[:per_type if kind is not None else n])]
    return out


def finish(cfg, model, data, log):
    """The model folder for generate/eval.py, then held-out evaluation, the ECG-blanked ablation, the follow-up
    questions and the chance level (no model: the most frequent training answer to each question)."""
    model.cache_encoder_tokens(0)   # encode as eval.py does, so its table is eval.py's on the saved model
    model.save(Path(cfg.out_dir) / "model")
    if cfg.llm and lora_layers(model.llm):   # the LoRA alone too, for peft users of the same --llm folder
        save_peft_adapter(model.llm, Path(cfg.out_dir) / "model" / "lora_adapter", base_model=cfg.llm)
    test, rows, answers = data["test"], rows_per_task(data["test"].rows, cfg.test_rows, cfg.test_rows_per_type), {}
    for name, ablate in [("test", False), ("test_ecg_blanked", True)]:
        t0 = time.time()
        scores, preds = evaluate(model, rows, test.inputs_of, cfg.batch_size, cfg.max_new_tokens, ablate_ecg=ablate)
        log({"event": name, "scores": scores, "seconds": time.time() - t0})
        print(f"\n{name} ({len(rows)} rows, {time.time() - t0:.0f} s)")
        print_table(scores)
        atomic_write(Path(cfg.out_dir) / f"{name}_predictions.jsonl", "".join(json.dumps(p) + "\n" for p in preds))
        answers[name] = preds
    effect = paired_difference(answers["test"], answers["test_ecg_blanked"])
    log({"event": "test_ecg_effect", "scores": effect})
    print("\nhow much each task reads the ECG: its main metric with the ECG minus with it blanked, same rows")
    print_difference(effect, "with ECG - blanked")
    followups = as_followups(rows, test.rows)
    if followups:   # asked second in a chat, after a report exchange about the same ECG
        _, preds = evaluate(model, followups, test.inputs_of, cfg.batch_size, cfg.max_new_tokens)
        second = paired_difference(preds, answers["test"])
        log({"event": "test_followup", "rows": len(followups), "scores": second})
        print(f"\nasked second in a chat ({len(followups)} ECG-QA rows, after a report exchange), minus asked first")
        print_difference(second, "second - first")
    scores = score_rows(rows, prior_answers(data["train"].rows, rows))
    log({"event": "test_prior", "scores": scores})
    print(f"\ntest_prior: chance level, the most frequent training answer to each question ({len(rows)} rows)")
    print_table(scores)
    print(f"\nmodel saved to {Path(cfg.out_dir) / 'model'} (python generate.py --ckpt {Path(cfg.out_dir) / 'model'} ...)")


def train(cfg):
    """One run, phase by phase. -> the finite training losses, step by step."""
    env = setup(cfg)                                                            # set-up
    data, ok = None, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if env.rank else "default")
            data = load_data(cfg, env.log)
        for stage in curriculum(cfg):   # every stage's task mix can be drawn from, before anything trains
            if stage.steps:
                data["train"].weights(stage.tasks)
        model = build_model(cfg, build_tokenizer(cfg, data, env.rank), env.device, env.dtype)
        if warms_up_encoder(cfg) and not env.resume_from:                       # warm-up
            warm_up_encoder(cfg, model, env)
        if cfg.grad_checkpoint:
            checkpoint_activations(model.llm)
        if cfg.compile:
            model.llm.compile()
        if env.fsdp:
            shard_model(cfg, model, env)
        losses, stopped = run_stages(cfg, env, model, data)                      # stages
        if env.fsdp and not stopped:
            model = gather_model(cfg, model, env)
        if env.rank == 0 and not stopped:                                       # final evaluation
            finish(cfg, model, data, env.log)
        ok = True
        return losses
    finally:                                                                    # teardown
        if data and data["train"].pool:
            data["train"].pool.shutdown(cancel_futures=True)
        if env.distributed:
            if ok:
                dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        train(parse_config(usage=__doc__))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
