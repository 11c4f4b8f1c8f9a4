"""What only a CUDA GPU can show: the LLM gives the CPU's logits there, batched greedy decoding gives each prompt's
own tokens, a run trains end to end (bf16 autocast, TF32) with its peak memory logged per phase, a checkpoint keeps
and restores the GPU's RNG, a resumed run repeats its losses, and FSDP2 runs in a process group of one over NCCL.
Each test skips on a machine without CUDA (this project's CI); `python -m bench.gpu` and these run on a GPU one."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import train
from model import LLM, LLMConfig, generate
from test_train import TINY, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run `python -m pytest tests/test_cuda.py` on one)")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def exact_fp32():
    """fp32 matmuls in full precision (a run switches TF32 on), restored after."""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    yield
    torch.backends.cuda.matmul.fp32_precision = before


def small_llm():
    torch.manual_seed(0)
    return LLM(LLMConfig(vocab_size=300, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)).eval()


def test_the_llm_gives_the_cpu_logits_on_cuda_left_padding_included(exact_fp32):
    cpu = small_llm()
    gpu = small_llm().cuda()
    ids = torch.randint(3, 300, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0   # a left-padded row
    with torch.no_grad():
        want = cpu(ids, attention_mask=mask)
        got = gpu(ids.cuda(), attention_mask=mask.cuda()).cpu()
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=1e-4)


def test_batched_greedy_decoding_on_cuda_gives_each_prompts_own_tokens(exact_fp32):
    llm = small_llm().cuda()
    prompts = torch.randint(3, 300, (4, 12), device="cuda")
    batched = generate(llm, prompts, max_new_tokens=16)
    assert batched == [generate(llm, p[None], max_new_tokens=16)[0] for p in prompts]


def test_a_run_trains_on_cuda_logs_peak_memory_per_phase_and_keeps_the_gpu_rng(tmp_path):
    train.train(tiny(tmp_path, device="cuda", encoder_warmup_steps=2, stage3_steps=6, ckpt_interval=3))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    phases = [r for r in records if r.get("event") == "phase"]
    assert phases and all(p["peak_mem_gib"] > 0 for p in phases)
    from safetensors.torch import load_file
    rng = load_file(str(config.latest_checkpoint(tmp_path) / "rng.safetensors"))
    assert set(rng) == {"torch", "cuda"}


def test_a_checkpoint_restores_the_gpu_rng_as_saved(tmp_path):
    cfg = tiny(tmp_path)
    model = torch.nn.Linear(4, 4).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4, device="cuda")).sum().backward()
    opt.step()
    torch.cuda.manual_seed(123)
    saved = torch.cuda.get_rng_state()
    path = train.save_checkpoint(cfg, model, opt, {"stage": 1, "step": 1, "global_step": 1})
    torch.rand(1000, device="cuda")   # the stream moves on
    assert not torch.equal(torch.cuda.get_rng_state(), saved)
    train.load_checkpoint(path, model, opt)
    assert torch.equal(torch.cuda.get_rng_state(), saved)


def test_a_run_resumed_on_cuda_repeats_its_losses(tmp_path):
    full = train.train(tiny(tmp_path / "a", device="cuda"))
    first = train.train(tiny(tmp_path / "b", device="cuda", stop_after=8))   # in stage 2: LoRA dropout on the GPU
    rest = train.train(config.parse_config(["--resume", f"--out_dir={tmp_path / 'b'}"]))
    # bf16 autocast and CUDA's attention backward are not bitwise repeatable, so: as close as two runs get
    assert first + rest == pytest.approx(full, rel=1e-2)


def test_fsdp2_runs_in_a_process_group_of_one_over_nccl(tmp_path):
    flags = [f"--{k}={v}" for k, v in {**TINY, "device": "cuda", "parallel": "fsdp"}.items()]
    r = subprocess.run([sys.executable, "train.py", f"--out_dir={tmp_path}", *flags], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
