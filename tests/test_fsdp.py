"""Tests for train.py --parallel fsdp (FSDP2 on CPU, gloo, 2 processes): the same losses and final
weights as one process with the same global batch, for full fine-tuning (stages 0-1) and for LoRA
on a frozen base (stages 2-3); sharded checkpoints (safetensors + JSON) that resume exactly, on the
same number of processes (with activation checkpointing) and on another (DCP reshards); the
gathered final folder loads in ECGChat and its LLM in transformers. Few process launches, so the
file stays quick."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import config
import train
from chat import ECGChat
from data import ECGRecord

ROOT = Path(__file__).resolve().parent.parent
# the smallest model with every part; stages 0-1 fine-tune whole, stages 2-3 train LoRA on a frozen base
TINY = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=400, encoder_dim=32, encoder_layers=1,
            batch_size=4, grad_accum=2, train_patients=10, val_patients=2, test_patients=2, skill_patients=0,
            eval_batches=1,
            gen_eval_rows=0, test_rows=1, max_new_tokens=4, log_interval=1, eval_interval=1000,
            ckpt_interval=1000, stage0_steps=2, stage1_steps=2, stage2_steps=2, stage3_steps=2, seed=7,
            encoder_warmup_steps=0, lora_dropout=0.0, stage1_train="encoder,projector,llm",
            stage2_train="encoder,projector,lora", stage3_train="encoder,projector,lora")
STOP = 5   # global step 5: inside stage 2, so the checkpoint holds LoRA and its AdamW state


def losses(out_dir):
    lines = [json.loads(x) for x in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r and "event" not in r]


def torchrun(out_dir, *flags):
    """train.py in 2 processes (gloo) with TINY + flags."""
    args = [f"--{k}={v}" for k, v in TINY.items()] + [f"--out_dir={out_dir}", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with socket.socket() as sock:  # a port free right now, so parallel CI jobs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process without FSDP (the reference); 2-process FSDP stopped at STOP, then resumed
    on 2 processes (fsdp/) and on 1 (one/: a process group of one, in this process)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    single = train.train(config.Config(out_dir=str(tmp / "single"), **TINY))
    (tmp / "fsdp").mkdir()
    shutil.copytree(tmp / "single" / "tokenizer", tmp / "fsdp" / "tokenizer")   # the same tokenizer
    torchrun(tmp / "fsdp", "--parallel=fsdp", f"--stop_after={STOP}")
    ckpt = config.latest_checkpoint(tmp / "fsdp")
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    shutil.copytree(tmp / "fsdp", tmp / "one")
    torchrun(tmp / "fsdp", "--resume", "--grad_checkpoint")   # recomputed activations: the same numbers
    rest = train.train(config.Config(out_dir=str(tmp / "one"), resume=True, **TINY, parallel="fsdp"))
    return tmp, single, rest, (ckpt.name, files)


def test_two_process_fsdp_matches_one_process_and_resumes_exactly(runs):
    tmp, single, *_ = runs
    assert len(single) == 8
    # full fine-tuning (stages 0-1), then LoRA on a frozen base (stages 2-3), stopped and resumed at step 5
    assert losses(tmp / "fsdp") == pytest.approx(single, rel=1e-5, abs=1e-6)
    a = load_file(str(tmp / "single" / "model" / "model.safetensors"))
    b = load_file(str(tmp / "fsdp" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_fsdp_checkpoint_is_sharded_safetensors_and_resumes_on_another_world_size(runs):
    tmp, single, rest, (name, files) = runs
    shards = [f"shards/shard-0000{i}-model-00001-of-00001.safetensors" for i in (1, 2)]   # one per process
    assert name == f"step_{STOP:07d}" and files == ["rng.safetensors", *shards, "state.json"]   # no pickle anywhere
    assert not list((tmp / "fsdp" / "checkpoints").glob(".tmp_*"))
    assert losses(tmp / "one")[:STOP] + rest == pytest.approx(single, rel=1e-5, abs=1e-6)   # 2 processes -> 1
    with pytest.raises(ValueError, match=r"parallel: 'fsdp' -> 'ddp'"):   # a sharded checkpoint is not DDP's
        train.train(config.Config(out_dir=str(tmp / "one"), resume=True, **TINY))


def test_fsdp_final_folder_loads_in_ecgchat_and_transformers(runs):
    tmp, *_ = runs
    model = ECGChat.load(tmp / "fsdp" / "model")
    ecg = ECGRecord(np.random.default_rng(0).normal(size=(2, 1000)).astype(np.float32), 100.0, ["I", "II"])
    ids, _ = model.prompt([("user", "Describe this ECG.")], [ecg], add_generation_prompt=True)
    assert len(model.generate([ids], [[ecg]], max_new_tokens=3, temperature=0)[0]) <= 3
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "fsdp" / "model", dtype=torch.float32).eval()
    text = torch.tensor([model.tokenizer.encode("Sinus rhythm", bos=True)])
    with torch.no_grad():
        assert (hf(text).logits - model.llm(text)).abs().max() <= 1e-4
