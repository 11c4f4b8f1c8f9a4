"""
train.py — the curriculum that turns a language model and an ECG encoder into an ECG chat model.

  warm-up  encoder    synthetic data only: the encoder alone, with small linear heads, learns the
                      generator's truth (synthetic/warmup.py); then it stays frozen, as GEM keeps its encoders
  stage 0  language   only for an LLM built from scratch: it learns to write the task text (no ECG), the loss on
                      every token, and the steps from a written reading to an answer as short texts from the
                      generator's truth (synthetic/skills.py), --text_batch of them packed end to end a step
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
  python train.py --data rows.json --ecg_root DIR  # anyECG-format rows (python -m realdata.prepare builds them)
  python train.py --encoder_init enc.safetensors   # start from a saved encoder (python -m synthetic.warmup --save)
  python train.py --images --image_init CLIP_DIR   # GEM: paper printouts too, read by a frozen CLIP tower
  torchrun --nproc_per_node 4 train.py ...         # DDP: one process per GPU (gloo on CPU)
  torchrun --nproc_per_node 8 train.py --parallel fsdp ...  # FSDP2: weights, gradients, AdamW state sharded

It writes out_dir/log.jsonl (every figure), out_dir/checkpoints/step_N/ (weights, optimizer, RNG
states; safetensors + JSON; FSDP: one file of shards per process) and at the end out_dir/model/,
which generate.py and eval.py take. The settings are config.py's `Config`.
"""

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

try:
    import fcntl   # the out_dir lock (POSIX)
except ImportError:   # Windows: no lock
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm import tqdm

from anyecg.peft import save_peft_adapter
from chat import SPECIAL_TOKENS, ECGChat, turns_of
from config import (BEFORE_THE_FIELD, check_config, check_resume, encoder_config, latest_checkpoint, parse_config,
                    warms_up_encoder)
from data import TASKS, ECGRecord, RowECGReader, atomic_write, load_rows, read_json
from ecg_encoder import ECGEncoder, load_encoder_config, load_encoder_weights
from eval import evaluate, evaluate_held_out, print_table, rows_per_task
from images.chat import ImageChat
from images.paper import WIDTH_MM
from images.rows import PrintoutReader
from images.vit import ImageEncoder, ImageEncoderConfig, clip_vision_config, load_clip_vision
from model import (LLM, LLMConfig, Tokenizer, add_lora, checkpoint_files, choose_device, lora_layers, read_hf_config,
                   train_tokenizer)
from parallel import fsdp
from synthetic.skills import SKILL_VAL_PATIENTS, skill_accuracy, skill_rows
from synthetic.tasks import TEST_SEED, add_image_rows, build_synthetic_dataset
from synthetic.warmup import WarmupConfig, warm_up


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
            if t not in (*TASKS, "skills"):
                raise ValueError(f"unknown task {t!r} in {spec!r}; tasks: {', '.join(TASKS)}, skills")
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
    model.set_trainable(**{part: part in stage.train for part in ("encoder", "projector", "llm", "lora")})
    # a frozen encoder's tokens: computed once per ECG (not under FSDP, whose ranks must run the encoder together,
    # nor with encoder dropout, which makes every pass differ)
    frozen = "encoder" not in stage.train and cfg.parallel != "fsdp" and not getattr(model.encoder.cfg, "dropout", 0)
    if not frozen or model.token_cache is None:
        model.cache_encoder_tokens(cfg.token_cache if frozen else 0)


# --------------------------------------------------------------------------- data: rows, and batches of them
class Split:
    """Rows and the function that fetches a row's inputs (ECGRecords, paper images). Synthetic splits keep whole
    examples in memory (`keep_inputs`); real data keeps only the token ids and streams its ECGs from disk through the
    reader's LRU cache, read ahead by a pool of `workers` processes. A row that cannot be used is skipped for good,
    its reason in `bad`."""

    def __init__(self, rows, inputs_of, keep_inputs=True, workers=None):
        self.rows, self.inputs_of, self.keep_inputs, self.workers = rows, inputs_of, keep_inputs, workers
        self.cache, self.bad = {}, {}

    def weights(self, tasks, required=True):
        """Sampling probability of each row under a stage's task weights (None: no such rows)."""
        w = np.array([tasks.get(r["task"], 0.0) for r in self.rows])
        if w.sum() == 0 and required:
            zero = sorted(t for t, v in tasks.items() if v == 0)
            present = ", ".join(sorted({r["task"] for r in self.rows}))
            raise ValueError(f"the task weights {zero} are 0" if zero else
                             f"no rows of tasks {sorted(tasks)} in the training data, which has {present}")
        return w / w.sum() if w.sum() else None

    def prefetch(self, indices):
        """Start reading these rows' records in the worker processes; they load while the caller goes on."""
        self.inputs_of.prefetch([self.rows[i] for i in indices if i not in self.bad], self.workers)


def load_data(cfg, log, make_ahead=0):
    """Train, val and test Splits: --data's rows, else synthetic ones (+ stage 0's skill texts). make_ahead: the
    synthetic training records made now by that many processes (a GPU run: the loop would wait for each)."""
    if cfg.data:
        return load_real_data(cfg, log)
    out = {}
    for split, n in [("train", cfg.train_patients), ("val", cfg.val_patients), ("test", cfg.test_patients)]:
        # the answers' form: 'Reading: R. [Question: Q] [Check: af not in ECG1; ...] Answer: a'
        ds = build_synthetic_dataset(n, seed=cfg.seed, split=split, read_first=cfg.read_first,
                                     after_reading=cfg.question_after_reading, worked=cfg.worked_checks)
        if cfg.images:  # printouts drawn at exactly the image encoder's input width
            add_image_rows(ds, image_config(cfg).width / WIDTH_MM)
        out[split] = Split(ds.rows, ds.inputs)
        made = ds.make_ahead(make_ahead) if make_ahead > 1 and split == "train" else 0
        log({"event": "data", "split": split, "patients": n, "rows": len(ds.rows), "records_made_ahead": made})
    if cfg.skill_patients and not cfg.llm:   # the answering steps as text, for stage 0 (synthetic/skills.py)
        for split, n, seed in [("train", cfg.skill_patients, cfg.seed),
                               ("val", min(SKILL_VAL_PATIENTS, cfg.skill_patients), TEST_SEED)]:
            rows = skill_rows(n, seed, after_reading=cfg.question_after_reading, worked=cfg.worked_checks)
            out[split].rows += rows
            log({"event": "data", "split": split, "skill_patients": n, "skill_rows": len(rows)})
    return out


def load_real_data(cfg, log):
    """--data a.json[,b.json...]: anyECG rows (malformed ones skipped with a warning). Rows with a "split" field
    (python -m realdata.prepare writes one) go to their split; without one, every 50th row is validation. The test
    split: --test_data, else the rows marked test, else val."""
    rows = []
    for path in cfg.data.split(","):
        kept = load_rows(path, images=cfg.images)
        log({"event": "data", "file": path, "rows": len(kept), "skipped": len(read_json(path)) - len(kept)})
        rows += kept
    marked = {s: [r for r in rows if r.get("split") == s] for s in ("val", "test")}
    train = [r for r in rows if r.get("split") not in ("val", "test")]
    val = marked["val"] or train[::50]
    train = train if marked["val"] else [r for i, r in enumerate(train) if i % 50]
    test = load_rows(cfg.test_data, images=cfg.images) if cfg.test_data else marked["test"] or val
    reader = PrintoutReader(cfg.ecg_root, 100, cfg.ecg_cache, cfg.image_root, image_config(cfg).width) \
        if cfg.images else RowECGReader(cfg.ecg_root, fs=100, cache_size=cfg.ecg_cache)
    # worker processes, spawned (safe next to CUDA and threads), that read records in parallel
    workers = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) \
        if cfg.workers > 1 else None
    log({"event": "splits", "train": len(train), "val": len(val), "test": len(test)})
    return {name: Split(r, reader, keep_inputs=False, workers=workers)
            for name, r in zip(("train", "val", "test"), (train, val, test))}


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
        inputs = split.inputs_of(row) if "ecg_path" in row else []   # its ECGs (and images); a skill text: none
        if ex is None:
            ids, labels = model.prompt(turns, inputs)
            ex = {"input_ids": ids, "labels": labels}
            split.cache[key] = dict(ex, inputs=inputs) if split.keep_inputs else ex   # real data: only the ids stay
    except (OSError, ValueError) as e:   # a missing or unreadable record (load_ecg names it), or too long
        split.bad[i] = str(e)
        return None
    return dict(ex, inputs=inputs)


def get_batch(cfg, split, probs, model, stage, step, micro):
    """The micro-batch of global index `micro` in step `step` of `stage`, collated. A pure function of (seed, stage,
    step, micro), so resuming needs no sampler state and each DDP rank takes its own micro indices. `bucket_steps`
    consecutive steps share one set of candidate rows sorted by length, each step one slice of it: less padding."""
    k, B, text_only = cfg.bucket_steps, cfg.batch_size, stage.index == 0
    if split.workers and stage.index and step % k == 0:
        # real data: start reading the next candidates' records now, so they load while these train
        split.prefetch(np.random.default_rng([cfg.seed, stage.index, step // k + 1, micro]).choice(
            len(split.rows), k * B, p=probs))
    if text_only and cfg.text_batch:   # many short texts packed end to end in rows: little padding
        rng = np.random.default_rng([cfg.seed, stage.index, step, micro])
        drawn = [example(split, int(i), model, True) for i in rng.choice(len(split.rows), cfg.text_batch, p=probs)]
        row_len = min(cfg.text_row_len or model.max_seq_len, model.max_seq_len)
        return collate(pack([e for e in drawn if e is not None], row_len), model.tokenizer.pad_id)
    rng = np.random.default_rng([cfg.seed, stage.index, step // k, micro])
    candidates = []
    while len(candidates) < k * B:   # unusable rows: draw others (the same rows always fail, so resume is exact)
        drawn = rng.choice(len(split.rows), k * B - len(candidates), p=probs)
        if split.workers and not text_only:
            split.prefetch(drawn)
        candidates += [e for e in (example(split, int(i), model, text_only) for i in drawn) if e is not None]
        drawable = np.flatnonzero(probs)   # this stage's rows: when every one of them fails, drawing again never ends
        if len(candidates) < k * B and all(int(i) in split.bad for i in drawable):
            raise RuntimeError(f"no record of the {len(drawable)} rows could be read; first error: "
                               f"{split.bad[int(drawable[0])]}")
    candidates.sort(key=lambda e: len(e["input_ids"]))
    j = rng.permutation(k)[step % k]  # the slices in random order, so lengths do not cycle
    return collate(candidates[j * B:(j + 1) * B], model.tokenizer.pad_id)


def pack(examples, length):
    """Text-only examples packed into rows of at most `length` tokens, the fewest rows a simple rule finds: the longest
    text first, each into the fullest row it fits (best-fit decreasing; a text longer than `length` gets a row of its
    own). In a row the texts stand in the order they were drawn, each with its own labels (no loss on predicting the
    next text's <bos>); a text may attend to the ones before it in its row, which it learns to ignore, as in GPT
    pretraining (--pack_alone: each to itself alone, texts_apart)."""
    rows = []   # [tokens used, indices of the row's texts]
    for k in sorted(range(len(examples)), key=lambda k: -len(examples[k]["input_ids"])):   # stable: ties keep order
        n = len(examples[k]["input_ids"])
        fits = [r for r in rows if r[0] + n <= length]
        row = max(fits, key=lambda r: r[0]) if fits else None
        if row is None:
            rows.append(row := [0, []])
        row[0] += n
        row[1].append(k)
    in_order = [sorted(texts) for _, texts in sorted(rows, key=lambda r: min(r[1]))]
    return [{"input_ids": [t for k in texts for t in examples[k]["input_ids"]],
             "labels": [t for k in texts for t in examples[k]["labels"]], "inputs": []} for texts in in_order]


def collate(examples, pad_id):
    """Right-pad -> {"input_ids" (B, T), "labels" (B, T) with -100 on padding, "inputs": per example its inputs}."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)                      # (B, T)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)                     # (B, T)
    for b, e in enumerate(examples):
        ids[b, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        labels[b, :len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": ids, "labels": labels, "inputs": [e["inputs"] for e in examples]}


def texts_apart(cfg, stage, batch, bos_id):
    """--pack_alone, stage 0's packed rows: which text each token belongs to, (B, T), counted from the <bos> that
    starts each text, for LLM.forward(document_ids=...): each text attends to itself alone (docs/RESULTS.md, "Each
    packed text attended to itself"; not the default). Else None. The padding after a row's last text counts with
    it: its labels are -100, and no real token sees it."""
    if not (cfg.pack_alone and stage.index == 0 and cfg.text_batch):
        return None
    return (batch["input_ids"] == bos_id).cumsum(1)                                     # (B, T)


def ecg_seconds(batch):
    return sum(x.signal.shape[1] / x.fs for sample in batch["inputs"] for x in sample if isinstance(x, ECGRecord))


# --------------------------------------------------------------------------- model, optimizer, schedule
def build_tokenizer(cfg, data, rank):
    """--llm's tokenizer, or this run's: out_dir/tokenizer, reused only when made by the same --vocab_size from the
    same training text (as a warm-up file is: a folder another run left behind is trained again, with a warning)."""
    if cfg.llm:
        return Tokenizer(cfg.llm)   # ECGChat adds the tokens its chat format needs and the vocabulary lacks
    tok_dir = Path(cfg.out_dir) / "tokenizer"
    texts = [t for r in data["train"].rows for t in (r["question"], r["answer"])]
    made_by = {"vocab_size": cfg.vocab_size, "phrases": cfg.phrases,
               "text_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest()}
    if rank == 0 and made_by != read_made_by(tok_dir):
        if (tok_dir / "tokenizer.model").is_file():
            warnings.warn(f"{tok_dir} was made by another --vocab_size or --phrases, or from other training rows: not "
                          "reused, training it again")
        train_run_tokenizer(texts, tok_dir, cfg.vocab_size, len(data["train"].rows), cfg.phrases)
        atomic_write(tok_dir / "made_by.json", json.dumps(made_by))
    if dist.is_initialized():
        dist.barrier()  # the other ranks read the file rank 0 wrote
    return Tokenizer(tok_dir, SPECIAL_TOKENS)


def read_made_by(tok_dir):
    """What made the tokenizer in tok_dir ({} if nothing there says: none, or an unreadable record). A record from
    before --phrases existed is of word pieces (config.BEFORE_THE_FIELD)."""
    try:
        old = {"phrases": BEFORE_THE_FIELD["phrases"]}
        return {**old, **read_json(tok_dir / "made_by.json")} if (tok_dir / "tokenizer.model").is_file() else {}
    except (ValueError, FileNotFoundError):
        return {}


def train_run_tokenizer(texts, tok_dir, vocab_size, n_rows, phrases=False):
    """train_tokenizer on the training rows' text; a --vocab_size the text cannot fill is lowered, with a warning."""
    try:
        train_tokenizer(texts, tok_dir, vocab_size, SPECIAL_TOKENS, phrases)
    except RuntimeError as e:   # sentencepiece's own message, without its source location
        why = str(e).split("] ")[-1].strip()
        most = re.search(r"too high.*<= (\d+)", why)
        if not most:
            raise ValueError(f"--vocab_size {vocab_size}: sentencepiece cannot build it from the text of the "
                             f"{n_rows} training rows: {why}") from None
        warnings.warn(f"--vocab_size {vocab_size}: the text of the {n_rows} training rows holds {most[1]} "
                      f"pieces at most; the tokenizer has {most[1]}")   # few rows (one record's): still a run
        train_tokenizer(texts, tok_dir, int(most[1]), SPECIAL_TOKENS, phrases)


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
        encoder = ECGEncoder(encoder_config(cfg))
    if not cfg.images:
        return ECGChat(llm, encoder.to(device, dtype), tok, cfg.max_seq_len, cfg.chat_format, cfg.label_ecgs,
                       ecg_seconds=cfg.ecg_seconds, name_last_ecg=cfg.name_last_ecg)
    image_encoder = load_clip_vision(cfg.image_init) if cfg.image_init else ImageEncoder(image_config(cfg))
    return ImageChat(llm, encoder.to(device, dtype), tok, cfg.max_seq_len, cfg.chat_format, cfg.label_ecgs,
                     image_encoder.to(device, dtype), train_image_encoder=not cfg.image_init,  # GEM: CLIP frozen
                     ecg_seconds=cfg.ecg_seconds, name_last_ecg=cfg.name_last_ecg)


def image_config(cfg):
    """The image encoder's shape: the tiny ViT trained here, or the pretrained CLIP tower's."""
    return clip_vision_config(cfg.image_init) if cfg.image_init else ImageEncoderConfig()


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


# --------------------------------------------------------------------------- the training loop
def run_stage(cfg, env, model, data, stage, progress):
    """The steps of one stage, from progress.step on. -> True when --stop_after ends the run here."""
    opt = make_optimizer(model, cfg, stage.lr)
    if progress.resume_stage == stage.index:   # the checkpoint of this stage: weights, optimizer, RNG
        meta = load_checkpoint(env.resume_from, model, opt, env.fsdp, show=env.rank == 0)
        progress.step, progress.global_step = meta["step"], meta["global_step"]
    # DDP: a whole copy per process, gradients averaged in backward (FSDP: sharded before the stages)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if env.distributed and not env.fsdp else model
    split, probs = data["train"], data["train"].weights(stage.tasks)
    shares = env.rank == 0 or env.fsdp       # writes checkpoints and validates (FSDP: every process, in step)
    bar = tqdm(total=stage.steps, initial=progress.step, desc=f"stage {stage.index} {stage.name}",
               disable=env.rank > 0 or not sys.stderr.isatty())   # a log file gets plain lines, not \r frames
    meter, n_bad, n_skipped = Meter(), 0, len(split.bad)
    try:
        while progress.step < stage.steps:
            step, lr = progress.step, lr_at(progress.step, stage, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = forward_backward(cfg, env, model, train_model, split, probs, stage, step, meter)
            norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                  cfg.grad_clip or float("inf"))
            stats = torch.stack([loss, (fsdp.full(norm) if env.fsdp else norm).to(loss)])   # FSDP: over all shards
            if env.distributed:   # the mean over processes; a non-finite value on any spreads to all
                dist.all_reduce(stats)
                stats /= env.world
            loss, norm = stats.tolist()
            finite = math.isfinite(loss) and math.isfinite(norm)
            if finite:   # a non-finite step is skipped: the weights stay as they were
                opt.step()
            opt.zero_grad(set_to_none=True)
            n_bad = 0 if finite else n_bad + 1
            if not finite:   # logged; --max_nan_steps of them in a row stop the run, the last good weights kept
                skip_step(cfg, env, model, opt, stage, progress, loss, n_bad, bar)
            progress.advance(loss if finite else None)
            bar.update(1)
            step = progress.step
            if finite and (step % cfg.log_interval == 0 or step == stage.steps):
                rates = meter.rates(env)
                env.log({**progress.position(stage), "loss": loss, "lr": lr, "grad_norm": norm, **rates})
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rates['tok_per_s']:.0f}")
                if bar.disable and env.rank == 0:
                    print(f"stage {stage.index} step {step}/{stage.steps}  loss {loss:.3f}  "
                          f"{rates['tok_per_s']:.0f} tok/s", flush=True)
            n_skipped = report_skipped(split, n_skipped, env, bar)
            if shares and (step % cfg.eval_interval == 0 or step == stage.steps):
                validate(cfg, env, model, data["val"], stage, progress, bar)
            if cfg.skill_eval_interval and step % cfg.skill_eval_interval == 0 and step < stage.steps:
                log_skills(env, model, data["val"], stage, step, bar.write)   # (the stage's end: after it)
            stop = bool(cfg.stop_after) and progress.steps_this_run >= cfg.stop_after
            if shares and (step % cfg.ckpt_interval == 0 or step == stage.steps or stop):
                save_checkpoint(cfg, model, opt, progress.position(stage), env.fsdp)
            if stop:
                return True
    finally:
        bar.close()
    return False


def forward_backward(cfg, env, model, train_model, split, probs, stage, step, meter):
    """This process's micro-batches of one step, forward and backward, the gradients accumulated over them.
    -> the step's mean loss (a tensor: read once the step is done, so the device is not waited for here)"""
    n_micro = cfg.grad_accum // env.world or 1
    loss = torch.zeros((), device=env.device)
    for m in range(n_micro):
        t_data = time.perf_counter()
        batch = get_batch(cfg, split, probs, model, stage, step, env.rank + m * env.world)
        meter.count(batch, model.tokenizer.pad_id, time.perf_counter() - t_data)
        # DDP: gradients averaged at the last micro-batch only (FSDP reduce-scatters at every one)
        no_sync = env.distributed and not env.fsdp and m < n_micro - 1
        with env.ctx, (train_model.no_sync() if no_sync else contextlib.nullcontext()):
            # non_blocking: queued, not waited for (a batch is ~1 MB: pinning it would cost what it saves)
            _, micro_loss = train_model(batch["input_ids"].to(env.device, non_blocking=True), batch["inputs"],
                                        labels=batch["labels"].to(env.device, non_blocking=True),
                                        document_ids=texts_apart(cfg, stage, batch, model.tokenizer.bos_id))
            (micro_loss / n_micro).backward()
        loss += micro_loss.detach() / n_micro
    return loss


def skip_step(cfg, env, model, opt, stage, progress, loss, n_bad, bar):
    """A step whose loss or gradient was not finite, and so skipped: logged and named; after max_nan_steps of them in
    a row, the run stops with the last good weights in a checkpoint."""
    step = progress.step
    env.log({"event": "nan", "stage": stage.index, "step": step, "loss": str(loss), "in_a_row": n_bad})
    bar.write(f"stage {stage.index} step {step}: non-finite loss or gradient, step skipped")
    if n_bad >= cfg.max_nan_steps:
        shares = env.rank == 0 or env.fsdp
        path = save_checkpoint(cfg, model, opt, progress.position(stage), env.fsdp) if shares else None
        raise FloatingPointError(f"{n_bad} non-finite steps in a row at stage {stage.index} step {step}; "
                                 f"the last good weights are kept in {path}")


@torch.no_grad()
def validate(cfg, env, model, split, stage, progress, bar):
    """The loss on eval_batches fixed batches of val rows of the stage's tasks, logged (none of them: nothing)."""
    probs = split.weights(stage.tasks, required=False)
    if probs is None or not cfg.eval_batches:
        return
    model.eval()
    losses = []
    for j in range(cfg.eval_batches):  # fixed batches: no stage has 10**9 steps
        batch = get_batch(cfg, split, probs, model, stage, 10**9 + j, 0)
        with env.ctx:
            losses.append(model(batch["input_ids"].to(env.device), batch["inputs"],
                                labels=batch["labels"].to(env.device),
                                document_ids=texts_apart(cfg, stage, batch, model.tokenizer.bos_id))[1].item())
    model.train()
    env.log({**progress.position(stage), "val_loss": float(np.mean(losses))})
    if env.rank == 0:
        bar.write(f"stage {stage.index} step {progress.step}: val loss {np.mean(losses):.4f}")


def log_skills(env, model, split, stage, step, write=print):
    """Each answering step's accuracy on held-out people, the reading given (synthetic/skills.py), logged and written:
    in a stage with skill texts, at its end and every --skill_eval_interval steps (none without --skill_patients;
    under FSDP a rank cannot generate alone)."""
    if env.rank > 0 or env.fsdp or "skills" not in stage.tasks:
        return
    accuracy = skill_accuracy(model, split.rows)
    if accuracy:
        env.log({"event": "skills", "stage": stage.index, "step": step, "accuracy": accuracy})
        write(f"stage {stage.index} step {step} skills (held-out, reading given): " +
              ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))


class Meter:
    """Tokens and ECG-seconds trained on since the last log line, the time it took, and the share of it spent
    making batches (the device waits for them: a GPU that is kept busy has a small data_share)."""

    def __init__(self):
        self.t0, self.tokens, self.ecg_s, self.data_s = time.time(), 0, 0.0, 0.0

    def count(self, batch, pad_id, data_s):
        self.tokens += int((batch["input_ids"] != pad_id).sum())
        self.ecg_s += ecg_seconds(batch)
        self.data_s += data_s

    def rates(self, env):
        """Over all processes, since the last call; on a GPU also the peak memory so far in this phase."""
        dt = time.time() - self.t0
        out = {"tok_per_s": self.tokens * env.world / dt, "ecg_s_per_s": self.ecg_s * env.world / dt,
               "data_share": self.data_s / dt}
        if env.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.__init__()
        return out


def report_skipped(split, n_known, env, bar):
    """Log and name the rows found unusable since the last call (unreadable, too long). -> how many are known."""
    if len(split.bad) > n_known:
        new = list(split.bad.items())[n_known:]
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

    def position(self, stage):   # what the log and the checkpoints record of it
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
        with phase(env, f"stage {stage.index}"):
            if run_stage_and_check(cfg, env, model, data, stage, progress):
                return progress.losses, True
    return progress.losses, False


def run_stage_and_check(cfg, env, model, data, stage, progress):
    """A stage's steps, then what the model can do at its end: each skill's accuracy (stage 0 with skill texts) and
    a few generated val answers per task. -> True when --stop_after ended the run in it."""
    model.train()
    progress.step = 0
    if run_stage(cfg, env, model, data, stage, progress):
        return True
    progress.resume_stage = None
    log_skills(env, model, data["val"], stage, stage.steps)
    # under FSDP a rank cannot generate alone; the final evaluation, on the gathered model, still runs
    if env.rank == 0 and cfg.gen_eval_rows and stage.index > 0 and not env.fsdp:
        rows = rows_per_task([r for r in data["val"].rows if r["task"] in stage.tasks], cfg.gen_eval_rows)
        scores, _ = evaluate(model, rows, data["val"].inputs_of, cfg.batch_size, cfg.max_new_tokens)
        env.log({"event": "gen_eval", "stage": stage.index, "scores": scores})
        print_table(scores)
    return False


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(cfg, model, opt, position, sharded=False):
    """out_dir/checkpoints/step_N/: model.safetensors (LoRA unmerged), optimizer.safetensors, state.json (stage, step,
    config, python/numpy RNG) + rng.safetensors (torch RNG): safetensors and JSON only, nothing pickled. The folder
    appears by one rename, so a crash leaves the older checkpoints as they were. Under FSDP every process calls it
    and writes its own shards of the weights and the AdamW state; rank 0 writes the rest and renames."""
    root = Path(cfg.out_dir) / "checkpoints"
    rank = dist.get_rank() if sharded else 0
    bad = nonfinite_weights(model, sharded)
    if bad:   # never keep poisoned weights as "the last good ones"
        raise FloatingPointError(f"non-finite weights in {bad[:3]} ({len(bad)} tensors): no checkpoint written; "
                                 f"the newest one is {latest_checkpoint(cfg.out_dir)}")
    final = root / f"step_{position['global_step']:07d}"
    if final.exists():
        return final
    tmp = root / f".tmp_{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_*"):   # half-written by a run that was killed: never a checkpoint
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    if sharded:   # FSDP: each process's slices, written once the folder exists and all on disk before the rename
        dist.barrier()
        fsdp.save_shards(model, opt, tmp / "shards")
        dist.barrier()
        if rank:
            return final
    else:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        names = {p: n for n, p in model.named_parameters()}
        state = {f"{names[p]}::{k}": v.detach().cpu().contiguous() for p, s in opt.state.items() for k, v in s.items()}
        save_file(state, str(tmp / "optimizer.safetensors"))
    save_file(rng_states(next(model.parameters()).device), str(tmp / "rng.safetensors"))
    np_state = np.random.get_state()
    meta = {**position, "config": asdict(cfg), "python_rng": list(random.getstate()),
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, final)  # atomic: the checkpoint exists whole or not at all
    for old in sorted(root.glob("step_*"))[:-cfg.keep_ckpts]:
        shutil.rmtree(old)  # only after the new one is complete
    return final


def rng_states(device):
    """The CPU's torch RNG state and, on a GPU, the state of the one this process runs on (cuda:N, or MPS)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        states["mps"] = torch.mps.get_rng_state()
    return states


def nonfinite_weights(model, sharded=False):
    """Names of the weights holding NaN/Inf (FSDP: in any process's shard; every process gets the same list)."""
    names, params = zip(*model.named_parameters())
    ok = torch.stack([torch.isfinite(fsdp.local(p) if sharded else p).all() for p in params]).int()
    if sharded:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return [n for n, good in zip(names, ok.tolist()) if not good]


def load_checkpoint(path, model, opt, sharded=False, show=False):
    """Weights and optimizer state into a model/optimizer built for the same stage; every RNG. -> state.json"""
    if sharded:
        fsdp.load_shards(path / "shards", model, opt)
    else:
        load_model(model, str(path / "model.safetensors"))  # strict: mismatched keys are named
        params = dict(model.named_parameters())
        for key, v in load_file(str(path / "optimizer.safetensors")).items():
            name, k = key.split("::")
            opt.state[params[name]][k] = v.to(params[name].device) if k != "step" else v
    meta = json.loads((path / "state.json").read_text())
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    device = next(model.parameters()).device   # the GPU's own stream (dropout there), resumed on the same kind
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    elif device.type == "mps" and "mps" in rng:
        torch.mps.set_rng_state(rng["mps"])
    random.setstate((meta["python_rng"][0], tuple(meta["python_rng"][1]), meta["python_rng"][2]))
    n = meta["numpy_rng"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if show:
        print(f"resumed from {path} (stage {meta['stage']}, step {meta['step']})")
    return meta


# --------------------------------------------------------------------------- a run, phase by phase
# set-up, warm-up, stages (each step: forward/backward, update, logging, checkpoint), final evaluation, teardown
def setup(cfg):
    """Process group (under torchrun), device, weight dtype, autocast context, the log, and the checkpoint to resume
    from. Fails early on a bad --image_init or --llm folder."""
    check_config(cfg)
    is_fsdp = cfg.parallel == "fsdp"
    distributed = "RANK" in os.environ or is_fsdp
    device = choose_device(cfg.device, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    dtype, ctx = precision(cfg, device, distributed)
    if distributed:   # torchrun's processes; --parallel fsdp without torchrun: a group of one (FSDP on one GPU)
        alone = {} if "RANK" in os.environ else dict(rank=0, world_size=1, store=dist.HashStore())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **alone)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if cfg.grad_accum % world:   # 0, the default: one micro-batch per process
        raise ValueError(f"--grad_accum {cfg.grad_accum} must be a multiple of the {world} processes (or 0: one each)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.images and is_fsdp:   # batches with and without images would run different collectives
        raise ValueError("--images is not supported with --parallel fsdp yet; use ddp")
    if cfg.image_init and not cfg.images:
        raise ValueError("--image_init is the image encoder of --images; add --images")
    if cfg.image_root and not (cfg.images and cfg.data):
        raise ValueError("--image_root is where the --data rows' printouts are, for --images; add both")
    if cfg.image_root and not os.path.isdir(cfg.image_root):
        raise ValueError(f"--image_root {cfg.image_root}: no such folder")
    if cfg.llm:  # fail before the data is built if the folder is not a Llama-family checkpoint
        read_hf_config(cfg.llm), checkpoint_files(cfg.llm)
    env = SimpleNamespace(distributed=distributed, fsdp=is_fsdp, rank=rank, world=world, device=device, dtype=dtype,
                          ctx=ctx, out=Path(cfg.out_dir))
    open_run_folder(cfg, env)
    return env


def precision(cfg, device, distributed):
    """What the run computes in on this device: -> (weight dtype, autocast context). CUDA: bf16 autocast, fp32
    matmuls in TF32, and a pretrained --llm's weights in bf16 (FSDP keeps fp32 masters and computes in bf16 through
    its own policy, parallel/fsdp.py). MPS and the CPU: fp32 throughout (MPS's bf16 depends on the macOS version, and
    the tiny model gains little from it). Refuses what a device cannot run."""
    if device.type == "mps" and distributed:
        raise ValueError("torchrun / --parallel fsdp on MPS: PyTorch has no process-group backend for Apple GPUs (nccl "
                         "is CUDA's, gloo the CPU's); train in one process, or with --device cpu")
    cuda = device.type == "cuda"
    if cuda:   # TF32: fp32 matmuls on tensor cores, ~1e-3 relative error, as autocast's bf16 has more of
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    dtype = {"auto": torch.bfloat16 if cuda and cfg.llm and cfg.parallel != "fsdp" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    return dtype, ctx


def open_run_folder(cfg, env):
    """One run per out_dir. A new run refuses a folder an older run used (its log, checkpoints or model) unless
    --overwrite, which deletes them first; --resume continues that run. Rank 0 holds out_dir/.lock until the run
    ends, so a second run started in the same folder stops at once. Sets env.lock, env.log, env.resume_from."""
    out, env.lock = env.out, None
    used = [p.name for p in (out / "log.jsonl", out / "model", out / "checkpoints") if p.exists()]
    if used and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{out} holds an older run ({', '.join(used)}): continue it with --resume, replace it with "
                         "--overwrite, or choose another --out_dir")
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise FileNotFoundError(f"{out / 'checkpoints'}: --resume given but no checkpoint there (a run stopped before "
                                "its first checkpoint starts again with --overwrite)")
    if env.distributed:
        dist.barrier()   # every process has looked at the folder before rank 0 changes it
    if env.rank == 0:
        env.lock = lock_folder(out)
        try:
            clear_older_run(cfg, out, resume_from)
        except BaseException:
            env.lock.close()
            raise

    def log(record):  # one JSON object per line, appended (a resumed run continues the file)
        if env.rank == 0:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    env.log, env.resume_from, env.phases = log, resume_from, []
    log({"event": "config", **asdict(cfg), "world_size": env.world, "resume_from": str(resume_from or "")})
    if resume_from:
        try:
            check_resume(cfg, resume_from, log)
        except ValueError:
            release(env)
            raise


def lock_folder(out):
    """out_dir/.lock, created if need be and held (flock) by this process until it ends or closes it. -> the file"""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")
    except OSError as e:
        raise ValueError(f"{out}: cannot write there ({e.strerror}); choose another --out_dir") from None
    if fcntl is not None:   # POSIX; on Windows two runs in one folder are not caught
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise ValueError(f"{out}: another run (process {holder}) is using this folder; wait for it to end, or "
                             "choose another --out_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def clear_older_run(cfg, out, resume_from):
    """--overwrite: the older run's log, checkpoints, model and answers go. --resume: checkpoints newer than the one
    resumed from (damaged ones, see latest_checkpoint) are renamed damaged_step_N, out of the run's way."""
    if cfg.overwrite:
        for path in [out / "log.jsonl", out / "model", out / "checkpoints", *out.glob("test_*predictions.jsonl")]:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if resume_from:
        for newer in sorted(resume_from.parent.glob("step_*")):
            if newer.name > resume_from.name:
                newer.rename(newer.with_name("damaged_" + newer.name))


@contextlib.contextmanager
def phase(env, name):
    """Times one phase of the run (data, warm-up, a stage, the final evaluation) and logs it, with the peak memory it
    took on a GPU, so every run says where its minutes and its memory went (env.phases keeps them for the end)."""
    cuda = env.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(env.device)
    t0 = time.time()
    yield
    record = {"phase": name, "seconds": round(time.time() - t0, 2)}
    if cuda:
        record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(env.device) / 2**30, 3)
    env.phases.append(record)
    env.log({"event": "phase", **record})


def release(env):
    """Gives out_dir back: the lock closes (a process that ends releases it anyway)."""
    if env.lock is not None:
        env.lock.close()
        env.lock = None


def warm_up_encoder(cfg, model, env):
    """The warm-up (synthetic/warmup.py) with this run's settings: the encoder, and the image encoder unless it is a
    pretrained CLIP tower (kept as loaded, as in GEM). Every DDP rank trains the same copy (same seed)."""
    steps = cfg.encoder_warmup_steps
    wcfg = WarmupConfig(steps, cfg.encoder_warmup_lr, cfg.batch_size, cfg.train_patients, eval_every=steps,
                        seed=cfg.seed, held_out="val")
    image_encoder = model.image_encoder if cfg.images and not cfg.image_init else None
    warm_up(model.encoder, image_encoder, wcfg, env.out, env.log, show=env.rank == 0)


def gather_model(cfg, model, env):
    """FSDP, at the end: the whole weights in a fresh unsharded model on rank 0, which finish() saves and evaluates.
    -> it (None elsewhere)"""
    state = fsdp.full_state_dict(model, env.rank)
    if state is None:
        return None
    whole = build_model(cfg, model.tokenizer, env.device, env.dtype)
    for stage in curriculum(cfg):
        prepare_stage(whole, stage, cfg)   # the same LoRA adapters
    whole.load_state_dict(state)
    return whole


def finish(cfg, model, data, log):
    """The model folder for generate/eval.py, then the held-out tables (eval.evaluate_held_out): the answers, the
    ECG-blanked ablation, the follow-up questions and the chance level."""
    model.cache_encoder_tokens(0)   # encode as eval.py does, so its table is eval.py's on the saved model
    model.save(Path(cfg.out_dir) / "model")
    if cfg.llm and lora_layers(model.llm):   # the LoRA alone too, for peft users of the same --llm folder
        save_peft_adapter(model.llm, Path(cfg.out_dir) / "model" / "lora_adapter", base_model=cfg.llm)
    test = data["test"]
    evaluate_held_out(model, rows_per_task(test.rows, cfg.test_rows, cfg.test_rows_per_type), test.inputs_of,
                      data["train"].rows, test.rows, cfg.out_dir, log, cfg.batch_size, cfg.max_new_tokens)
    folder = Path(cfg.out_dir) / "model"
    print(f"\nmodel saved to {folder} (python generate.py --ckpt {folder} ...)")


def train(cfg):
    """One run, phase by phase. -> the finite training losses, step by step."""
    env = setup(cfg)                                                            # set-up
    data, ok = None, False
    try:
        with warnings.catch_warnings(), phase(env, "data"):
            warnings.simplefilter("ignore" if env.rank else "default")
            data = load_data(cfg, env.log, make_ahead=cfg.workers if env.device.type != "cpu" else 0)
        for stage in curriculum(cfg):   # every stage's task mix can be drawn from, before anything trains
            try:
                if stage.steps:
                    data["train"].weights(stage.tasks)
            except ValueError as e:
                raise ValueError(f"stage {stage.index} ({stage.name}): {e}; choose its tasks with "
                                 f"--stage{stage.index}_tasks, or --stage{stage.index}_steps 0 to skip it") from None
        model = build_model(cfg, build_tokenizer(cfg, data, env.rank), env.device, env.dtype)
        if warms_up_encoder(cfg) and not env.resume_from:                       # warm-up
            with phase(env, "warm-up"):
                warm_up_encoder(cfg, model, env)
        if cfg.grad_checkpoint:
            checkpoint_activations(model.llm)
        if cfg.compile and env.device.type == "mps":   # inductor's MPS backend is a prototype
            warnings.warn("--compile is skipped on MPS: torch.compile's Apple-GPU backend is not ready for training")
        elif cfg.compile:
            model.llm.compile()
        if env.fsdp:
            # a sharded model cannot grow: every stage's LoRA is added first (B = 0, so nothing changes until it
            # trains, though --lora_dropout masks are drawn from then on, unlike DDP's)
            for stage in curriculum(cfg):
                prepare_stage(model, stage, cfg)
            fsdp.shard(model, env.device)
        losses, stopped = run_stages(cfg, env, model, data)                      # stages
        if env.fsdp and not stopped:
            model = gather_model(cfg, model, env)
        if env.rank == 0 and not stopped:                                       # final evaluation
            with phase(env, "evaluation"):
                finish(cfg, model, data, env.log)
            print("time per phase: " + ", ".join(f"{p['phase']} {p['seconds']:.0f} s" for p in env.phases))
        ok = True
        return losses
    finally:                                                                    # teardown
        release(env)
        if data and data["train"].workers:
            data["train"].workers.shutdown(cancel_futures=True)
        if env.distributed:
            if ok:
                dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)   # python train.py > run.log: each line there as it is printed
    try:
        train(parse_config(usage=__doc__))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
