"""Tests for anyecg/peft.py: LoRA adapters in peft's folder format, both ways (an adapter peft saved gives its logits
here; one saved here loads in peft), with every problem of an adapter folder named, and .bin files read without
unpickling objects."""

import json

import pytest
import torch

from anyecg.peft import load_peft_adapter, save_peft_adapter
from model import LLM, LLMConfig, add_lora
from test_model import make_hf_model


def random_lora(model, seed):
    """Non-zero B (peft and nanoECG both start B at zero, which would hide a wrong A, B or scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_an_adapter_saved_by_peft_loads_with_its_logits(tmp_path, file_format):
    peft = pytest.importorskip("peft")
    hf, path = make_hf_model(tmp_path, "gqa-tied")
    lora = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1)
    theirs = peft.get_peft_model(hf, lora)
    random_lora(theirs, 3)
    theirs.save_pretrained(tmp_path / "adapter", safe_serialization=file_format == "safetensors")
    assert (tmp_path / "adapter" / f"adapter_model.{file_format}").is_file()
    idx = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = theirs.eval()(idx).logits
        for merge in (False, True):
            ours = LLM.from_pretrained(path, dtype=torch.float32)
            wrapped = load_peft_adapter(ours, tmp_path / "adapter", merge=merge)
            assert len(wrapped) == 3 * 2 and all(m.merged == merge for m in wrapped)   # 3 linears x 2 layers
            assert (ours(idx) - ref).abs().max() <= 1e-4


def test_an_adapter_saved_here_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    hf, path = make_hf_model(tmp_path, "mha-untied")
    ours = LLM.from_pretrained(path, dtype=torch.float32)
    add_lora(ours, ("q_proj", "k_proj"), r=4, alpha=8, dropout=0.0)
    random_lora(ours, 5)
    save_peft_adapter(ours, tmp_path / "adapter", base_model=path)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    idx = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (ours.eval()(idx) - theirs(idx).logits).abs().max() <= 1e-4
    plain = LLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ours(idx) - plain(idx)).abs().max() > 1e-3   # the adapter changes the answer


def test_adapter_problems_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    _, path = make_hf_model(tmp_path, "mha-untied")
    ours = LLM.from_pretrained(path, dtype=torch.float32)
    add_lora(ours, ("q_proj",), r=4, alpha=8, dropout=0.0)
    save_peft_adapter(ours, tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    good = load_file(file)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    typo, norm = key.replace("q_proj", "qq_proj"), "base_model.model.model.norm.weight"
    for tensors, message in [
            ({**good, key: torch.zeros(4, 63)}, r"layers\.0\.self_attn\.q_proj: lora_A \(4, 63\).*needs \(4, 64\)"),
            ({**good, typo: good[key].clone()}, r"layers\.0\.self_attn\.qq_proj: the LLM has no linear"),
            ({**good, norm: torch.ones(64)}, r"key 'base_model\.model\.model\.norm\.weight' is not a LoRA matrix")]:
        save_file(tensors, file)
        with pytest.raises(ValueError, match=message):
            load_peft_adapter(LLM.from_pretrained(path), tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match=r"options not implemented here: \{'use_dora': True\}"):
        load_peft_adapter(LLM.from_pretrained(path), tmp_path / "a")
    with pytest.raises(ValueError, match="no LoRA adapter here"):
        load_peft_adapter(LLM.from_pretrained(path), tmp_path)


def test_target_modules_that_disagree_with_the_tensors_are_named_and_nothing_is_wrapped(tmp_path):
    from model import LoRALinear
    from test_model import tiny_llm
    ours = tiny_llm()
    add_lora(ours, ("q_proj",), r=4, alpha=8, dropout=0.0)
    save_peft_adapter(ours, tmp_path / "a")   # q_proj of layers 0 and 1
    config = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(config.read_text())
    for targets, message in [
            (["q_proj", "v_proj"],
             r"no tensors for \['layers\.0\.self_attn\.v_proj', 'layers\.1\.self_attn\.v_proj'\]"),
            (["k_proj"], r"no tensors for \['layers\.0\.self_attn\.k_proj', .*\] \(2 modules\); tensors for untargeted "
                         r"\['layers\.0\.self_attn\.q_proj', 'layers\.1\.self_attn\.q_proj'\] \(2 modules\)"),
            ("all-linear", r"no tensors for \['layers\.0\.mlp\.down_proj', .*\] and 7 more \(12 modules\)")]:
        config.write_text(json.dumps({**cfg, "target_modules": targets}))
        llm = tiny_llm()
        with pytest.raises(ValueError, match=r"a/adapter_config\.json: target_modules .* disagrees with "
                                             r"adapter_model\.safetensors: " + message):
            load_peft_adapter(llm, tmp_path / "a")
        assert not any(isinstance(m, LoRALinear) for m in llm.modules())   # refused before anything is wrapped
    for targets in [r"model\.layers\.\d+\.self_attn\.q_proj", ["self_attn.q_proj"]]:   # peft's other spellings
        config.write_text(json.dumps({**cfg, "target_modules": targets}))
        assert len(load_peft_adapter(tiny_llm(), tmp_path / "a")) == 2


class Payload:
    def __reduce__(self):
        return (print, ("a pickle ran code",))


def test_bin_adapters_are_read_without_unpickling_objects(tmp_path, capsys):
    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": Payload()}, d / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model\.bin: not a plain state dict of tensors"):
        load_peft_adapter(LLM(LLMConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1)), d)
    assert "a pickle ran code" not in capsys.readouterr().out
