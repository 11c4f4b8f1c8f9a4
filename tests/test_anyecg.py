"""Tests for anyECG-chat's own encoder (anyecg/release.py: load_anyecg) and preprocessing (anyecg_input): a small
random checkpoint in their key layout (width 128, depth 2), its output against a plain re-statement of their
`ViT.encode` + projection + `encode_and_project_ecg`, key and shape errors, the token count rule, .pth and
.safetensors, weights_only; the preprocessing against scipy.signal.resample (when scipy is there)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from anyecg.release import anyecg_input, load_anyecg
from data import STANDARD_LEADS, ECGRecord

D, DEPTH, HEADS, D_MLP, D_LLM = 128, 2, 2, 256, 96  # their heads are 64 wide


def their_state(seed=0):
    """(ecg_model state dict, projection state dict) with their key names and shapes, random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1, offset=0.0):
        return offset + scale * torch.randn(*shape, generator=g)

    vit = {"to_patch_embedding.1.weight": r(200, offset=1), "to_patch_embedding.1.bias": r(200),
           "to_patch_embedding.2.weight": r(D, 200), "to_patch_embedding.2.bias": r(D),
           "to_patch_embedding.3.weight": r(D, offset=1), "to_patch_embedding.3.bias": r(D),
           "lead_embedding": r(1, 12, D, scale=1), "pos_embedding": r(1, 6, D, scale=1), "cls_token": r(D, scale=1),
           "norm.weight": r(D, offset=1), "norm.bias": r(D), "fc.weight": r(512, D)}  # the unused classifier head
    for i in range(DEPTH):
        p = f"transformer.layers.{i}."
        vit |= {p + "0.norm.weight": r(D, offset=1), p + "0.norm.bias": r(D), p + "0.to_qkv.weight": r(3 * D, D),
                p + "0.to_out.0.weight": r(D, D), p + "0.to_out.0.bias": r(D),
                p + "1.net.0.weight": r(D, offset=1), p + "1.net.0.bias": r(D),
                p + "1.net.1.weight": r(D_MLP, D), p + "1.net.1.bias": r(D_MLP),
                p + "1.net.4.weight": r(D, D_MLP), p + "1.net.4.bias": r(D)}
    proj = {"0.weight": r(D_LLM, D), "0.bias": r(D_LLM), "2.weight": r(D_LLM, D_LLM), "2.bias": r(D_LLM)}
    return vit, proj


def save_pth(folder, vit, proj):
    torch.save(vit, folder / "ecg_model.pth")
    torch.save(proj, folder / "projection.pth")
    return folder


# --- their code, restated in plain torch ops --------------------------------


def ref_encode(s, series):
    """ViT.encode: (B, 12, 1000) -> (B, 61, D)."""
    ln = lambda x, k: F.layer_norm(x, x.shape[-1:], s[k + ".weight"], s[k + ".bias"])
    lin = lambda x, k: x @ s[k + ".weight"].T + (s[k + ".bias"] if k + ".bias" in s else 0)
    B = series.shape[0]
    x = series.reshape(B, 12, 5, 200).reshape(B, 60, 200)  # 'b (c p1) (n p2) -> b (c n) (p1 p2)', p1=1, p2=200
    x = ln(lin(ln(x, "to_patch_embedding.1"), "to_patch_embedding.2"), "to_patch_embedding.3")
    x = x.reshape(B, 12, 5, D) + s["lead_embedding"].unsqueeze(2) + s["pos_embedding"].unsqueeze(1)[:, :, 1:, :]
    x = torch.cat([s["cls_token"].expand(B, 1, D), x.reshape(B, 60, D)], dim=1)
    x[:, :1] += s["pos_embedding"][:, :1]
    for i in range(DEPTH):
        p = f"transformer.layers.{i}."
        q, k, v = (t.reshape(B, 61, HEADS, -1).transpose(1, 2) for t in lin(ln(x, p + "0.norm"), p + "0.to_qkv").chunk(3, -1))
        attn = torch.softmax(q @ k.transpose(-1, -2) * (D // HEADS) ** -0.5, dim=-1)
        x = lin((attn @ v).transpose(1, 2).reshape(B, 61, D), p + "0.to_out.0") + x
        x = lin(F.gelu(lin(ln(x, p + "1.net.0"), p + "1.net.1")), p + "1.net.4") + x
    return x


def ref_tokens(vit, proj, ecg):
    """encode_and_project_ecg for one (12, T) ECG."""
    segments = []
    for i in range(0, ecg.shape[1], 1000):
        seg = ecg[None, :, i:i + 1000]
        segments.append(F.pad(seg, (0, 1000 - seg.shape[2])))
    h = ref_encode(vit, torch.cat(segments))
    y = F.gelu(h @ proj["0.weight"].T + proj["0.bias"]) @ proj["2.weight"].T + proj["2.bias"]
    cls = torch.stack([e[0] for e in y]).mean(dim=0)
    return torch.cat([cls[None], torch.cat([e[1:] for e in y])])


# --- the encoder ---------------------------------------------------------------


@pytest.mark.parametrize("T", [1000, 1500, 6000, 999])
def test_tokens_match_their_code(tmp_path, T):
    vit, proj = their_state()
    enc = load_anyecg(save_pth(tmp_path, vit, proj))
    x = torch.rand(12, T, generator=torch.Generator().manual_seed(T)) * 2 - 1
    with torch.no_grad():
        out, ref = enc(x), ref_tokens(vit, proj, x)
    assert out.shape == (1 + 60 * math.ceil(T / 1000), D_LLM) == (enc.num_tokens(T), enc.d_llm)
    assert (out - ref).abs().max().item() <= 1e-4


def test_safetensors_loads_the_same(tmp_path):
    vit, proj = their_state()
    (tmp_path / "pth").mkdir(), (tmp_path / "st").mkdir()
    save_file(vit, str(tmp_path / "st" / "ecg_model.safetensors"))
    save_file(proj, str(tmp_path / "st" / "projection.safetensors"))
    x = torch.rand(12, 1500) * 2 - 1
    with torch.no_grad():
        a, b = load_anyecg(save_pth(tmp_path / "pth", vit, proj))(x), load_anyecg(tmp_path / "st")(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("edit, named", [
    (lambda v, p: v.pop("transformer.layers.1.0.to_qkv.weight"),
     r"missing keys: \['ecg_model\.transformer\.layers\.1\.0\.to_qkv\.weight'\]"),
    (lambda v, p: v.update({"transformer.layers.0.0.to_qkv.bias": torch.zeros(3 * D)}),
     r"unexpected keys: \['ecg_model\.transformer\.layers\.0\.0\.to_qkv\.bias'\]"),
    (lambda v, p: p.update({"2.bias": torch.zeros(D_LLM + 1)}),
     r"shape mismatches: \['projection\.2\.bias: file \(97,\) vs model \(96,\)'\]"),
    (lambda v, p: v.update({"pos_embedding": torch.zeros(1, 7, D)}),
     r"ecg_model\.pos_embedding: file \(1, 7, 128\) vs model \(1, 6, 128\)"),
])
def test_key_and_shape_errors_named(tmp_path, edit, named):
    vit, proj = their_state()
    edit(vit, proj)
    with pytest.raises(ValueError, match=r"(?s)does not match anyECG-chat's layout.*" + named):
        load_anyecg(save_pth(tmp_path, vit, proj))


def test_missing_file_named(tmp_path):
    vit, _ = their_state()
    torch.save(vit, tmp_path / "ecg_model.pth")
    with pytest.raises(FileNotFoundError, match="projection.pth"):
        load_anyecg(tmp_path)


class Payload:  # unpickling this would run open(path, "w"): weights_only must refuse before that
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_pth_is_loaded_with_weights_only(tmp_path):
    vit, proj = their_state()
    save_pth(tmp_path, vit, proj)
    torch.save(vit | {"extra": Payload(str(tmp_path / "ran"))}, tmp_path / "ecg_model.pth")
    with pytest.raises(ValueError, match=r"ecg_model\.pth: not a plain state dict of tensors"):
        load_anyecg(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_a_truncated_or_non_float_checkpoint_is_one_error_naming_the_file(tmp_path):
    vit, proj = their_state()
    save_file(vit, str(tmp_path / "ecg_model.safetensors"))
    save_file(proj, str(tmp_path / "projection.safetensors"))
    (tmp_path / "ecg_model.safetensors").write_bytes((tmp_path / "ecg_model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"ecg_model\.safetensors: not a readable safetensors file"):
        load_anyecg(tmp_path)
    save_file(vit | {"cls_token": vit["cls_token"].int()}, str(tmp_path / "ecg_model.safetensors"))
    with pytest.raises(ValueError, match=r"ecg_model\.cls_token is int32, not floating point"):
        load_anyecg(tmp_path)


def test_a_projector_wider_than_the_llm_is_refused_naming_both(tmp_path):
    from anyecg.release import load_chat
    from model import LLM, LLMConfig, train_tokenizer
    save_pth(tmp_path, *their_state())   # their projector gives D_LLM = 96-wide tokens
    LLM(LLMConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
        ).save_pretrained(tmp_path / "llm")
    train_tokenizer(["Sinus rhythm, normal ECG.", "Atrial fibrillation."] * 20, tmp_path / "llm", vocab_size=300)
    with pytest.raises(ValueError, match=r"projection\.pth: anyECG-chat's projector gives 96-wide tokens, but the "
                                         r"LLM of .*llm/config\.json is 64 wide"):
        load_chat(tmp_path, tmp_path / "llm")


def test_bad_input_shape(tmp_path):
    enc = load_anyecg(save_pth(tmp_path, *their_state()))
    with pytest.raises(ValueError, match=r"\(12, T\)"):
        enc(torch.zeros(8, 1000))


# --- the preprocessing ---------------------------------------------------------


def record(fs, seconds, leads, seed=0):
    rng = np.random.default_rng(seed)
    return ECGRecord(rng.standard_normal((len(leads), round(fs * seconds))).astype(np.float32), float(fs), leads)


def their_input(rec):
    """get_ecg_from_path (resample first, zero-fill, reorder) + ecg_transform, on (samples, leads) like theirs."""
    signal = pytest.importorskip("scipy.signal")
    ecg = rec.signal.T.astype(np.float64)
    if rec.fs != 100:
        ecg = signal.resample(ecg, int(ecg.shape[0] * 100 / rec.fs), axis=0)
    order = list(rec.leads) + [x for x in STANDARD_LEADS if x not in rec.leads]
    ecg = np.concatenate([ecg, np.zeros((ecg.shape[0], 12 - len(rec.leads)))], axis=1)
    ecg = ecg[:, [order.index(x) for x in STANDARD_LEADS]]
    with np.errstate(invalid="ignore"):
        ecg = (ecg - ecg.min(0, keepdims=True)) / (ecg.max(0, keepdims=True) - ecg.min(0, keepdims=True)) * 2 - 1
    return np.nan_to_num(ecg, nan=0).T.astype(np.float32)


@pytest.mark.parametrize("fs, seconds, leads", [
    (360, 30.3, ["II", "V1"]),              # MIT-BIH-like: odd length, 2 leads
    (500, 10, list(reversed(STANDARD_LEADS))),
    (250, 7.002, ["V5", "I", "aVF"]),
    (100, 12.34, ["III"]),                  # already 100 Hz: not resampled
])
def test_input_equals_their_preprocessing(fs, seconds, leads):
    rec = record(fs, seconds, leads)
    x = anyecg_input(rec)
    assert x.dtype == np.float32 and x.shape == (12, int(rec.signal.shape[1] * 100 / fs))
    np.testing.assert_allclose(x, their_input(rec), atol=1e-6)


def test_input_zero_fill_range_and_nan():
    rec = record(500, 4, ["V2", "I", "II", "X"])
    rec.signal[2, 100] = np.nan                 # lead II: one NaN spreads, and the lead becomes 0
    x = anyecg_input(rec)
    present = [STANDARD_LEADS.index(n) for n in ("I", "V2")]
    for i in range(12):
        if i in present:
            assert x[i].min() == -1 and x[i].max() == 1
        else:
            assert not x[i].any()               # absent, "X" not a lead, or NaN-poisoned: all 0
    assert np.isfinite(x).all()
