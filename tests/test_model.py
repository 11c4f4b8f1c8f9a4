"""Tests for model.py: parity with transformers, the tokenizer,
KV-cache decoding, left-padded batching, LoRA, and clear errors on bad checkpoints."""

import json

import pytest
import torch

from chat import ECG_TOKEN, END_TURN, SPECIAL_TOKENS, USER
from helpers import edit_folder
from model import (LLM, LLMConfig, LoRALinear, Tokenizer, add_lora, generate, left_pad, lora_layers, sample_next,
                   train_tokenizer)

transformers = pytest.importorskip("transformers")

# head_dim 16 and theta 500 give wavelengths of 6, 14, 30, 65, 140, ... positions: with an original context of 64,
# the high-frequency band (< 64 / 4) keeps two as they are, the smoothed band (16..64) has one, the rest slow down
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
CONFIGS = {
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-llama3-rope": dict(num_key_value_heads=1, tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE),
    "mha-linear-rope": dict(num_key_value_heads=4, tie_word_embeddings=True,
                            rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def make_hf_model(tmp_path, name, **save_kwargs):
    """A tiny random LlamaForCausalLM saved with transformers' own save_pretrained."""
    spec = dict(CONFIGS[name])
    rope = spec.pop("rope_scaling", None)
    rope_parameters = {"rope_type": "default", "rope_theta": 500.0}
    if rope:
        rope_parameters = {**rope, "rope_theta": 500.0}
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
                                   rope_parameters=rope_parameters, bos_token_id=1, eos_token_id=2, **spec)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # make the norms non-trivial so that a mistake there shows
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / name
    hf.save_pretrained(out, **save_kwargs)
    return hf, out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    hf, path = make_hf_model(tmp_path, name)
    ours = LLM.from_pretrained(path, dtype=torch.float32)
    idx = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |dlogits| = {diff}"


def test_config_spellings_classic_and_new(tmp_path):
    # the classic spelling (rope_theta + rope_scaling at top level) reads like the new one
    hf, path = make_hf_model(tmp_path, "gqa-llama3-rope")
    new_cfg = LLM.from_pretrained(path).config
    raw = json.loads((path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(raw))
    old_cfg = LLM.from_pretrained(path).config
    assert old_cfg == new_cfg and new_cfg.rope_theta == 500.0 and new_cfg.rope_scaling["factor"] == 8.0


@pytest.mark.parametrize("name", ["mha-untied", "gqa-llama3-rope"])
def test_greedy_generation_matches_transformers(tmp_path, name):
    hf, path = make_hf_model(tmp_path, name)
    ours = LLM.from_pretrained(path)
    prompt = torch.randint(3, 320, (1, 7), generator=torch.Generator().manual_seed(2))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                      min_new_tokens=20, pad_token_id=0, eos_token_id=None)[0, 7:].tolist()
    got = generate(ours, prompt, max_new_tokens=20)[0]
    assert got == ref


def make_qwen(tmp_path, kind, tied):
    """A tiny random Qwen2 (q/k/v biases) or Qwen3 (per-head q/k RMSNorm) saved by transformers."""
    config = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[kind](
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # zero biases and unit norms would hide a bias or a norm left out
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / kind)
    return hf, tmp_path / kind


@pytest.mark.parametrize("kind, tied", [("qwen2", False), ("qwen3", True)])
def test_qwen_logits_generation_cache_and_save_match_transformers(tmp_path, kind, tied):
    hf, path = make_qwen(tmp_path, kind, tied)
    ours = LLM.from_pretrained(path)
    assert (ours.config.qkv_bias, ours.config.qk_norm) == ((True, False) if kind == "qwen2" else (False, True))
    idx = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max() <= 1e-4
        ours.setup_cache(2, 40)                                             # the cache equals recompute
        steps = [ours(idx[:, :30], start_pos=0)] + [ours(idx[:, t:t + 1], start_pos=t) for t in range(30, 40)]
        ours.clear_cache()
        assert (torch.cat(steps, dim=1) - ours(idx)).abs().max() <= 1e-5
    prompt = idx[:1, :7]
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                      min_new_tokens=20, pad_token_id=0, eos_token_id=None)[0, 7:].tolist()
    assert generate(ours, prompt, max_new_tokens=20)[0] == ref
    ours.save_pretrained(tmp_path / "ours")                                 # written back as a Qwen folder
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(back).__name__ == type(hf).__name__
    with torch.no_grad():
        assert (back(idx).logits - ours(idx)).abs().max() <= 1e-4


def test_sharded_checkpoint_loads(tmp_path):
    hf, path = make_hf_model(tmp_path, "gqa-tied", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
    ours = LLM.from_pretrained(path)
    idx = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["mha-untied", "gqa-tied", "gqa-llama3-rope"])
def test_our_save_loads_in_transformers(tmp_path, name):
    _, path = make_hf_model(tmp_path, name)
    ours = LLM.from_pretrained(path)
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    idx = torch.randint(0, 320, (2, 30))
    with torch.no_grad():
        assert (back(idx).logits - ours(idx)).abs().max() <= 1e-4


def test_llava_style_prefix_loads_and_ignores_towers(tmp_path):
    from safetensors.torch import load_file, save_file
    hf, path = make_hf_model(tmp_path, "mha-untied")
    state = load_file(path / "model.safetensors")
    renamed = {"language_model." + k: v for k, v in state.items()}
    renamed["vision_tower.patch_embed.weight"] = torch.randn(8, 8)
    renamed["multi_modal_projector.linear_1.weight"] = torch.randn(8, 8)
    llava = tmp_path / "llava"
    llava.mkdir()
    save_file(renamed, llava / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    (llava / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": cfg}))
    ours = LLM.from_pretrained(llava)
    idx = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max() <= 1e-4


# ---- tokenizer

TEXT = ["Report: Sinus rhythm, Left bundle branch block, Abnormal ECG",
        "Locate the Premature ventricular contraction on this ECG. Duration: 1.3s-2.9s, 6.1s-7.7s",
        "Heart rate: 72 bpm, PR: 160 ms, QRS: 96 ms, QT/QTc: 380/412 ms. Axis normal.",
        "No Atrial premature beat Found", "Which leads show ST elevation? V1, V2 and V3."] * 40


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXT, tmp_path_factory.mktemp("tok"), vocab_size=400, special_tokens=SPECIAL_TOKENS)


def test_tokenizer_matches_sentencepiece_on_ordinary_text(tok):
    for text in ["Sinus rhythm with 1st degree A-V block", "  two  leading spaces\tand a tab\n",
                 "QTc 452 ms; ünïcödé and emoji 🫀 go through bytes", ""]:
        assert tok.encode(text) == tok.sp.encode(text)
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_special_tokens_are_single_ids(tok):
    assert tok.vocab_size == tok.base_vocab_size + len(SPECIAL_TOKENS)
    text = f"{USER}\n<ecg>{ECG_TOKEN * 3}</ecg>\nWhat rhythm?{END_TURN}"
    ids = tok.encode(text, bos=True)
    assert ids[0] == tok.bos_id and ids.count(tok.added[ECG_TOKEN]) == 3
    assert ids[1] == tok.added[USER] and ids[-1] == tok.added[END_TURN]
    assert all(i >= tok.base_vocab_size for i in ids if i in tok.id_to_added)
    assert tok.decode(ids[1:]) == text
    # pieces between special tokens are encoded on their own
    assert tok.encode("a<ecg>b") == tok.sp.encode("a") + [tok.added["<ecg>"]] + tok.sp.encode("b")


def test_tokenizer_reloads_with_same_ids(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer(tmp_path)
    assert again.added == tok.added and again.encode("Report: Sinus rhythm" + END_TURN) == \
        tok.encode("Report: Sinus rhythm" + END_TURN)


def test_phrase_pieces_span_spaces_and_cut_cleanly(tmp_path):
    # phrases=True: a set phrase of the text becomes one piece; without it every word is its own
    texts = [f"Reading: {s}, Abnormal ECG. Check: {s.lower()} in ECG{k}. Answer: {a}"
             for s in ("Left bundle branch block", "Right bundle branch block", "Atrial flutter") for k in (1, 2)
             for a in ("yes", "no")] * 30
    phrases = train_tokenizer(texts, tmp_path / "phrases", vocab_size=400, phrases=True)
    words = train_tokenizer(texts, tmp_path / "words", vocab_size=400)
    assert len(phrases.encode("Left bundle branch block")) == 1 < len(words.encode("Left bundle branch block")) == 4
    assert len(phrases.encode(texts[0])) < len(words.encode(texts[0]))
    for text in texts[:12] + ["  two  spaces, Left bundle branch blocks\tand a tab\n", "QTc 452 ms"]:
        assert phrases.decode(phrases.encode(text)) == text
        # a prompt cut after punctuation ("Answer:", a reading's ".") is encoded as the start of the whole text, so
        # the model continues it from the tokens it was trained on (letters never join ':' or '.' in one piece)
        for cut in (text.find("Answer:") + len("Answer:"), text.find(".") + 1):
            if cut > 0:
                assert phrases.encode(text)[:len(phrases.encode(text[:cut]))] == phrases.encode(text[:cut])


def test_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer(tmp_path)


def make_byte_level_bpe(folder):
    """A byte-level BPE tokenizer.json (Llama-3 / Qwen style) trained here, with a bos and an eos special token."""
    from tokenizers import Tokenizer as JSONTokenizer, decoders, models, pre_tokenizers, trainers
    tk = JSONTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin|>", "<|end|text>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir()
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin|>", "eos_token": "<|end|text>",
                                                              "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def test_tokenizer_json_matches_transformers_and_keeps_special_tokens_whole(tmp_path):
    folder = make_byte_level_bpe(tmp_path / "bpe")
    ours = Tokenizer(folder, SPECIAL_TOKENS)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    theirs.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    texts = ["Sinus rhythm with 1st degree A-V block", "  two  leading spaces\tand a tab\n", "QTc 452 ms; 1234567",
             "ünïcödé and emoji 🫀 go through bytes", "", f"{USER}<ecg>{ECG_TOKEN * 3}</ecg>What rhythm?{END_TURN}",
             "a<|end|text>b<|begin|>"]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode(ECG_TOKEN) == [ours.added[ECG_TOKEN]] and ours.added[ECG_TOKEN] >= ours.base_vocab_size
    forged = f"a{END_TURN}b{ECG_TOKEN}<|begin|>"   # what a user typed: ordinary text, no special token
    plain = ours.encode(forged, special=False)
    assert not set(plain) & set(ours.added.values()) and ours.decode(plain) == forged
    assert ours.encode(forged) == theirs.encode(forged, add_special_tokens=False)   # the switch is put back
    assert ours.bos_id == theirs.bos_token_id and ours.eos_id == theirs.eos_token_id
    assert ours.encode("hi", bos=True, eos=True)[0::len(ours.encode("hi")) + 1] == [ours.bos_id, ours.eos_id]
    ours.save(tmp_path / "saved")                                           # and back, with the added tokens
    again = Tokenizer(tmp_path / "saved")
    assert again.added == ours.added and again.encode(texts[5]) == ours.encode(texts[5])


def test_tokenizer_json_without_the_tokenizers_library_says_how_to_get_it(tmp_path, monkeypatch):
    import builtins
    folder = make_byte_level_bpe(tmp_path / "bpe")
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "tokenizers" else real_import(name, *a, **k))
    with pytest.raises(ImportError, match=r"tokenizer\.json needs the tokenizers library: pip install tokenizers"):
        Tokenizer(folder)


# ---- KV cache and batching

def tiny_llm(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LLMConfig(**{**dict(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256), **kw})
    return LLM(cfg).init_weights(std=0.2).eval()


def test_kv_cache_decode_equals_full_recompute():
    llm = tiny_llm()
    seq = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        full = llm(seq)                                                     # (B, T, V)
        llm.setup_cache(2, 30)
        step_logits = [llm(seq[:, :10], start_pos=0)]
        for t in range(10, 30):
            step_logits.append(llm(seq[:, t:t + 1], start_pos=t))
        llm.clear_cache()
    cached = torch.cat(step_logits, dim=1)
    assert (cached - full).abs().max() <= 1e-5


def test_batched_left_padded_generation_equals_one_at_a_time():
    llm = tiny_llm(seed=3)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    alone = [generate(llm, torch.tensor([p]), max_new_tokens=15)[0] for p in prompts]
    ids, mask = left_pad(prompts, pad_id=0)
    batched = generate(llm, ids, mask, max_new_tokens=15)
    assert batched == alone
    # and the logits themselves agree, not just the argmax
    with torch.no_grad():
        logits_b = llm(ids, attention_mask=mask)[:, -1]
        for b, p in enumerate(prompts):
            assert (llm(torch.tensor([p]))[0, -1] - logits_b[b]).abs().max() <= 1e-5


def test_inputs_embeds_equal_token_ids():
    llm = tiny_llm()
    idx = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(llm(idx), llm(inputs_embeds=llm.embed_tokens(idx)))
        assert (llm(idx, last_only=True) - llm(idx)[:, -1:]).abs().max() <= 1e-5


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) <= {0, 1}
    # p(0) ~ 0.71, so with top_p 0.5 only token 0 survives
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_next(logits, 1.0, generator=g).tolist()) >= {0, 1, 2}
    assert sample_next(logits[:1], 0.0).item() == 0


class Scripted:
    """Stands in for an LLM in generate(): whatever the input, it predicts the given tokens one after another."""

    def __init__(self, tokens, vocab_size):
        self.tokens, self.vocab_size, self.embed_tokens = tokens, vocab_size, torch.nn.Embedding(vocab_size, 1)

    def setup_cache(self, batch_size, max_len):
        self.t = 0

    def clear_cache(self):
        pass

    def __call__(self, idx=None, inputs_embeds=None, **kw):
        B = (idx if idx is not None else inputs_embeds).shape[0]
        logits = torch.full((B, 1, self.vocab_size), -1e9)
        logits[:, :, self.tokens[min(self.t, len(self.tokens) - 1)]] = 0.0
        self.t += 1
        return logits


def test_stop_ids_and_stop_strings(tok):
    script = tok.encode("Sinus rhythm, Left bundle branch block") + [tok.eos_id]
    text = tok.decode(script[:-1])
    prompt = torch.tensor([tok.encode("Report:", bos=True)])
    llm = Scripted(script, tok.vocab_size)
    assert generate(llm, prompt, max_new_tokens=30, stop_ids=(tok.eos_id,))[0] == script[:-1]    # stops at EOS
    assert generate(llm, prompt, max_new_tokens=4)[0] == script[:4]                                # or at the budget
    comma = tok.encode(",")[-1]
    assert generate(llm, prompt, max_new_tokens=30, stop_ids=(comma,))[0] == script[:script.index(comma)]
    streamed = []
    out = generate(llm, prompt, max_new_tokens=30, stop_ids=(tok.eos_id,), tokenizer=tok,
                   on_text=lambda b, s: streamed.append(s))[0]
    assert tok.decode(out) == text and "".join(streamed) == text and len(streamed) > 1          # streamed in pieces
    got = tok.decode(generate(llm, prompt, max_new_tokens=30, tokenizer=tok, stop_strings=("bundle",))[0])
    assert got == "Sinus rhythm, Left"                                     # cut before the token that made the stop


# ---- LoRA and vocabulary growth

def test_lora_zero_init_is_identity_and_merge_matches():
    llm = tiny_llm()
    idx = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        before = llm(idx)
        add_lora(llm, targets=("q_proj", "k_proj", "v_proj"), r=4, alpha=8, dropout=0.0)
        assert len(lora_layers(llm)) == 6
        assert torch.equal(llm(idx), before)
        for m in lora_layers(llm):
            m.lora_B.normal_(std=0.5)
        unmerged = llm(idx)
        assert (unmerged - before).abs().max() > 0.1  # the adapters do something
        # merging folds B @ A into W: equal up to fp32 rounding of logits of size ~4
        for m in lora_layers(llm):
            m.merge()
        assert (llm(idx) - unmerged).abs().max() <= 1e-4


def test_lora_keeps_base_names_and_saves_merged(tmp_path):
    llm = add_lora(tiny_llm(), r=2, alpha=4, dropout=0.0)
    assert isinstance(llm.layers[0].self_attn.q_proj, LoRALinear)
    assert "layers.0.self_attn.q_proj.weight" in llm.state_dict()
    with torch.no_grad():
        for m in lora_layers(llm):
            m.lora_B.normal_()
    llm.save_pretrained(tmp_path)
    back = LLM.from_pretrained(tmp_path)
    idx = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        assert (back(idx) - llm(idx)).abs().max() <= 1e-4   # merged vs unmerged: fp32 rounding only


def test_llama3_rope_frequencies_match_transformers_in_all_three_bands():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from model import rope_inv_freq
    hf_cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters={**LLAMA3_ROPE,
                                                                                              "rope_theta": 500.0})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(LLMConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0,
                                   rope_scaling={k: v for k, v in LLAMA3_ROPE.items()}))
    assert torch.allclose(ours, theirs.float(), rtol=1e-6, atol=0)
    wavelen = 2 * torch.pi / rope_inv_freq(LLMConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0))
    old = LLAMA3_ROPE["original_max_position_embeddings"]
    assert (wavelen < old / 4).sum() == 2 and ((wavelen >= old / 4) & (wavelen <= old)).sum() == 1   # every band used


def test_resize_vocab_new_rows_are_mean():
    llm = tiny_llm()
    old_emb = llm.embed_tokens.weight.detach().clone()
    old_head = llm.lm_head.weight.detach().clone()
    llm.resize_vocab(106)
    assert llm.embed_tokens.weight.shape == (106, 48) and llm.lm_head.weight.shape == (106, 48)
    assert torch.equal(llm.embed_tokens.weight[:100], old_emb)
    assert torch.allclose(llm.embed_tokens.weight[100:], old_emb.mean(0).expand(6, -1))
    assert torch.allclose(llm.lm_head.weight[103], old_head.mean(0))
    assert llm(torch.tensor([[105]])).shape == (1, 1, 106)


# ---- bad checkpoints

def test_missing_config_or_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM.from_pretrained(tmp_path)
    _, path = make_hf_model(tmp_path, "gqa-tied")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LLM.from_pretrained(path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                      "vocab_size": 10}))
    with pytest.raises(ValueError, match="gpt2"):
        LLM.from_pretrained(tmp_path)


def test_shape_mismatch_names_the_key(tmp_path):
    _, path = make_hf_model(tmp_path, "mha-untied")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight.*\(160, 64\)"):
        LLM.from_pretrained(path)


def test_missing_key_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    _, path = make_hf_model(tmp_path, "mha-untied")
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        LLM.from_pretrained(path)


def tiny_folder(folder, edit_state=None, edit_config=None, **kw):
    """tiny_llm(**kw) saved as a Hugging Face folder, its tensors and config.json then edited as a damaged or
    hand-edited checkpoint would be."""
    tiny_llm(**kw).save_pretrained(folder)
    return edit_folder(folder, edit_state, edit_config)


def test_a_config_that_disagrees_with_its_layers_is_an_error_naming_file_and_keys(tmp_path):
    # 2 of 4 layers would run half the model (and train.py --llm would train half of it) without a word
    half = tiny_folder(tmp_path / "half", edit_config=lambda c: c.update(num_hidden_layers=2), num_hidden_layers=4)
    with pytest.raises(ValueError, match=r"half/model\.safetensors: \['model\.layers\.2\.[^]]+\] and 13 more "
                                         r"\(18 tensors\) are not used .*num_hidden_layers=2"):
        LLM.from_pretrained(half)
    more = tiny_folder(tmp_path / "more", edit_config=lambda c: c.update(num_hidden_layers=6), num_hidden_layers=4)
    with pytest.raises(ValueError, match=r"more/model\.safetensors: lacks \['model\.layers\.4\.[^]]+\] and 13 more "
                                         r"\(18 keys\) that config\.json implies"):
        LLM.from_pretrained(more)


def test_only_the_tensors_a_folder_may_rightly_hold_unused_are_allowed(tmp_path):
    def allowed(s):
        s["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)      # an old Llama's saved RoPE table
        s["lm_head.weight"] = s["model.embed_tokens.weight"].clone()           # a tied head saved as a copy
        s["model.norm.weight"][:] = 3e38    # finite, though its sum overflows: only NaN and Inf are refused
    ours = LLM.from_pretrained(tiny_folder(tmp_path / "ok", allowed, tie_word_embeddings=True))
    assert ours.lm_head.weight is ours.embed_tokens.weight and torch.isfinite(ours.norm.weight).all()
    for name, edit, kw, named in [
            ("head", lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"] + 1}),
             dict(tie_word_embeddings=True), r"\['lm_head\.weight'\] \(1 tensors\) .*tie_word_embeddings=True"),
            ("stray", lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(3)}), {},
             r"\['model\.layers\.0\.mlp\.extra\.weight'\] \(1 tensors\) are not used")]:
        with pytest.raises(ValueError, match=rf"{name}/model\.safetensors: {named}"):
            LLM.from_pretrained(tiny_folder(tmp_path / name, edit, **kw))
    untied = tiny_folder(tmp_path / "untied", edit_config=lambda c: c.update(tie_word_embeddings=True))
    with pytest.raises(ValueError, match=r"\['lm_head\.weight'\] \(1 tensors\) are not used"):
        LLM.from_pretrained(untied)   # the config ties a head the weights hold apart


def test_weights_that_are_not_finite_floats_are_refused_naming_file_and_first_key(tmp_path):
    ints = tiny_folder(tmp_path / "ints", lambda s: s.update({"model.norm.weight": s["model.norm.weight"].int()}))
    with pytest.raises(ValueError, match=r"ints/model\.safetensors: key model\.norm\.weight is int32, not floating"):
        LLM.from_pretrained(ints)

    def poison(s):
        s["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
        s["model.norm.weight"][3] = float("inf")
    nan = tiny_folder(tmp_path / "nan", poison)
    for dtype in (None, torch.bfloat16):
        with pytest.raises(ValueError, match=r"nan/model\.safetensors: key model\.layers\.1\.mlp\.down_proj\.weight "
                                             r"holds non-finite values"):
            LLM.from_pretrained(nan, dtype=dtype)
