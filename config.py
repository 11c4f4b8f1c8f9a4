"""
config.py — every setting of a training run: the `Config` dataclass, whose fields are also the command-line flags
(and the keys of a --config JSON file), the presets that change the defaults (anyECG's recipe with --llm; an
untrained encoder trained in every stage), and the checks that refuse a value a run cannot work with, or a
--resume that would change what the run learns (a run's checkpoints: out_dir/checkpoints/step_N, train.py).

Precedence: defaults < preset < --config file < flags. `python train.py --help` lists every field with its help
text and default; the help is the field's metadata, written once, beside the field.
"""

import argparse
import difflib
import json
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

from safetensors import safe_open

from chat import FORMATS
from ecg_encoder import ENCODER_PRESETS, EncoderConfig


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    out_dir: str = arg("out", "where log.jsonl, checkpoints/ and model/ go")
    seed: int = arg(1337, "model init and the batch stream")
    device: str = arg("auto", "auto (CUDA, then Apple's MPS, then the CPU) | cpu | cuda | mps")
    parallel: str = arg("ddp", "how processes share the model: ddp (under torchrun, a whole copy each) | fsdp "
                               "(FSDP2: weights, gradients, AdamW state sharded; without torchrun a group of one)")
    # data: synthetic unless --data is given
    data: str = arg("", "JSON of training rows, anyECG-format or LLaVA-style (empty: synthetic ECGs)")
    ecg_root: str = arg("", "folder the rows' ecg_path values are relative to")
    test_data: str = arg("", "JSON of rows evaluated at the end (synthetic: the held-out split)")
    workers: int = arg(4, "processes reading records in parallel (real data; on a GPU also the synthetic training "
                          "records, made before the stages; 0 or 1: in the main process)")
    ecg_cache: int = arg(1024, "prepared records kept in memory (real data; the rest streams from disk)")
    token_cache: int = arg(100000, "a frozen encoder's tokens of this many ECGs kept, each encoded once (0: off)")
    train_patients: int = arg(1000, "synthetic patients for training (about 9 rows each)")
    val_patients: int = arg(40, "synthetic patients for validation loss and the in-training eval")
    test_patients: int = arg(640, "synthetic patients of the fixed held-out test split (about 60 long clips)")
    skill_patients: int = arg(3000, "synthetic patients whose truth makes stage 0's skill texts, 8 each (0: none; "
                                    "synthetic/skills.py)")
    read_first: bool = arg(True, "synthetic ECG-QA and multi-ECG answers write the ECGs' reading first")
    question_after_reading: bool = arg(False, "with read_first: the answer repeats the question after the reading "
                                              "(and stage 0's skill texts leave it out of the user turn)")
    worked_checks: bool = arg(True, "with read_first: the lookups an answer needs are written before it ('Check: "
                                    "af not in ECG1; ...'): a set comparison one finding at a time, a rhythm change "
                                    "one ECG at a time, a question about one finding in each ECG it asks about")
    # model
    llm: str = arg("", "Hugging Face LLM folder (Llama, Mistral, Qwen); empty: a tiny LLM from scratch (+ stage 0)")
    label_ecgs: bool = arg(True, "name each ECG of a multi-ECG prompt (ECG1:, ECG2:, ...) as questions and answers do")
    ecg_seconds: bool = arg(True, "state each ECG's length before its block, as answers write times ('(45.9s)'), so "
                                  "a span that lasts the whole record can end where it does")
    name_last_ecg: bool = arg(True, "with label_ecgs: the last block of several is named as the last ('ECG4 "
                                    "(10.0s, last):'), so a per-ECG answer stops after it")
    chat_format: str = arg("auto", "prompt layout: auto (the checkpoint's own: llama3, chatml) | nanoecg | llama3 | "
                                   "chatml")
    vocab_size: int = arg(1000, "sentencepiece vocabulary trained on the task text (from scratch)")
    phrases: bool = arg(True, "from scratch: tokenizer pieces may span spaces, so a finding's name ('Left bundle "
                              "branch block') is one piece and the texts a third shorter (model.train_tokenizer)")
    dim: int = arg(192, "tiny LLM width")
    n_layers: int = arg(4, "tiny LLM depth")
    n_heads: int = arg(4, "tiny LLM attention heads")
    n_kv_heads: int = arg(2, "tiny LLM key/value heads (grouped-query attention)")
    max_seq_len: int = arg(512, "context length (text + ECG tokens)")
    encoder: str = arg("tiny", "ECG encoder preset: tiny | base (anyECG's ViT-Base shape)")
    encoder_dim: int = arg(0, "override the preset's width (0: keep)")
    encoder_layers: int = arg(0, "override the preset's depth (0: keep)")
    encoder_init: str = arg("", "encoder weights to start from (safetensors with its config: "
                                "python -m synthetic.warmup --save)")
    images: bool = arg(False, "GEM's image modality: report + grounded rows also from paper printouts")
    image_init: str = arg("", "with --images: a Hugging Face CLIP folder, kept frozen (GEM: CLIP ViT-L/336)")
    image_root: str = arg("", "with --images --data: the folder the rows' image paths are under (default: each "
                              "printout drawn from the row's record)")
    encoder_warmup_steps: int = arg(900, "synthetic data: first the encoder alone learns the truth (0: off)")
    encoder_warmup_lr: float = arg(1e-3, "learning rate of the encoder warm-up")
    lora_targets: str = arg("q_proj,k_proj", "LLM linears that get LoRA (anyECG: q_proj,k_proj)")
    lora_r: int = arg(8, "LoRA rank")
    lora_alpha: float = arg(16.0, "LoRA scale numerator (scale = alpha / r)")
    lora_dropout: float = arg(0.1, "dropout on the LoRA input")
    # curriculum. tasks: comma list of task[:weight] or "all"; train: parts of encoder,projector,llm,lora
    stage0_steps: int = arg(1150, "language pretraining steps, task text and skill texts (skipped with --llm)")
    stage0_lr: float = arg(2e-3, "stage 0 peak learning rate")
    text_batch: int = arg(64, "stage 0: texts per step, packed end to end in rows of text_row_len (0: batch_size rows)")
    text_row_len: int = arg(256, "stage 0: the length of the rows texts are packed into, at most max_seq_len (0: "
                                 "max_seq_len); the default holds the longest synthetic text, and half the length "
                                 "halves the attention each text pays for those packed before it")
    pack_alone: bool = arg(False, "stage 0: each packed text attends to itself alone, not to those before it in its "
                                  "row (not the default: docs/RESULTS.md, 'Each packed text attended to itself')")
    stage0_tasks: str = arg("all,skills", "stage 0 text comes from these tasks (skills: synthetic/skills.py's)")
    stage0_train: str = arg("llm", "stage 0 trainable parts")
    stage1_steps: int = arg(250, "report stage steps")
    stage1_lr: float = arg(1e-3, "stage 1 peak learning rate")
    stage1_tasks: str = arg("report", "stage 1 task mix")
    stage1_train: str = arg("projector,llm", "stage 1 trainable parts (+ encoder if untrained; --llm: anyECG's)")
    stage2_steps: int = arg(200, "localization stage steps")
    stage2_lr: float = arg(1e-3, "stage 2 peak learning rate")
    stage2_tasks: str = arg("report,location:2,location_long:4", "stage 2 task mix")
    stage2_train: str = arg("projector,llm", "stage 2 trainable parts (as stage 1)")
    stage3_steps: int = arg(700, "all-task stage steps")
    stage3_lr: float = arg(1e-3, "stage 3 peak learning rate")
    stage3_tasks: str = arg("report,grounded,ecgqa,location,location_long:4,multi:4",
                            "stage 3 task mix (weights per row: the few long clips and multi-ECG rows 4x; "
                            "skills:0.12 adds stage 0's skill texts as a fifth of the rows)")
    stage3_train: str = arg("projector,llm", "stage 3 trainable parts (as stage 1)")
    # optimization
    batch_size: int = arg(16, "examples per micro-batch (per process)")
    bucket_steps: int = arg(8, "steps drawn from one length-sorted pool of rows (1: no length grouping)")
    grad_accum: int = arg(0, "micro-batches per optimizer step, over all processes (0: one per process)")
    weight_decay: float = arg(0.01, "AdamW decay on matrices (never on norms and biases)")
    beta2: float = arg(0.99, "AdamW beta2")
    warmup_frac: float = arg(0.1, "linear warmup, share of each stage's steps")
    min_lr_frac: float = arg(0.1, "cosine decays to this share of the peak")
    grad_clip: float = arg(1.0, "clip the global gradient norm (0: off)")
    max_nan_steps: int = arg(3, "stop (checkpoint kept) after this many non-finite steps in a row")
    dtype: str = arg("auto", "weights: auto (fp32, bf16 for --llm on CUDA) | float32 | bfloat16")
    compile: bool = arg(False, "torch.compile the LLM")
    grad_checkpoint: bool = arg(False, "recompute LLM activations in backward (less memory)")
    # logging, evaluation, checkpoints
    log_interval: int = arg(10, "steps between log lines")
    eval_interval: int = arg(200, "steps between validation losses")
    eval_batches: int = arg(4, "micro-batches per validation loss")
    skill_eval_interval: int = arg(0, "steps between each skill's held-out accuracy, in a stage with skill texts "
                                      "(0: at the stage's end only)")
    gen_eval_rows: int = arg(4, "val rows per task generated at each stage's end (0: off)")
    test_rows: int = arg(150, "held-out rows per task evaluated at the end (0: all)")
    test_rows_per_type: int = arg(40, "ECG-QA and multi: held-out rows per question type instead (0: test_rows)")
    max_new_tokens: int = arg(256, "generation budget in evaluation")
    ckpt_interval: int = arg(500, "steps between checkpoints (and one at each stage end)")
    keep_ckpts: int = arg(2, "checkpoint folders kept")
    resume: bool = arg(False, "continue the run in out_dir from its newest checkpoint, with its config")
    overwrite: bool = arg(False, "start a new run in an out_dir an older run used, deleting its log, checkpoints and "
                                 "model (its tokenizer and warm-up file are reused only if made by the same settings)")
    stop_after: int = arg(0, "stop (checkpoint written) after this many steps in this run (0: never)")


# anyECG's recipe, applied when --llm is given (explicit flags still win)
ANYECG = dict(stage1_lr=1e-4, stage2_lr=1e-4, stage3_lr=1e-4, weight_decay=1e-4, beta2=0.999, encoder="base",
              stage1_train="encoder,projector", stage2_train="encoder,projector,lora",
              stage3_train="encoder,projector,lora")
# What --resume lets a flag change: how the run logs, evaluates, checkpoints and where it runs, never what it learns.
RESUME_SAFE = ("out_dir", "resume", "overwrite", "stop_after", "device", "workers", "ecg_cache", "compile",
               "grad_checkpoint", "log_interval", "eval_interval", "eval_batches",
               "skill_eval_interval", "gen_eval_rows", "test_rows",
               "max_new_tokens", "ckpt_interval", "keep_ckpts", "max_nan_steps", "test_data")
# An encoder that nothing trained before the curriculum learns in the stages (see encoder_pretrained)
UNTRAINED_ENCODER = dict.fromkeys(("stage1_train", "stage2_train", "stage3_train"), "encoder,projector,llm")


def warms_up_encoder(cfg):
    """Does the run start with the encoder warm-up? Only on synthetic data (it needs the generator's truth), and not
    when --encoder_init brings an encoder already trained."""
    return bool(cfg.encoder_warmup_steps) and not cfg.data and not cfg.encoder_init


def encoder_pretrained(cfg):
    """Is the encoder trained before the curriculum (warmed up, or --encoder_init)? Such an encoder stays frozen in
    the stages: training it on through the LLM's loss adds little and doubles the cost of a step."""
    return bool(cfg.encoder_init) or warms_up_encoder(cfg)


def encoder_config(cfg):
    """The EncoderConfig of --encoder with --encoder_dim / --encoder_layers over it (an encoder built here, not one
    --encoder_init brings)."""
    over = {k: v for k, v in [("d_model", cfg.encoder_dim), ("n_layers", cfg.encoder_layers)] if v}
    return EncoderConfig(**ENCODER_PRESETS[cfg.encoder] | over)


def _bool(s):
    if str(s).lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")
    return str(s).lower() in ("1", "true", "yes", "on")


def _unknown_key(key, source):
    names = [f.name for f in fields(Config)]
    close = difflib.get_close_matches(key.replace("-", "_"), names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see python train.py --help"
    return ValueError(f"{source}: unknown config key {key!r}{hint}")


def parse_config(argv=None, usage=__doc__):
    """defaults < preset (--llm: anyECG's; an untrained encoder: trained in every stage) < --config < flags.
    usage: the text --help shows above the flags (train.py passes its own docstring)."""
    p = argparse.ArgumentParser(prog="train.py", description=usage, allow_abbrev=False,
                                argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="--resume continues with the config saved in the checkpoint; beside it only "
                                       f"these fields may change: {', '.join(RESUME_SAFE)}")
    p.add_argument("--config", help="JSON file of config fields (read as data)")
    for f in fields(Config):
        flags = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
        kind = dict(type=_bool, nargs="?", const=True) if f.type is bool else dict(type=f.type)   # --images = true
        p.add_argument(*flags, dest=f.name, help=f"{f.metadata['help']} (default: {f.default})", **kind)
    args, unknown = p.parse_known_args(argv)
    for u in unknown:
        raise _unknown_key(u.split("=")[0].lstrip("-"), "command line") if u.startswith("--") else \
            ValueError(f"command line: unexpected argument {u!r}")
    given = vars(args)
    from_file = read_config_file(given.pop("config")) if "config" in given else {}
    merged = {**from_file, **given}
    if merged.get("resume"):   # the run's own config, then what was given now (setup refuses unsafe changes)
        saved = saved_config(latest_checkpoint(merged.get("out_dir", Config.out_dir)))
        return Config(**{**saved, "stop_after": 0, "overwrite": False, **merged})
    first = Config(**merged)
    preset = ANYECG if first.llm else {} if encoder_pretrained(first) else UNTRAINED_ENCODER
    return Config(**{**preset, **merged})


def latest_checkpoint(out_dir):
    """The newest intact checkpoint folder of the run in out_dir, or None. A damaged newer one (a file cut off by a
    full disk, a state.json edited by hand) is passed over, with a warning naming it and why."""
    for path in sorted((Path(out_dir) / "checkpoints").glob("step_*"), reverse=True):  # temp folders start with "."
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(f"{path} is damaged ({problem}): passed over for the checkpoint before it")
    return None


def checkpoint_problem(path):
    """Why a checkpoint folder cannot be resumed from (None: it can): a state.json or weight file that does not
    read whole (safetensors checks its header against the file's length)."""
    try:
        json.loads((path / "state.json").read_text())["config"]
        for file in sorted(path.rglob("*.safetensors")):
            with safe_open(file, "pt"):
                pass
    except Exception as e:   # OSError, JSON, a missing key, safetensors' own error: each means "do not resume here"
        return f"{type(e).__name__}: {e}"
    return None


# A checkpoint saved before one of these fields existed ran without what it turns on, and resumes so.
BEFORE_THE_FIELD = dict(phrases=False, ecg_seconds=False, name_last_ecg=False, text_row_len=0)


def saved_config(checkpoint):
    """The config fields a checkpoint's state.json holds ({} without a checkpoint: setup says so)."""
    if checkpoint is None:
        return {}
    names = {f.name for f in fields(Config)}
    saved = json.loads((checkpoint / "state.json").read_text())["config"]
    return {**BEFORE_THE_FIELD, **{k: v for k, v in saved.items() if k in names}}


def check_resume(cfg, checkpoint, log):
    """A resumed run is the run that was started: fields outside RESUME_SAFE that differ from the checkpoint's
    config are refused, all in one message; safe changes are logged."""
    saved = saved_config(checkpoint)
    changes = [(k, v, getattr(cfg, k)) for k, v in saved.items() if v != getattr(cfg, k)]
    refused = [f"{k}: {old!r} -> {new!r}" for k, old, new in changes if k not in RESUME_SAFE]
    if refused:
        raise ValueError(f"{checkpoint}: --resume continues the run saved there, and these fields would change it: "
                         f"{'; '.join(refused)}. Drop those flags, or start a new run in another --out_dir.")
    if changes:
        log({"event": "resume_changes", "changes": {k: [old, new] for k, old, new in changes}})


def read_config_file(path):
    """A JSON object of config fields, each converted to its field's type (never executed)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read config JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of config fields")
    kinds = {f.name: f.type for f in fields(Config)}
    for k, v in raw.items():
        if k not in kinds:
            raise _unknown_key(k, path)
        # JSON types as the command line takes them: no bool for a number, no float for an int, no null
        fits = kinds[k] is bool if isinstance(v, bool) else isinstance(v, (int, float) if kinds[k] is float
                                                                        else kinds[k])
        if not fits:
            raise ValueError(f"{path}: {k} must be {kinds[k].__name__}, got {json.dumps(v)}")
    return {k: kinds[k](v) for k, v in raw.items()}


def check_config(cfg):
    """Every value a run cannot work with, named in one error before anything is built."""
    counts = ("batch_size", "bucket_steps", "log_interval", "eval_interval", "ckpt_interval",
              "keep_ckpts", "max_new_tokens", "max_seq_len", "dim", "n_layers", "n_heads", "n_kv_heads",
              "max_nan_steps", "lora_r")
    patients = () if cfg.data else ("train_patients", "val_patients", "test_patients")   # synthetic: each split some
    rules = [("at least 1", lambda v: v >= 1, counts + patients),
             ("not negative", lambda v: v >= 0, ("encoder_warmup_steps", "stage0_steps", "stage1_steps", "stage2_steps",
                                                 "stage3_steps", "test_rows", "test_rows_per_type", "stop_after",
                                                 "grad_accum", "eval_batches", "gen_eval_rows", "workers",
                                                 "token_cache", "skill_patients", "text_batch",
                                                 "text_row_len")),
             ("above 0", lambda v: v > 0, ("stage0_lr", "stage1_lr", "stage2_lr", "stage3_lr", "encoder_warmup_lr")),
             ("in [0, 1)", lambda v: 0 <= v < 1, ("warmup_frac", "min_lr_frac"))]
    bad = [f"--{k} {getattr(cfg, k)}: {rule}" for rule, ok, names in rules for k in names if not ok(getattr(cfg, k))]
    if cfg.resume and cfg.overwrite:
        bad.append("--resume and --overwrite: choose one (continue the run in out_dir, or replace it)")
    if cfg.parallel not in ("ddp", "fsdp"):
        bad.append(f"--parallel {cfg.parallel}: ddp or fsdp")
    if cfg.chat_format not in ("auto", *FORMATS):
        bad.append(f"--chat_format {cfg.chat_format}: auto, {', '.join(FORMATS)}")
    if cfg.encoder not in ENCODER_PRESETS:
        bad.append(f"--encoder {cfg.encoder}: {' or '.join(ENCODER_PRESETS)}")
    elif not cfg.encoder_init:
        try:
            encoder_config(cfg)
        except ValueError as e:
            hint = " (base is --llm's preset; --encoder tiny is the small one)" if cfg.llm else ""
            bad.append(f"--encoder {cfg.encoder} --encoder_dim {cfg.encoder_dim}: {e}{hint}")
    if bad:
        raise ValueError("config: " + "; ".join(bad))
