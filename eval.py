"""
Evaluation: metrics, benchmarks, speed measurements.

    python eval.py bench-encoder [--device cpu|cuda] [--durations 10,60,600,3600]
    python eval.py bench-llm [--device cpu|cuda] [--dtype fp32|bf16]   (needs transformers)
"""

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch
from torch.utils import flop_counter

from ecg_encoder import LEADS_12, ECGEncoder, EncoderConfig

# -----------------------------------------------------------------------------
# encoder benchmark: time and peak memory of one single-lead ECG from 10 s to 1 h
# (time per ECG-second should be flat, memory linear), and the windowed encoder on a
# batch of mixed-length ECGs against the same ECGs zero-padded to the longest.


def count_flops(fn):
    """FLOPs of fn() as counted by torch's FlopCounterMode. Its table lacks the CPU
    flash-attention op, so we add it: attention is exactly what windows keep small."""
    def sdpa_cpu(q, k, v, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(q, k, v)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        fn()
    return fc.get_total_flops()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timeit(fn, device, min_reps=3, min_time_s=1.0, max_time_s=60.0):
    """Median wall time of fn() over at least min_reps runs (more while under min_time_s)."""
    times = []
    while len(times) < min_reps or (sum(times) < min_time_s and len(times) < 100):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if sum(times) > max_time_s:
            break
    return statistics.median(times)


def _rss_kib(field):  # current (VmRSS) or peak (VmHWM) resident memory of this process
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])


def _measure_one(preset, seconds, device, threads, what):
    """Runs in a fresh process, so memory figures are this ECG's alone.
    what="memory": FLOPs and peak memory; what="time": median wall time."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    enc = ECGEncoder(getattr(EncoderConfig, preset)()).to(device).eval()
    x = torch.randn(1, round(seconds * enc.cfg.fs), device=device)
    run = lambda: enc([x], [["II"]])  # noqa: E731
    with torch.no_grad():
        flops = count_flops(run)  # doubles as the warm-up (kernels, thread pool)
        if what == "time":
            return dict(time_s=_timeit(run, device))
        # peak memory above the resting state, over one forward
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            rest = torch.cuda.memory_allocated()
            run()
            peak = torch.cuda.max_memory_allocated() - rest
        else:
            rest = _rss_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM (the peak) to the current RSS
            run()
            peak = _rss_kib("VmHWM") * 1024 - rest
    return dict(preset=preset, seconds=seconds, tokens=enc.internal_tokens(x.shape[1], 1),
                out=enc.num_tokens(x.shape[1]), flops=flops, peak_bytes=peak)


def _in_fresh_process(fn, *args, env=None):
    old = dict(os.environ)
    os.environ.update(env or {})  # a spawned child reads these at start-up
    try:
        with mp.get_context("spawn").Pool(1) as pool:
            return pool.apply(fn, args)
    finally:
        os.environ.clear()
        os.environ.update(old)


def _mixed_batch(device, threads):
    """Windowed (dense groups / nested jagged) vs zero-padded to the longest, tiny preset."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    enc = ECGEncoder(EncoderConfig.tiny()).to(device).eval()
    spec = [(12, 8), (12, 10), (12, 10), (12, 25.5), (1, 60), (2, 137), (12, 300), (1, 600)]
    leads = [list(LEADS_12[:n]) if n > 1 else ["II"] for n, _ in spec]
    sigs = [torch.randn(n, round(s * enc.cfg.fs), device=device) for n, s in spec]
    longest = max(x.shape[1] for x in sigs)
    padded = [torch.nn.functional.pad(x, (0, longest - x.shape[1])) for x in sigs]
    rows = []
    with torch.no_grad():
        for name, xs, packed in [("windowed, dense groups", sigs, "dense"),
                                 ("windowed, nested jagged", sigs, "nested"),
                                 ("zero-padded to longest", padded, "dense")]:
            run = lambda: enc(xs, leads, packed=packed)  # noqa: E731
            # FlopCounterMode cannot trace nested tensors; the nested path does the same math
            flops = count_flops(run) if packed == "dense" else None
            tokens = sum(enc.internal_tokens(x.shape[1], len(l)) for x, l in zip(xs, leads))
            rows.append((name, tokens, flops, _timeit(run, device, min_reps=2)))
    return spec, rows


def bench_encoder(device="cpu", durations=(10, 60, 600, 3600), presets=("tiny", "base"),
                  threads=None):
    from tqdm import tqdm
    threads = threads or torch.get_num_threads()
    # for the memory run, big buffers go straight to mmap and back to the OS when freed,
    # so peak RSS tracks live tensors (glibc would otherwise keep freed memory around);
    # timing runs use the default allocator, as a user would
    mem_env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    jobs = [(p, s) for p in presets for s in durations]
    results = []
    for preset, seconds in tqdm(jobs, desc="encoder bench"):
        r = _in_fresh_process(_measure_one, preset, seconds, device, threads, "memory", env=mem_env)
        r |= _in_fresh_process(_measure_one, preset, seconds, device, threads, "time")
        results.append(r)
    spec, rows = _in_fresh_process(_mixed_batch, device, threads)

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
            print(f"{p:<6} {r['seconds']:>6g}s {r['tokens']:>7} {r['out']:>7} "
                  f"{r['flops'] / 1e9:>8.2f} {r['time_s']:>8.3f} {per_s:>9.3f} "
                  f"{per_s / steady:>7.2f}x {r['peak_bytes'] / 2**20:>8.1f} "
                  f"{r['peak_bytes'] / 2**20 / (r['seconds'] / 60):>11.2f}")
        if len(rs) > 1:  # time = fixed + marginal * seconds, through shortest and longest
            a, b = rs[0], rs[-1]
            marginal = (b["time_s"] - a["time_s"]) / (b["seconds"] - a["seconds"])
            fixed = a["time_s"] - marginal * a["seconds"]
            print(f"{p:<6} fixed cost per call {1e3 * fixed:.1f} ms, "
                  f"marginal {1e3 * marginal:.3f} ms per ECG-second")
    print(f"\nMixed batch, tiny preset, (leads, seconds): {spec}")
    print(f"{'path':<26} {'tokens':>8} {'GFLOP':>8} {'time s':>8}")
    for name, tokens, flops, sec in rows:
        gflop = f"{flops / 1e9:8.2f}" if flops is not None else f"{'(same)':>8}"
        print(f"{name:<26} {tokens:>8} {gflop} {sec:>8.3f}")
    return results, rows


# -----------------------------------------------------------------------------
# LLM speed: ours vs transformers, same weights, same process, interleaved

def bench_llm(args):
    """Training step (forward + backward) and cached greedy decode, nanoECG's LLM against
    transformers' LlamaForCausalLM on the same random checkpoint. The two are timed in turns,
    rep after rep, and the median of each is printed, so machine noise hits both alike."""
    import tempfile

    import transformers
    from generate import generate
    from model import LLM

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = LLM.from_pretrained(d, dtype=dtype, device=device)
    hf = hf.to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"config: {n_params / 1e6:.1f}M params, dim {args.dim}, {args.layers} layers, "
          f"{args.heads}/{args.kv_heads} heads, vocab {args.vocab}, {dtype}, {device}, "
          f"{torch.get_num_threads()} threads")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    B, T = args.train_batch, args.train_len
    idx = torch.randint(0, args.vocab, (B, T + 1), device=device)

    def train_step_ours():
        ours.train()
        logits = ours(idx[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten()).backward()
        ours.zero_grad(set_to_none=True)

    def train_step_hf():
        hf.train()
        hf(idx[:, :-1], labels=idx[:, :-1]).loss.backward()  # transformers shifts labels itself
        hf.zero_grad(set_to_none=True)

    def decode(model_name, batch):
        prompt = torch.randint(3, args.vocab, (batch, args.prompt_len), device=device)
        n = args.new_tokens
        if model_name == "ours":
            ours.eval()
            return lambda: generate(ours, prompt, max_new_tokens=n)
        hf.eval()
        return lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False, pad_token_id=0)

    rows = [("train step fwd+bwd", B * T, train_step_ours, train_step_hf)]
    for batch in args.decode_batches:
        with torch.no_grad():
            rows.append((f"decode batch {batch}", batch * args.new_tokens, decode("ours", batch), decode("hf", batch)))
    print(f"{'measure':<22}{'ours tok/s':>12}{'transformers tok/s':>20}{'ours/hf':>9}")
    for name, n_tokens, fn_ours, fn_hf in rows:
        grad = torch.enable_grad() if name.startswith("train") else torch.no_grad()
        with grad:
            fn_ours(), fn_hf()  # warm-up
            t_ours, t_hf = [], []
            for _ in range(args.reps):
                t_ours.append(timed(fn_ours))
                t_hf.append(timed(fn_hf))
        a, b = n_tokens / statistics.median(t_ours), n_tokens / statistics.median(t_hf)
        print(f"{name:<22}{a:>12.0f}{b:>20.0f}{a / b:>9.2f}")
        if device.type == "cuda" and name.startswith("train"):
            peak = {torch.bfloat16: 989e12, torch.float32: 67e12}.get(dtype, 989e12)  # H100 SXM dense
            flops = 6 * n_params * n_tokens / statistics.median(t_ours)
            print(f"{'':<22}MFU {flops / peak:.1%} (6·N·tokens/s over {peak / 1e12:.0f} TFLOP/s)")


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench-encoder", help="encoder time/memory vs ECG duration")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--durations", default="10,60,600,3600", help="seconds, comma-separated")
    b.add_argument("--presets", default="tiny,base", help="EncoderConfig presets")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    b = sub.add_parser("bench-llm", help="LLM train step and cached decode, ours vs transformers")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    b.add_argument("--vocab", type=int, default=8000)
    b.add_argument("--dim", type=int, default=512, help="hidden size (default ~20M-parameter config)")
    b.add_argument("--ffn", type=int, default=1376, help="MLP intermediate size")
    b.add_argument("--layers", type=int, default=5)
    b.add_argument("--heads", type=int, default=8)
    b.add_argument("--kv-heads", type=int, default=4)
    b.add_argument("--train-batch", type=int, default=4)
    b.add_argument("--train-len", type=int, default=256)
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    b.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command == "bench-llm":
        bench_llm(args)
    elif args.command == "bench-encoder":
        bench_encoder(args.device, [float(s) for s in args.durations.split(",")],
                      args.presets.split(","), args.threads)


if __name__ == "__main__":
    main()
