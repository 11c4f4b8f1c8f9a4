"""Where a run computes: --device auto's choice (CUDA, then Apple's MPS, then the CPU), what each device refuses or
computes in, the RNG states a checkpoint keeps per device, and the per-phase record every run logs. The backends'
availability is passed in, so the MPS and CUDA choices are checked here on a CPU without faking torch."""
import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

import config
import train
from model import choose_device


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda:0"), (False, True, "mps"), (False, False, "cpu"),
                                                 (True, False, "cuda:0")])
def test_auto_prefers_cuda_then_mps_then_the_cpu(cuda, mps, expected):
    assert str(choose_device("auto", cuda=cuda, mps=mps)) == expected


def test_each_process_of_torchrun_takes_its_own_gpu_and_cpu_and_mps_are_taken_as_asked():
    assert choose_device("auto", cuda=True, mps=False, local_rank=3) == torch.device("cuda:3")
    assert choose_device("cpu", cuda=True, mps=True) == torch.device("cpu")
    assert choose_device("mps", cuda=True, mps=True) == torch.device("mps")


@pytest.mark.parametrize("name, match", [("cuda", "--device cuda: .*no CUDA GPU"), ("mps", "--device mps: no Apple"),
                                         ("gpu", "--device gpu: auto, cpu, cuda or mps")])
def test_a_device_that_is_not_here_is_one_clear_error(name, match):
    with pytest.raises(ValueError, match=match):
        choose_device(name, cuda=False, mps=False)


def test_mps_refuses_process_groups_and_computes_in_fp32_without_autocast():
    cfg = config.Config()
    with pytest.raises(ValueError, match="MPS: PyTorch has no process-group backend"):
        train.precision(cfg, torch.device("mps"), distributed=True)
    dtype, ctx = train.precision(config.Config(llm="some/llama"), torch.device("mps"), distributed=False)
    assert dtype == torch.float32 and isinstance(ctx, contextlib.nullcontext)


def test_cuda_autocasts_to_bf16_and_a_pretrained_llm_loads_in_bf16_unless_fsdp_keeps_fp32_masters():
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        dtype, ctx = train.precision(config.Config(llm="some/llama"), torch.device("cuda:0"), distributed=False)
        assert dtype == torch.bfloat16 and isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"   # fp32 matmuls on tensor cores
        fsdp = config.Config(llm="some/llama", parallel="fsdp")
        assert train.precision(fsdp, torch.device("cuda:0"), distributed=True)[0] == torch.float32
        assert train.precision(config.Config(), torch.device("cuda:0"), distributed=False)[0] == torch.float32
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    dtype, ctx = train.precision(config.Config(), torch.device("cpu"), distributed=True)   # gloo on the CPU
    assert dtype == torch.float32 and isinstance(ctx, contextlib.nullcontext)


def test_a_cpu_checkpoint_keeps_the_torch_rng_and_no_gpu_state():
    assert set(train.rng_states(torch.device("cpu"))) == {"torch"}


def test_every_run_logs_its_phases_and_the_share_of_step_time_spent_making_batches(tmp_path):
    from test_train import tiny   # the suite's tiny run
    train.train(tiny(tmp_path, encoder_warmup_steps=2))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    phases = [r for r in records if r.get("event") == "phase"]
    assert [p["phase"] for p in phases] == ["data", "warm-up", "stage 0", "stage 1", "stage 2", "stage 3",
                                            "evaluation"]
    assert all(p["seconds"] >= 0 for p in phases)
    shares = [r["data_share"] for r in records if "loss" in r and "event" not in r]
    assert shares and all(0 < s < 1 for s in shares)


def test_the_phase_timer_records_peak_memory_on_a_gpu_only():
    seen = []
    env = SimpleNamespace(device=torch.device("cpu"), phases=[], log=seen.append)
    with train.phase(env, "stage 1"):
        pass
    assert seen == [{"event": "phase", "phase": "stage 1", "seconds": seen[0]["seconds"]}] and env.phases


def test_synthetic_records_made_ahead_in_worker_processes_are_the_ones_made_on_demand():
    from data import row_paths
    from synthetic.tasks import build_synthetic_dataset
    ahead, on_demand = (build_synthetic_dataset(6, seed=3, split="train") for _ in range(2))
    n = ahead.make_ahead(2)
    assert n >= len({p for r in ahead.rows for p in row_paths(r)}) > 6   # a clip of a record is a record of its own
    for row in ahead.rows:
        for a, b in zip(ahead.inputs(row), on_demand.inputs(row)):
            assert a.leads == b.leads and a.fs == b.fs and (a.signal == b.signal).all()
    assert ahead._cache.cache_info().currsize == 0   # every record came from the workers
