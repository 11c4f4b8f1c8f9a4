"""
anyecg/release.py — anyECG-chat's published model (CuCl-2/anyECG-chat, on Hugging Face as cucl2/anyECG-chat) run
by nanoECG: their ECG preprocessing (`anyecg_input`), their ECG ViT and projector (`AnyECG`, `load_anyecg`), and
the whole chat model on a Meta-Llama-3-8B-Instruct folder with their LoRA adapter (`load_chat`).

    python generate.py --anyecg path/to/anyECG-chat --llm path/to/Meta-Llama-3-8B-Instruct --ecg REC --prompt "..."

Their encoder plugs into chat.ECGChat as any encoder does (signals and lead lists in, tokens out); it projects each
10 s window itself, so the chat model gets no projector of its own.
"""
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from anyecg.peft import load_peft_adapter, read_tensors
from chat import ECGChat
from data import STANDARD_LEADS
from ecg_encoder import ENCODER_PRESETS, EncoderBlock, EncoderConfig, Projector, check_state
from model import LLM, Tokenizer, read_hf_config


# --------------------------------------------------------------------------- their preprocessing
def anyecg_input(record):
    """anyECG-chat's own preprocessing of a record (their anyecg/utils.py: `get_ecg_from_path`, `ecg_transform`), what
    load_anyecg reads: (12, T) float32 at 100 Hz, leads in STANDARD_LEADS order (others dropped), absent
    leads zero, each lead min-max scaled to [-1, 1], then NaN -> 0. Faithful, quirks included: a flat or absent lead
    is 0/0 and so all 0, and one NaN sample spreads through the FFT and the min/max and zeroes its whole lead. Their
    loader keeps only the first 5000 samples of a 12-lead file, or a location row's [ecg_start, ecg_end): cut first."""
    signal, fs, leads = record
    x = np.asarray(signal, dtype=np.float64)  # float64 like their wfdb.rdsamp: scipy would keep a float32 in float32
    if fs != 100:  # their int() truncation and their order of operations, so T is the same
        n = int(x.shape[1] * 100 / fs)
        if n < 1:
            raise ValueError(f"{x.shape[1]} samples at {fs:g} Hz are not one sample at 100 Hz")
        x = fft_resample(x, n)
    out = np.zeros((len(STANDARD_LEADS), x.shape[1]))  # (12, T)
    for i, lead in enumerate(STANDARD_LEADS):
        if lead in leads:
            out[i] = x[leads.index(lead)]
    lo, hi = out.min(axis=1, keepdims=True), out.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):  # the 0/0 of flat leads is meant: NaN, then 0
        out = (out - lo) / (hi - lo) * 2 - 1
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


def fft_resample(x, num):
    """scipy.signal.resample(x, num, axis=-1) of a real x with numpy's FFT: keep the lower band of the two lengths.
    When that band's length m is even, its top bin stands for the +-m/2 pair of a two-sided spectrum: it is doubled
    when shortening (the pair folds into one bin) and halved when lengthening (it splits into two)."""
    n = x.shape[-1]
    m = min(n, num)
    spec = np.fft.rfft(x, axis=-1)[..., :m // 2 + 1]
    if m % 2 == 0 and num != n:
        spec[..., m // 2] *= 2 if num < n else 0.5
    return np.fft.irfft(spec / (n / num), n=num, axis=-1)  # irfft drops the imaginary part of an even num's top bin


# --------------------------------------------------------------------------- their encoder and projector
class AnyECG(nn.Module):
    """anyECG-chat's ECG ViT and projector (CuCl-2/anyECG-chat: `ViT.encode` in anyecg/ecgvit.py, `projection` and
    `encode_and_project_ecg` in anyecg/ecg_language_modeling.py) on ecg_encoder's blocks and projector, to run their
    release (load_anyecg). enc(x): x (12, T) at 100 Hz from anyecg_input -> (enc.num_tokens(T), enc.d_llm).
    Unlike ECGEncoder: 12 fixed lead slots (an absent lead is zeros), learned positions inside a 10 s window, a
    LayerNorm on each raw patch, no final norm (their `encode` returns the last block's output)."""
    WINDOW, PATCH = 1000, 200  # samples at 100 Hz: 10 s windows of 2 s patches
    PER_WINDOW = 12 * WINDOW // PATCH   # 12 leads x 5 patches = 60 tokens a window

    def __init__(self, d=768, depth=12, mlp_ratio=4, d_llm=4096):
        super().__init__()
        # EncoderBlock reads d_model, n_heads, mlp_ratio, dropout; their heads are 64 wide (ecg_vit_base: 768 / 12)
        cfg = EncoderConfig(**ENCODER_PRESETS["base"] | dict(d_model=d, n_layers=depth, n_heads=d // 64,
                                                            mlp_ratio=mlp_ratio))
        self.cfg = cfg   # also what the chat model asks of an encoder: fs (100 Hz) and patch_size (the shortest ECG)
        self.patch_in_norm = nn.LayerNorm(self.PATCH)  # on the raw samples, as theirs
        self.patch_proj = nn.Linear(self.PATCH, d)
        self.patch_out_norm = nn.LayerNorm(d)
        self.lead_emb = nn.Parameter(torch.zeros(1, 12, d))                        # their shapes, (1, ...)
        self.pos_emb = nn.Parameter(torch.zeros(1, 1 + self.WINDOW // self.PATCH, d))  # [0]: the CLS token's
        self.cls = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(depth))
        self.proj = Projector(d, d_llm)

    @property
    def d_llm(self):
        return self.proj.fc2.out_features

    def num_tokens(self, n_samples):
        """1 + 60 * ceil(T / 1000): the windows' mean CLS token, then every window's 60 patch tokens."""
        return 1 + self.PER_WINDOW * -(-n_samples // self.WINDOW)

    def max_seconds(self, n_tokens):
        """Longest ECG whose tokens fit into n_tokens: whole 10 s windows."""
        return max(0, (n_tokens - 1) // self.PER_WINDOW) * self.WINDOW / self.cfg.fs

    def encode(self, windows):  # (W, 12, 1000) -> (W, 61, d): CLS, then lead by lead, 5 patches each
        x = windows.unflatten(-1, (-1, self.PATCH))                          # (W, 12, 5, 200)
        x = self.patch_out_norm(self.patch_proj(self.patch_in_norm(x)))      # (W, 12, 5, d)
        x = x + self.lead_emb[:, :, None] + self.pos_emb[:, None, 1:]
        cls = (self.cls + self.pos_emb[0, 0]).expand(len(x), 1, -1)          # (W, 1, d)
        x = torch.cat([cls, x.flatten(1, 2)], dim=1)                         # (W, 61, d)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x, leads=None):
        """x: one (12, T) ECG -> its tokens; or, as the chat model calls every encoder, a list of ECGs and their
        lead lists (the 12 slots, always) -> one tensor of tokens per ECG, each ECG encoded alone as theirs."""
        if isinstance(x, (list, tuple)):
            return [self(one) for one in x]
        x = torch.as_tensor(x, dtype=self.cls.dtype, device=self.cls.device)
        if x.ndim != 2 or x.shape[0] != 12 or x.shape[1] == 0:
            raise ValueError(f"anyECG-chat reads a (12, T) ECG at 100 Hz (anyecg_input), got {tuple(x.shape)}")
        x = F.pad(x, (0, -x.shape[1] % self.WINDOW))                         # the last window zero-padded
        windows = x.unflatten(1, (-1, self.WINDOW)).transpose(0, 1)          # (W, 12, 1000)
        y = self.proj(self.encode(windows))                                  # (W, 61, d_llm): each window alone
        return torch.cat([y[:, 0].mean(0, keepdim=True), y[:, 1:].flatten(0, 1)])  # (1 + 60 W, d_llm)


def anyecg_names(depth):
    """Their key -> ours: ecg_model.* (the ViT's state dict) and projection.* (nn.Sequential(Linear, GELU, Linear))."""
    names = {"ecg_model.cls_token": "cls", "ecg_model.pos_embedding": "pos_emb", "ecg_model.lead_embedding": "lead_emb"}
    parts = [("ecg_model.to_patch_embedding.1", "patch_in_norm"), ("ecg_model.to_patch_embedding.2", "patch_proj"),
             ("ecg_model.to_patch_embedding.3", "patch_out_norm"), ("projection.0", "proj.fc1"),
             ("projection.2", "proj.fc2")]
    for i in range(depth):  # layers.i.0: Attention (with its norm), layers.i.1: FeedForward (LN, fc, GELU, -, fc)
        parts += [(f"ecg_model.transformer.layers.{i}.{theirs}", f"blocks.{i}.{ours}") for theirs, ours in
                  [("0.norm", "ln1"), ("0.to_qkv", "qkv"), ("0.to_out.0", "proj"), ("1.net.0", "ln2"),
                   ("1.net.1", "mlp.0"), ("1.net.4", "mlp.2")]]
    names |= {f"{theirs}.{p}": f"{ours}.{p}" for theirs, ours in parts for p in ("weight", "bias")}
    for i in range(depth):  # their to_qkv has no bias: ours stays 0
        del names[f"ecg_model.transformer.layers.{i}.0.to_qkv.bias"]
    return names


def load_anyecg(ckpt_dir):
    """anyECG-chat's released encoder and projector from ckpt_dir: ecg_model.pth and projection.pth as their train.py
    saves them (read with weights_only=True: a pickle holding anything but tensors is refused, never run), or
    ecg_model.safetensors / projection.safetensors (preferred). Widths and depth come from the shapes (the release:
    768, 12, 3072, 4096). -> an AnyECG in eval mode; missing, unexpected and misshapen keys are named in theirs."""
    folder = Path(ckpt_dir)
    state = {f"{part}.{k}": v for part in ("ecg_model", "projection") for k, v in _read_anyecg(folder, part).items()}
    # the head of their contrastive pretraining (CLEP) is in the ViT's state dict (norm, fc), unused by `encode`
    state = {k: v for k, v in state.items() if not k.startswith(("ecg_model.norm.", "ecg_model.fc."))}

    def size(key, dim, default):  # a width read off a shape; a missing key keeps the release's, reported below
        return state[key].shape[dim] if key in state and state[key].ndim > dim else default
    layers = [int(k.split(".")[3]) for k in state if re.match(r"ecg_model\.transformer\.layers\.\d+\.", k)]
    d, depth = size("ecg_model.cls_token", 0, 768), 1 + max(layers, default=11)
    d_mlp, d_llm = size("ecg_model.transformer.layers.0.1.net.1.weight", 0, 4 * d), size("projection.0.weight", 0, 4096)
    enc = AnyECG(d, depth, max(1, d_mlp // d), d_llm)
    names, own = anyecg_names(depth), enc.state_dict()
    check_state({theirs: own[ours].shape for theirs, ours in names.items()}, state, folder, "anyECG-chat's layout")
    zero_bias = {f"blocks.{i}.qkv.bias": torch.zeros(3 * d) for i in range(depth)}  # their to_qkv has none
    enc.load_state_dict({names[k]: v.float() for k, v in state.items()} | zero_bias)
    return enc.eval()


def _read_anyecg(folder, part):
    """One of their two state dicts, {key: tensor}, with errors that name the file."""
    return read_tensors(anyecg_file(folder, part))   # .pth read with weights_only=True: tensors, never code


def anyecg_file(folder, part):
    """The file of one of their two state dicts: part.safetensors, else part.pth."""
    paths = [Path(folder) / f"{part}.safetensors", Path(folder) / f"{part}.pth"]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{folder}: neither {part}.pth nor {part}.safetensors (anyECG-chat's checkpoint)")
    return path


# --------------------------------------------------------------------------- the chat model
def load_chat(ckpt_dir, llm_dir, dtype=None, device=None):
    """anyECG-chat's release as an ECGChat: their ECG encoder and projector (load_anyecg) and their LoRA adapter
    (adapter_config.json + adapter_model.safetensors, as peft saves it) from ckpt_dir, on the Llama-3-8B-Instruct
    folder llm_dir. Prompts use Llama-3's template with each ECG block on the reserved tokens 128003-128005, as
    theirs; the ECGs must be read as theirs are (anyecg_input: 12 x T at 100 Hz). The encoder stays in float32, as
    in their code; its tokens are cast to the LLM's dtype when spliced."""
    encoder = load_anyecg(ckpt_dir)
    hidden = read_hf_config(llm_dir).hidden_size   # checked before the LLM's weights are read
    if encoder.d_llm != hidden:   # masked_scatter would take the first elements of each wider token, silently
        raise ValueError(f"{anyecg_file(ckpt_dir, 'projection')}: anyECG-chat's projector gives {encoder.d_llm}-wide "
                         f"tokens, but the LLM of {Path(llm_dir) / 'config.json'} is {hidden} wide (hidden_size); "
                         "their release runs on Meta-Llama-3-8B-Instruct (4096)")
    llm = LLM.from_pretrained(llm_dir, dtype=dtype, device=device)
    if not (Path(ckpt_dir) / "adapter_config.json").is_file():
        warnings.warn(f"{ckpt_dir}: no LoRA adapter (adapter_config.json); the LLM runs as it is (a stage-1 "
                      "checkpoint)")
    else:
        load_peft_adapter(llm, ckpt_dir)
    encoder = encoder.to(llm.embed_tokens.weight.device)
    return ECGChat(llm, encoder, Tokenizer(llm_dir), chat_format="llama3", projector=nn.Identity()).eval()
