"""
checkpoints.py — a training run's checkpoints: out_dir/checkpoints/step_N/ holds the weights, the AdamW state and
every random generator's state, in safetensors and JSON only (nothing pickled), so that --resume continues the
run exactly. A checkpoint appears by one rename of a finished temp folder: a crash leaves the older ones intact.
Under FSDP each process writes and reads its own slices through torch.distributed.checkpoint.
"""

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor


def save_checkpoint(cfg, model, opt, state, fsdp=False):
    """out_dir/checkpoints/step_N/: model.safetensors (LoRA unmerged), optimizer.safetensors, state.json (stage, step,
    config, python/numpy RNG) + rng.safetensors (torch RNG). The folder appears by one rename, so a crash leaves the
    older checkpoints as they were. Under FSDP every process calls it and writes its own shards of the weights and the
    AdamW state into shards/ (save_shards); rank 0 writes the rest and renames."""
    root = Path(cfg.out_dir) / "checkpoints"
    rank = dist.get_rank() if fsdp else 0
    bad = nonfinite_weights(model, fsdp)
    if bad:   # never keep poisoned weights as "the last good ones"
        raise FloatingPointError(f"non-finite weights in {bad[:3]} ({len(bad)} tensors): no checkpoint written; "
                                 f"the newest one is {latest_checkpoint(cfg.out_dir)}")
    final = root / f"step_{state['global_step']:07d}"
    if final.exists():
        return final
    tmp = root / f".tmp_{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_*"):   # half-written by a run that was killed: never a checkpoint
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    if fsdp:
        dist.barrier()   # the folder exists before any process writes into it
        save_shards(model, opt, tmp / "shards")
        dist.barrier()   # every shard is on disk before rank 0 renames the folder
        if rank:
            return final
    else:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        names = {p: n for n, p in model.named_parameters()}
        opt_state = {f"{names[p]}::{k}": v.detach().cpu().contiguous() for p, s in opt.state.items()
                     for k, v in s.items()}
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


def nonfinite_weights(model, fsdp=False):
    """Names of the weights holding NaN/Inf (FSDP: in any process's shard; every process gets the same list)."""
    names, params = zip(*model.named_parameters())
    ok = torch.stack([torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all() for p in params]).int()
    if fsdp:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return [n for n, good in zip(names, ok.tolist()) if not good]


def save_shards(model, opt, folder):
    """FSDP: this process's slices of the weights and the AdamW state, written by torch.distributed.checkpoint as
    safetensors (one file per process, recording where its slices sit in the whole tensors: no pickled index)."""
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state["state"]},
             storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))


def load_shards(folder, model, opt):
    """save_shards' files into this run's sharded model and optimizer. DCP matches slices by their place in the
    whole tensor, so a run on another number of processes reads them too."""
    model_state, optim_state = get_state_dict(model, opt)   # this run's slices; creates the AdamW state
    dcp.load({"model": model_state, "optim": optim_state["state"]},
             storage_reader=HuggingFaceStorageReader(str(folder)))
    set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optim_state)


def latest_checkpoint(out_dir):
    found = sorted((Path(out_dir) / "checkpoints").glob("step_*"))  # temp folders start with "."
    return found[-1] if found else None


def load_checkpoint(path, model, opt, fsdp=False):
    """Weights and optimizer state into a model/optimizer built for the same stage; every RNG. -> state.json"""
    if fsdp:
        load_shards(path / "shards", model, opt)
    else:
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
