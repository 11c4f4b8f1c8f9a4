"""Tests for the command-line chat in generate.py: one answer about the real 12-lead PTB
record with --plot (the SVG parsed as XML), lead subsets and parts of a record, multi-turn
chat from stdin, streaming, and one clear error for each bad input."""

import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

import generate
from images import paper
from chat import SPECIAL_TOKENS, ECGChat, _run_lengths
from data import BEAT_NAMES, ECGRecord, prepare_ecg
from ecg_encoder import ECGEncoder, EncoderConfig
from model import LLM, LLMConfig, train_tokenizer
from synthetic.generator import make_patient, synth_ecg

ROOT = Path(__file__).resolve().parents[1]
PHYSIONET = ROOT.parent / "shared" / "data" / "physionet"
PTB = PHYSIONET / "s0010_re"
SVG = "{http://www.w3.org/2000/svg}"
TEXT = ["Report: Sinus rhythm, Normal ECG", "Duration: 1.3s-2.9s, 6.1s-7.7s", "yes", "no",
        "Heart rate: 72 bpm, PR: 160 ms, QRS: 90 ms"] * 20 + list(BEAT_NAMES.values())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An untrained tiny ECGChat saved as a checkpoint folder: its answers are noise."""
    d = tmp_path_factory.mktemp("gen")
    tok = train_tokenizer(TEXT, d / "tok", vocab_size=400, special_tokens=SPECIAL_TOKENS)
    torch.manual_seed(0)
    llm = LLM(LLMConfig(vocab_size=tok.base_vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)).init_weights()
    ECGChat(llm, ECGEncoder(EncoderConfig(d_model=32, n_layers=2, n_heads=2)), tok).save(d / "ckpt")
    return d / "ckpt"


def need(record):
    if not Path(f"{record}.hea").is_file():
        pytest.skip(f"PhysioNet record {record} not found")


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def polylines(svg_path):
    return ET.parse(svg_path).getroot().findall(f"{SVG}polyline")


def test_answers_about_ptb_record_and_plots_it(ckpt, tmp_path):
    need(PTB)
    out = tmp_path / "plot.svg"
    r = run_cli("--ckpt", ckpt, "--ecg", PTB, "--prompt", "Locate the Premature ventricular contraction.",
                "--start", "5", "--end", "15", "--max-new-tokens", "12", "--seed", "0", "--plot", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and "Traceback" not in r.stderr
    assert "s0010_re: 10.0 s at 1000 Hz, leads I II III aVR aVL aVF V1 V2 V3 V4 V5 V6" in r.stderr
    root = ET.parse(out).getroot()                                            # well-formed XML
    assert root.tag == f"{SVG}svg" and len(polylines(out)) == 12             # the leads the model read
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert "0 s" in labels and "10 s" in labels                               # time axis in seconds
    assert any(t and t.startswith("s0010_re from 5 s:") for t in labels)
    # same seed, same answer
    again = run_cli("--ckpt", ckpt, "--ecg", PTB, "--prompt", "Locate the Premature ventricular contraction.",
                    "--start", "5", "--end", "15", "--max-new-tokens", "12", "--seed", "0")
    assert again.stdout == r.stdout


def test_plot_shades_the_localized_intervals(tmp_path):
    rec = ECGRecord(np.random.default_rng(0).normal(size=(2, 1000)).astype(np.float32), 100.0, ["II", "V5"])
    spans = generate.plot_answer(tmp_path / "p.svg", rec, ["II", "V5"], "Duration: 1.0s-2.0s, 8.5s-12.0s", "rec")
    assert spans == [(1.0, 2.0), (8.5, 10.0)]                                 # clipped to the 10 s shown
    shaded = [e for e in ET.parse(tmp_path / "p.svg").getroot().iter(f"{SVG}rect") if e.get("fill") == "#ff9900"]
    assert len(shaded) == 2
    assert generate.plot_answer(tmp_path / "q.svg", rec, ["V5"], "No Atrial premature beat Found", "rec") == []
    assert len(polylines(tmp_path / "q.svg")) == 1


def test_lead_subset_several_ecgs_and_multi_turn_from_stdin(ckpt):
    need(PHYSIONET / "100")
    need(PTB)
    r = run_cli("--ckpt", ckpt, "--ecg", PHYSIONET / "100", "--ecg", PTB, "--leads", "ii, V5", "--end", "10",
                "--max-new-tokens", "6", "--temperature", "0", stdin="What rhythm?\n\nAnd now?\nexit\nnever asked\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2                                    # two questions, two answers
    assert r.stderr.count("leads II V5 -> 20 tokens") == 2
    assert "(--start/--end took the same part of every --ecg)" in r.stderr       # said, not silently done


def test_chat_turn_streams_keeps_history_and_forgets_oldest(ckpt):
    model = ECGChat.load(ckpt)
    ecg = ECGRecord(np.random.default_rng(1).normal(size=(1, 1000)).astype(np.float32), 100.0, ["II"])
    pieces = []
    answer, forgotten = generate.chat_turn(model, [("user", "What rhythm?")], [ecg], 10, on_text=pieces.append)
    assert forgotten == 0 and "".join(pieces).strip() == answer
    turns = [("user", "What rhythm?"), ("assistant", answer), ("user", "And the rate?")]
    seen = []
    real = model.generate
    model.generate = lambda prompts, ecgs, **kw: seen.append(prompts[0]) or real(prompts, ecgs, **kw)
    generate.chat_turn(model, turns, [ecg], 10)
    assert model.tokenizer.decode(seen[-1]).count("<|user|>") == 2           # the history is in the prompt
    model.max_seq_len = len(seen[-1]) + 5                                    # too small for history + 10 new
    _, forgotten = generate.chat_turn(model, turns, [ecg], 10)
    assert forgotten == 1 and model.tokenizer.decode(seen[-1]).count("<|user|>") == 1


def test_cut_seconds():
    rec = ECGRecord(np.arange(2000, dtype=np.float32)[None], 100.0, ["II"])
    assert generate.cut_seconds(rec, 2.5, 4.0).signal[0, [0, -1]].tolist() == [250, 399]
    with pytest.warns(UserWarning, match="past the end"):
        assert generate.cut_seconds(rec, 19.0, 99.0).signal.shape == (1, 100)
    with pytest.raises(ValueError, match=r"clip \[500, 300\) is not inside the record's 2000 samples \(5-3 s of 20.00 s\)"):
        generate.cut_seconds(rec, 5, 3)


def error_of(capsys, *args):
    """Run generate.main in-process; -> the one error line it exits with."""
    with pytest.raises(SystemExit) as e:
        generate.main([str(a) for a in args])
    assert e.value.code not in (0, None)
    return str(e.value.code)


def test_bad_inputs_give_one_clear_error(ckpt, tmp_path, capsys):
    need(PHYSIONET / "100")
    base = ["--ckpt", ckpt, "--prompt", "Where?", "--max-new-tokens", "2"]
    msg = error_of(capsys, *base, "--ecg", tmp_path / "nope")
    assert "nope.hea: no such WFDB header" in msg
    msg = error_of(capsys, *base, "--ecg", PHYSIONET / "100", "--leads", "I,foo")
    assert "--leads: ['foo'] are not ECG lead names" in msg
    msg = error_of(capsys, *base, "--ecg", PHYSIONET / "100", "--leads", "V1", "--end", 10)   # the whole: too long
    assert "100: leads ['V1'] requested but the record has ['II', 'V5']" in msg
    np.save(tmp_path / "odd.npy", np.random.default_rng(0).normal(size=(2, 1000)))
    with pytest.warns(UserWarning, match="not ECG leads"):
        msg = error_of(capsys, *base, "--ecg", tmp_path / "odd.npy", "--fs", 250, "--lead-names", "P1,P2")
    assert "odd.npy: no standard ECG lead among ['P1', 'P2']" in msg
    msg = error_of(capsys, *base, "--ecg", tmp_path / "odd.npy")
    assert "pass load_ecg(path, fs=..., lead_names=[...])" in msg
    msg = error_of(capsys, *base, "--ecg", PHYSIONET / "100", "--start", 5000)
    assert "100: clip [1800000, 650000) is not inside the record's 650000 samples (5000-1805.56 s of 1805.56 s)" in msg
    msg = error_of(capsys, *base, "--ecg", PHYSIONET / "100")               # 30 min do not fit 512 tokens
    assert "the LLM context allows 512" in msg
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(ckpt).iterdir():
        if f.name != "tokenizer.model":
            (broken / f.name).write_bytes(f.read_bytes())
    msg = error_of(capsys, "--ckpt", broken, "--ecg", PHYSIONET / "100", "--prompt", "Where?")
    assert "tokenizer.model: missing" in msg


def test_implausible_amplitudes_are_named_and_an_ecg_must_leave_room_for_the_answer(ckpt, tmp_path, capsys):
    rec, _ = synth_ecg(make_patient(3), 10.0, 250.0, leads=["II"], seed=3)
    np.save(tmp_path / "uv.npy", rec.signal * 1000)                          # the same ECG in µV
    base = ["--ckpt", ckpt, "--fs", "250", "--lead-names", "II", "--prompt", "Rhythm?", "--max-new-tokens", "2"]
    with pytest.warns(UserWarning, match=r"uv\.npy: the leads span \d+ mV .*look like µV.*--units uV"):
        generate.main([str(a) for a in base + ["--ecg", tmp_path / "uv.npy"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                       # read as µV: nothing to warn about
        generate.main([str(a) for a in base + ["--ecg", tmp_path / "uv.npy", "--units", "uV"]])
    long, _ = synth_ecg(make_patient(3), 240.0, 100.0, leads=["II"], seed=3)  # 480 ECG tokens of the 512
    np.save(tmp_path / "long.npy", long.signal)
    msg = error_of(capsys, "--ckpt", ckpt, "--fs", "100", "--lead-names", "II", "--ecg", tmp_path / "long.npy",
                   "--prompt", "Rhythm?")
    assert "the LLM context allows 512" in msg and "--start/--end" in msg and "--max-new-tokens 256" in msg


def test_non_finite_times_and_rates_and_an_empty_prompt_are_refused(ckpt, tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.sin(np.arange(2000) / 9)[None])
    base = ["--ckpt", ckpt, "--ecg", tmp_path / "a.npy", "--fs", "250", "--lead-names", "II", "--max-new-tokens", "2"]
    for option, value in [("--fs", "inf"), ("--end", "nan"), ("--start", "inf")]:
        error_of(capsys, *base, "--prompt", "Rhythm?", option, value)
        assert f"argument {option}: '{value}' is not a finite number" in capsys.readouterr().err
    for prompt in ("", "  "):                                               # never a silent chat from stdin
        error_of(capsys, *base, "--prompt", prompt)
        assert "--prompt is empty" in capsys.readouterr().err


def test_a_part_of_a_long_wfdb_record_is_all_that_is_read(ckpt, tmp_path, capsys, monkeypatch):
    """Of a long WFDB record only the part --start/--end ask for is read (wfdb's sampfrom/sampto), and a record too
    long for the context is refused from its header alone: here its signal file is gone, so reading it would fail."""
    import argparse
    import wfdb
    from data import load_ecg
    sig = np.sin(np.arange(150000)[:, None] / 40) * 0.8                    # 10 minutes at 250 Hz
    wfdb.wrsamp("long", fs=250, units=["mV"], sig_name=["II"], p_signal=sig, fmt=["16"], write_dir=str(tmp_path))
    spans, real = [], wfdb.rdrecord
    read = lambda *a, **kw: spans.append((kw["sampfrom"], kw["sampto"])) or real(*a, **kw)
    monkeypatch.setattr(wfdb, "rdrecord", read)
    args = argparse.Namespace(ecg=[str(tmp_path / "long")], start=300.0, end=310.0, leads=None, lead_names=None,
                              fs=None, units=None, anyecg=None, image=None, max_new_tokens=2)
    (rec, _), = generate.read_inputs(args, ECGChat.load(ckpt))[0]
    assert spans == [(75000, 77500)]
    assert np.array_equal(rec.signal, load_ecg(tmp_path / "long").signal[:, 75000:77500])
    (tmp_path / "long.dat").unlink()
    msg = error_of(capsys, "--ckpt", ckpt, "--ecg", tmp_path / "long", "--prompt", "Rhythm?")
    assert "ECG(s) of 600 s need" in msg and "the LLM context allows 512" in msg and "--start/--end" in msg


def test_reads_a_paper_image_alone_or_with_the_signal(ckpt, tmp_path):
    """--image: a PNG printout (drawn by images/paper.py) read through Pillow, alone or with --ecg;
    a checkpoint without an image encoder says so."""
    pytest.importorskip("PIL", reason="Pillow (optional) reads user images")
    from images.chat import ImageChat, load_chat
    from images.paper import render_ecg, write_png
    from images.vit import ImageEncoder, ImageEncoderConfig
    rec, _ = synth_ecg(make_patient(6), 10.0, 500.0, seed=6)
    png = tmp_path / "printout.png"
    write_png(render_ecg(rec.signal, rec.fs, list(rec.leads), px_per_mm=2.0), png)
    np.save(tmp_path / "ecg.npy", rec.signal)
    plain = ECGChat.load(ckpt)
    with_images = ImageChat(plain.llm, plain.encoder, plain.tokenizer, image_encoder=ImageEncoder(
        ImageEncoderConfig(d_model=32, n_layers=1, n_heads=2)))
    with_images.save(tmp_path / "img_ckpt")
    alone = run_cli("--ckpt", tmp_path / "img_ckpt", "--image", png, "--prompt", "Report?", "--max-new-tokens", "5")
    assert alone.returncode == 0, alone.stderr
    assert "printout.png: 532 x 276 px -> 32 tokens" in alone.stderr
    both = run_cli("--ckpt", tmp_path / "img_ckpt", "--image", png, "--ecg", tmp_path / "ecg.npy", "--fs", "500",
                   "--lead-names", ",".join(rec.leads), "--prompt", "Report?", "--max-new-tokens", "5")
    assert both.returncode == 0, both.stderr
    assert "printout.png: 532 x 276 px -> 32 tokens" in both.stderr and "ecg.npy: 10.0 s at 500 Hz" in both.stderr
    # the answer to both is asked with both: a 20-token ECG block, then a 32-token image block, each input spliced
    model, seen = load_chat(tmp_path / "img_ckpt"), []
    real = model.generate
    model.generate = lambda prompts, inputs, **kw: seen.append((prompts[0], inputs[0])) or real(prompts, inputs, **kw)
    ecg, image = prepare_ecg(rec, 100.0), paper.read_image(png)
    generate.chat_turn(model, [("user", "Report?")], [ecg, image], 3)
    ids, inputs = seen[0]
    assert _run_lengths([i == model.ecg_token_id for i in ids]) == [20]
    assert _run_lengths([i == model.img_token_id for i in ids]) == [32]
    assert ids.index(model.ecg_token_id) < ids.index(model.img_token_id) and inputs[0] is ecg and inputs[1] is image
    r = run_cli("--ckpt", ckpt, "--image", png, "--prompt", "Report?")
    assert r.returncode != 0 and "reads ECGs only" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--ckpt", ckpt, "--prompt", "Report?")
    assert r.returncode != 0 and "give at least one --ecg" in r.stderr


def test_anyecg_release_answers_as_their_code_does(tmp_path, capsys):
    """generate.py --anyecg on a tiny release in their layout (ecg_model.pth, projection.pth, a LoRA adapter saved
    by peft) and a tiny Llama-3-style folder: the prompt ids are their apply_chat_template's with the ECG block
    first, the spliced embeddings their encode_and_project_ecg's, and the greedy answer transformers + peft's."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    from test_anyecg import D_LLM, ref_tokens, save_pth, their_state
    from test_ecg_chat import make_instruct_tokenizer
    from anyecg.release import anyecg_input, load_chat
    from data import load_ecg
    llama = make_instruct_tokenizer(tmp_path / "llama3", "llama3")
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=D_LLM, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)).eval()
    hf.save_pretrained(llama)
    release = tmp_path / "release"
    release.mkdir()
    vit, proj = their_state()
    save_pth(release, vit, proj)
    lora = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"],
                                                   lora_dropout=0.1)).eval()   # their stage-3 LoRA settings
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    lora.save_pretrained(release)
    g = np.random.default_rng(0)   # 12.5 s of 2 leads at 360 Hz: two windows at 100 Hz, the second zero-padded
    np.save(tmp_path / "ecg.npy", (g.standard_normal((2, 4500)) * 0.3).astype(np.float32))
    question = "Locate the Atrial premature beat on this ECG."

    # theirs: get_input_embeds + language_model.generate, greedy
    x = torch.as_tensor(anyecg_input(load_ecg(tmp_path / "ecg.npy", fs=360, lead_names=["MLII", "V1"])))
    with torch.no_grad():
        tokens = ref_tokens(vit, proj, x)
    block = "<|reserved_special_token_1|>" + "<|reserved_special_token_3|>" * len(tokens) + "<|reserved_special_token_2|>"
    ids = tok.apply_chat_template([{"role": "user", "content": block + question}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")["input_ids"]
    at = ids[0].tolist().index(128003 - 128000) + 1   # the tiny vocabulary numbers Llama-3's ids from 0
    with torch.no_grad():
        embeds = lora.get_input_embeddings()(ids)
        embeds[0, at:at + len(tokens)] = tokens
        out = lora.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                            do_sample=False, eos_token_id=[tok.eos_token_id], pad_token_id=tok.eos_token_id)

    model = load_chat(release, llama)
    ecg = ECGRecord(x.numpy(), 100.0, list(generate.STANDARD_LEADS))
    prompt = model.prompt([("user", question)], [ecg], add_generation_prompt=True)[0]
    assert prompt == ids[0].tolist()
    with torch.no_grad():
        assert (model.embed(ids, [[ecg]])[0, at:at + len(tokens)] - tokens).abs().max() <= 1e-4
        ours = model.generate([prompt], [[ecg]], max_new_tokens=12, temperature=0)[0]
    assert ours == [i for i in out[0].tolist() if i != tok.eos_token_id] and ours
    generate.main(["--anyecg", str(release), "--llm", str(llama), "--ecg", str(tmp_path / "ecg.npy"), "--fs", "360",
                   "--lead-names", "MLII,V1", "--prompt", question, "--temperature", "0", "--max-new-tokens", "12"])
    assert capsys.readouterr().out.strip() == model.tokenizer.decode(ours).strip()
