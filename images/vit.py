"""
images/vit.py — the image encoder for paper ECGs (GEM's second modality): a small ViT trained here, or a pretrained
CLIP vision tower (`load_clip_vision`; GEM's is CLIP ViT-L/336) read from a Hugging Face folder. Both are the same
`ImageEncoder`: images (H, W, 3) of any size -> (B, num_tokens, d_model), on the ECG encoder's transformer blocks.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from ecg_encoder import EncoderBlock


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
        self.blocks = nn.ModuleList(EncoderBlock(cfg, QuickGELU if cfg.clip else nn.GELU) for _ in range(cfg.n_layers))
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
