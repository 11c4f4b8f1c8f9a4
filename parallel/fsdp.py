"""
parallel/fsdp.py — train.py --parallel fsdp: FSDP2 (`fully_shard`) over the chat model, and its checkpoint files.

Each LLM block becomes one group whose weights, gradients and AdamW state are split over the processes (gathered whole
just before the block runs, freed after); the ECG encoder is one group, the root takes the rest. The encoder is not
split block by block: its blocks run once per group of equal-shaped windows, a count that differs between processes,
while FSDP's gathers must match call for call. Frozen weights are sharded too. On CUDA: bf16 compute over fp32
master weights. A checkpoint holds each process's slices as safetensors (torch.distributed.checkpoint), which a run on
any number of processes reads back; the run ends by gathering the whole weights on rank 0.
"""
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def shard(model, device):
    """FSDP2 on an ECGChat, in place. A sharded model cannot grow: add every stage's LoRA first."""
    bf16 = torch.bfloat16 if device.type == "cuda" else None
    policy = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16)
    for module in [*model.llm.layers, model.encoder, model]:
        fully_shard(module, mp_policy=policy)


def local(t):
    """This process's slice of a sharded tensor (a DTensor); a tensor FSDP left whole, as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t):
    """A value computed over sharded tensors (the gradient norm), whole on every process."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model, rank):
    """The whole weights, gathered through CPU memory; every process takes part. -> on rank 0 the state dict of an
    unsharded model (None elsewhere)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None if rank else full


def save_shards(model, opt, folder):
    """This process's slices of the weights and the AdamW state, written by torch.distributed.checkpoint as
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
