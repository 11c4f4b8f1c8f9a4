"""
ecg_encoder.py — the ECG encoder and the projector into the LLM: any length, any lead set, several ECGs. Below them,
the image encoder for paper printouts (GEM's second modality): a small ViT, or a pretrained CLIP vision tower
(`load_clip_vision`). Last, anyECG-chat's own encoder and projector (`AnyECG`, `load_anyecg`), beside nanoECG's.

Design in one paragraph. Each lead is cut on its own into patches of `patch_size` samples (anyECG-style), so a token
is (one lead, one stretch of time); its embedding is the patch's shape and amplitude + a learned embedding of its
lead name + a fixed sinusoidal code of its ABSOLUTE start time in seconds + its beats' timing, measured (RR before
and after over the local median RR: `rhythm_features`, the one input that sees across windows). Absent leads make no
tokens: they cost nothing and cannot be mistaken for a flat lead. Attention is local to windows of `window_s`
seconds (every lead and patch in a window attends to every other, nothing crosses a window border), so cost and
memory are linear in duration and an hour-long Holter encodes on a laptop. To spend no attention on padding, the
windows of a batch are grouped by shape (n_leads, n_patches) and each group runs as one dense (B, T, C) batch
through `F.scaled_dot_product_attention` (full 10 s windows of 12-lead ECGs together, a short last window in a small
group of its own); `packed="nested"` instead packs every window into one nested jagged tensor (SDPA's
variable-length path). At the output the present leads are averaged per patch (the token count does not depend on
the lead count), consecutive patches are average-pooled to `tokens_per_second`, and the absolute time code is added
again so the LLM can read "at 12.3 s" off a token.

Why no min-max scaling (anyECG scales each lead to [-1, 1]): amplitude in mV is diagnostic (low voltage, ST
shift), so signals are only clamped to +-`max_abs_mv`. Why no per-patch LayerNorm (anyECG has one): it would blow
the noise of a flat stretch up to the size of a QRS complex. A patch enters as its samples minus its mean (which
removes baseline wander), still in mV, with that mean and its std alongside.
"""

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data import STANDARD_LEADS, atomic_write, read_tensors


# --------------------------------------------------------------------------- config
@dataclass
class EncoderConfig:
    fs: int = 100                   # model sampling rate (Hz); resampling happens in data.py
    leads: tuple = tuple(STANDARD_LEADS)  # the lead vocabulary the encoder was built for
    patch_size: int = 50            # samples per token per lead (50 @ 100 Hz = 0.5 s)
    window_s: float = 10.0          # attention span; nothing attends across windows
    tokens_per_second: float = 2.0  # output rate per ECG, whatever its lead count
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    max_abs_mv: float = 20.0        # clamp: beyond this it is saturation / artefact
    max_period_s: float = 4 * 3600  # slowest time-code period, so hours stay distinct
    rhythm: bool = True             # add each patch's beat timing (rhythm_features) to its embedding

    def __post_init__(self):
        self.leads = tuple(self.leads)  # a list from JSON becomes a tuple again
        assert self.d_model % self.n_heads == 0 and self.d_model % 2 == 0
        # windows and output tokens are whole numbers of patches: no output token straddles two windows
        assert self.patches_per_window * self.patch_size == round(self.window_s * self.fs), \
            "window_s must be a whole number of patches"
        assert abs(self.pool * self.tokens_per_second - self.fs / self.patch_size) < 1e-9, \
            "tokens_per_second must divide the patch rate fs / patch_size"
        assert self.patches_per_window % self.pool == 0, "a window must hold a whole number of output tokens"

    @classmethod
    def from_dict(cls, d):  # a saved config; files written before the rhythm features have none
        return cls(**({"rhythm": False} | d))

    @property
    def patch_s(self):  # seconds per patch
        return self.patch_size / self.fs

    @property
    def patches_per_window(self):
        return round(self.window_s * self.fs / self.patch_size)

    @property
    def pool(self):  # patches averaged into one output token
        return max(1, round(self.fs / self.patch_size / self.tokens_per_second))

    @classmethod
    def tiny(cls, **kw):  # the CPU default: ~0.8M parameters, 20 tokens per 10 s
        return cls(**kw)

    @classmethod
    def base(cls, **kw):  # ViT-Base like anyECG: 2 s patches, 5 tokens per 10 s
        return cls(**(dict(patch_size=200, tokens_per_second=0.5, d_model=768, n_layers=12, n_heads=12) | kw))


# --------------------------------------------------------------------------- beat timing, measured
def beat_times(x, fs):
    """QRS complexes of one ECG (L, N) in mV -> their sample indices (n,). The absolute slope summed over the
    leads and smoothed over 80 ms peaks at each QRS; a beat is a peak that is the largest within +-250 ms (a
    refractory period) and reaches 30 % of the largest within +-1 s (so the threshold follows the amplitude
    along a Holter). A plain slope detector in the spirit of Pan-Tompkins; docs/RESULTS.md has how it does on
    MIT-BIH 100 and on the synthetic records."""
    slope = (x[:, 1:] - x[:, :-1]).abs().sum(0)[None, None].float()  # (1, 1, N-1)
    k, r, w = (round(s * fs) for s in (0.04, 0.25, 1.0))
    energy = F.avg_pool1d(slope, 2 * k + 1, 1, k, count_include_pad=False)  # (1, 1, N-1)
    peak = ((energy == F.max_pool1d(energy, 2 * r + 1, 1, r)) & (energy > 0.3 * F.max_pool1d(energy, 2 * w + 1, 1, w))
            & (energy > 1e-3))[0, 0]
    t = torch.nonzero(peak)[:, 0] + 1  # a plateau can give neighbours: keep the first of each run
    return t[torch.cat([torch.ones(min(1, len(t)), dtype=torch.bool, device=t.device), t.diff() > r])]


def rhythm_features(x, fs, patch_size, n_patches):
    """One ECG (L, N) -> (n_patches, 5), zeros in a patch without a beat. Per patch: the number of beats
    starting in it; the shortest RR before one of them and the longest RR after one, each as its difference
    from the local median RR (of the 17 RRs around it) in tenths of that median; the local median in tenths of
    a second from 0.8 s; and the local irregularity (the mean change between successive RRs, in tenths of the
    median). Why: a PAC differs from a sinus beat mostly in coming early (MIT-BIH 100's: 0.65-0.85 of the RR),
    which one patch cannot see and which the attention did not learn to measure from the patches' shapes
    (docs/RESULTS.md); a PVC adds a compensatory pause; AF is early and late beats throughout."""
    t = beat_times(x, fs)
    out = torch.zeros(n_patches, 5, device=x.device)
    if len(t) < 3:  # no rhythm to speak of
        return out
    rr = t.diff().float()  # (n-1,)
    around = lambda v: F.pad(v, (8, 8), value=float("nan")).unfold(0, 17, 1)  # (len(v), 17): +-8 neighbours
    median = around(rr).nanmedian(-1).values  # (n-1,)
    irregular = around(F.pad(rr.diff().abs(), (0, 1), value=float("nan"))).nanmean(-1).nan_to_num() / median
    ratio = 10 * (rr / median - 1)
    zero = ratio.new_zeros(1)
    before, after = torch.cat([zero, ratio]), torch.cat([ratio, zero])  # (n,): the first / last beat count as on time
    local = torch.cat([median[:1], median]) * 10 / fs - 8, 10 * torch.cat([irregular[:1], irregular])  # (n,) each
    patch = t // patch_size
    out[:, 0].index_add_(0, patch, torch.ones_like(before))
    out[:, 1].scatter_reduce_(0, patch, before, "amin", include_self=False)
    out[:, 2].scatter_reduce_(0, patch, after, "amax", include_self=False)
    for c, v in zip((3, 4), local):
        out[:, c].scatter_reduce_(0, patch, v, "mean", include_self=False)
    return out.clamp(-10, 10)


# --------------------------------------------------------------------------- building blocks
class Block(nn.Module):
    """Pre-norm transformer block on a dense (B, T, C) batch or a nested jagged tensor (B, j, C); attention stays
    inside each row (= one window)."""

    def __init__(self, cfg, act=nn.GELU):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), act(), nn.Linear(cfg.mlp_ratio * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def attention(self, x):
        # .contiguous(): the jagged SDPA path needs each of q, k, v in its own storage
        q, k, v = (t.contiguous().unflatten(-1, (self.n_heads, -1)).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))  # 3 x (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).flatten(-2))  # (B, T, C)

    def forward(self, x):
        x = x + self.drop(self.attention(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class Projector(nn.Module):
    """ECG tokens -> LLM embedding width, anyECG's Linear -> GELU -> Linear."""

    def __init__(self, d_enc, d_llm):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_enc, d_llm), nn.Linear(d_llm, d_llm)

    def forward(self, x):  # (..., d_enc) -> (..., d_llm)
        return self.fc2(F.gelu(self.fc1(x)))


# --------------------------------------------------------------------------- the encoder
class ECGEncoder(nn.Module):
    """enc(signals, leads) -> list of (num_tokens(n_samples_i), d_model), one per ECG."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        P, d = cfg.patch_size, cfg.d_model
        self.lead_index = {name: i for i, name in enumerate(cfg.leads)}
        self.patch_proj = nn.Linear(P + 2, d)  # the patch's shape, its mean and its std, in mV
        self.patch_out_norm = nn.LayerNorm(d)
        self.lead_emb = nn.Embedding(len(cfg.leads), d)
        self.rhythm_proj = nn.Linear(5, d) if cfg.rhythm else None  # rhythm_features -> the same width
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)

    # --- lengths, known before encoding (the chat template places placeholders) ---
    def num_patches(self, n_samples):
        return -(-n_samples // self.cfg.patch_size)  # ceil: the last patch is zero-padded

    def num_tokens(self, n_samples):
        """Output tokens for an ECG of n_samples (any lead count); forward agrees."""
        return -(-self.num_patches(n_samples) // self.cfg.pool)

    def internal_tokens(self, n_samples, n_leads):
        """Tokens that go through the transformer: they are what costs FLOPs."""
        return n_leads * self.num_patches(n_samples)

    def max_seconds(self, n_tokens):
        """Longest ECG whose output fits into n_tokens."""
        return n_tokens / self.cfg.tokens_per_second

    def _time(self, n, spacing_s):
        """Sinusoidal code of the absolute start times of n tokens spaced spacing_s apart, (n, C). Periods are
        geometric from twice the patch length (so neighbouring patches differ) to max_period_s (hours), so both
        sub-second and hour scales are readable. No learned table: any duration works. Computed in float64 (on
        the CPU: MPS has none): sin(2*pi*3600/1) in float32 would already lose the sub-second digits."""
        t = torch.arange(n, dtype=torch.float64) * spacing_s  # (n,)
        periods = torch.logspace(math.log10(2 * self.cfg.patch_s), math.log10(self.cfg.max_period_s),
                                 self.cfg.d_model // 2, dtype=torch.float64, device=t.device)
        angle = 2 * math.pi * t[:, None] / periods  # (n, C/2)
        w = self.lead_emb.weight
        return torch.cat([angle.sin(), angle.cos()], dim=-1).to(w.device, w.dtype)  # (n, C)

    # --- input checks and patch embedding ---
    def _check(self, i, x, names):
        if x.ndim != 2:
            raise ValueError(f"ECG {i}: expected (n_leads, n_samples), got shape {tuple(x.shape)}")
        if len(names) != x.shape[0]:
            raise ValueError(f"ECG {i}: {x.shape[0]} signal rows but {len(names)} lead names {list(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"ECG {i}: duplicate lead names {list(names)}")
        for name in names:
            if name not in self.lead_index:
                raise ValueError(f"ECG {i}: unknown lead {name!r}; this encoder knows "
                                 f"{list(self.cfg.leads)} (normalise names in data.py)")
        if x.shape[1] < self.cfg.patch_size:
            raise ValueError(f"ECG {i}: {x.shape[1]} samples is shorter than one patch; the minimum is "
                             f"{self.cfg.patch_size} samples ({self.cfg.patch_s:g} s at {self.cfg.fs} Hz)")
        if not torch.isfinite(x).all():
            raise ValueError(f"ECG {i}: signal contains NaN or Inf (repair it in data.py first)")

    def embed(self, x, names):
        """One ECG (L, N) in mV -> token embeddings (L, n_p, C)."""
        L, N = x.shape
        P, n_p = self.cfg.patch_size, self.num_patches(N)
        x = x.clamp(-self.cfg.max_abs_mv, self.cfg.max_abs_mv)
        rhythm = rhythm_features(x, self.cfg.fs, P, n_p) if self.rhythm_proj is not None else None  # (n_p, 5)
        x = F.pad(x, (0, n_p * P - N)).view(L, n_p, P)  # (L, n_p, P)
        mean = x.mean(-1, keepdim=True)  # (L, n_p, 1)
        stats = torch.cat([mean, x.std(-1, correction=0, keepdim=True)], dim=-1)  # (L, n_p, 2)
        h = self.patch_out_norm(self.patch_proj(torch.cat([x - mean, stats], -1)))  # (L, n_p, C)
        if rhythm is not None:  # the same beat timing for every lead: it is the ECG's
            h = h + self.rhythm_proj(rhythm.to(h.dtype))
        ids = torch.tensor([self.lead_index[n] for n in names], device=x.device)
        return h + self.lead_emb(ids)[:, None, :] + self._time(n_p, self.cfg.patch_s)  # (L, n_p, C)

    def windows(self, h):
        """(L, n_p, C) -> [(n_windows, L*p, C), ...]: full windows, then the short last one."""
        L, n_p, C = h.shape
        Pw = self.cfg.patches_per_window
        n_full = n_p // Pw
        chunks = []
        if n_full:
            full = h[:, :n_full * Pw].reshape(L, n_full, Pw, C)  # (L, W, Pw, C)
            chunks.append(full.transpose(0, 1).reshape(n_full, L * Pw, C))  # (W, L*Pw, C)
        if n_p > n_full * Pw:
            chunks.append(h[:, n_full * Pw:].reshape(1, -1, C))  # (1, L*rest, C)
        return chunks

    def readout(self, x, L):
        """Transformer output of windows (B, L*p, C) -> output tokens (B, ceil(p/pool), C)."""
        B, T, C = x.shape
        x = self.ln_f(x).view(B, L, T // L, C).mean(1)  # (B, p, C): average the leads
        k, p = self.cfg.pool, T // L
        n = -(-p // k)
        x = F.pad(x, (0, 0, 0, n * k - p)).view(B, n, k, C).sum(2)  # (B, n, C)
        count = (p - k * torch.arange(n, device=x.device)).clamp(max=k)  # last one may be short
        return x / count[None, :, None]

    # --- forward ---
    def forward(self, signals, leads, packed="dense"):
        """signals: list of (n_leads_i, n_samples_i) tensors in mV at cfg.fs; leads: list of lead-name lists.
        Returns a list of (num_tokens(n_samples_i), d_model). packed: "dense" (group equal-shape windows) or
        "nested" (one jagged batch)."""
        assert packed in ("dense", "nested"), packed
        if len(signals) != len(leads):
            raise ValueError(f"{len(signals)} signals but {len(leads)} lead-name lists")
        dev, dtype = self.lead_emb.weight.device, self.lead_emb.weight.dtype
        chunks = []  # (ecg index, n_leads, (n_windows, T, C)), in time order per ECG
        for i, (x, names) in enumerate(zip(signals, leads)):
            x = torch.as_tensor(x, dtype=dtype, device=dev)
            self._check(i, x, names)
            chunks += [(i, len(names), c) for c in self.windows(self.embed(x, names))]
        outs = self._run_dense(chunks) if packed == "dense" else self._run_nested(chunks)
        tokens = [torch.cat([y for (j, _, _), y in zip(chunks, outs) if j == i]) for i in range(len(signals))]
        # each (n_tokens_i, C); the absolute time code is added again, at each output token's start time
        return [t + self._time(len(t), self.cfg.pool * self.cfg.patch_s) for t in tokens]

    def _run_dense(self, chunks):
        """Windows of equal shape (n_leads, n_patches) -> one dense batch each, no padding."""
        groups = {}
        for j, (_, L, c) in enumerate(chunks):
            groups.setdefault((L, c.shape[1]), []).append(j)
        outs = [None] * len(chunks)
        for (L, _), idx in groups.items():
            x = torch.cat([chunks[j][2] for j in idx])  # (B, T, C)
            for block in self.blocks:
                x = block(x)
            y = self.readout(x, L)  # (B, n, C)
            for j, part in zip(idx, y.split([chunks[j][2].shape[0] for j in idx])):
                outs[j] = part.flatten(0, 1)  # (n_windows * n, C), time order
        return outs

    def _run_nested(self, chunks):
        """Every window as one row of a nested jagged tensor: SDPA's variable-length path, meant for CUDA
        (FlashAttention varlen). On CPU torch falls back to a loop over the windows, several times slower
        than _run_dense (see `python bench.py encoder`)."""
        wins = [(L, w) for _, L, c in chunks for w in c.unbind(0)]
        x = torch.nested.as_nested_tensor([w for _, w in wins], layout=torch.jagged)  # (W, j, C)
        with warnings.catch_warnings():  # torch's CPU fallback warns "prototype stage"
            warnings.simplefilter("ignore", UserWarning)
            for block in self.blocks:
                x = block(x)
        ys = iter([self.readout(y[None], L)[0] for (L, _), y in zip(wins, x.unbind(0))])
        return [torch.cat([next(ys) for _ in range(c.shape[0])]) for _, _, c in chunks]


# --------------------------------------------------------------------------- the image encoder (GEM's second modality)
@dataclass
class ImageEncoderConfig:
    height: int = 192          # every image is resized to height x width first (px); the
    width: int = 368           # printout is 138 x 265 mm, so 1.4 px per mm here
    patch_size: int = 16       # ViT patches of 16 x 16 px: 12 x 23 of them
    out_rows: int = 4          # output tokens: the patch grid average-pooled to out_rows x out_cols;
    out_cols: int = 8          # 4 rows = the printout's three lead rows and its rhythm strip
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    clip: bool = False         # CLIP's layout (load_clip_vision): class token, ln_pre, no patch bias, quick-GELU
    pixel_mean: tuple = (0.5, 0.5, 0.5)  # pixels/255 are normalised per channel with these;
    pixel_std: tuple = (0.5, 0.5, 0.5)   # the defaults map paper white to +1 and ink to -1

    def __post_init__(self):
        assert self.height % self.patch_size == 0 and self.width % self.patch_size == 0
        assert self.d_model % self.n_heads == 0

    @property
    def num_tokens(self):
        return self.out_rows * self.out_cols

    @classmethod
    def tiny(cls, **kw):  # the CPU default
        return cls(**kw)

    @classmethod
    def base(cls, **kw):  # ViT-B/16 widths at 2 px per mm (GEM: CLIP ViT-L/336)
        return cls(**(dict(height=272, width=528, d_model=768, n_layers=12, n_heads=12, out_rows=8, out_cols=16) | kw))


class ImageEncoder(nn.Module):
    """enc(images) -> (B, num_tokens, d_model). images: uint8 RGB arrays or tensors (H, W, 3) of any size (a rendered
    printout, a scan, a photo), each resized to the config's size. A plain ViT: learned positions, the ECG encoder's
    pre-norm blocks, then the patch grid pooled to out_rows x out_cols tokens in reading order (row by row)."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.cfg = cfg
        P, d = cfg.patch_size, cfg.d_model
        self.grid = (cfg.height // P, cfg.width // P)
        self.patch_proj = nn.Conv2d(3, d, P, stride=P, bias=not cfg.clip)  # = a Linear on each flattened P x P x 3 patch
        self.pos_emb = nn.Parameter(0.02 * torch.randn(self.grid[0] * self.grid[1] + cfg.clip, d))
        if cfg.clip:  # CLIP prepends a class token (its position is pos_emb[0]) and normalises first
            self.cls_token = nn.Parameter(torch.zeros(d))
            self.ln_pre = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(Block(cfg, QuickGELU if cfg.clip else nn.GELU) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)

    @property
    def num_tokens(self):
        return self.cfg.num_tokens

    def pixels(self, images):
        """-> (B, 3, height, width) float, normalised with the config's pixel mean and std."""
        device = self.pos_emb.device
        mean, std = (torch.tensor(v, device=device).view(3, 1, 1) for v in (self.cfg.pixel_mean, self.cfg.pixel_std))
        out = []
        for im in images:
            x = torch.as_tensor(im, device=device)
            if x.ndim != 3 or x.shape[-1] != 3:
                raise ValueError(f"expected an RGB image (H, W, 3), got shape {tuple(x.shape)}")
            x = (x.permute(2, 0, 1).float() / 255 - mean) / std                 # (3, H, W)
            out.append(F.interpolate(x[None], size=(self.cfg.height, self.cfg.width), mode="bilinear",
                                     antialias=True, align_corners=False))
        return torch.cat(out).to(self.pos_emb.dtype)

    def features(self, pixels):
        """(B, 3, height, width) normalised pixels -> (B, h*w, C) patch features (no class token)."""
        x = self.patch_proj(pixels).flatten(2).transpose(1, 2)                 # (B, h*w, C)
        if self.cfg.clip:
            x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1 + h*w, C)
        x = x + self.pos_emb
        if self.cfg.clip:
            x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x[:, int(self.cfg.clip):])

    def forward(self, images):
        x = self.features(self.pixels(images))                                 # (B, h*w, C)
        x = x.transpose(1, 2).unflatten(2, self.grid)                          # (B, C, h, w)
        x = F.adaptive_avg_pool2d(x, (self.cfg.out_rows, self.cfg.out_cols))   # (B, C, rows, cols)
        return x.flatten(2).transpose(1, 2)                                    # (B, rows*cols, C)


class QuickGELU(nn.Module):  # CLIP's activation: x * sigmoid(1.702 x)
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def clip_vision_config(path, **overrides):
    """The ImageEncoderConfig (clip=True) of a Hugging Face CLIP folder's config.json (a CLIPModel's vision_config,
    or a CLIPVisionModel's own), with overrides applied."""
    folder = Path(path)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: no readable config.json of a CLIP model ({e})") from None
    vc = raw.get("vision_config", raw)
    if raw.get("model_type") not in ("clip", "clip_vision_model") or "patch_size" not in vc:
        raise ValueError(f"{folder / 'config.json'}: model_type {raw.get('model_type')!r}, not a CLIP vision model")
    d, size = vc["hidden_size"], vc["image_size"]
    if vc.get("hidden_act", "quick_gelu") != "quick_gelu" or vc["intermediate_size"] % d:
        raise ValueError(f"{folder / 'config.json'}: hidden_act {vc.get('hidden_act')!r} / intermediate_size "
                         f"{vc['intermediate_size']} not supported (quick_gelu, a multiple of hidden_size)")
    return ImageEncoderConfig(**({"height": size, "width": size, "patch_size": vc["patch_size"], "d_model": d,
                                  "n_layers": vc["num_hidden_layers"], "n_heads": vc["num_attention_heads"],
                                  "mlp_ratio": vc["intermediate_size"] // d, "clip": True,
                                  "pixel_mean": (0.48145466, 0.4578275, 0.40821073),   # CLIP's image processor
                                  "pixel_std": (0.26862954, 0.26130258, 0.27577711)} | overrides))


def load_clip_vision(path, **overrides):
    """A pretrained CLIP vision tower (GEM's image encoder is CLIP ViT-L/336) from a Hugging Face CLIPModel or
    CLIPVisionModel folder, as our ImageEncoder with clip=True: q, k, v fused into one matrix, CLIP's post_layernorm
    on every patch token. overrides go to ImageEncoderConfig: another height/width resamples the position grid
    (bicubic), e.g. to keep a printout's 2:1 shape; fewer n_layers keep the first blocks; out_rows/out_cols set the
    pooled token grid."""
    folder, cfg = Path(path), clip_vision_config(path, **overrides)
    d = cfg.d_model
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (convert a pytorch_model.bin first)")
    state = {}  # a CLIPModel's keys start "vision_model." (text tower beside it); a CLIPVisionModel's may not
    for f in files:
        state |= {k.removeprefix("vision_model."): v for k, v in load_file(str(f)).items()
                  if k.startswith(("vision_model.", "embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm."))}

    def take(key):
        if key not in state:
            raise ValueError(f"{folder}: weight {key} (or vision_model.{key}) missing")
        return state[key]

    pos = take("embeddings.position_embedding.weight")                        # (1 + g*g, d)
    g = int(math.isqrt(pos.shape[0] - 1))
    grid = (cfg.height // cfg.patch_size, cfg.width // cfg.patch_size)
    if grid != (g, g):  # resample the position grid, keep the class token's
        patches = pos[1:].T.reshape(1, d, g, g).float()                              # (1, d, g, g)
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)  # (1, d, h, w)
        pos = torch.cat([pos[:1], patches.reshape(d, -1).T.to(pos.dtype)])            # (1 + h*w, d)
    ours = {"patch_proj.weight": take("embeddings.patch_embedding.weight"), "pos_emb": pos,
            "cls_token": take("embeddings.class_embedding"), "ln_pre.weight": take("pre_layrnorm.weight"),
            "ln_pre.bias": take("pre_layrnorm.bias"), "ln_f.weight": take("post_layernorm.weight"),
            "ln_f.bias": take("post_layernorm.bias")}
    for i in range(cfg.n_layers):
        hf, me = f"encoder.layers.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            ours[me + "qkv." + part] = torch.cat([take(f"{hf}self_attn.{n}_proj.{part}") for n in "qkv"])
            for a, b in [("self_attn.out_proj", "proj"), ("layer_norm1", "ln1"), ("layer_norm2", "ln2"),
                         ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2")]:
                ours[f"{me}{b}.{part}"] = take(f"{hf}{a}.{part}")
    encoder = ImageEncoder(cfg)
    encoder.load_state_dict({k: v.float() for k, v in ours.items()})
    return encoder


def check_fits(encoder, n_samples, max_seq_len, n_text_tokens=0):
    """The number of ECG tokens of ECGs of these lengths (samples), or a clear error if they and n_text_tokens do not
    fit into an LLM context of max_seq_len."""
    n_ecg = sum(encoder.num_tokens(n) for n in n_samples)
    if n_ecg + n_text_tokens > max_seq_len:
        secs = ", ".join(f"{n / encoder.cfg.fs:g}" for n in n_samples)
        room = max(0, max_seq_len - n_text_tokens)
        raise ValueError(f"ECG(s) of {secs} s need {n_ecg} tokens, plus "
                         f"{n_text_tokens} text tokens; the LLM context allows {max_seq_len} (room for about "
                         f"{encoder.max_seconds(room):g} s of ECG). Use a shorter part of the ECG, or a model trained "
                         "with a longer context (train.py --max_seq_len).")
    return n_ecg


# --------------------------------------------------------------------------- weights: safetensors
def save_encoder_weights(module, path, cfg=None, made_by=None):
    """Save any module's state. The config, if given, goes into the file's metadata as JSON (data, never code), and
    so does `made_by`: what produced the weights (e.g. the warm-up's settings), to tell another run's file apart."""
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    meta = {k: json.dumps(v) for k, v in [("config", cfg and asdict(cfg)), ("made_by", made_by)] if v is not None}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta or None))


def load_encoder_weights(module, path):
    """Load a safetensors file into module; any mismatch is one error naming the keys."""
    return load_state(module, load_file(str(path)), path)


def load_state(module, state, source):
    """Load `state` into `module`, or raise one error naming `source` and every missing, unexpected or misshapen key,
    or every tensor holding NaN or Inf (never load poisoned weights)."""
    check_state({k: v.shape for k, v in module.state_dict().items()}, state, source, type(module).__name__)
    module.load_state_dict(state)
    return module


def check_state(shapes, state, source, what):
    """The checks of load_state against `shapes` ({key: shape}), `what` naming the layout they describe."""
    poisoned = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if poisoned:
        raise ValueError(f"{source}: non-finite values (NaN/Inf) in {poisoned[:5]} ({len(poisoned)} tensors)")
    missing, unexpected = sorted(shapes.keys() - state.keys()), sorted(state.keys() - shapes.keys())
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(shapes[k])}"
             for k in sorted(shapes.keys() & state.keys()) if state[k].shape != shapes[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"{source} does not match {what}:\n  missing keys: {missing}"
                         f"\n  unexpected keys: {unexpected}\n  shape mismatches: {wrong}")


def file_metadata(path):
    """The metadata of a safetensors file (a dict of strings); errors name the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such encoder weights file")
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors' own error does not say which file
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def load_encoder_config(path):
    """The EncoderConfig that save_encoder_weights(..., cfg) stored in the file."""
    meta = file_metadata(path)
    if "config" not in meta:
        raise ValueError(f"{path} holds no encoder config in its metadata")
    return EncoderConfig.from_dict(json.loads(meta["config"]))


# --------------------------------------------------------------------------- anyECG-chat's own encoder and checkpoint
class AnyECG(nn.Module):
    """anyECG-chat's ECG ViT and projector (CuCl-2/anyECG-chat: `ViT.encode` in anyecg/ecgvit.py, `projection` and
    `encode_and_project_ecg` in anyecg/ecg_language_modeling.py) on this file's Block and Projector, to run their
    release (load_anyecg). enc(x): x (12, T) at 100 Hz from data.anyecg_input -> (enc.num_tokens(T), enc.d_llm).
    Unlike ECGEncoder: 12 fixed lead slots (an absent lead is zeros), learned positions inside a 10 s window, a
    LayerNorm on each raw patch, no final norm (their `encode` returns the last block's output)."""
    WINDOW, PATCH = 1000, 200  # samples at 100 Hz: 10 s windows of 2 s patches
    PER_WINDOW = 12 * WINDOW // PATCH   # 12 leads x 5 patches = 60 tokens a window

    def __init__(self, d=768, depth=12, mlp_ratio=4, d_llm=4096):
        super().__init__()
        # Block reads d_model, n_heads, mlp_ratio, dropout from it; their heads are 64 wide (ecg_vit_base: 768 / 12)
        cfg = EncoderConfig.base(d_model=d, n_layers=depth, n_heads=d // 64, mlp_ratio=mlp_ratio)
        self.cfg = cfg   # also what the chat model asks of an encoder: fs (100 Hz) and patch_size (the shortest ECG)
        self.patch_in_norm = nn.LayerNorm(self.PATCH)  # on the raw samples, as theirs
        self.patch_proj = nn.Linear(self.PATCH, d)
        self.patch_out_norm = nn.LayerNorm(d)
        self.lead_emb = nn.Parameter(torch.zeros(1, 12, d))                        # their shapes, (1, ...)
        self.pos_emb = nn.Parameter(torch.zeros(1, 1 + self.WINDOW // self.PATCH, d))  # [0]: the CLS token's
        self.cls = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(depth))
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

    def forward(self, x):
        x = torch.as_tensor(x, dtype=self.cls.dtype, device=self.cls.device)
        if x.ndim != 2 or x.shape[0] != 12 or x.shape[1] == 0:
            raise ValueError(f"anyECG-chat reads a (12, T) ECG at 100 Hz (data.anyecg_input), got {tuple(x.shape)}")
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
    paths = [folder / f"{part}.safetensors", folder / f"{part}.pth"]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{folder}: neither {part}.pth nor {part}.safetensors (anyECG-chat's checkpoint)")
    return read_tensors(path)   # .pth read with weights_only=True: tensors, never code
