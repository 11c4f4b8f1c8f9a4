"""
bench/gpu.py — the one-GPU check: every figure a student with a GPU asks for, from one command, in one table.

    python -m bench.gpu                       # on a CUDA machine: about 10 minutes (--budget), everything below
    python -m bench.gpu --smoke               # the same code at a toy size on whatever is here (CPU: ~1 minute)
    python -m bench.gpu --estimate configs/gpu24.json   # a config's FLOPs, counted on the CPU, and its GPU time

Rows, each measured here unless it says "estimated":
  default run   `python train.py` (the README's first command) as a subprocess: wall time, time and peak GPU memory
                per phase, the share of step time spent making batches (the GPU waits for them), the test table's
                main figure per task with its 95 % interval. If it outlasts the budget it is stopped, and the table
                says which phases finished.
  LLM           a training step (tokens/s, MFU against the GPU's dense bf16 peak) and cached decode at batch 1 and
                8, nanoECG's LLM against transformers' LlamaForCausalLM on the same random checkpoint (bench/speed.py;
                without transformers installed ours is timed alone: it is a test requirement, not a run one)
  encoder       one single-lead ECG from 10 s to 1 h: time and peak memory; a mixed batch windowed vs zero-padded
  FSDP          the same few steps by `train.py` plain and under `--parallel fsdp` in a process group of one
  data          records/s the reader gives (1 and 4 processes) against the rows/s the default run's steps take
On a machine without CUDA the same code runs on the CPU (or Apple's MPS) at toy sizes, and the table's header says
which device gave it.
The table is printed and written to --out as table.md (for docs/RESULTS.md) and table.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

import train
from bench.speed import bench_encoder, bench_llm, bench_read, count_flops, llm_args, peak_flops
from config import parse_config
from data import STANDARD_LEADS
from model import choose_device

ROOT = Path(__file__).resolve().parent.parent

# the check at two sizes: a CUDA GPU's (the real figures) and a smoke one (the same code in about a minute)
SIZES = {
    "gpu": dict(run=[], durations=(10, 60, 600, 3600), llm=dict(dtype="bf16"), fsdp_steps=20, records=400,
                workers=(1, 4), fsdp=["--train_patients", "100", "--test_patients", "8"]),   # steps, not data
    "smoke": dict(run=["--dim", "32", "--n_layers", "1", "--n_heads", "2", "--n_kv_heads", "1", "--vocab_size", "400",
                       "--encoder_dim", "32", "--encoder_layers", "1", "--batch_size", "4", "--train_patients", "12",
                       "--skill_patients", "10", "--val_patients", "2", "--test_patients", "8",
                       "--encoder_warmup_steps", "4",
                       "--stage0_steps", "3", "--stage1_steps", "3", "--stage2_steps", "3", "--stage3_steps", "3",
                       "--test_rows", "2", "--test_rows_per_type", "1", "--max_new_tokens", "8",
                       "--gen_eval_rows", "0", "--log_interval", "1"],
                  durations=(10, 60), llm=dict(dtype="fp32", vocab=500, dim=64, ffn=172, layers=2, heads=4,
                                               kv_heads=2, train_batch=2, train_len=64, new_tokens=8, reps=2,
                                               decode_batches=[1, 8]),
                  fsdp_steps=4, records=24, workers=(1, 2), fsdp=[]),
}
# --------------------------------------------------------------------------- train.py as a subprocess
def run_train(flags, out, timeout):
    """`python train.py --out_dir out/run FLAGS` in a subprocess, its output in out/train.txt.
    -> (wall seconds, the run's log records, finished within timeout)"""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / "train.txt", "w") as f:
        try:
            done = subprocess.run([sys.executable, "train.py", "--out_dir", str(out / "run"), "--overwrite", *flags],
                                  cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            done = None
    if done is not None and done.returncode:
        tail = (out / "train.txt").read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"train.py failed ({out / 'train.txt'}): " + " | ".join(tail))
    return time.time() - t0, read_log(out), done is not None


def read_log(out):
    """The records of the run train.py wrote under out (none if it wrote no log)."""
    log = out / "run" / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def seconds_per_step(records, stage):
    """Median seconds between consecutive logged steps of a stage (its log lines' clock), per step."""
    lines = [r for r in records if r.get("stage") == stage and "loss" in r and "event" not in r]
    gaps = [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(lines, lines[1:]) if b["step"] > a["step"]]
    return statistics.median(gaps) if gaps else None


def default_run_rows(size, device, out, timeout):
    """The README's first command on this device: wall time, phases, batches' share of step time, the test table."""
    wall, records, finished = run_train(["--device", device.type, *size["run"]], out / "default", timeout)
    phases = [r for r in records if r.get("event") == "phase"]
    rows = [("default run", "wall time", f"{wall:.0f} s" + ("" if finished else
            f" (stopped at the budget; finished: {', '.join(p['phase'] for p in phases) or 'none'})"))]
    for p in phases:
        mem = f", peak {p['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in p else ""
        rows.append(("default run", f"phase {p['phase']}", f"{p['seconds']:.3g} s{mem}"))
    shares = [r["data_share"] for r in records if "data_share" in r and "event" not in r]
    if shares:
        rows.append(("default run", "batch making, share of step time", f"{statistics.mean(shares):.1%} mean, "
                     f"{max(shares):.1%} at most (of {len(shares)} log intervals)"))
    test = next((r["scores"] for r in records if r.get("event") == "test"), {})
    for task, s in test.items():
        if "main" in s:
            m = s["main"]
            rows.append(("default run", f"test {task}: {m['metric']}",
                         f"{m['value']:.3f} [{m['interval95'][0]:.3f}, {m['interval95'][1]:.3f}] (n {s['n']})"))
    return rows


# --------------------------------------------------------------------------- the parts
def llm_rows(size, device):
    """A training step and cached decode: ours against transformers (bench/speed.py), with MFU on a known GPU."""
    defaults = vars(llm_args(argparse.ArgumentParser()).parse_args([]))   # `python -m bench.speed llm`'s sizes
    args = SimpleNamespace(**{**defaults, **size["llm"], "device": str(device)})
    if device.type != "cuda":
        args.dtype = "fp32"   # bf16 matmuls on a CPU are emulated: a figure of nothing a user runs
    rows = []
    for name, ours, hf, mfu in bench_llm(args):
        theirs = f", transformers {hf:,.0f} ({ours / hf:.2f}x)" if hf else ", transformers not installed"
        rows.append(("LLM", f"{name}, {args.dtype}", f"{ours:,.0f} tok/s{theirs}"))
        if mfu is not None:
            rows.append(("LLM", f"{name}, MFU", f"{mfu:.1%} of {peak_flops(device) / 1e12:.0f} TFLOP/s (bf16 peak)"))
    return rows


def encoder_rows(size, device):
    results, mixed = bench_encoder(device.type, size["durations"], ["tiny"])
    mem = "peak memory" if device.type == "cuda" else "peak RSS rise"
    rows = [("encoder", f"one 1-lead ECG of {r['seconds']:g} s",
             f"{1e3 * r['time_s']:.1f} ms ({1e3 * r['time_s'] / r['seconds']:.3f} ms per ECG-s), "
             f"{mem} {r['peak_bytes'] / 2**20:.1f} MiB") for r in results]
    (_, _, _, windowed), (_, _, _, padded) = mixed[0], mixed[-1]
    rows.append(("encoder", "mixed batch of 8 (8 s to 600 s)", f"windowed {windowed:.3f} s, zero-padded {padded:.3f} s"))
    return rows


def fsdp_rows(size, device, out):
    """A few stage-1 steps of the default model plain and sharded by FSDP2 in a process group of one."""
    steps = size["fsdp_steps"]
    flags = ["--device", device.type, *size["run"], *size["fsdp"], "--encoder_warmup_steps", "0", "--stage0_steps", "0",
             "--skill_patients", "0",
             "--stage1_steps", str(steps), "--stage2_steps", "0", "--stage3_steps", "0", "--log_interval", "1",
             "--eval_batches", "0", "--gen_eval_rows", "0", "--test_rows", "1", "--test_rows_per_type", "1",
             "--max_new_tokens", "4", "--ckpt_interval", "100000"]
    rows = []
    for name, extra in [("plain", []), ("FSDP2, group of one", ["--parallel", "fsdp"])]:
        _, records, _ = run_train(flags + extra, out / f"fsdp_{extra[-1] if extra else 'plain'}", timeout=600)
        mem = [r["peak_mem_gib"] for r in records if "peak_mem_gib" in r and "event" not in r]
        per_step = seconds_per_step(records, 1)
        rows.append(("FSDP", f"{steps} stage-1 steps, {name}", f"{1e3 * per_step:.0f} ms a step" +
                     (f", peak {max(mem):.2f} GiB" if mem else "")))
    return rows


def data_rows(size, out):
    """Records/s the reader gives, against the rows/s the default run's stage-3 steps take (real data: one record a
    row, except multi-ECG rows)."""
    records = read_log(out / "default")
    per_step = seconds_per_step(records, 3)
    batch = next((r["batch_size"] for r in records if r.get("event") == "config"), 16)
    rows = [("data", "rows/s the stage-3 steps take", f"{batch / per_step:.0f} (batch {batch}, {1e3 * per_step:.0f} ms "
             "a step)" if per_step else "not measured (no stage-3 steps logged)")]
    for n, rate in bench_read(size["records"], size["workers"]):
        rows.append(("data", f"PTB-XL-sized records read, {n} process{'es' if n > 1 else ''}", f"{rate:.0f} records/s"))
    return rows


# --------------------------------------------------------------------------- a config's cost, counted on the CPU
def run_flops(flags):
    """FLOPs of a train.py run, counted by torch's FlopCounterMode on batches of each phase (the CPU is enough: a
    count does not depend on the device) and multiplied by its steps. The final evaluation (generation) is left
    out. -> [(phase, steps, FLOPs a step)]"""
    cfg = parse_config([*flags, "--device", "cpu", "--out_dir", str(ROOT / "runs" / "flop_count"), "--overwrite"])
    # enough rows to draw batches of every task (a batch's FLOPs do not depend on how many people there are)
    cfg.train_patients, cfg.val_patients, cfg.test_patients = 200, 4, 4
    cfg.skill_patients = min(cfg.skill_patients, 200)
    with warnings.catch_warnings():   # a small tokenizer's warnings: its size barely moves the count
        warnings.simplefilter("ignore")
        data = train.load_data(cfg, lambda record: None)
        model = train.build_model(cfg, train.build_tokenizer(cfg, data, 0), torch.device("cpu"), torch.float32)
    out = []
    if train.warms_up_encoder(cfg):   # forward + backward of a batch of 10 s 12-lead ECGs: 3x the forward
        x, leads = [torch.randn(12, 10 * model.encoder.cfg.fs)] * cfg.batch_size, [STANDARD_LEADS] * cfg.batch_size
        out.append(("warm-up", cfg.encoder_warmup_steps, 3 * count_flops(lambda: model.encoder(x, leads))))
    for stage in train.curriculum(cfg):
        if not stage.steps:
            continue
        train.prepare_stage(model, stage, cfg)
        probs, flops = data["train"].weights(stage.tasks), []
        for step in range(3):   # batches differ in length: the mean of three
            batch = train.get_batch(cfg, data["train"], probs, model, stage, step, 0)
            flops.append(count_flops(lambda: model(batch["input_ids"], batch["inputs"],
                                                   labels=batch["labels"])[1].backward()))
        out.append((f"stage {stage.index}", stage.steps, statistics.mean(flops)))
    return out


def estimate_rows(flags, name, rate=25e12, step_floor=0.03):
    """A config's training FLOPs and its GPU time at `rate` FLOP/s achieved (25 TFLOP/s: a fifth of the dense bf16
    peak of a 24 GB L4 or A10, about what rows of a few hundred tokens through a 768-wide model get), or at least
    step_floor seconds a step (the kernel launches and Python a small model's step cannot go under). Estimated, not
    measured: the check on a GPU measures the default run's time."""
    phases = run_flops(flags)
    total, steps = sum(n * f for _, n, f in phases), sum(n for _, n, _ in phases)
    rows = [("estimate", f"{name}: {p}", f"{n} steps x {f / 1e12:.3f} TFLOP") for p, n, f in phases]
    minutes = max(total / rate, steps * step_floor) / 60
    rows.append(("estimate", f"{name}: training", f"{total / 1e12:,.0f} TFLOP, {steps} steps: ~{minutes:.0f} min at "
                 f"{rate / 1e12:.0f} TFLOP/s or {1e3 * step_floor:.0f} ms a step (estimated)"))
    return rows


# --------------------------------------------------------------------------- the check
def device_line(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        "Apple GPU (MPS)" if device.type == "mps" else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return f"{name}; torch {torch.__version__}, CUDA {torch.version.cuda}; commit {commit.strip() or 'unknown'}"


def check(device, smoke, out, budget):
    """Every part in turn, cheapest first, the default run last with what is left of the budget. A part that fails
    is a row saying so, and the others still run. -> (rows, failures)"""
    size, t0, rows, failed = SIZES["smoke" if smoke else "gpu"], time.time(), [], []

    def part(name, fn):
        try:
            rows.extend(fn())
        except Exception as e:   # noqa: BLE001 -- a CUDA failure is a finding: reported, the rest still runs
            traceback.print_exc()
            rows.append((name, "FAILED", f"{type(e).__name__}: {str(e)[:200]}"))
            failed.append(name)

    part("LLM", lambda: llm_rows(size, device))
    part("encoder", lambda: encoder_rows(size, device))
    part("FSDP", lambda: fsdp_rows(size, device, out))
    part("default run", lambda: default_run_rows(size, device, out, max(60, budget - (time.time() - t0))))
    part("data", lambda: data_rows(size, out))
    return rows, failed


def write_table(rows, header, out):
    lines = [header, "", "| part | measure | value |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps({"device": header, "rows": rows}, indent=1) + "\n")
    width = max(len(f"{a}: {b}") for a, b, _ in rows)
    print(f"\n{header}")
    for a, b, c in rows:
        print(f"{f'{a}: {b}':<{width}}  {c}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then the CPU) | cuda | mps | cpu")
    p.add_argument("--smoke", action="store_true", help="toy sizes (the default without CUDA): the code, not figures")
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole check; the default run gets what "
                                                              "the other parts leave")
    p.add_argument("--out", default="runs/gpu_check", help="folder for the runs and table.md / table.json")
    p.add_argument("--estimate", metavar="CONFIG", help="instead: a config file's FLOPs and GPU time, estimated")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.estimate:
        rows = estimate_rows([], "default") + estimate_rows(["--config", args.estimate], Path(args.estimate).stem)
        write_table(rows, "Estimated from FLOPs counted on the CPU (nothing run on a GPU)", out)
        return rows, []
    device = choose_device(args.device)
    smoke = args.smoke or device.type != "cuda"
    header = f"{'Smoke run (toy sizes: the code, not figures)' if smoke else 'GPU check'} on {device_line(device)}"
    print(header)
    rows, failed = check(device, smoke, out, args.budget)
    write_table(rows, header, out)
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (tracebacks above; table in {out / 'table.md'})")
    return rows, failed


if __name__ == "__main__":
    main()
