"""Tests for images/vit.py: a pretrained CLIP vision tower (GEM's image encoder) loads into ImageEncoder and gives
transformers' features; another input size resamples its position grid; a folder that is not CLIP is named."""

import pytest
import torch

from images.vit import load_clip_vision


def _tiny_clip(tmp_path, image_size=56):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=image_size, patch_size=14)
    hf = transformers.CLIPVisionModel(cfg).eval()
    with torch.no_grad():  # LayerNorms at 1/0 and a zero class token would hide a swapped weight
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf


def test_clip_vision_matches_transformers(tmp_path):
    hf = _tiny_clip(tmp_path)
    ours = load_clip_vision(tmp_path).eval()
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_hidden_states=True)
        ln = hf.post_layernorm if hasattr(hf, "post_layernorm") else hf.vision_model.post_layernorm
        assert (ours.features(pixels) - ln(out.last_hidden_state[:, 1:])).abs().max() < 1e-4
        first = load_clip_vision(tmp_path, n_layers=1).eval()   # the first block only
        assert (first.features(pixels) - ln(out.hidden_states[1][:, 1:])).abs().max() < 1e-4
        # the pixel normalisation is CLIP's: uint8 in, (x / 255 - mean) / std
        image = torch.randint(0, 256, (56, 56, 3), dtype=torch.uint8)
        mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
        expected = ((image.float() / 255 - mean) / std).permute(2, 0, 1)
        assert (ours.pixels([image])[0] - expected).abs().max() < 1e-5


def test_clip_vision_resized_grid_and_bad_folder(tmp_path):
    _tiny_clip(tmp_path / "clip")
    wide = load_clip_vision(tmp_path / "clip", height=56, width=112, out_rows=2, out_cols=4)
    assert wide.pos_emb.shape == (1 + 4 * 8, 32)
    assert wide([torch.zeros(60, 120, 3, dtype=torch.uint8)]).shape == (1, 8, 32)
    same = load_clip_vision(tmp_path / "clip", height=56, width=56)  # resampling to its own size changes nothing
    assert torch.equal(same.pos_emb, load_clip_vision(tmp_path / "clip").pos_emb)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a CLIP vision model"):
        load_clip_vision(tmp_path / "llama")
