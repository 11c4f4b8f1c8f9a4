"""
ecg_encoder.py — the ECG encoder and the projector into the LLM: any length, any lead set, several ECGs.

Design in one paragraph. Each lead is cut on its own into patches of `patch_size` samples (anyECG-style), so a token
is (one lead, one stretch of time); its embedding is the patch's shape and amplitude + a learned embedding of its
lead name + a fixed sinusoidal code of its ABSOLUTE start time in seconds + its beats' timing, measured (RR before
and after over the local median RR: `rhythm_features`) + its lead's average beat in its window (`beat_templates`:
where PR, QT and the ST level can be read; these two see a little across windows). Absent leads make no
tokens: they cost nothing and cannot be mistaken for a flat lead. Attention is local to windows of `window_s`
seconds (every lead and patch in a window attends to every other, nothing crosses a window border), so cost and
memory are linear in duration and an hour-long Holter encodes on a laptop. To spend no attention on padding, the
windows of a batch are grouped by shape (n_leads, n_patches) and each group runs as one dense (B, T, C) batch
through `F.scaled_dot_product_attention` (full 10 s windows of 12-lead ECGs together, a short last window in a small
group of its own). At the output the present leads are averaged per patch (the token count does not depend on the
lead count), consecutive patches are average-pooled to `tokens_per_second`, and the absolute time code is added
again so the LLM can read "at 12.3 s" off a token.

Why no min-max scaling (anyECG scales each lead to [-1, 1]): amplitude in mV is diagnostic (low voltage, ST
shift), so signals are only clamped to +-`max_abs_mv`. Why no per-patch LayerNorm (anyECG has one): it would blow
the noise of a flat stretch up to the size of a QRS complex. A patch enters as its samples minus its mean (which
removes baseline wander), still in mV, with that mean and its std alongside.

What the chat model (chat.py) asks of an encoder, so that others plug in (anyecg/: anyECG-chat's ViT):
`enc(signals, leads)` -> one (num_tokens(n_samples), d) tensor per ECG, `num_tokens`, `max_seconds`, and `cfg.fs`,
`cfg.patch_size` (the shortest ECG it reads), `cfg.d_model`.
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data import STANDARD_LEADS, atomic_write


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
    template: bool = True           # add its lead's average beat in its window (beat_templates) to each patch

    def __post_init__(self):
        self.leads = tuple(self.leads)  # a list from JSON becomes a tuple again
        # windows and output tokens are whole numbers of patches: no output token straddles two windows
        problems = [why for bad, why in [
            (self.d_model % self.n_heads or self.d_model % 2, f"d_model {self.d_model} must be even and a multiple of "
                                                             f"n_heads {self.n_heads}"),
            (self.patches_per_window * self.patch_size != round(self.window_s * self.fs),
             f"window_s {self.window_s:g} must be a whole number of patches"),
            (abs(self.pool * self.tokens_per_second - self.fs / self.patch_size) > 1e-9,
             f"tokens_per_second {self.tokens_per_second:g} must divide the patch rate fs / patch_size"),
            (self.patches_per_window % self.pool, "a window must hold a whole number of output tokens")] if bad]
        if problems:
            raise ValueError(f"encoder config: {'; '.join(problems)}")

    @property
    def patch_s(self):  # seconds per patch
        return self.patch_size / self.fs

    @property
    def patches_per_window(self):
        return round(self.window_s * self.fs / self.patch_size)

    @property
    def pool(self):  # patches averaged into one output token
        return max(1, round(self.fs / self.patch_size / self.tokens_per_second))



# --tiny is the CPU default (~0.8M parameters, 20 tokens per 10 s); base is a ViT-Base like anyECG's (5 tokens per 10 s)
ENCODER_PRESETS = {"tiny": {},
                   "base": dict(patch_size=200, tokens_per_second=0.5, d_model=768, n_layers=12, n_heads=12)}


# --------------------------------------------------------------------------- beat timing, measured
def beat_times(x, fs):
    """QRS complexes of one ECG (L, N) in mV -> their sample indices (n,). The absolute slope summed over the
    leads and smoothed over 80 ms peaks at each QRS; a beat is a peak that is the largest within +-250 ms (a
    refractory period) and reaches 30 % of the largest within +-1 s (so the threshold follows the amplitude
    along a Holter). A plain slope detector in the spirit of Pan-Tompkins."""
    slope = (x[:, 1:] - x[:, :-1]).abs().sum(0)[None, None].float()  # (1, 1, N-1)
    k, r, w = (round(s * fs) for s in (0.04, 0.25, 1.0))
    energy = F.avg_pool1d(slope, 2 * k + 1, 1, k, count_include_pad=False)  # (1, 1, N-1)
    peak = ((energy == F.max_pool1d(energy, 2 * r + 1, 1, r)) & (energy > 0.3 * F.max_pool1d(energy, 2 * w + 1, 1, w))
            & (energy > 1e-3))[0, 0]
    t = torch.nonzero(peak)[:, 0] + 1  # a plateau can give neighbours: keep the first of each run
    return t[torch.cat([torch.ones(min(1, len(t)), dtype=torch.bool, device=t.device), t.diff() > r])]


def rhythm_features(x, fs, patch_size, n_patches, t=None):
    """One ECG (L, N) -> (n_patches, 5), zeros in a patch without a beat. Per patch: the number of beats
    starting in it; the shortest RR before one of them and the longest RR after one, each as its difference
    from the local median RR (of the 17 RRs around it) in tenths of that median; the local median in tenths of
    a second from 0.8 s; and the local irregularity (the mean change between successive RRs, in tenths of the
    median). Why: a PAC differs from a sinus beat mostly in coming early, which one patch cannot see and which
    attention over the patches' shapes does not learn to measure; a PVC adds a compensatory pause; AF is early and
    late beats throughout. t: beat_times(x, fs), when the caller has them."""
    t = beat_times(x, fs) if t is None else t
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


TEMPLATE_S = (0.3, 0.6)  # seconds before and after each QRS that its average beat covers (P wave to T wave)


def template_span(fs):
    """Samples (before, after) each QRS in an average beat at fs."""
    return tuple(round(s * fs) for s in TEMPLATE_S)


def beat_templates(x, t, fs, window):
    """One ECG (L, N) in mV and its beats t (beat_times) -> (L, n_windows, before + after) float: per lead and
    window of `window` samples, the average of the beats whose QRS falls in it, from TEMPLATE_S[0] before each QRS to
    TEMPLATE_S[1] after, less the lead's median in the window (its baseline); zeros in a window without a beat.
    Why: on an averaged beat PR, QRS width, QT, the ST level and the T wave's sign sit at fixed offsets from the QRS,
    with the noise averaged out, while on the patches they fall anywhere across patch borders (docs/RESULTS.md, "The
    encoder reads each lead's average beat": without it the encoder never learns PR, ST or the T wave)."""
    x = x.float()
    L, N = x.shape
    a, b = template_span(fs)
    n_w = -(-N // window)
    beats = F.pad(x, (a, b))[:, t[:, None] + torch.arange(a + b, device=x.device)]  # (L, n, a + b)
    w = t // window  # (n,): each beat's window
    total = x.new_zeros(L, n_w, a + b).index_add_(1, w, beats)
    count = x.new_zeros(n_w).index_add_(0, w, x.new_ones(len(t)))  # (n_w,)
    full = N // window * window  # the full windows, then a short last one
    base = torch.cat([x[:, :full].view(L, -1, window).median(-1).values]  # (L, n_w)
                     + ([x[:, full:].median(-1, keepdim=True).values] if full < N else []), 1)
    return torch.where(count[:, None] > 0, total / count.clamp(min=1)[:, None] - base[..., None], 0.0)


# --------------------------------------------------------------------------- building blocks
class EncoderBlock(nn.Module):
    """Pre-norm transformer block on a dense (B, T, C) batch; attention stays inside each row (= one window)."""

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
        q, k, v = (t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)
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
        # beat_templates -> the same width, normalised as the patches are: on the raw average beat the QRS (1-2 mV)
        # swamps a 0.1 mV ST shift (without the norm the warm-up's ST statements stay near F1 0)
        self.template_proj = nn.Sequential(nn.Linear(sum(template_span(cfg.fs)), d), nn.LayerNorm(d)) \
            if cfg.template else None
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)

    # --- lengths, known before encoding (the chat template places placeholders) ---
    def num_patches(self, n_samples):
        return -(-n_samples // self.cfg.patch_size)  # ceil: the last patch is zero-padded

    def num_tokens(self, n_samples):
        """Output tokens for an ECG of n_samples (any lead count); forward agrees."""
        return -(-self.num_patches(n_samples) // self.cfg.pool)

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
        beats = beat_times(x, self.cfg.fs) if self.cfg.rhythm or self.cfg.template else None
        extra = 0  # what is known of the beats, added to every patch
        if self.rhythm_proj is not None:  # the same beat timing for every lead: it is the ECG's
            extra = self.rhythm_proj(rhythm_features(x, self.cfg.fs, P, n_p, beats).to(x.dtype))  # (n_p, C)
        if self.template_proj is not None:  # each lead's average beat, on every patch of its window
            Pw = self.cfg.patches_per_window
            templates = beat_templates(x, beats, self.cfg.fs, Pw * P).to(x.dtype)  # (L, W, a + b)
            extra = extra + self.template_proj(templates).repeat_interleave(Pw, dim=1)[:, :n_p]  # (L, n_p, C)
        x = F.pad(x, (0, n_p * P - N)).view(L, n_p, P)  # (L, n_p, P)
        mean = x.mean(-1, keepdim=True)  # (L, n_p, 1)
        stats = torch.cat([mean, x.std(-1, correction=0, keepdim=True)], dim=-1)  # (L, n_p, 2)
        h = self.patch_out_norm(self.patch_proj(torch.cat([x - mean, stats], -1))) + extra  # (L, n_p, C)
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
    def forward(self, signals, leads):
        """signals: list of (n_leads_i, n_samples_i) tensors in mV at cfg.fs; leads: list of lead-name lists.
        Returns a list of (num_tokens(n_samples_i), d_model)."""
        if len(signals) != len(leads):
            raise ValueError(f"{len(signals)} signals but {len(leads)} lead-name lists")
        dev, dtype = self.lead_emb.weight.device, self.lead_emb.weight.dtype
        chunks = []  # (ecg index, n_leads, (n_windows, T, C)), in time order per ECG
        for i, (x, names) in enumerate(zip(signals, leads)):
            x = torch.as_tensor(x, dtype=dtype, device=dev)
            self._check(i, x, names)
            chunks += [(i, len(names), c) for c in self.windows(self.embed(x, names))]
        outs = self._run_dense(chunks)
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
    # every part's state is floating point; an integer tensor would be cast silently by load_state_dict's copy
    ints = sorted(k for k, v in state.items() if not v.is_floating_point())
    if ints:
        raise ValueError(f"{source}: {ints[0]} is {str(state[ints[0]].dtype).removeprefix('torch.')}, not floating "
                         f"point weights ({len(ints)} such tensors: {ints[:5]})")
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
    return saved_encoder_config(json.loads(meta["config"]))


def saved_encoder_config(saved):
    """The EncoderConfig of a saved dict. A field added since the file was written takes the value that builds the
    model the file holds: files without `template` were written before beat_templates, by encoders without them."""
    return EncoderConfig(**({"template": False} | saved))
