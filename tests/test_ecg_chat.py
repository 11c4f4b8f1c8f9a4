"""Tests for the ECG-chat model in chat.py: splicing ECG tokens into placeholder blocks,
gradients and freezing, the context guard, save/load, and generation with ECGs; and the one
that reads paper images too (images/chat.py)."""

import json

import pytest
import torch

from chat import (ASSISTANT, ECG_END, ECG_START, ECG_TOKEN, END_TURN, IMG_END, IMG_START, IMG_TOKEN, SPECIAL_TOKENS,
                  USER, ECGChat, ecg_blocks, encode_chat)
from data import ECGRecord
from ecg_encoder import ECGEncoder, EncoderConfig
from helpers import edit_folder
from model import LLM, LLMConfig, Tokenizer, add_lora, train_tokenizer

TEXT = ["Report: Sinus rhythm, Normal ECG", "Duration: 1.3s-2.9s", "Is there atrial fibrillation? yes",
        "Which ECG shows a longer QT? the second"] * 30


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXT, tmp_path_factory.mktemp("tok"), vocab_size=300, special_tokens=SPECIAL_TOKENS)


def make_chat(tok, seed=0, max_seq_len=512):
    torch.manual_seed(seed)
    llm = LLM(LLMConfig(vocab_size=tok.base_vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_seq_len)).init_weights()
    enc = ECGEncoder(EncoderConfig(d_model=32, n_layers=2, n_heads=2))
    return ECGChat(llm, enc, tok).eval()


def ecg(seconds, leads=("I", "II"), seed=0):
    g = torch.Generator().manual_seed(seed)
    return ECGRecord(torch.randn(len(leads), int(seconds * 100), generator=g) * 0.5, 100.0, list(leads))


def prompt_ids(tok, model, ecgs, question="What rhythm?"):
    blocks = "".join(ECG_START + ECG_TOKEN * model.encoder.num_tokens(e.signal.shape[1]) + ECG_END for e in ecgs)
    return tok.encode(f"{USER}\n{blocks}\n{question}{END_TURN}\n{ASSISTANT}\n", bos=True)


def test_three_ecgs_each_block_holds_its_own_tokens(tok):
    model = make_chat(tok)
    ecgs = [ecg(10, seed=1), ecg(23.5, ("II",), seed=2), ecg(4, ("I", "II", "V1", "V5"), seed=3)]
    ids = torch.tensor([prompt_ids(tok, model, ecgs)])
    with torch.no_grad():
        x = model.embed(ids, [ecgs])
        slots = (ids[0] == model.ecg_token_id).nonzero().flatten().tolist()
        start = 0
        for e in ecgs:
            alone = model.projector(model.encoder([e.signal], [e.leads])[0])   # this ECG encoded by itself
            pos = slots[start:start + len(alone)]
            assert (x[0, pos] - alone).abs().max() <= 1e-5
            # the block is delimited by <ecg> ... </ecg>
            assert ids[0, pos[0] - 1] == tok.added[ECG_START] and ids[0, pos[-1] + 1] == tok.added[ECG_END]
            start += len(alone)
        assert start == len(slots)
        # text positions keep their token embeddings
        text = (ids[0] != model.ecg_token_id).nonzero().flatten()
        assert torch.equal(x[0, text], model.llm.embed_tokens(ids[0, text]))


def test_absolute_time_reaches_the_llm(tok):
    # 30 s of the same 10 s three times: the windows are independent, so only the time code can tell the LLM that
    # token 0 is at 0 s, token 20 at 10 s and token 40 at 20 s
    model = make_chat(tok)
    ten = ecg(10, ("II",), seed=3).signal
    e = ECGRecord(torch.cat([ten, ten, ten], dim=1), 100.0, ["II"])
    ids = torch.tensor([prompt_ids(tok, model, [e])])
    with torch.no_grad():
        x = model.embed(ids, [[e]])[0, ids[0] == model.ecg_token_id]                          # (60, C)
    assert (x[0] - x[20]).abs().max() > 1e-2 and (x[20] - x[40]).abs().max() > 1e-2


def test_placeholder_count_mismatch_is_a_clear_error(tok):
    model = make_chat(tok)
    ecgs = [ecg(10), ecg(10, seed=1)]
    ids = prompt_ids(tok, model, ecgs)
    ids.remove(model.ecg_token_id)  # one placeholder short in the first block
    with pytest.raises(ValueError, match=r"placeholder blocks of \[19, 20\].*\[20, 20\]"):
        model.embed(torch.tensor([ids]), [ecgs])
    with pytest.raises(ValueError, match="placeholder"):
        model.embed(torch.tensor([prompt_ids(tok, model, ecgs)]), [ecgs[:1]])


def test_gradient_reaches_encoder_and_projector_and_freezing_works(tok):
    model = make_chat(tok).train()
    add_lora(model.llm, r=2, alpha=4, dropout=0.0)
    ecgs = [ecg(12)]
    ids = torch.tensor([prompt_ids(tok, model, ecgs) + tok.encode("Report: Sinus rhythm" + END_TURN)])
    labels = ids.clone()
    labels[:, :-6] = -100
    # stage 1: encoder + projector trained, LLM frozen
    model.set_trainable(encoder=True, projector=True, llm=False, lora=False)
    _, loss = model(ids, [ecgs], labels=labels)
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("encoder.", "projector.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # stage 2: + LoRA; the rest of the LLM stays frozen
    model.zero_grad(set_to_none=True)
    model.set_trainable(encoder=False, projector=True, llm=False, lora=True)
    model(ids, [ecgs], labels=labels)[1].backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if ".lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("encoder."))


def test_loss_only_on_labelled_tokens(tok):
    model = make_chat(tok)
    ecgs = [ecg(10)]
    ids = torch.tensor([prompt_ids(tok, model, ecgs) + tok.encode("Report: Normal ECG" + END_TURN)])
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]
    logits, loss = model(ids, [ecgs], labels=labels)
    manual = torch.nn.functional.cross_entropy(logits[0, -4:-1], ids[0, -3:])
    assert abs(loss.item() - manual.item()) < 1e-5


def test_ecg_longer_than_context_is_a_clear_error(tok):
    model = make_chat(tok, max_seq_len=128)
    # an hour at 2 tokens/s = 7200 ECG tokens
    with pytest.raises(ValueError, match=r"7200 tokens.*LLM context allows 128.*shorter part of the ECG.*--max_seq_len"):
        model.check_fits([100 * 3600], n_text_tokens=30)
    assert model.check_fits([1000], n_text_tokens=30) == 20
    assert model.check_fits([1000, 500], n_text_tokens=30) == 30   # several ECGs: their tokens together
    long_prompt = torch.zeros(1, 129, dtype=torch.long)
    with pytest.raises(ValueError, match="max_seq_len=128"):
        model(long_prompt, [[]])


def test_generate_with_ecgs_batched_equals_alone(tok):
    model = make_chat(tok, seed=1)
    cases = [[ecg(10, seed=4)], [ecg(21, ("II",), seed=5), ecg(10, seed=6)], [ecg(5, ("V1", "V2", "V3"), seed=7)]]
    prompts = [prompt_ids(tok, model, e, q) for e, q in zip(cases, ["What rhythm?", "Compare them.", "QT?"])]
    alone = [model.generate([p], [e], max_new_tokens=8, stop_ids=())[0] for p, e in zip(prompts, cases)]
    assert model.generate(prompts, cases, max_new_tokens=8, stop_ids=()) == alone


def test_save_load_roundtrip_and_llm_part_reads_in_transformers(tok, tmp_path):
    model = make_chat(tok, seed=2)
    add_lora(model.llm, r=2, alpha=4, dropout=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B" in n:
                p.normal_()
    ecgs = [ecg(15, ("II", "V5"))]
    ids = torch.tensor([prompt_ids(tok, model, ecgs)])
    with torch.no_grad():
        before = model(ids, [ecgs])
    model.save(tmp_path / "ckpt")
    back = ECGChat.load(tmp_path / "ckpt")
    with torch.no_grad():
        assert (back(ids, [ecgs]) - before).abs().max() <= 1e-4
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    text = torch.tensor([tok.encode("Report: Sinus rhythm", bos=True)])
    with torch.no_grad():
        assert (hf(text).logits - back.llm(text)).abs().max() <= 1e-4


def test_load_errors_name_the_file(tok, tmp_path):
    model = make_chat(tok)
    model.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        ECGChat.load(tmp_path / "ckpt")
    model.llm.save_pretrained(tmp_path / "plain")
    tok.save(tmp_path / "plain")
    with pytest.raises(ValueError, match="nanoecg"):
        ECGChat.load(tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    cfg["nanoecg"] = {"encoder": {**EncoderConfig(d_model=48, n_layers=2, n_heads=2).__dict__}}
    (tmp_path / "plain" / "config.json").write_text(json.dumps(cfg, default=list))
    with pytest.raises(ValueError, match="ecg_encoder"):
        ECGChat.load(tmp_path / "plain")


# ----------------------------------------------------------------------------- images (GEM's second modality)


def make_image_chat(tok, seed=0):
    from images.chat import ImageChat
    from images.vit import ImageEncoder, ImageEncoderConfig
    model = make_chat(tok, seed)
    torch.manual_seed(seed + 1)
    img_enc = ImageEncoder(ImageEncoderConfig(height=32, width=64, out_rows=2, out_cols=4, d_model=32, n_layers=1,
                                              n_heads=2))
    return ImageChat(model.llm, model.encoder, tok, image_encoder=img_enc).eval()


def image(seed, h=40, w=90):
    return torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_image_and_ecg_tokens_each_land_in_their_own_block_in_order(tok):
    model = make_image_chat(tok)
    n_img = model.image_encoder.num_tokens
    samples = [([ecg(10, seed=1), ecg(6, ("II",), seed=2)], [image(3)]),   # both modalities
               ([], [image(4), image(5, 80, 60)]),                          # images only, two sizes
               ([ecg(8, seed=6)], [])]                                       # signal only
    prompts = [model.prompt([("user", "What rhythm?")], e + im, add_generation_prompt=True)[0] for e, im in samples]
    T = max(map(len, prompts))
    ids = torch.tensor([p + [tok.pad_id] * (T - len(p)) for p in prompts])
    with torch.no_grad():
        x = model.embed(ids, [e + im for e, im in samples])
        for b, (ecgs, images) in enumerate(samples):
            row = ids[b].tolist()
            ecg_slots = [i for i, t in enumerate(row) if t == model.ecg_token_id]
            img_slots = [i for i, t in enumerate(row) if t == model.img_token_id]
            assert not ecg_slots or not img_slots or max(ecg_slots) < min(img_slots)   # ECG blocks first
            start = 0
            for s, _, leads in ecgs:
                alone = model.projector(model.encoder([s], [leads])[0])            # this ECG by itself
                assert (x[b, ecg_slots[start:start + len(alone)]] - alone).abs().max() <= 1e-5
                start += len(alone)
            assert start == len(ecg_slots)
            for k, im in enumerate(images):
                alone = model.image_projector(model.image_encoder([im])[0])       # this image by itself
                pos = img_slots[k * n_img:(k + 1) * n_img]
                assert (x[b, pos] - alone).abs().max() <= 1e-5
                assert row[pos[0] - 1] == tok.added[IMG_START] and row[pos[-1] + 1] == tok.added[IMG_END]
            text = [i for i, t in enumerate(row) if t not in (model.ecg_token_id, model.img_token_id)]
            assert torch.equal(x[b, text], model.llm.embed_tokens(ids[b, text]))


def test_image_model_saves_loads_and_a_missing_image_is_a_clear_error(tok, tmp_path):
    model = make_image_chat(tok)
    ecgs, images = [ecg(10, seed=1)], [image(3)]
    ids = torch.tensor([model.prompt([("user", "What rhythm?")], ecgs + images, add_generation_prompt=True)[0]])
    model.save(tmp_path / "ckpt")
    from images.chat import load_chat
    back = load_chat(tmp_path / "ckpt")
    assert type(back) is type(model) and type(load_chat(make_saved(tok, tmp_path / "plain"))) is ECGChat
    with torch.no_grad():
        assert torch.allclose(model(ids, [ecgs + images]), back(ids, [ecgs + images]), atol=1e-5)
    with pytest.raises(ValueError, match=r"placeholder blocks of \[8\] <img_token>s but its 0 image"):
        model(ids, [ecgs])
    with pytest.raises(ValueError, match="not ECGRecords .images.., but this model reads ECGs only"):
        make_chat(tok)(ids, [ecgs + images])
    with pytest.raises(ValueError, match=r"weights \['img_encoder.\*', 'img_projector.\*'\] belong to no part"):
        ECGChat.load(tmp_path / "ckpt")   # the ECG-only model would drop them: an error, not a silent half model
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["nanoecg"]["image_encoder"]["patch"] = 8
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"ckpt/config\.json: unknown config key 'patch' under nanoecg\.image_encoder"):
        load_chat(tmp_path / "ckpt")


def make_saved(tok, folder):
    make_chat(tok).save(folder)
    return folder


def test_a_damaged_checkpoint_file_is_named(tok, tmp_path):
    make_chat(tok).save(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])                             # a truncated download
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        ECGChat.load(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{garbage")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        ECGChat.load(tmp_path / "ckpt")


# --- the checkpoint's own chat format (Llama-3 headers, ChatML) against transformers' apply_chat_template ---

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Their templates, with {% generation %} around what an assistant says, so transformers reports the loss mask too.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_instruct_tokenizer(folder, kind):
    """A byte-level BPE tokenizer.json with a Llama-3 (headers, reserved special tokens, Llama-3's split regex) or a
    Qwen-style ChatML vocabulary (no <bos>, no reserved tokens), and its chat template."""
    from tokenizers import Regex, Tokenizer as JSONTokenizer, decoders, models, pre_tokenizers, trainers
    if kind == "llama3":
        special = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{k}|>" for k in range(4)] + \
            ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"] + \
            [f"<|reserved_special_token_{k}|>" for k in range(5, 8)]
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}
    else:
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        config = {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}
    tk = JSONTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXT * 3, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir()
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def instruct_chat(folder):
    tok = Tokenizer(folder)
    torch.manual_seed(0)
    llm = LLM(LLMConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)).init_weights()
    return ECGChat(llm, ECGEncoder(EncoderConfig(d_model=32, n_layers=1, n_heads=2)), tok).eval()


@pytest.mark.parametrize("kind", ["llama3", "chatml"])
def test_prompt_and_loss_mask_follow_the_checkpoints_chat_template(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    folder = make_instruct_tokenizer(tmp_path / kind, kind)
    model = instruct_chat(folder)
    assert model.format.name == kind
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    theirs.add_special_tokens({"additional_special_tokens": list(model.format.marks)})   # no-op for Llama-3's reserved
    assert theirs.convert_tokens_to_ids(list(model.format.marks)) == [model.tokenizer.added[m] for m in model.format.marks]
    ecgs = [ecg(3, seed=1), ecg(2.5, ("II",), seed=2)]
    turns = [("user", "  What rhythm?\n"), ("assistant", "Report: Sinus rhythm, Normal ECG"),
             ("user", "Is there atrial fibrillation?"), ("assistant", " yes ")]
    ids, labels = model.prompt(turns, ecgs)
    # transformers sees the same blocks, written out as text in the first user message
    s, e, t = model.format.marks[:3]
    blocks = "".join(s + t * model.encoder.num_tokens(x.signal.shape[1]) + e for x in ecgs)
    messages = [{"role": r, "content": (blocks if i == 0 else "") + c} for i, (r, c) in enumerate(turns)]
    ref = theirs.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == ref["input_ids"]
    assert [lab != -100 for lab in labels] == [bool(m) for m in ref["assistant_masks"]]
    assert [i for i, lab in zip(ids, labels) if lab != -100].count(tok_id := theirs.convert_tokens_to_ids(
        model.format.end)) == 2 and tok_id in model.stop_ids()   # each answer's end-of-turn token is learnt
    gen, _ = model.prompt(turns[:3], ecgs, add_generation_prompt=True)
    assert gen == theirs.apply_chat_template(messages[:3], tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"]


def test_llama3_reserved_tokens_hold_the_ecg_blocks_and_chatml_grows_six_rows(tmp_path):
    llama3 = instruct_chat(make_instruct_tokenizer(tmp_path / "llama3", "llama3"))
    # anyECG-chat's layout: <ecg> <|reserved_special_token_1|> (128003), </ecg> _2 (128004), the placeholder _3 (128005)
    assert [llama3.tokenizer.added[m] for m in llama3.format.marks[:3]] == [3, 4, 5]
    assert llama3.tokenizer.vocab_size == llama3.tokenizer.base_vocab_size == llama3.llm.config.vocab_size
    chatml = instruct_chat(make_instruct_tokenizer(tmp_path / "chatml", "chatml"))
    base = chatml.tokenizer.base_vocab_size
    assert chatml.format.marks == (ECG_START, ECG_END, ECG_TOKEN, IMG_START, IMG_END, IMG_TOKEN)
    assert sorted(chatml.tokenizer.added[m] for m in chatml.format.marks) == list(range(base, base + 6))
    assert chatml.llm.config.vocab_size == base + 6 and chatml.tokenizer.bos_id is None


def test_an_unknown_chat_format_is_named(tmp_path):
    folder = make_instruct_tokenizer(tmp_path / "chatml", "chatml")
    with pytest.raises(ValueError, match="chat format 'vicuna' unknown; known: auto, nanoecg, llama3, chatml"):
        ECGChat(LLM(LLMConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1)), ECGEncoder(EncoderConfig()),
                Tokenizer(folder), chat_format="vicuna")


def test_several_ecgs_are_named_as_the_answers_name_them_and_one_is_not(tok, tmp_path):
    model = make_chat(tok)
    turns = [("user", "Which ECG shows a longer QT?"), ("assistant", "the second")]
    plain, _ = encode_chat(tok, turns, ecg_blocks([3, 2]))
    named, labels = encode_chat(tok, turns, ecg_blocks([3, 2], named=True))
    text = tok.decode(named)
    assert text.index("ECG1:") < text.index(ECG_START) < text.index("ECG2:") < text.rindex(ECG_START)
    assert [i for i in named if i in tok.id_to_added] == [i for i in plain if i in tok.id_to_added]   # same blocks
    assert [x for x in labels if x != -100] == [x for x in encode_chat(tok, turns, ecg_blocks([3, 2]))[1] if x != -100]
    assert ecg_blocks([3], named=True) == ecg_blocks([3])   # one ECG: no name
    model.label_ecgs = True
    model.save(tmp_path / "m")
    assert ECGChat.load(tmp_path / "m").label_ecgs is True


def test_each_ecgs_length_is_stated_before_its_block_as_answers_write_times(tok, tmp_path):
    model = make_chat(tok)
    ecgs = [ecg(45.92, seed=1), ecg(10, seed=2)]
    turn = [("user", "Where is the Left bundle branch block beat?")]
    assert "s)" not in tok.decode(model.prompt(turn, ecgs[:1], add_generation_prompt=True)[0])   # off by default
    model.ecg_seconds = True
    one = tok.decode(model.prompt(turn, ecgs[:1], add_generation_prompt=True)[0])
    assert f"(45.9s){ECG_START}" in one.replace(" ", "")
    model.label_ecgs = True
    two = tok.decode(model.prompt(turn, ecgs, add_generation_prompt=True)[0]).replace(" ", "")
    assert two.index("ECG1(45.9s):") < two.index(ECG_START) < two.index("ECG2(10.0s):") < two.rindex(ECG_START)
    assert saved_and_read_without(model, "ecg_seconds", tmp_path) == (True, False)


def saved_and_read_without(model, setting, tmp_path):
    """(the setting as a saved folder reads it, as the same folder reads without it): a folder saved before the
    setting existed must read as it was trained, with it off."""
    model.save(tmp_path / "m")
    saved = getattr(ECGChat.load(tmp_path / "m"), setting)
    settings = json.loads((tmp_path / "m" / "config.json").read_text())
    del settings["nanoecg"][setting]
    (tmp_path / "m" / "config.json").write_text(json.dumps(settings))
    return saved, getattr(ECGChat.load(tmp_path / "m"), setting)


def test_the_last_of_several_named_ecgs_is_named_as_the_last(tok, tmp_path):
    # a per-ECG answer stops after the part whose name the prompt marks as the last: a lookup, not a count
    assert ecg_blocks([2, 3, 1], named=True, seconds=[10, 12.5, 10], last=True).count(":") == 3
    three = ecg_blocks([2, 3, 1], named=True, seconds=[10, 12.5, 10], last=True)
    assert three.startswith("ECG1 (10.0s):") and "ECG2 (12.5s):" in three and "ECG3 (10.0s, last):" in three
    assert "ECG2 (last):" in ecg_blocks([1, 1], named=True, last=True)
    assert ecg_blocks([3], named=True, seconds=[10], last=True) == ecg_blocks([3], seconds=[10])   # one ECG: no name
    assert ecg_blocks([1, 1], last=True) == ecg_blocks([1, 1])   # unnamed blocks have no last one to name
    assert ecg_blocks([], named=True, seconds=[], last=True) == ""   # a text-only prompt (stage 0, a skill text)
    model = make_chat(tok)
    model.label_ecgs = model.name_last_ecg = True
    turn = [("user", "Which findings are new in the second ECG?")]
    text = tok.decode(model.prompt(turn, [ecg(10, seed=1), ecg(10, seed=2)], add_generation_prompt=True)[0])
    assert "ECG2(last):" in text.replace(" ", "") and "ECG1(last)" not in text.replace(" ", "")
    assert saved_and_read_without(model, "name_last_ecg", tmp_path) == (True, False)


def test_a_rows_history_and_followups_are_turns_of_one_chat_and_every_answer_is_learnt(tok):
    from chat import turns_of
    row = {"question": "Report?", "answer": "Report: Sinus rhythm", "history": [["Is it readable?", "yes"]],
           "followups": [["Is there atrial fibrillation?", "no"]]}
    assert turns_of(row) == [("user", "Is it readable?"), ("assistant", "yes"), ("user", "Report?"),
                             ("assistant", "Report: Sinus rhythm"), ("user", "Is there atrial fibrillation?"),
                             ("assistant", "no")]
    assert turns_of(row, answered=False) == turns_of(row)[:3]
    ids, labels = encode_chat(tok, turns_of(row), ecg_blocks([2]))
    learnt = [i for i, x in zip(ids, labels) if x != -100]
    end = tok.added[END_TURN]
    assert learnt == tok.encode("yes") + [end] + tok.encode("Report: Sinus rhythm") + [end] + tok.encode("no") + [end]


def test_cached_encoder_tokens_are_each_ecgs_own_encoding_alone(tok):
    # train.py's frozen-encoder cache: an ECG's tokens are looked up by content, computed once with the ECG
    # encoded alone; a batch mixing cached and new ECGs gives each its own tokens
    model = make_chat(tok)
    recs = [ECGRecord(ecg(s, leads, seed).signal.numpy(), 100.0, list(leads))
            for s, leads, seed in [(10, ("I", "II", "V1"), 1), (7.3, ("II",), 2), (10, ("I", "II", "V1"), 3)]]
    with torch.no_grad():
        alone = [model.projector(model.encoder([r.signal], [r.leads])[0]) for r in recs]
        model.cache_encoder_tokens(2)
        first = model.encode_ecgs(recs[:2])
        again = model.encode_ecgs([recs[1], recs[2], recs[0]])
        assert len(model.token_cache) == 2                                  # full: the third is encoded, not kept
        for got, want in zip(first + again, [alone[0], alone[1], alone[1], alone[2], alone[0]]):
            assert torch.equal(got, want)
        model.cache_encoder_tokens(0)
        assert model.token_cache is None and len(model.encode_ecgs(recs)) == 3


def edited_checkpoint(tok, folder, edit_state=None, edit_config=None):
    """make_chat's model saved, its weights and config.json then edited as a damaged or hand-edited one would be."""
    make_chat(tok).save(folder)
    return edit_folder(folder, edit_state, edit_config)


def test_a_checkpoint_whose_config_or_weights_do_not_fit_is_one_error_naming_file_and_keys(tok, tmp_path):
    f = r"model\.safetensors"
    for name, state, config, named in [
            ("layers", None, lambda c: c.update(num_hidden_layers=1),
             rf"{f}: \['model\.layers\.1\.[^]]+\] and 4 more \(9 tensors\) are not used"),
            ("stray", lambda s: s.update({"model.vision.weight": torch.zeros(2)}), None,
             rf"{f}: weights \['model\.vision\.\*'\] belong to no part"),
            ("int_llm", lambda s: s.update({"model.norm.weight": s["model.norm.weight"].int()}), None,
             rf"{f}: key model\.norm\.weight is int32, not floating point"),
            ("int_part", lambda s: s.update({"ecg_encoder.ln_f.weight": s["ecg_encoder.ln_f.weight"].int()}), None,
             rf"{f} \(ecg_encoder\.\*\): ln_f\.weight is int32, not floating point"),
            ("nan_llm", lambda s: s["model.layers.0.self_attn.q_proj.weight"].__setitem__((0, 0), float("nan")),
             None, rf"{f}: key model\.layers\.0\.self_attn\.q_proj\.weight holds non-finite values"),
            ("key", None, lambda c: c["nanoecg"]["encoder"].update(d_modle=32),
             r"config\.json: unknown config key 'd_modle' under nanoecg\.encoder; did you mean d_model")]:
        with pytest.raises(ValueError, match=named):
            ECGChat.load(edited_checkpoint(tok, tmp_path / name, state, config))


def test_parts_whose_widths_do_not_join_are_refused_at_construction(tok):
    from anyecg.release import AnyECG
    from ecg_encoder import Projector
    llm = make_chat(tok).llm   # hidden size 64; the encoder's tokens are 32 wide
    enc = ECGEncoder(EncoderConfig(d_model=32, n_layers=1, n_heads=2))
    for encoder, projector, named in [
            (enc, Projector(48, 64), r"ECG encoder \(ECGEncoder\) gives 32-wide tokens, but the projector "
                                     r"\(Projector\) takes 48-wide ones"),
            (enc, Projector(32, 96), r"projector \(Projector\) gives 96-wide tokens, but the LLM's hidden size is 64"),
            (AnyECG(d=64, depth=1, d_llm=4096), torch.nn.Identity(),   # anyECG's own projection, 4,096 wide
             r"ECG encoder \(AnyECG\) gives 4096-wide tokens, but the LLM's hidden size is 64")]:
        with pytest.raises(ValueError, match=named):
            ECGChat(llm, encoder, tok, projector=projector)
    ECGChat(llm, AnyECG(d=64, depth=1, d_llm=64), tok, projector=torch.nn.Identity())   # widths that join
