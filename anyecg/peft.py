"""
anyecg/peft.py — LoRA adapters in `peft`'s folder format (adapter_config.json + adapter_model.safetensors), both
ways: anyECG-chat's release ships its LoRA so, and a `train.py --llm` run writes its LoRA so for peft users of the
same LLM folder. The LoRA layers themselves are model.py's.
"""
import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from data import atomic_write
from model import LoRALinear, few


def read_tensors(path):
    """{name: tensor} from a .safetensors file, or from a PyTorch pickle (.bin, .pth) read with weights_only=True:
    tensors come back, any other object is refused, because a full unpickle can run code the file carries."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as e:   # a truncated or foreign file: safetensors' own error does not name it
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # UnpicklingError for a refused object, RuntimeError for a torn file
        raise ValueError(f"{path}: not a plain state dict of tensors ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


# peft's key for one LoRA matrix of LlamaForCausalLM: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
# (lm_head without the inner "model."); our module is layers.0.self_attn.q_proj.
PEFT_KEY = re.compile(r"^base_model\.model\.(?:model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")
PEFT_UNSUPPORTED = ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
                    "layers_to_transform")


def load_peft_adapter(llm, adapter_dir, merge=False):
    """A LoRA adapter saved by `peft` (adapter_config.json + adapter_model.safetensors, or adapter_model.bin read
    with weights_only=True) into LoRALinear layers wrapped around this LLM's linears; merge=True folds it into the
    weights (y = x (W + alpha/r B A)^T, the same as peft's merge_and_unload). -> the wrapped layers. Every problem
    is found before the LLM is touched."""
    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text()) if (d / "adapter_config.json").is_file() else None
    if cfg is None or cfg.get("peft_type") != "LORA":
        raise ValueError(f"{d}: no LoRA adapter here (adapter_config.json with peft_type LORA)")
    odd = {k: cfg[k] for k in PEFT_UNSUPPORTED if cfg.get(k)}
    if odd or cfg.get("bias", "none") != "none":
        raise ValueError(f"{d / 'adapter_config.json'}: options not implemented here: {odd or {'bias': cfg['bias']}}")
    file = d / "adapter_model.safetensors"
    file = file if file.is_file() else d / "adapter_model.bin"
    pairs = lora_pairs(file)
    modules = dict(llm.named_modules())
    for name, ab in pairs.items():
        check_pair(file, name, ab, modules.get(name), cfg["r"])
    check_targets(llm, cfg, pairs, d / "adapter_config.json", file)
    wrapped = []
    for name, ab in pairs.items():
        lora = LoRALinear(modules[name], cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0))
        with torch.no_grad():
            lora.lora_A.copy_(ab["A"])
            lora.lora_B.copy_(ab["B"])
        if merge:
            lora.merge()
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else llm, attr, lora)
        wrapped.append(lora)
    return wrapped


def lora_pairs(file):
    """{module name: {"A": lora_A, "B": lora_B}} from an adapter file; a key that is no LoRA matrix is an error."""
    pairs = {}
    for key, tensor in read_tensors(file).items():
        m = PEFT_KEY.match(key)
        if not m:
            raise ValueError(f"{file}: key {key!r} is not a LoRA matrix (base_model.model.*.lora_A/B.weight)")
        pairs.setdefault(m[1], {})[m[2]] = tensor
    return pairs


def check_pair(file, name, ab, base, r):
    """One module's lora_A and lora_B fit the LLM's linear layer `base` of that name at rank r."""
    if not isinstance(base, nn.Linear) or set(ab) != {"A", "B"}:
        why = "has no linear layer of that name" if not isinstance(base, nn.Linear) else "needs lora_A and lora_B"
        raise ValueError(f"{file}: {name}: the LLM {why}")
    want = {"A": (r, base.in_features), "B": (base.out_features, r)}
    if any(tuple(ab[x].shape) != want[x] for x in "AB"):
        raise ValueError(f"{file}: {name}: lora_A {tuple(ab['A'].shape)}, lora_B {tuple(ab['B'].shape)}; "
                         f"this LLM with r={r} needs {want['A']} and {want['B']}")


def targeted(name, spec):
    """Whether peft's target_modules (or exclude_modules) `spec` names a module: a list names a module by its full
    name or its last parts ('q_proj' names layers.0.self_attn.q_proj); a string is a regex of the whole name. Names
    are matched as peft sees them, LlamaForCausalLM's (model.layers.0.self_attn.q_proj, lm_head)."""
    name = name if name == "lm_head" else "model." + name
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec or ())


def check_targets(llm, cfg, pairs, config_file, file):
    """The adapter's tensors are the LoRA of exactly the linear layers its target_modules names (peft would wrap
    the named ones, start those without tensors at zero, and drop tensors of the others, with a warning at most)."""
    spec = cfg.get("target_modules")
    if not spec:   # peft then picks a default per model type: nothing written here to disagree with
        return
    linears = [n for n, m in llm.named_modules() if isinstance(m, nn.Linear)]
    names = [n for n in linears if n != "lm_head"] if spec == "all-linear" else spec   # peft: all but the head
    named = {n for n in linears if targeted(n, names) and not targeted(n, cfg.get("exclude_modules"))}
    lacking, extra = sorted(named - pairs.keys()), sorted(pairs.keys() - named)
    if lacking or extra:
        raise ValueError(f"{config_file}: target_modules {spec!r} disagrees with {file.name}: "
                         + "; ".join([f"no tensors for {few(lacking)} ({len(lacking)} modules)"] * bool(lacking)
                                     + [f"tensors for untargeted {few(extra)} ({len(extra)} modules)"] * bool(extra)))


def save_peft_adapter(llm, out_dir, base_model=""):
    """The LLM's LoRA layers as a `peft` adapter folder (PeftModel.from_pretrained(base, out_dir) reads it);
    base_model: the folder or hub name of the LLM it applies to."""
    layers = {name: m for name, m in llm.named_modules() if isinstance(m, LoRALinear)}
    shapes = {(m.lora_A.shape[0], m.scale, m.dropout.p) for m in layers.values()}
    if len(shapes) != 1:
        raise ValueError(f"save_peft_adapter: LoRA layers of one rank, scale and dropout needed, found {shapes}")
    r, scale, dropout = shapes.pop()
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model), "r": r,
           "lora_alpha": scale * r, "lora_dropout": dropout, "bias": "none", "inference_mode": True,
           "target_modules": sorted({name.rpartition(".")[2] for name in layers})}
    tensors = {f"base_model.model.{'' if name == 'lm_head' else 'model.'}{name}.lora_{x}.weight":
               getattr(m, f"lora_{x}").detach().contiguous().cpu() for name, m in layers.items() for x in "AB"}
    out_dir = Path(out_dir)
    atomic_write(out_dir / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out_dir / "adapter_config.json", json.dumps(cfg, indent=2))
    return out_dir
