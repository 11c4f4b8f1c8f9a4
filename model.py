"""
model.py — the language side of nanoECG, in one file, read top to bottom:

  1. Tokenizer    sentencepiece (or tokenizer.json) + *added* special tokens, never split; `train_tokenizer`.
  2. LLM          a Llama-family decoder from scratch: RMSNorm, rotate-half RoPE (rope_scaling: linear, llama3),
                  grouped-query attention via F.scaled_dot_product_attention, SwiGLU, tied embeddings, a KV cache.
  3. Checkpoints  `LLM.from_pretrained(dir)` reads a Hugging Face folder (single or sharded safetensors, LLaVA-style
                  too) memory-mapped into a meta-device model, so a 7B model never exists twice in memory;
                  `save_pretrained` writes the same format back.
  4. LoRA         an adapter around nn.Linear that can merge into it (peft's folder format: anyecg/peft.py).
  5. Sampling     `generate`: left-padded prompts prefilled once, then decoded through the KV cache (greedy,
                  temperature, top-k, top-p), with stop tokens, stop strings and streaming.
  6. Devices      `choose_device`: --device auto is CUDA, then Apple's MPS, then the CPU; `synchronize` for timing.
The ECG side (encoder, splicing, the chat format) is in ecg_encoder.py and chat.py.

Module and parameter names follow Hugging Face's Llama (embed_tokens, layers.N.self_attn.q_proj, ...), so loading a
checkpoint strips a prefix and renames nothing, and RoPE's rotate-half layout is transformers' (no Q/K permutation).
A left-padded batch gives exactly the tokens each prompt gives alone: padding is masked out of attention and RoPE
positions are counted over real tokens only (LLM.forward).
"""

import contextlib
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import atomic_write, read_json


# --------------------------------------------------------------------------- 1. Tokenizer
class Tokenizer:
    """A checkpoint's tokenizer + added special tokens, from whichever file its folder holds:
    - tokenizer.model (sentencepiece: Llama-2, TinyLlama, Vicuna, Mistral): text is encoded as sentencepiece does,
      dummy-prefix space included; text holding special tokens is cut around them and each piece encoded alone
      (transformers' "legacy" Llama behaviour), each special token one id;
    - tokenizer.json (byte-level BPE: Llama-3.x, Qwen, SmolLM) through the optional `tokenizers` library.
    New special tokens get the next free ids; bos_id is None for a model without one (Qwen)."""

    def __init__(self, path, special_tokens=()):
        path = Path(path)
        if path.suffix == ".json" or (path.is_dir() and not (path / "tokenizer.model").is_file()
                                      and (path / "tokenizer.json").is_file()):
            self._load_json(path / "tokenizer.json" if path.is_dir() else path, special_tokens)
            return
        import sentencepiece as spm
        model_file = path / "tokenizer.model" if path.is_dir() else path
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file}: no tokenizer.model (sentencepiece) or tokenizer.json here")
        self.model_file, self.tk = model_file, None
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:   # sentencepiece's message names its C++ source, not the file
            raise ValueError(f"{model_file}: not a readable sentencepiece model ({str(e).split('] ')[-1]})") from None
        self.base_vocab_size = self.sp.get_piece_size()
        added_file = model_file.parent / "added_tokens.json"   # Hugging Face's record of added tokens, if saved
        self.added = {str(k): int(v) for k, v in read_json(added_file).items()} if added_file.is_file() else {}
        self.add_special_tokens(special_tokens)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # Llama's model has no pad piece; padding positions are masked, so any id works: use unk.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()

    def _load_json(self, file, special_tokens):
        try:
            from tokenizers import Tokenizer as JSONTokenizer
        except ImportError:
            raise ImportError(f"{file}: reading tokenizer.json needs the tokenizers library: pip install tokenizers") \
                from None
        self.model_file, self.sp = file, None
        try:
            self.tk = JSONTokenizer.from_file(str(file))
        except Exception as e:   # the library raises a bare Exception for a cut-off or malformed file
            raise ValueError(f"{file}: not a readable tokenizer.json ({e})") from None
        self.base_vocab_size = self.tk.get_vocab_size(with_added_tokens=False)
        self.added = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items()}
        self.add_special_tokens(special_tokens)
        config_file = file.parent / "tokenizer_config.json"
        self.config = read_json(config_file) if config_file.is_file() else {}

        def token_id(name):   # a token in tokenizer_config.json is a string or {"content": string, ...}
            token = self.config.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            return self.tk.token_to_id(token) if token else None
        self.bos_id, self.eos_id = token_id("bos_token"), token_id("eos_token")
        self.pad_id = next(i for i in (token_id("pad_token"), self.eos_id, 0) if i is not None)

    @property
    def vocab_size(self):
        return max([self.base_vocab_size - 1, *self.added.values()]) + 1

    def add_special_tokens(self, tokens):
        """New special tokens, kept whole in any text, at the next free ids (those it has keep theirs)."""
        new = [t for t in tokens if t not in self.added]
        if self.tk is not None:   # tokenizer.json: the tokenizers library numbers them
            self.tk.add_special_tokens(new)
            self.added = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items()}
        else:
            for token in new:
                self.added[token] = self.vocab_size
        self.id_to_added = {i: t for t, i in self.added.items()}
        # longest first, so that a token which is a prefix of another never wins
        alternatives = sorted(self.added, key=len, reverse=True)
        self.split_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

    def encode(self, text, bos=False, eos=False, special=True):
        """special=False: the spelling of a special token in text is ordinary text, encoded piece by piece like any
        other (how chat.encode_chat encodes what a user or a data row wrote, so no text can open or close a turn)."""
        return [self.bos_id] * bool(bos) + self._encode(text, special) + [self.eos_id] * bool(eos)

    def _encode(self, text, special):
        if self.tk is not None:
            self.tk.encode_special_tokens = not special   # tokenizers' switch: special tokens split as text
            try:
                return self.tk.encode(text, add_special_tokens=False).ids
            finally:
                self.tk.encode_special_tokens = False
        pieces = self.split_re.split(text) if special and self.split_re else [text]
        return [i for piece in pieces if piece
                for i in ([self.added[piece]] if special and piece in self.added else self.sp.encode(piece))]

    def decode(self, ids):
        if self.tk is not None:
            return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)
        # decode runs of ordinary ids with sentencepiece; added tokens print as their string
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in self.id_to_added or i >= self.base_vocab_size:
                out += [self.sp.decode(run), self.id_to_added.get(i, "")]
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def save(self, out_dir):
        """Hugging Face's files: tokenizer.model + added_tokens.json, or tokenizer.json + tokenizer_config.json."""
        out_dir = Path(out_dir)
        if self.tk is not None:   # the added tokens live inside tokenizer.json; bos/eos/pad names beside it
            atomic_write(out_dir / "tokenizer.json", self.tk.to_str())
            atomic_write(out_dir / "tokenizer_config.json", json.dumps(self.config, indent=1))
            return
        atomic_write(out_dir / "tokenizer.model", self.model_file.read_bytes())
        atomic_write(out_dir / "added_tokens.json", json.dumps(self.added, indent=1))


def train_tokenizer(texts, out_dir, vocab_size=2000, special_tokens=(), phrases=False):
    """Train a Llama-style BPE sentencepiece model on an iterable of strings, with Llama's choices: byte fallback (no
    unknown characters), digits split one by one, no normalisation (so decode(encode(x)) == x), a dummy-prefix space.
    phrases: pieces may span spaces, so a set phrase of the text ("Left bundle branch block") can become one piece;
    letters never join digits or punctuation (sentencepiece's script split), so a text cut after "Answer:" or a
    "." is still encoded as the whole text is."""
    import sentencepiece as spm
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 16,
        split_by_whitespace=not phrases, max_sentencepiece_length=64 if phrases else 16, num_threads=2, minloglevel=2)
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    (out_dir / "added_tokens.json").unlink(missing_ok=True)
    tok = Tokenizer(out_dir / "tokenizer.model", special_tokens)
    tok.save(out_dir)
    return tok


# --------------------------------------------------------------------------- 2. The LLM
@dataclass
class LLMConfig:
    # field names are Hugging Face's Llama config names, so config.json maps one to one
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 0        # 0: = num_attention_heads; fewer: grouped-query attention
    head_dim: int = 0                   # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # {"rope_type": "linear" | "llama3", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias: bool = False              # q/k/v projections with a bias even without attention_bias (Qwen2)
    qk_norm: bool = False               # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.num_key_value_heads:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")


def rope_inv_freq(cfg):
    """Inverse frequencies of rotary embeddings, (head_dim/2,), with rope_scaling applied."""
    d = cfg.head_dim
    # always on the CPU: a small table, and meta-device arithmetic (from_pretrained) is slow to set up
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":  # position / factor, folded into the frequencies
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (linear, llama3 are)")


def apply_rope(x, cos, sin):
    # x: (B, H, T, D); cos, sin: (B, 1, T, D). Rotate-half layout: pairs are (i, i + D/2).
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 for stability under bf16, scale in the input dtype (as Llama does)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    """Static per-layer cache: keys/values for up to max_len positions, written in place."""

    def __init__(self, batch_size, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start, k, v):
        # k, v: (B, Hkv, T, D) written at slots [start, start+T); returns the filled prefix
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; {end} needed. "
                             "Call setup_cache with a larger max_len.")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, b, b_qkv = cfg.hidden_size, cfg.attention_bias, cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(C, self.n_heads * self.head_dim, bias=b_qkv)
        self.k_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=b_qkv)
        self.v_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=b_qkv)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, C, bias=b)
        if cfg.qk_norm:   # Qwen3: keeps the attention logits in range without a bias
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.cache = None  # a KVCache while decoding

    def forward(self, x, cos, sin, mask, start_pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)                      # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)                   # (B, T, Hkv, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                                      # (B, H|Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None and start_pos is not None:
            k, v = self.cache.update(start_pos, k, v)                                   # (B, Hkv, S, D)
        # mask is None -> plain causal (training, or a fresh unpadded prompt), or no mask at all
        # for a single new token attending to every cached one; otherwise one boolean (B,1,T,S).
        is_causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                         # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, H, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(C, H, bias=b)
        self.up_proj = nn.Linear(C, H, bias=b)
        self.down_proj = nn.Linear(H, C, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, start_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_for(attention_mask, T, start_pos, document_ids=None):
    """The one boolean mask (B, 1, T, S) SDPA gets when padding, a cache or packed texts need it, else None.
    attention_mask: (B, S), 1 for real tokens and 0 for padding, over every key so far (cached and new). Query t sits
    at slot start_pos + t. document_ids (B, T), no cache: texts packed in one row, each attending to itself alone."""
    if document_ids is not None:
        if start_pos not in (None, 0) or attention_mask is not None:
            raise ValueError("document_ids are for packed training rows: no KV cache, no attention_mask")
        same = document_ids[:, :, None] == document_ids[:, None, :]                    # (B, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=same.device).tril()
        return (same & causal)[:, None]                                               # (B, 1, T, T)
    if attention_mask is None or bool(attention_mask.all()):
        if start_pos in (None, 0) or T == 1:
            return None  # is_causal (T > 1) or attend to everything cached (T == 1)
        attention_mask = torch.ones(1, start_pos + T, dtype=torch.bool)
    S = attention_mask.shape[1]
    device = attention_mask.device
    q_slot = (start_pos or 0) + torch.arange(T, device=device)
    k_slot = torch.arange(S, device=device)
    causal = k_slot[None, :] <= q_slot[:, None]                                  # (T, S)
    mask = causal[None] & attention_mask[:, None, :].bool()                      # (B, T, S)
    # a padding query would see no key, and its NaN from SDPA would leak on through 0 * NaN: it sees at least itself
    mask = mask | (k_slot[None, :] == q_slot[:, None])[None]
    return mask[:, None]                                                         # (B, 1, T, S)


class LLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        # an empty weight skips nn.Embedding's own normal_ init: init_weights draws it below, and
        # on the meta device (from_pretrained) that normal_ alone would cost seconds of start-up
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        if self.embed_tokens.weight.device.type != "meta":  # from_pretrained assigns real weights later
            self.init_weights()

    def init_weights(self, std=0.02):
        """Random init for a model trained from scratch (from_pretrained skips this)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        # scale the residual-branch outputs down with depth (GPT-2 / nanoGPT)
        for block in self.layers:
            for lin in (block.self_attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(lin.weight, std=std / math.sqrt(2 * len(self.layers)))
        return self

    def rope(self, position_ids, dtype):
        # position_ids: (B, T) -> cos, sin: (B, 1, T, D), computed in fp32 like transformers
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]      # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)                                        # (B, T, D)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def forward(self, idx=None, *, inputs_embeds=None, attention_mask=None, position_ids=None,
                start_pos=None, last_only=False, document_ids=None):
        """Token ids (B, T) or embeddings (B, T, C) -> logits (B, T, V) (or (B, 1, V) if last_only). attention_mask
        (B, S): 1 = real token, 0 = padding, over all keys (cache + new). start_pos: with a KV cache set up, the cache
        slot of the first new token; None = no cache. position_ids (B, T): RoPE positions; by default counted over
        real tokens, so a left-padded prompt gets the same positions it would get alone. document_ids (B, T): texts
        packed end to end in a row (training, no cache), a token attending only to those of its own text; padding
        after the last text may form a text of its own, as its labels are -100."""
        x = self.embed_tokens(idx) if inputs_embeds is None else inputs_embeds        # (B, T, C)
        B, T, _ = x.shape
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = (start_pos or 0) + torch.arange(T, device=x.device)[None].expand(B, T)
        cos, sin = self.rope(position_ids, x.dtype)
        mask = attention_mask_for(attention_mask, T, start_pos, document_ids)
        if mask is not None:
            mask = mask.to(x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, start_pos)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    # ---- KV cache
    def setup_cache(self, batch_size, max_len, dtype=None, device=None):
        p = self.embed_tokens.weight
        for layer in self.layers:
            layer.self_attn.cache = KVCache(batch_size, self.config.num_key_value_heads, max_len,
                                            self.config.head_dim, dtype or p.dtype, device or p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.self_attn.cache = None

    def resize_vocab(self, new_size):
        """Grow embeddings (and the head) to new_size rows for added special tokens; new rows = the old rows' mean."""
        def grown(p):
            w = p.data
            extra = w.float().mean(0, keepdim=True).to(w.dtype).expand(new_size - w.shape[0], -1)
            return nn.Parameter(torch.cat([w, extra], 0), requires_grad=p.requires_grad)
        if new_size <= self.embed_tokens.weight.shape[0]:
            return self
        self.embed_tokens.weight = grown(self.embed_tokens.weight)
        tied = self.config.tie_word_embeddings
        self.lm_head.weight = self.embed_tokens.weight if tied else grown(self.lm_head.weight)
        self.embed_tokens.num_embeddings = self.lm_head.out_features = new_size
        self.config.vocab_size = new_size
        return self

    # ---- checkpoints (the helpers are in section 3)
    @classmethod
    def from_pretrained(cls, hf_dir, dtype=None, device=None):
        """A Hugging Face checkpoint folder -> LLM, built on the meta device, the weights assigned as they are read.
        The config and the weights must agree: every tensor config.json implies is there, every tensor of the LLM in
        the files is used, each is finite floating point, or a ValueError names the file and the keys."""
        cfg = read_hf_config(hf_dir)
        with torch.device("meta"):  # no memory is allocated: the weights are assigned as they are read
            model = cls(cfg)
        expected = model.state_dict()
        if cfg.tie_word_embeddings:
            expected.pop("lm_head.weight")
        with contextlib.ExitStack() as stack:
            key_file = open_checkpoint(hf_dir, stack, device)   # checkpoint key -> (file, its open handle)
            prefix, head_key = _llm_prefix(key_file, hf_dir)
            to_ckpt = {k: head_key if k == "lm_head.weight" else prefix + k for k in expected}
            check_llm_keys(key_file, to_ckpt, prefix, head_key, cfg, hf_dir)
            state = {name: read_weight(key_file, key, expected[name].shape, dtype) for name, key in to_ckpt.items()}
        model.load_state_dict(state, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(cfg).to(model.embed_tokens.weight.device)  # buffers are not in the checkpoint
        return model.eval()

    def save_pretrained(self, out_dir):
        save_pretrained(self, out_dir)


# --------------------------------------------------------------------------- 3. Hugging Face checkpoints
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "llava", "llava_llama", "qwen2", "qwen3"}
ARCHITECTURE_FLAGS = {"qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True}}   # what sets them apart from Llama


def read_hf_config(hf_dir):
    """config.json -> LLMConfig: the classic (rope_theta + rope_scaling) and the newer (rope_parameters) spellings,
    and the text_config of LLaVA-style folders."""
    path = Path(hf_dir) / "config.json"
    raw = read_json(path)
    raw = raw.get("text_config") or raw
    model_type, archs = raw.get("model_type", ""), raw.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES and not any("Llama" in a or "Mistral" in a for a in archs):
        raise ValueError(f"{path}: model_type={model_type!r} architectures={archs} is not a "
                         f"Llama-family model (supported model_type: {sorted(SUPPORTED_MODEL_TYPES)})")
    window = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None   # Qwen: off unless asked
    if window and window < raw.get("max_position_embeddings", 0):
        print(f"note: {path}: sliding_window={window} is not implemented; attention "
              "is full, which is identical for sequences up to that length")
    names = {f.name for f in fields(LLMConfig)}
    kwargs = {k: v for k, v in raw.items() if k in names and v is not None}
    rope = raw.get("rope_parameters")  # newer spelling: theta and scaling in one dict
    if rope:
        kwargs["rope_theta"] = rope.get("rope_theta", kwargs.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        kwargs["rope_scaling"] = None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in kwargs]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
    kwargs.setdefault("intermediate_size", 4 * kwargs["hidden_size"])
    return LLMConfig(**{**kwargs, **ARCHITECTURE_FLAGS.get(model_type, {})})


def checkpoint_files(hf_dir):
    """The safetensors file(s) of a checkpoint folder, single or sharded."""
    hf_dir = Path(hf_dir)
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [hf_dir / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard named in {index.name} is missing")
        return files
    hint = " (only .bin pickles found: convert them to safetensors first)" if list(hf_dir.glob("*.bin")) else ""
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json{hint}")


def _llm_prefix(key_file, hf_dir):
    """Where the LLM's keys sit: '' for our own files, 'model.' for LlamaForCausalLM, or e.g. 'language_model.model.'
    / 'model.language_model.' in LLaVA-style folders, whose other keys (vision/ECG tower, projector) are ignored."""
    embeds = [k for k in key_file if k.endswith("embed_tokens.weight")]
    if len(embeds) != 1:
        raise ValueError(f"{hf_dir}: expected one '*embed_tokens.weight' key, found {embeds or 'none'}")
    prefix = embeds[0][: -len("embed_tokens.weight")]
    heads = [k for k in key_file if k.endswith("lm_head.weight")]
    return prefix, heads[0] if len(heads) == 1 else "lm_head.weight"


def open_checkpoint(hf_dir, stack, device=None):
    """{key: (file, its open safe_open handle)} over the folder's safetensors file(s), the handles kept open by
    `stack` (an ExitStack) so that each tensor is read memory-mapped when it is needed."""
    from safetensors import safe_open
    key_file = {}
    for f in checkpoint_files(hf_dir):
        try:
            sf = stack.enter_context(safe_open(str(f), framework="pt", device=str(device or "cpu")))
        except Exception as e:   # a truncated or foreign file: safetensors' own error does not name it
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
        key_file |= {k: (f, sf) for k in sf.keys()}
    return key_file


LLM_PARTS = ("embed_tokens.", "layers.", "norm.", "rotary_emb.")   # the LLM's keys start so after its prefix


def is_llm_key(key, prefix="model.", head_key="lm_head.weight"):
    """Whether a checkpoint key belongs to the LLM (not to a tower or projector stored beside it)."""
    return key == head_key or key.startswith(prefix) and key[len(prefix):].startswith(LLM_PARTS)


def few(keys, n=5):
    """'[a, b, c] and 7 more': a few keys of many, for an error that stays one line."""
    keys = list(keys)
    return f"{keys[:n]}" + (f" and {len(keys) - n} more" if len(keys) > n else "")


def check_llm_keys(key_file, to_ckpt, prefix, head_key, cfg, hf_dir):
    """Every key the config implies is in the files, and every LLM key in the files is one of them: a config.json
    that disagrees with its weights (num_hidden_layers 2 on a 4-layer model) would otherwise run half the model."""
    missing = [k for k in to_ckpt.values() if k not in key_file]
    if missing:
        files = {f for f, _ in key_file.values()}
        where = files.pop() if len(files) == 1 else Path(hf_dir) / "model.safetensors.index.json"
        raise ValueError(f"{where}: lacks {few(missing)} ({len(missing)} keys) that config.json implies")
    used = set(to_ckpt.values())
    unused = [k for k in key_file if is_llm_key(k, prefix, head_key) and k not in used
              # old Llama checkpoints saved RoPE's frequency table as a buffer; it is computed from config.json here
              and not k.endswith("rotary_emb.inv_freq")
              and not (cfg.tie_word_embeddings and k == head_key and _tied_copy(key_file, k, prefix))]
    if unused:
        raise ValueError(f"{key_file[unused[0]][0]}: {few(unused)} ({len(unused)} tensors) are not used by the model "
                         f"{Path(hf_dir) / 'config.json'} describes (num_hidden_layers={cfg.num_hidden_layers}, "
                         f"tie_word_embeddings={cfg.tie_word_embeddings}); the config disagrees with the weights")


def _tied_copy(key_file, head_key, prefix):
    """Whether a saved head equals the embeddings: with tie_word_embeddings some savers write the tied head too, a
    copy the model rightly skips; a head that differs means the config's tying disagrees with the weights."""
    embed = prefix + "embed_tokens.weight"
    return torch.equal(key_file[head_key][1].get_tensor(head_key), key_file[embed][1].get_tensor(embed))


def read_weight(key_file, key, shape, dtype=None):
    """One tensor of the checkpoint, memory-mapped, checked against the shape the config implies; a tensor that is not
    floating point, or holds NaN or Inf, is refused (it would fail in the first matmul, or answer noise)."""
    f, sf = key_file[key]
    t = sf.get_tensor(key)
    if t.shape != shape:
        raise ValueError(f"{f}: key {key} has shape {tuple(t.shape)}, config.json implies {tuple(shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{f}: key {key} is {str(t.dtype).removeprefix('torch.')}, not floating point weights")
    # NaN and Inf carry into a sum, which needs no tensor-sized temporary; only an overflowing sum needs the full check
    if not (torch.isfinite(t.sum()) or torch.isfinite(t).all()):
        raise ValueError(f"{f}: key {key} holds non-finite values (NaN or Inf)")
    return t.to(dtype) if dtype is not None else t


def hf_state_dict(model):
    """Our state dict under Hugging Face names, LoRA adapters merged into their weights."""
    state = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            key = f"{name}.{pname}"
            if pname.startswith("lora_") or (key == "lm_head.weight" and model.config.tie_word_embeddings):
                continue
            if isinstance(module, LoRALinear) and pname == "weight":
                p = module.merged_weight()
            state[key if key == "lm_head.weight" else "model." + key] = p
    return state


def save_pretrained(model, out_dir, extra_tensors=None, extra_config=None):
    """config.json + model.safetensors in Hugging Face's layout (Llama, or Qwen2/3 by the config), written atomically.
    extra_tensors / extra_config let the ECG-chat model store its encoder and projector in the same file and
    config (LLaVA style): transformers and from_pretrained still read the LLM."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = asdict(model.config)
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    kind = "qwen3" if model.config.qk_norm else "qwen2" if model.config.qkv_bias else "llama"
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[kind]
    cfg.update(architectures=[arch], model_type=kind, torch_dtype=dtype, **(extra_config or {}))
    tensors = {k: v.detach().contiguous().cpu() for k, v in {**hf_state_dict(model), **(extra_tensors or {})}.items()}
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out_dir / "config.json", json.dumps(cfg, indent=2))


# --------------------------------------------------------------------------- 4. LoRA
class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, W and b the base layer's, under their own names (a wrapped
    model still loads and saves plain checkpoints); B starts at zero, so wrapping changes nothing."""

    def __init__(self, base: nn.Linear, r=8, alpha=16, dropout=0.0):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        self.train(base.training)   # an eval-mode model stays in eval mode (no dropout) when wrapped

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.merged:
            y = y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale
        return y

    def delta(self):
        return (self.lora_B @ self.lora_A) * self.scale  # (out, in)

    def merged_weight(self):
        return self.weight if self.merged else self.weight + self.delta()

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta()
            self.merged = True


def add_lora(model, targets=("q_proj", "k_proj"), r=8, alpha=16, dropout=0.1):
    """Wrap every nn.Linear whose attribute name is in `targets` (anyECG: q_proj, k_proj); freezing is the caller's."""
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r, alpha, dropout))
                wrapped += 1
    if not wrapped:
        raise ValueError(f"add_lora: no nn.Linear named any of {list(targets)}")
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


# --------------------------------------------------------------------------- 5. Sampling
def left_pad(prompts, pad_id):
    """list of token-id lists -> ids (B, T) and attention_mask (B, T), 1 on real tokens."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        if p:
            ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, T - len(p):] = 1
    return ids, mask


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B,). temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p                          # mass before this token already enough
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(llm, input_ids, attention_mask=None, *, inputs_embeds=None, max_new_tokens=64,
             temperature=0.0, top_k=None, top_p=None, stop_ids=(), stop_strings=(), tokenizer=None,
             on_text=None, generator=None):
    """Continue a (left-padded) batch of prompts. Returns the new tokens of each row, cut before the stop token /
    stop string. input_ids (B, T), attention_mask (B, T); inputs_embeds (B, T, C) replaces the embeddings of
    input_ids for the prompt (the ECG-chat model passes prompts with ECG tokens spliced in). stop_strings need
    a tokenizer. on_text(row, text) is called with each piece of new text."""
    B, T = input_ids.shape
    device = llm.embed_tokens.weight.device
    input_ids = input_ids.to(device)
    attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(device)
    llm.setup_cache(B, T + max_new_tokens)
    try:
        logits = llm(input_ids if inputs_embeds is None else None, inputs_embeds=inputs_embeds,
                     attention_mask=attention_mask, start_pos=0, last_only=True)[:, -1]   # (B, V)
        new, done, printed = [[] for _ in range(B)], [False] * B, [""] * B  # printed: text already streamed per row
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)           # (B,)
            for b in range(B):
                if done[b]:
                    continue
                tok = int(nxt[b])
                if tok in stop_ids:
                    done[b] = True
                    continue
                new[b].append(tok)
                if tokenizer is not None and (on_text or stop_strings):
                    text = tokenizer.decode(new[b])
                    hit = [text.index(s) for s in stop_strings if s in text]
                    if hit:
                        done[b] = True
                        text = text[:min(hit)]
                    if on_text and len(text) > len(printed[b]) and not text.endswith("\ufffd"):
                        on_text(b, text[len(printed[b]):])
                        printed[b] = text
            if all(done) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            logits = llm(nxt[:, None], attention_mask=attention_mask, start_pos=T + step)[:, -1]
    finally:
        llm.clear_cache()
    if stop_strings and tokenizer is not None:
        for row in new:  # cut before the first stop string: drop tokens until the text ends at or before its start
            text = tokenizer.decode(row)
            cut = min((text.index(s) for s in stop_strings if s in text), default=len(text))
            while row and len(tokenizer.decode(row)) > cut:
                row.pop()
    for b, row in enumerate(new if on_text and tokenizer is not None else []):   # the end of a character held
        text = tokenizer.decode(row)                                           # back that never finished
        if len(text) > len(printed[b]) and text.startswith(printed[b]):
            on_text(b, text[len(printed[b]):])
    return new


# --------------------------------------------------------------------------- 6. Devices
def choose_device(name="auto", cuda=None, mps=None, local_rank=0):
    """--device -> torch.device. "auto": CUDA, then Apple silicon's MPS, then the CPU. cuda / mps: whether those
    backends are there (None: ask torch; tests pass them in). Under torchrun each process takes GPU local_rank."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    mps = torch.backends.mps.is_available() if mps is None else mps
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: auto, cpu, cuda or mps")
    if name == "cuda" and not cuda:
        raise ValueError(f"--device cuda: torch {torch.__version__} sees no CUDA GPU (a CPU build of torch, or no "
                         "driver); use --device cpu")
    if name == "mps" and not mps:
        raise ValueError("--device mps: no Apple-silicon GPU here (MPS needs macOS 12.3+ on an M-series Mac)")
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


def synchronize(device):
    """Wait for the device's queued work (timing a GPU needs it; the CPU runs in order)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
