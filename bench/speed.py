"""
bench/speed.py — how fast, measured side by side in one run (these machines are shared and noisy, so a figure is
only ever compared with one taken beside it).

  encoder   time and peak memory of one single-lead ECG from 10 s to 1 h (time per ECG-second should be flat,
            memory linear), and a batch of mixed-length ECGs, windowed against zero-padded to the longest
  llm       a training step (forward + backward) and cached greedy decode, nanoECG's LLM against transformers'
            LlamaForCausalLM on the same random checkpoint, timed in turns (needs transformers); on CUDA also MFU
  speed     both, in one table set against the design's targets
  read      records/s reading PTB-XL-sized records through the training reader, in one process or several

    python -m bench.speed encoder [--device cpu|cuda] [--durations 10,60,600,3600] [--presets tiny,base]
    python -m bench.speed llm [--device cpu|cuda] [--dtype fp32|bf16]
    python -m bench.speed speed [--device cpu|cuda]
    python -m bench.speed read [--records 400] [--workers 1,2,4]
"""
import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch.utils import flop_counter
from tqdm import tqdm

from data import STANDARD_LEADS, RowECGReader
from ecg_encoder import ENCODER_PRESETS, ECGEncoder, EncoderConfig
from model import LLM, LLMConfig, generate, synchronize


# --------------------------------------------------------------------------- measuring
def timed(fn, device):
    """Wall time of one call of fn(), with the GPU's queue drained before and after."""
    device = torch.device(device)
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def median_time(fn, device, min_reps=3, min_time_s=1.0, max_time_s=60.0):
    """Median wall time of fn() over at least min_reps runs (more while under min_time_s)."""
    times = []
    while len(times) < min_reps or (sum(times) < min_time_s and len(times) < 100):
        times.append(timed(fn, device))
        if sum(times) > max_time_s:
            break
    return statistics.median(times)


def count_flops(fn):
    """FLOPs of fn() as counted by torch's FlopCounterMode. Its table lacks the CPU
    flash-attention op, so we add it: attention is exactly what windows keep small."""
    def sdpa_cpu(q, k, v, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(q, k, v)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        fn()
    return fc.get_total_flops()


def _rss_kib(field):  # current (VmRSS) or peak (VmHWM) resident memory of this process
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])


def peak_bytes(fn, device):
    """Memory fn() needs above what is allocated before it: CUDA's allocator peak, or on the
    CPU the rise of this process's peak resident memory (VmHWM, reset first)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        rest = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - rest
    if not os.path.exists("/proc/self/status"):   # macOS has no /proc: not measured there
        fn()
        return float("nan")
    rest = _rss_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak) to the current RSS
    fn()
    return _rss_kib("VmHWM") * 1024 - rest


def in_fresh_process(fn, *args, env=None):
    """fn(*args) in a new process, so its memory figures are its own."""
    old = dict(os.environ)
    os.environ.update(env or {})  # a spawned child reads these at start-up
    try:
        with mp.get_context("spawn").Pool(1) as pool:
            return pool.apply(fn, args)
    finally:
        os.environ.clear()
        os.environ.update(old)


# dense bf16 peaks from the vendors' spec sheets (no sparsity), matched on the name torch reports, first match wins
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "T4": 65e12}


def peak_flops(device):
    """A CUDA GPU's dense bf16 peak in FLOP/s, or None (not CUDA, or not in PEAK_BF16: MFU is then not given)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# --------------------------------------------------------------------------- the encoder
def _measure_one(preset, seconds, device, threads, what):
    """One ECG of `seconds`, in a fresh process: FLOPs and peak memory (what="memory") or median time ("time")."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    enc = ECGEncoder(EncoderConfig(**ENCODER_PRESETS[preset])).to(device).eval()
    x = torch.randn(1, round(seconds * enc.cfg.fs), device=device)
    run = lambda: enc([x], [["II"]])  # noqa: E731
    with torch.no_grad():
        flops = count_flops(run)  # doubles as the warm-up (kernels, thread pool)
        if what == "time":
            return dict(time_s=median_time(run, device))
        peak = peak_bytes(run, device)
    return dict(preset=preset, seconds=seconds, tokens=internal_tokens(enc, x.shape[1], 1),
                out=enc.num_tokens(x.shape[1]), flops=flops, peak_bytes=peak)


def internal_tokens(enc, n_samples, n_leads):
    """Tokens that go through the encoder's transformer: what costs FLOPs (its output is pooled from them)."""
    return n_leads * enc.num_patches(n_samples)


def _mixed_batch(device, threads):
    """Windowed (equal-shaped windows in dense groups) vs zero-padded to the longest, tiny preset."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    enc = ECGEncoder(EncoderConfig()).to(device).eval()
    spec = [(12, 8), (12, 10), (12, 10), (12, 25.5), (1, 60), (2, 137), (12, 300), (1, 600)]
    leads = [list(STANDARD_LEADS[:n]) if n > 1 else ["II"] for n, _ in spec]
    sigs = [torch.randn(n, round(s * enc.cfg.fs), device=device) for n, s in spec]
    longest = max(x.shape[1] for x in sigs)
    padded = [torch.nn.functional.pad(x, (0, longest - x.shape[1])) for x in sigs]
    rows = []
    with torch.no_grad():
        for name, xs in [("windowed, dense groups", sigs), ("zero-padded to longest", padded)]:
            run = lambda: enc(xs, leads)  # noqa: E731
            tokens = sum(internal_tokens(enc, x.shape[1], len(l)) for x, l in zip(xs, leads))
            rows.append((name, tokens, count_flops(run), median_time(run, device, min_reps=2)))
    return spec, rows


def bench_encoder(device="cpu", durations=(10, 60, 600, 3600), presets=("tiny", "base"), threads=None):
    threads = threads or torch.get_num_threads()
    # for the memory run, big buffers go straight to mmap and back to the OS when freed, so peak RSS tracks live
    # tensors (glibc would otherwise keep freed memory around); timing runs use the default allocator, as a user would
    mem_env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    results = []
    for preset, seconds in tqdm([(p, s) for p in presets for s in durations], desc="encoder bench"):
        r = in_fresh_process(_measure_one, preset, seconds, device, threads, "memory", env=mem_env)
        results.append(r | in_fresh_process(_measure_one, preset, seconds, device, threads, "time"))
    spec, rows = in_fresh_process(_mixed_batch, device, threads)
    print_encoder_tables(results, spec, rows, presets, device, threads)
    return results, rows


def print_encoder_tables(results, spec, rows, presets, device, threads):
    mem = "peak CUDA memory allocated" if device == "cuda" else "peak RSS increase"
    print(f"\nOne single-lead ECG, device {device}, {threads} threads, fp32, no_grad. "
          f"Memory: {mem} over one forward (fresh process).")
    print(f"{'preset':<6} {'ECG':>7} {'tok in':>7} {'tok out':>7} {'GFLOP':>8} {'time s':>8} "
          f"{'ms/ECG-s':>9} {'vs longest':>8} {'mem MiB':>8} {'MiB/ECG-min':>11}")
    for p in presets:
        rs = [r for r in results if r["preset"] == p]
        steady = 1e3 * rs[-1]["time_s"] / rs[-1]["seconds"]  # ms per ECG-second, longest ECG
        for r in rs:
            per_s = 1e3 * r["time_s"] / r["seconds"]
            print(f"{p:<6} {r['seconds']:>6g}s {r['tokens']:>7} {r['out']:>7} {r['flops'] / 1e9:>8.2f} "
                  f"{r['time_s']:>8.3f} {per_s:>9.3f} {per_s / steady:>7.2f}x {r['peak_bytes'] / 2**20:>8.1f} "
                  f"{r['peak_bytes'] / 2**20 / (r['seconds'] / 60):>11.2f}")
        if len(rs) > 1:  # time = fixed + marginal * seconds, through shortest and longest
            a, b = rs[0], rs[-1]
            marginal = (b["time_s"] - a["time_s"]) / (b["seconds"] - a["seconds"])
            fixed = a["time_s"] - marginal * a["seconds"]
            print(f"{p:<6} fixed cost per call {1e3 * fixed:.1f} ms, marginal {1e3 * marginal:.3f} ms per ECG-second")
    print(f"\nMixed batch, tiny preset, (leads, seconds): {spec}")
    print(f"{'path':<26} {'tokens':>8} {'GFLOP':>8} {'time s':>8}")
    for name, tokens, flops, sec in rows:
        print(f"{name:<26} {tokens:>8} {flops / 1e9:8.2f} {sec:>8.3f}")


# --------------------------------------------------------------------------- the LLM: ours vs transformers, in turns
def llm_pair(args, device, dtype):
    """The same random Llama checkpoint as ours and as transformers' model (None when transformers, a test
    requirement, is not installed: ours alone, from the same shape)."""
    sizes = dict(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
                 tie_word_embeddings=False)
    torch.manual_seed(0)
    try:
        import transformers
    except ImportError:
        return LLM(LLMConfig(**sizes)).to(device, dtype), None
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = LLM.from_pretrained(d, dtype=dtype, device=device)
    return ours, hf.to(device=device, dtype=dtype)


def llm_workloads(args, ours, hf, device):
    """[(measure, tokens per call, ours fn, transformers fn)]: a training step, then cached decode per batch size."""
    B, T = args.train_batch, args.train_len
    idx = torch.randint(0, args.vocab, (B, T + 1), device=device)

    def step_ours():
        ours.train()
        logits = ours(idx[:, :-1])                                                     # (B, T, V)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten()).backward()
        ours.zero_grad(set_to_none=True)

    def step_hf():
        if hf is None:
            return
        hf.train()
        hf(idx[:, :-1], labels=idx[:, :-1]).loss.backward()  # transformers shifts labels itself
        hf.zero_grad(set_to_none=True)

    def decode(batch):
        prompt = torch.randint(3, args.vocab, (batch, args.prompt_len), device=device)
        n = args.new_tokens

        def decode_hf():
            if hf is not None:
                hf.eval().generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0)
        return lambda: generate(ours.eval(), prompt, max_new_tokens=n), decode_hf
    return [("train step fwd+bwd", B * T, step_ours, step_hf)] + [
        (f"decode batch {b}", b * args.new_tokens, *decode(b)) for b in args.decode_batches]


def bench_llm(args):
    """-> [(measure, ours tok/s, transformers tok/s or None, MFU or None)], medians of args.reps runs,
    the two models timed in turns so machine noise hits both alike. MFU: bf16 on a GPU whose peak is known."""
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ours, hf = llm_pair(args, device, dtype)
    peak = peak_flops(device) if dtype == torch.bfloat16 else None
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"config: {n_params / 1e6:.1f}M params, dim {args.dim}, {args.layers} layers, {args.heads}/{args.kv_heads} "
          f"heads, vocab {args.vocab}, {dtype}, {device}, {torch.get_num_threads()} threads")
    print(f"{'measure':<22}{'ours tok/s':>12}{'transformers tok/s':>20}{'ours/hf':>9}")
    figures = []
    for name, n_tokens, fn_ours, fn_hf in llm_workloads(args, ours, hf, device):
        with torch.enable_grad() if name.startswith("train") else torch.no_grad():
            fn_ours(), fn_hf()  # warm-up
            turns = [(timed(fn_ours, device.type), timed(fn_hf, device.type)) for _ in range(args.reps)]
        a, b = (n_tokens / statistics.median(t) for t in zip(*turns))  # ours, transformers
        b = b if hf is not None else None
        print(f"{name:<22}{a:>12.0f}" + (f"{b:>20.0f}{a / b:>9.2f}" if b else f"{'not installed':>20}"))
        mfu = None
        if peak and name.startswith("train"):
            mfu = 6 * n_params * a / peak
            print(f"{'':<22}MFU {mfu:.1%} (6·N·tokens/s over {peak / 1e12:.0f} TFLOP/s)")
        figures.append((name, a, b, mfu))
    return figures


# --------------------------------------------------------------------------- everything in one table
def speed(args):
    """Every speed figure the design asks for, in one table: the LLM against transformers (train step, cached decode),
    the encoder's time per ECG-second from 10 s to 1 h, and a mixed-length batch windowed against zero-padded. Each
    part prints its own detail first. -> [(measure, value, target, met: True / False / None when there is no target)]"""
    llm = bench_llm(args)
    enc, mixed = bench_encoder(args.device, [float(x) for x in args.durations.split(",")], ["tiny"], None)
    per_s = {r["seconds"]: 1e3 * r["time_s"] / r["seconds"] for r in enc}
    longest = per_s[max(per_s)]
    table = []
    for name, ours, hf, mfu in llm:
        if hf:
            table.append((f"LLM {name}, ours / transformers", f"{ours / hf:.2f}x", ">= 1.0x", ours >= hf))
        if mfu is not None:
            table.append((f"LLM {name}, MFU", f"{mfu:.1%}", "reported", None))
    for sec, ms in per_s.items():
        table.append((f"encoder ms per ECG-second, {sec:g} s", f"{ms:.3f} ({ms / longest:.2f}x of {max(per_s):g} s)",
                      "flat (<= 1.3x)", ms / longest <= 1.3))
    dense, padded = mixed[0][3], mixed[-1][3]
    table.append(("mixed batch: windowed vs zero-padded time", f"{dense:.3f} s vs {padded:.3f} s",
                  "windowed faster", dense < padded))
    print(f"\n{'measure':<52} {'value':<28} {'target':<16} met")
    for measure, value, target, met in table:
        print(f"{measure:<52} {value:<28} {target:<16} {'-' if met is None else 'yes' if met else 'NO'}")
    return table


# --------------------------------------------------------------------------- reading real records
def bench_read(n_records=400, workers=(1, 2, 4)):
    """Records/s reading PTB-XL-sized records (12 leads, 10 s, 500 Hz, 16-bit WFDB) from local disk through the
    training reader (data.RowECGReader: read, resample to 100 Hz), batch by batch as train.py reads them: in the
    main process (1) or with N reader processes. -> [(processes, records/s)]"""
    import wfdb   # pulls in pandas: only this benchmark needs it here
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for k in range(n_records):
            wfdb.wrsamp(f"r{k:05d}", fs=500, units=["mV"] * 12, sig_name=list(STANDARD_LEADS),
                        p_signal=rng.normal(0, 0.3, (5000, 12)), fmt=["16"] * 12, adc_gain=[1000.0] * 12,
                        baseline=[0] * 12, write_dir=tmp)
        rows = [{"ecg_path": f"r{k:05d}", "task": "report"} for k in range(n_records)]
        print(f"{n_records} records of 12 leads x 10 s at 500 Hz, read and resampled to 100 Hz ({os.cpu_count()} CPUs)")
        print("| reader processes | records/s | ms per batch of 16 |\n|---|---|---|")
        for n in workers:
            reader = RowECGReader(tmp, 100, cache_size=n_records)
            pool = ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) if n > 1 else None
            if pool:
                list(pool.map(abs, range(n)))                                # start the workers first
            t = time.perf_counter()
            for i in range(0, n_records, 16):                                # batch by batch, as in training
                if pool:
                    reader.prefetch(rows[i:i + 16], pool)
                for row in rows[i:i + 16]:
                    reader(row)
            dt = time.perf_counter() - t
            if pool:
                pool.shutdown()
            print(f"| {n} | {n_records / dt:.0f} | {16 * dt / n_records * 1000:.1f} |")
            out.append((n, n_records / dt))
    return out


# --------------------------------------------------------------------------- command line
def llm_args(b):
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    b.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    sizes = {"vocab": 8000, "dim": 512, "ffn": 1376, "layers": 5, "heads": 8, "kv-heads": 4, "train-batch": 4,
             "train-len": 256, "prompt-len": 32, "new-tokens": 64}   # integer options, in --help order
    helps = {"dim": "hidden size (default ~20M-parameter config)", "ffn": "MLP intermediate size"}
    for name, default in sizes.items():
        b.add_argument(f"--{name}", type=int, default=default, help=helps.get(name))
    b.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    b.add_argument("--reps", type=int, default=5)
    return b


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("encoder", help="encoder time/memory vs ECG duration")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    b.add_argument("--durations", default="10,60,600,3600", help="seconds, comma-separated")
    b.add_argument("--presets", default="tiny,base", help="EncoderConfig presets")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    llm_args(sub.add_parser("llm", help="LLM train step and cached decode, ours vs transformers"))
    b = llm_args(sub.add_parser("speed", help="llm + encoder (tiny) in one table against the design's targets"))
    b.add_argument("--durations", default="10,60,600,3600", help="encoder: ECG seconds, comma-separated")
    b = sub.add_parser("read", help="records/s reading PTB-XL-sized records, in one process or several")
    b.add_argument("--records", type=int, default=400, help="records written and read")
    b.add_argument("--workers", default="1,2,4", help="reader process counts to time")
    args = parser.parse_args(argv)
    if args.command == "llm":
        return bench_llm(args)
    if args.command == "speed":
        return speed(args)
    if args.command == "read":
        return bench_read(args.records, [int(w) for w in args.workers.split(",")])
    return bench_encoder(args.device, [float(s) for s in args.durations.split(",")], args.presets.split(","),
                         args.threads)


if __name__ == "__main__":
    main()
