"""Tests for train.py: the curriculum's stages learn and freeze what they should, resume is exact,
DDP equals gradient accumulation, checkpoints survive a crash, and bad input gets a clear error."""

import dataclasses
import functools
import json
import math
import os
import signal
import socket
import time
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import config
import train
from anyecg.peft import load_peft_adapter
from chat import ECGChat
from data import ECGRecord
from helpers import write_dataset
from images.chat import load_chat
from model import LLM
from synthetic.tasks import build_synthetic_dataset

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=400, encoder_dim=32, encoder_layers=1,
            batch_size=4, train_patients=10, val_patients=2, test_patients=2, skill_patients=10, text_batch=8, eval_batches=1,
            gen_eval_rows=0, test_rows=1, max_new_tokens=4, log_interval=1, eval_interval=1000, ckpt_interval=1000,
            stage0_steps=3, stage1_steps=3, stage2_steps=3, stage3_steps=3, seed=7, encoder_warmup_steps=0,
            # anyECG's freezing (the --llm recipe), so the frozen-parts test has parts to check
            stage1_train="encoder,projector", stage2_train="encoder,projector,lora",
            stage3_train="encoder,projector,lora")


def tiny(tmp_path, **kw):
    return config.Config(out_dir=str(tmp_path), **{**TINY, **kw})


def safe_open_metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def log_of(out_dir, key="loss"):
    lines = [json.loads(x) for x in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if key in r and "event" not in r]


# ----------------------------------------------------------------------------- config

def test_unknown_config_key_lists_close_matches(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'stage1_step'.*stage1_steps"):
        config.parse_config(["--stage1_step", "3"])
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"batch_sise": 4}))
    with pytest.raises(ValueError, match=rf"{bad}.*'batch_sise'.*batch_size"):
        config.parse_config(["--config", str(bad)])
    for text, why in [("{not json", "cannot read config JSON"), ("[1, 2]", "expected a JSON object"),
                      ('{"batch_size": "ten"}', 'batch_size must be int, got "ten"'),
                      ('{"batch_size": null}', "batch_size must be int, got null"),
                      ('{"stage1_steps": 2.5}', "stage1_steps must be int, got 2.5"),
                      ('{"images": 1}', "images must be bool, got 1"), ('{"seed": [1]}', r"seed must be int, got \[1\]")]:
        (tmp_path / "m.json").write_text(text)
        with pytest.raises(ValueError, match=rf"m\.json: {why}"):
            config.parse_config(["--config", str(tmp_path / "m.json")])
    good = tmp_path / "g.json"
    good.write_text(json.dumps({"batch_size": 4, "stage2_tasks": "location"}))
    cfg = config.parse_config(["--config", str(good), "--batch-size", "5", "--resume"])
    assert (cfg.batch_size, cfg.stage2_tasks, cfg.resume) == (5, "location", True)  # flags beat the file
    anyecg = config.parse_config(["--llm", "x"])  # anyECG's recipe with --llm: frozen LLM, then LoRA
    assert (anyecg.stage1_lr, anyecg.stage1_train, anyecg.stage3_train) == (1e-4, "encoder,projector",
                                                                            "encoder,projector,lora")
    assert config.parse_config([]).stage1_train == "projector,llm"  # the tiny LLM trains whole, the warmed-up encoder stays
    for argv in (["--data", "rows.json"], ["--encoder_warmup_steps", "0"]):  # no warm-up: the stages train the encoder
        assert config.parse_config(argv).stage3_train == "encoder,projector,llm"
    assert config.parse_config(["--data", "rows.json", "--encoder_init", "e.safetensors"]).stage3_train == "projector,llm"
    assert config.parse_config(["--llm", "x", "--stage1_train", "llm"]).stage1_train == "llm"  # flags win
    with pytest.raises(ValueError, match="unknown task 'locaton'"):
        train.curriculum(replace(cfg, stage2_tasks="locaton"))


def test_every_preset_in_configs_reads_and_passes_the_checks():
    presets = sorted((Path(__file__).parent.parent / "configs").glob("*.json"))
    assert len(presets) >= 2   # gpu24.json and cpu_long.json, which the README and RESULTS name
    for path in presets:
        cfg = config.parse_config(["--config", str(path)])
        config.check_config(cfg)
        train.curriculum(cfg)   # every stage's task list names tasks that exist
        assert cfg.out_dir == f"runs/{path.stem}", path   # a preset's run goes to a folder of its own name


def test_llm_folder_that_is_not_llama_names_the_file(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"gpt2/config.json.*not a Llama-family"):
        train.train(tiny(tmp_path / "out", llm=str(folder)))

# ----------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages")
    cfg = config.Config(out_dir=str(out), **TINY)
    data = train.load_data(cfg, lambda record: None)
    model = train.build_model(cfg, train.build_tokenizer(cfg, data, 0), torch.device("cpu"), torch.float32)
    return cfg, data, model


def test_each_stage_lowers_the_loss_and_leaves_frozen_parts_bit_identical(setup):
    cfg, data, model = setup
    for stage in train.curriculum(cfg):
        train.prepare_stage(model, stage, cfg)
        model.train()
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert frozen and trained
        opt = train.make_optimizer(model, cfg, 1e-2)
        batch = train.get_batch(cfg, data["train"], data["train"].weights(stage.tasks), model, stage, 0, 0)
        ids, labels, inputs = batch["input_ids"], batch["labels"], batch["inputs"]
        torch.manual_seed(0)
        losses = []
        for _ in range(8):
            _, loss = model(ids, inputs, labels=labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        # a frozen tiny LLM leaves the ECG side little room on one batch; the drop is small but sure
        assert losses[-1] < losses[0] - 0.01, (stage.name, losses)
        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), f"stage {stage.name}: frozen {n} changed"
        assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)
        expect_lora = any("lora" in s.train for s in train.curriculum(cfg) if s.index <= stage.index)
        assert bool(train.lora_layers(model.llm)) == expect_lora


def test_stage0_is_text_only_and_stage1_sees_ecgs(setup):
    cfg, data, model = setup
    s0, s1 = train.curriculum(cfg)[:2]
    b0 = train.get_batch(cfg, data["train"], data["train"].weights(s0.tasks), model, s0, 0, 0)
    b1 = train.get_batch(cfg, data["train"], data["train"].weights(s1.tasks), model, s1, 0, 0)
    assert all(e == [] for e in b0["inputs"]) and all(len(e) >= 1 for e in b1["inputs"])
    real = b0["input_ids"] != model.tokenizer.pad_id
    bos = b0["input_ids"] == model.tokenizer.bos_id
    assert torch.equal(b0["labels"] != -100, real & ~bos)   # stage 0: loss on every token but each text's <bos>
    # packed: text_batch texts end to end in fewer rows, of at most text_row_len where a row holds several
    row_len = min(cfg.text_row_len or model.max_seq_len, model.max_seq_len)
    assert int(bos.sum()) == cfg.text_batch and bos[:, 0].all() and len(b0["input_ids"]) < cfg.text_batch
    assert all(n <= row_len for n, k in zip(real.sum(1).tolist(), bos.sum(1).tolist()) if k > 1)
    for ids, labels in zip(b1["input_ids"].tolist(), b1["labels"].tolist()):   # stage 1: the answer's tokens only
        opens = ids.index(model.tokenizer.added[model.format.assistant])
        assert all(x == -100 for x in labels[:opens + 1]) and any(x != -100 for x in labels[opens + 1:])


def test_with_pack_alone_each_packed_text_is_read_as_if_it_were_alone_in_its_row(setup):
    # stage 0 packs texts end to end; with --pack_alone each attends to itself alone, so packing changes no logits
    cfg, data, model = setup
    s0, s1 = train.curriculum(cfg)[:2]
    b0 = train.get_batch(cfg, data["train"], data["train"].weights(s0.tasks), model, s0, 0, 0)
    bos = model.tokenizer.bos_id
    assert train.texts_apart(cfg, s0, b0, bos) is None                                # the default: GPT's packing
    apart = dataclasses.replace(cfg, pack_alone=True)
    assert train.texts_apart(apart, s1, b0, bos) is None                              # the ECG stages never pack
    r = int((b0["input_ids"] == bos).sum(1).argmax())                                # the row of most texts
    ids, texts = b0["input_ids"][r:r + 1], train.texts_apart(apart, s0, b0, bos)[r:r + 1]   # (1, T)
    starts = (ids[0] == bos).nonzero().flatten().tolist()
    assert len(starts) >= 2 and texts[0, starts].tolist() == list(range(1, len(starts) + 1))
    a, b = starts[1], starts[2] if len(starts) > 2 else int((ids[0] != model.tokenizer.pad_id).sum())   # text 2
    was_training = model.training
    model.eval()   # earlier tests may have added LoRA, whose dropout would make each pass differ
    with torch.no_grad():
        packed, alone, unmasked = model(ids, [[]], document_ids=texts), model(ids[:, a:b], [[]]), model(ids, [[]])
    model.train(was_training)
    assert torch.allclose(packed[0, a:b], alone[0], atol=1e-4)
    assert not torch.allclose(unmasked[0, a:b], alone[0], atol=1e-3)   # without the ids it sees the text before


def test_a_run_with_pack_alone_trains_and_validates_stage0_with_its_texts_apart(tmp_path):
    losses = train.train(tiny(tmp_path / "a", pack_alone=True, stage0_steps=4, eval_interval=2, stage1_steps=1,
                              stage2_steps=1, stage3_steps=1))
    assert len(losses) == 7 and all(math.isfinite(x) for x in losses)
    logged = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert any("val_loss" in e and e.get("stage") == 0 for e in logged)


def test_skill_texts_can_be_drawn_beside_the_ecg_rows_of_an_ecg_stage(setup):
    """--stage3_tasks ...,skills:0.12 (docs/RESULTS.md, "Stage 3 forgets the answering steps"): text rows among the
    ECG rows."""
    cfg, data, model = setup
    s3 = train.curriculum(dataclasses.replace(cfg, stage3_tasks=cfg.stage3_tasks + ",skills:0.12"))[3]
    probs = data["train"].weights(s3.tasks)
    share = sum(p for p, r in zip(probs, data["train"].rows) if r["task"] == "skills")
    assert 0.02 < share < 0.5   # a small share, drawn beside the ECG rows
    drawn = [e for step in range(16) for e in train.get_batch(cfg, data["train"], probs, model, s3, step, 0)["inputs"]]
    texts = sum(e == [] for e in drawn)   # a skill text has no ECG; every task row has one
    assert 0 < texts < len(drawn) / 2, (texts, len(drawn), share)


def test_pack_fills_few_rows_longest_text_first_and_keeps_the_drawn_order_in_each():
    lengths = [5, 3, 6, 2, 4, 7, 9, 12]
    texts = [{"input_ids": [k] * n, "labels": [-100] + [k] * (n - 1)} for k, n in enumerate(lengths)]
    rows = train.pack(texts, 10)
    # laid end to end in the drawn order (the rule before) they need 6 rows; best-fit decreasing finds 5: 4 full
    assert [r["input_ids"] for r in rows] == [[0] * 5 + [3] * 2, [1] * 3 + [5] * 7, [2] * 6 + [4] * 4, [6] * 9,
                                              [7] * 12]   # a text longer than a row gets one of its own
    for r in rows:   # each text whole, with its own labels, and the row's texts in the order drawn
        firsts = [k for i, k in enumerate(r["input_ids"]) if i == 0 or r["input_ids"][i - 1] != k]
        assert firsts == sorted(firsts) and r["inputs"] == []
        assert r["labels"] == [x for k in firsts for x in texts[k]["labels"]]


def test_collate_right_pads_and_keeps_each_examples_inputs(setup):
    cfg, data, model = setup
    rows = data["train"].rows[:3]
    examples = [dict(zip(("input_ids", "labels"), model.prompt([("user", r["question"]), ("assistant", r["answer"])],
                                                             data["train"].inputs_of(r))), inputs=data["train"].inputs_of(r))
                for r in rows]
    batch = train.collate(examples, model.tokenizer.pad_id)
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) > 1 and batch["input_ids"].shape == (3, max(lengths))
    for b, n in enumerate(lengths):
        assert (batch["input_ids"][b, n:] == model.tokenizer.pad_id).all() and (batch["labels"][b, n:] == -100).all()
        assert batch["input_ids"][b, :n].tolist() == examples[b]["input_ids"]
        assert batch["labels"][b, :n].tolist() == examples[b]["labels"]
    assert batch["inputs"] == [e["inputs"] for e in examples] and isinstance(batch["inputs"][0][0], ECGRecord)
    assert train.ecg_seconds(batch) == sum(x.signal.shape[1] / x.fs for e in examples for x in e["inputs"])


# ----------------------------------------------------------------------------- the loop

def test_resume_mid_stage_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    full = train.train(tiny(tmp_path / "a", skill_eval_interval=2))   # scoring the skills mid-stage changes nothing
    # stop in stage 2 (steps 3 + 3 + 2), where LoRA dropout draws from the torch RNG
    first = train.train(tiny(tmp_path / "b", stop_after=8))
    assert config.latest_checkpoint(tmp_path / "b").name == "step_0000008"
    # a checkpoint is safetensors and JSON only: nothing that unpickles
    assert {f.suffix for f in config.latest_checkpoint(tmp_path / "b").iterdir()} == {".safetensors", ".json"}
    # --resume is the run that was started: flags that would change it are refused, all named in one message
    for flags, named in [(["--dim", "48", "--seed", "8"], "seed: 7 -> 8; dim: 32 -> 48"),
                         (["--stage3_steps", "5"], "stage3_steps: 3 -> 5")]:
        with pytest.raises(ValueError, match=named):
            train.train(config.parse_config(["--resume", f"--out_dir={tmp_path / 'b'}", *flags]))
    # with no other flag it takes the saved config (not today's defaults); a safe change is logged
    rest = train.train(config.parse_config(["--resume", f"--out_dir={tmp_path / 'b'}", "--log_interval", "1",
                                           "--eval_batches", "2"]))
    changes = [r for r in map(json.loads, (tmp_path / "b" / "log.jsonl").read_text().splitlines())
               if r.get("event") == "resume_changes"]
    assert changes[-1]["changes"] == {"resume": [False, True], "stop_after": [8, 0], "eval_batches": [1, 2]}
    assert len(full) == 12 and first + rest == full
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    back = ECGChat.load(tmp_path / "b" / "model")  # the folder generate.py / eval.py take
    assert back.tokenizer.vocab_size == back.llm.config.vocab_size
    assert (tmp_path / "a" / "test_predictions.jsonl").is_file()
    # stage 0's skills: scored on held-out people, each family apart, every --skill_eval_interval steps and at its end
    skills = [r for r in map(json.loads, (tmp_path / "a" / "log.jsonl").read_text().splitlines())
              if r.get("event") == "skills"]
    assert [(r["stage"], r["step"]) for r in skills] == [(0, 2), (0, 3)]
    assert len(skills[0]["accuracy"]) >= 8
    assert all(0 <= v <= 1 for v in skills[0]["accuracy"].values())


def after_the_scoring_prompt(model, rows, check_given=False):
    """[(row, the trained text after its scoring prompt)] for the rows that fit the tiny model's context (at least 80
    %), each prompt checked to be the trained text's own beginning."""
    from synthetic.skills import answer_prompt
    out = []
    for r in rows:
        try:
            full = model.prompt([("user", r["question"]), ("assistant", r["answer"])], [])[0]
        except ValueError:   # longer than the tiny test model's context (its 400-piece vocabulary)
            continue
        asked = answer_prompt(model, r, check_given)
        assert full[:len(asked)] == asked
        out.append((r, model.tokenizer.decode(full[len(asked):]).strip()))
    assert len(out) >= len(rows) * 0.8
    return out


def test_a_skill_is_scored_on_exactly_the_text_it_is_trained_on(setup):
    """The scoring prompt (question, answer turn, reading through "Answer:") is the trained text's own beginning, and
    what follows it there is the final answer and the end of the turn (a worked check's rows: the next test)."""
    cfg, data, model = setup
    rows = [r for r in data["val"].rows if r["task"] == "skills" and " Check: " not in r["answer"]]
    assert rows and {r["family"] for r in rows} >= {"single-choose", "single-query"}
    for r, rest in after_the_scoring_prompt(model, rows):
        assert rest == (r["final"] if "Answer:" in r["answer"] else r["answer"]) + model.format.end, rest


def test_a_worked_skill_is_scored_on_the_check_the_model_writes_not_one_it_is_given(setup):
    """With --worked_checks the scoring prompt stops before "Check:": the model writes the lookups and the answer, so
    the score is of the step, not of gathering tags it was handed."""
    from synthetic.skills import skill_rows
    cfg, data, model = setup
    rows = [r for r in skill_rows(40, seed=5, worked=True) if " Check: " in r["answer"]]
    assert {r["family"] for r in rows} >= {"comparison-query", "new_findings", "resolved_findings", "rhythm_change",
                                           "hr_trend"}
    for r, rest in after_the_scoring_prompt(model, rows):
        assert rest.startswith("Check:") and rest.endswith(f"Answer: {r['final']}{model.format.end}"), rest
    for r, rest in after_the_scoring_prompt(model, rows, check_given=True):   # skills_probe --check_given
        assert rest == r["answer"].rpartition("Check: ")[2] + model.format.end, rest


@pytest.fixture
def one_thread():
    """Every run of a test on one thread, as its subprocesses run: a float sum split over more threads may differ
    in its last bits, and the losses are compared exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_run_killed_by_sigkill_resumes_to_the_losses_of_an_uninterrupted_run(tmp_path, one_thread):
    kw = dict(stage3_steps=40, ckpt_interval=4)
    full = train.train(tiny(tmp_path / "a", **kw))
    args = [f"--{k}={v}" for k, v in {**TINY, **kw}.items()] + [f"--out_dir={tmp_path / 'b'}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while config.latest_checkpoint(tmp_path / "b") is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)   # no chance to clean up: whatever is on disk now is what resume finds
    finally:
        proc.wait()
    killed_at = json.loads((config.latest_checkpoint(tmp_path / "b") / "state.json").read_text())["global_step"]
    assert 0 < killed_at < len(full), "the kill landed after the first checkpoint and before the end"
    before = [r["loss"] for r in log_of(tmp_path / "b")][:killed_at]
    rest = train.train(tiny(tmp_path / "b", resume=True, **kw))
    assert before + rest == full


def test_two_process_ddp_matches_single_process_gradient_accumulation(tmp_path):
    """Two processes with the default --grad_accum 0 (one micro-batch each, as the README's torchrun command runs)
    against one process accumulating the same two micro-batches."""
    kw = dict(lora_dropout=0.0, stage0_steps=2, stage1_steps=2, stage2_steps=2, stage3_steps=2)
    single = train.train(tiny(tmp_path / "single", grad_accum=2, **kw))
    (tmp_path / "ddp").mkdir()
    os.symlink(tmp_path / "single" / "tokenizer", tmp_path / "ddp" / "tokenizer")  # same tokenizer
    args = [f"--{k}={v}" for k, v in {**TINY, **kw}.items()] + [f"--out_dir={tmp_path / 'ddp'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with socket.socket() as sock:  # a port free right now, so parallel CI jobs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(port), str(ROOT / "train.py"), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ddp = [x["loss"] for x in log_of(tmp_path / "ddp")]
    assert len(ddp) == len(single) == 8
    assert ddp == pytest.approx(single, rel=1e-5, abs=1e-6)
    a = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_crash_between_temp_write_and_rename_keeps_the_previous_checkpoint(setup, tmp_path, monkeypatch):
    cfg, _, model = setup
    cfg = replace(cfg, out_dir=str(tmp_path))
    opt = train.make_optimizer(model, cfg, 1e-3)
    first = train.save_checkpoint(cfg, model, opt, {"stage": 1, "step": 1, "global_step": 1})
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(*args):
        raise KeyboardInterrupt("killed between temp write and rename")
    monkeypatch.setattr(train.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(cfg, model, opt, {"stage": 1, "step": 2, "global_step": 2})
    monkeypatch.undo()
    assert config.latest_checkpoint(tmp_path) == first
    meta = train.load_checkpoint(first, model, opt)
    assert meta["step"] == 1 and all(torch.equal(p, saved[n]) for n, p in model.named_parameters())


def test_nan_step_is_skipped_and_repeated_nan_stops_with_checkpoint(tmp_path, monkeypatch):
    forward = ECGChat.forward
    calls = {"n": 0, "bad": {4}}

    def flaky(self, *args, **kw):
        logits, loss = forward(self, *args, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] in calls["bad"] or "all" in calls["bad"]:
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(ECGChat, "forward", flaky)
    losses = train.train(tiny(tmp_path / "a"))
    nan = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines() if '"nan"' in x]
    assert len(nan) == 1 and nan[0]["stage"] == 1 and len(losses) == 11  # one step skipped, run finished
    calls.update(n=0, bad={"all"})
    with pytest.raises(FloatingPointError, match="3 non-finite steps"):
        train.train(tiny(tmp_path / "b"))
    kept = config.latest_checkpoint(tmp_path / "b")
    assert all(torch.isfinite(t).all() for t in load_file(str(kept / "model.safetensors")).values())
    # the run resumes from the weights kept at the stop, once the cause is gone
    calls.update(n=0, bad=set())
    assert all(math.isfinite(x) for x in train.train(tiny(tmp_path / "b", resume=True)))
    assert (tmp_path / "b" / "model" / "model.safetensors").is_file()


def test_anyecg_file_with_malformed_rows_and_missing_records_trains_and_counts_them(tmp_path):
    """Malformed rows are dropped when the file is read; rows whose record is missing or
    that are too long for the context are skipped when drawn, counted and named in the log; rows marked "split": "val" form the
    validation split; the run goes on to the end."""
    ds = build_synthetic_dataset(4, seed=3, split="train")
    path = write_dataset(ds, tmp_path / "ecgs", "rows")
    rows = json.loads(Path(path).read_text())
    for r in rows[:3]:
        r["split"] = "val"
    missing = [dict(r, ecg_path=[f"gone/rec{k}"], split="train") for k, r in enumerate(rows[3:9])]
    missing += [dict(rows[3], ecg_path=["../outside_the_root"], split="train")]   # never read, whatever is there
    too_long = [dict(r, question="why? " * 600) for r in rows[9:13]]   # 1,200 pieces: "?" joins no word
    rows += missing + too_long + [{"question": "no answer", "ecg_path": "x", "task": "report", "dataset": "d"}, "not a row"]
    Path(path).write_text(json.dumps(rows))
    with pytest.warns(UserWarning, match="skipped 2"):
        train.train(tiny(tmp_path / "out", data=path, ecg_root=str(tmp_path / "ecgs"), stage0_steps=1,
                         stage1_steps=1, stage2_steps=1, stage3_steps=1, test_rows=1))
    log = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    event = next(r for r in log if "skipped" in r)
    assert event["skipped"] == 2 and event["rows"] == len(rows) - 2
    assert next(r for r in log if r.get("event") == "splits")["val"] == 3
    skipped = [x for r in log if r.get("event") == "skipped_rows" for x in r["new"]]
    assert any("gone/rec" in x for x in skipped) and any("context allows" in x for x in skipped)
    assert any("outside the ECG root" in x for x in skipped)
    assert all("gone/rec" in x or "context allows" in x or "outside the ECG root" in x for x in skipped)
    assert (tmp_path / "out" / "model").is_dir()


def test_encoder_init_starts_from_saved_encoder_and_names_a_mismatch(setup, tmp_path):
    """--encoder_init: the model starts from the file's encoder (its config comes along);
    a file that does not fit an encoder is one error naming the file and the keys."""
    from ecg_encoder import ECGEncoder, EncoderConfig, save_encoder_weights
    cfg, data, model = setup
    pretrained = ECGEncoder(EncoderConfig(d_model=48, n_layers=2))
    save_encoder_weights(pretrained, tmp_path / "enc.safetensors", pretrained.cfg)
    cfg2 = replace(cfg, encoder_init=str(tmp_path / "enc.safetensors"))
    chat = train.build_model(cfg2, model.tokenizer, torch.device("cpu"), torch.float32)
    assert chat.encoder.cfg.d_model == 48 and len(chat.encoder.blocks) == 2
    for name, p in pretrained.state_dict().items():
        assert torch.equal(chat.encoder.state_dict()[name], p), name
    save_encoder_weights(torch.nn.Linear(2, 2), tmp_path / "bad.safetensors", pretrained.cfg)
    with pytest.raises(ValueError, match=r"(?s)bad\.safetensors does not match ECGEncoder.*unexpected keys"):
        train.build_model(replace(cfg, encoder_init=str(tmp_path / "bad.safetensors")), model.tokenizer,
                          torch.device("cpu"), torch.float32)
    (tmp_path / "junk.safetensors").write_text("not safetensors")
    with pytest.raises(ValueError, match=r"junk\.safetensors: not a readable safetensors file"):
        train.build_model(replace(cfg, encoder_init=str(tmp_path / "junk.safetensors")), model.tokenizer,
                          torch.device("cpu"), torch.float32)


@pytest.fixture
def few_warmup_val_patients(monkeypatch):
    """The warm-up scores itself on 200 validation patients (about 10 s to simulate, each call); the tests of what it
    saves and reuses need only a few."""
    monkeypatch.setattr(train, "WarmupConfig", functools.partial(train.WarmupConfig, test_patients=4))


@pytest.mark.usefixtures("few_warmup_val_patients")
def test_encoder_warmup_trains_the_encoder_saves_it_and_reuses_the_file(setup, tmp_path):
    """The warm-up changes the encoder, writes out_dir/encoder_warmup.safetensors and logs its
    validation scores; a second run (a restart before the first checkpoint) loads the file."""
    cfg, data, shared = setup
    cfg2 = replace(cfg, out_dir=str(tmp_path), encoder_warmup_steps=3)
    model = train.build_model(cfg, shared.tokenizer, torch.device("cpu"), torch.float32)  # leave the fixture's alone
    before = {n: p.detach().clone() for n, p in model.encoder.state_dict().items()}
    records = []
    env = SimpleNamespace(out=tmp_path, log=records.append, rank=0)
    train.warm_up_encoder(cfg2, model, env)
    after = {n: p.detach().clone() for n, p in model.encoder.state_dict().items()}
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert records[0]["event"] == "encoder_warmup" and records[0]["steps"] == 3 and "val_hr_mae" in records[0]
    fresh = train.build_model(cfg, model.tokenizer, torch.device("cpu"), torch.float32)
    train.warm_up_encoder(cfg2, fresh, env)
    assert len(records) == 1  # loaded, not trained again
    for n, p in fresh.encoder.state_dict().items():
        assert torch.equal(p, after[n]), n


def test_the_question_after_the_reading_reaches_every_split_and_the_skill_texts(tmp_path):
    """--question_after_reading: each synthetic answer that writes a reading repeats its question after it, in every
    split (the test split's reference too), and stage 0's skill texts leave the question out of the user turn."""
    cfg = tiny(tmp_path, question_after_reading=True, worked_checks=False)   # with the checks: the next test
    data = train.load_data(cfg, lambda record: None)
    for split in ("train", "test"):
        rows = [r for r in data[split].rows if r.get("reading") and r["task"] != "skills"]
        assert rows and all(r["reading"].endswith(" Question: " + r["question"].removesuffix(" Please answer briefly."))
                            for r in rows)
    skills = [r for r in data["train"].rows if r["task"] == "skills" and "Reading:" in r["answer"]]
    assert skills and all(r["question"] == "Read, then answer." and " Question: " in r["answer"] for r in skills)
    plain = train.load_data(tiny(tmp_path), lambda record: None)["train"].rows
    assert not any(" Question: " in r.get("reading", "") for r in plain)


def test_worked_checks_stand_after_the_repeated_question_in_every_split_and_the_skill_texts(tmp_path):
    """--worked_checks: a set comparison or rhythm change is worked after the reading (after the repeated question,
    which it depends on), in every split and in stage 0's skill texts; other rows are unchanged."""
    cfg = tiny(tmp_path, question_after_reading=True, worked_checks=True, train_patients=40, test_patients=40)
    data = train.load_data(cfg, lambda record: None)
    for split in ("train", "test"):
        rows = [r for r in data[split].rows if r.get("check") and r["task"] != "skills"]
        assert rows and all(r["reading"].endswith(" Question: " + r["question"].removesuffix(" Please answer briefly.")
                                                  + " " + r["check"]) for r in rows)
        assert not any("Check:" in r.get("reading", "") for r in data[split].rows if not r.get("check"))
    skills = [r for r in data["train"].rows if r["task"] == "skills" and "Check:" in r["answer"]]
    assert skills and all(r["answer"].index(" Question: ") < r["answer"].index(" Check: ") for r in skills)


def test_images_train_every_modality_and_are_scored_apart(tmp_path):
    """--images: report and grounded rows of 12-lead records come three ways (signal, paper
    image, both); the image encoder learns, and the final table scores each modality apart."""
    cfg = tiny(tmp_path, images=True, train_patients=6, test_rows=0, stage0_steps=1, stage2_steps=1, stage3_steps=2,
               stage1_tasks="report", batch_size=6)
    train.train(cfg)
    back = load_chat(tmp_path / "model")
    start = train.build_model(cfg, back.tokenizer, torch.device("cpu"), torch.float32)   # same seed: the init
    assert back.image_encoder is not None and back.image_encoder.num_tokens == 32
    assert not torch.equal(back.image_encoder.pos_emb, start.image_encoder.pos_emb)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    scores = next(r for r in log if r.get("event") == "test")["scores"]
    assert {f"{task} [{m}]" for task in ("report", "grounded") for m in ("signal", "image", "both")} <= set(scores)
    assert scores["report [signal]"]["n"] == scores["report [image]"]["n"] == scores["report [both]"]["n"]
    prior = next(r for r in log if r.get("event") == "test_prior")["scores"]  # the chance level, same groups
    assert set(prior) == set(scores) - {"skipped"}


def test_images_with_a_pretrained_clip_tower_keep_it_frozen(tmp_path):
    """--image_init: GEM's setup, the image encoder is a pretrained CLIP vision tower that
    no stage trains (its projector does learn); the saved model loads it back."""
    transformers = pytest.importorskip("transformers")
    from images.vit import load_clip_vision
    clip_cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=56, patch_size=14)
    transformers.CLIPVisionModel(clip_cfg).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="add --images"):
        train.train(tiny(tmp_path / "run", image_init=str(tmp_path / "clip")))
    cfg = tiny(tmp_path / "run", images=True, image_init=str(tmp_path / "clip"), train_patients=6, test_rows=0,
               stage0_steps=1, stage2_steps=1, stage3_steps=2, stage1_tasks="report", batch_size=6)
    train.train(cfg)
    back = load_chat(tmp_path / "run" / "model")
    loaded = load_clip_vision(tmp_path / "clip")
    assert back.image_encoder.cfg.clip
    for name, p in loaded.state_dict().items():
        assert torch.equal(p, back.image_encoder.state_dict()[name]), name
    start = train.build_model(cfg, back.tokenizer, torch.device("cpu"), torch.float32)
    assert not torch.equal(back.image_projector.fc1.weight, start.image_projector.fc1.weight)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "report [image]" in next(r for r in log if r.get("event") == "test")["scores"]


@pytest.mark.usefixtures("few_warmup_val_patients")
def test_a_diverging_warm_up_stops_clearly_and_a_poisoned_warm_up_file_is_not_reused(setup, tmp_path):
    with pytest.raises(FloatingPointError, match=r"encoder warm-up: the loss is not finite.*--encoder_warmup_lr"):
        train.train(tiny(tmp_path / "a", encoder_warmup_steps=20, encoder_warmup_lr=1e6))
    assert not (tmp_path / "a" / "encoder_warmup.safetensors").exists()             # nothing a later run would load
    # a warm-up file holding NaN, made with this run's own settings, is named and not reused
    cfg, _, model = setup
    cfg = replace(cfg, out_dir=str(tmp_path / "b"), encoder_warmup_steps=2)
    env = SimpleNamespace(out=tmp_path / "b", log=lambda r: None, rank=0)
    (tmp_path / "b").mkdir()
    fresh = train.build_model(cfg, model.tokenizer, torch.device("cpu"), torch.float32)
    train.warm_up_encoder(cfg, fresh, env)
    path = tmp_path / "b" / "encoder_warmup.safetensors"
    poisoned = {k: v.clone().fill_(float("nan")) for k, v in load_file(str(path)).items()}
    save_file(poisoned, str(path), metadata=safe_open_metadata(path))
    with pytest.warns(UserWarning, match=r"encoder_warmup\.safetensors holds non-finite weights.*warming up again"):
        train.warm_up_encoder(cfg, fresh, env)
    assert all(torch.isfinite(p).all() for p in fresh.encoder.parameters())
    assert all(torch.isfinite(t).all() for t in load_file(str(path)).values())      # replaced by a good one
    with pytest.warns(UserWarning, match="made by another warm-up"):                 # other settings: not reused
        train.warm_up_encoder(replace(cfg, encoder_warmup_steps=3), fresh, env)
    deeper = replace(cfg, encoder_warmup_steps=3, encoder_layers=fresh.encoder.cfg.n_layers + 1)
    other = train.build_model(deeper, model.tokenizer, torch.device("cpu"), torch.float32)
    with pytest.warns(UserWarning, match="made by another warm-up"):                 # another encoder: not loaded
        train.warm_up_encoder(deeper, other, env)


def test_values_a_run_cannot_use_are_named_before_anything_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"--batch_size 0: at least 1; --train_patients 0: at least 1"):
        train.train(tiny(tmp_path / "a", batch_size=0, train_patients=0))
    with pytest.raises(ValueError, match=r"--stage1_lr -0.1: above 0"):
        train.train(tiny(tmp_path / "a", stage1_lr=-0.1))
    with pytest.raises(ValueError, match=r"--test_rows_per_type -1: not negative; --chat_format vicuna: auto, nanoecg"):
        train.train(tiny(tmp_path / "a", test_rows_per_type=-1, chat_format="vicuna"))
    with pytest.raises(ValueError, match=r"--encoder base --encoder_dim 64: encoder config: d_model 64 must be even and "
                                         r"a multiple of n_heads 12"):   # anyECG's preset has 12 heads
        train.train(tiny(tmp_path / "a", encoder="base", encoder_dim=64))
    assert not (tmp_path / "a" / "tokenizer").exists()
    with pytest.raises(ValueError, match=r"--vocab_size 300: sentencepiece cannot build it .*Vocabulary size"):
        train.train(tiny(tmp_path / "b", vocab_size=300))
    # a task mix whose weights are all 0 is named before stage 0 trains, not after
    with pytest.raises(ValueError, match=r"stage 1 \(report\): the task weights \['report'\] are 0; .*--stage1_tasks"):
        train.train(tiny(tmp_path / "c", stage1_tasks="report:0"))
    assert not list((tmp_path / "c").glob("checkpoints/step_*"))
    # real rows of one task (MIT-BIH's localization rows): the stages that cannot be drawn say what the data has
    localization_only = train.Split([{"task": "location"}, {"task": "location_long"}], None)
    with pytest.raises(ValueError, match=r"no rows of tasks \['report'\] in the training data, which has location, "
                                         r"location_long"):
        localization_only.weights({"report": 1.0})


def test_a_vocabulary_larger_than_few_rows_hold_is_lowered_with_a_warning(tmp_path):
    """Rows of one record (MIT-BIH 100's 39): sentencepiece cannot make 1000 pieces of their text; the run goes on
    with as many as it can, and says so. A vocabulary too small stays an error (test above)."""
    rows = [{"question": f"Where is beat {k}?", "answer": f"Duration: {k}.0s-{k}.5s"} for k in range(40)]
    cfg = tiny(tmp_path, vocab_size=1000)
    with pytest.warns(UserWarning, match=r"--vocab_size 1000: the text of the 40 training rows holds (\d+) pieces at "
                                         r"most; the tokenizer has \1"):
        tok = train.build_tokenizer(cfg, {"train": train.Split(rows, None)}, 0)
    assert 260 < tok.base_vocab_size < 1000 and tok.decode(tok.encode("Where is beat 7?")) == "Where is beat 7?"


def test_half_written_checkpoint_folders_are_cleaned_up(setup, tmp_path):
    cfg, _, model = setup
    cfg = replace(cfg, out_dir=str(tmp_path))
    stale = tmp_path / "checkpoints" / ".tmp_killed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    train.save_checkpoint(cfg, model, train.make_optimizer(model, cfg, 1e-3), {"stage": 1, "step": 1, "global_step": 1})
    assert not stale.exists() and [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000001"]


def test_one_run_per_folder_a_used_one_is_refused_locked_or_replaced(tmp_path):
    """A new run in a folder an older run used would see its own checkpoints pruned (the older names sort after
    them) and --resume pick the older run: it is refused unless --overwrite; a folder in use is locked."""
    out = tmp_path / "run"
    older = out / "checkpoints" / "step_0009999"
    older.mkdir(parents=True)
    (out / "log.jsonl").write_text('{"event": "config"}\n')
    with pytest.raises(ValueError, match=r"run holds an older run \(log.jsonl, checkpoints\): continue it with "
                                         r"--resume, replace it with --overwrite"):
        train.train(tiny(out))
    assert older.is_dir() and (out / "log.jsonl").read_text() == '{"event": "config"}\n'   # nothing touched
    with pytest.raises(ValueError, match=r"--resume and --overwrite: choose one"):
        train.train(tiny(out, resume=True, overwrite=True))
    held = train.lock_folder(out)   # as a run still going holds it
    with pytest.raises(ValueError, match=rf"another run \(process {os.getpid()}\) is using this folder"):
        train.train(tiny(out, overwrite=True))
    held.close()
    train.train(tiny(out, overwrite=True, stop_after=5, ckpt_interval=2, keep_ckpts=2))
    assert not older.exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000003", "step_0000005"]
    assert [json.loads(x).get("event") for x in (out / "log.jsonl").read_text().splitlines()][0] == "config"
    assert len(log_of(out)) == 5   # the older run's log went with it
    train.lock_folder(out).close()   # the finished run gave the folder back
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"a_file/run: cannot write there \(.*\); choose another --out_dir"):
        train.train(tiny(tmp_path / "a_file" / "run"))


def test_a_damaged_newest_checkpoint_is_passed_over_and_the_run_resumes_from_the_one_before(tmp_path):
    kw = dict(ckpt_interval=2, keep_ckpts=3)
    full = train.train(tiny(tmp_path / "a", **kw))
    first = train.train(tiny(tmp_path / "b", stop_after=5, **kw))
    ckpts = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002", "step_0000003", "step_0000005"]
    weights = ckpts / "step_0000005" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])           # cut off, as by a full disk
    with pytest.warns(UserWarning, match=r"step_0000005 is damaged \(SafetensorError.*passed over"):
        assert config.latest_checkpoint(tmp_path / "b").name == "step_0000003"
    (ckpts / "step_0000003" / "state.json").write_text('{"stage": 1, "st')   # edited by hand, cut short
    with pytest.warns(UserWarning, match=r"step_0000003 is damaged \(JSONDecodeError"):
        rest = train.train(tiny(tmp_path / "b", resume=True, **kw))
    assert first[:2] + rest == full
    assert {"damaged_step_0000003", "damaged_step_0000005"} <= {p.name for p in ckpts.iterdir()}


def test_a_tokenizer_another_run_left_in_out_dir_is_trained_again(setup, tmp_path):
    cfg, data, _ = setup
    cfg = replace(cfg, out_dir=str(tmp_path))
    first = train.build_tokenizer(cfg, data, 0)
    made = (tmp_path / "tokenizer" / "tokenizer.model").stat().st_mtime_ns
    with warnings.catch_warnings():   # made by the same settings: reused as it is, without a word
        warnings.simplefilter("error")
        assert train.build_tokenizer(cfg, data, 0).base_vocab_size == first.base_vocab_size
    assert (tmp_path / "tokenizer" / "tokenizer.model").stat().st_mtime_ns == made
    with pytest.warns(UserWarning, match=r"tokenizer was made by another --vocab_size or --phrases, or from other "
                                         r"training rows"):
        other = train.build_tokenizer(replace(cfg, vocab_size=cfg.vocab_size + 50), data, 0)
    assert other.base_vocab_size == first.base_vocab_size + 50
    with pytest.warns(UserWarning, match="another --vocab_size or --phrases"):   # pieces within words, or across
        words = train.build_tokenizer(replace(cfg, vocab_size=cfg.vocab_size + 50, phrases=not cfg.phrases), data, 0)
    phrase_tok, word_tok = (other, words) if cfg.phrases else (words, other)
    answers = [r["answer"] for r in data["train"].rows]
    assert sum(map(len, map(phrase_tok.encode, answers))) < sum(map(len, map(word_tok.encode, answers)))
    fewer = {**data, "train": train.Split(data["train"].rows[:-1], None)}
    with pytest.warns(UserWarning, match="from other training rows"):
        train.build_tokenizer(replace(cfg, vocab_size=cfg.vocab_size + 50), fewer, 0)
    # a folder from before --phrases existed (its record does not say) is of word pieces: reused by such a run
    words_cfg = replace(cfg, vocab_size=cfg.vocab_size + 51, phrases=False)
    with pytest.warns(UserWarning, match="another --vocab_size"):
        train.build_tokenizer(words_cfg, data, 0)
    record = tmp_path / "tokenizer" / "made_by.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "phrases"}))
    made = (tmp_path / "tokenizer" / "tokenizer.model").stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.build_tokenizer(words_cfg, data, 0)
    assert (tmp_path / "tokenizer" / "tokenizer.model").stat().st_mtime_ns == made


def test_a_checkpoint_saved_before_a_field_existed_resumes_without_it(tmp_path):
    # a run started before --phrases / --ecg_seconds / --name_last_ecg / --text_row_len existed trained without them:
    # resuming it must not switch them on (a tokenizer trained again with phrase pieces would give the checkpoint's
    # ids other meanings; its stage 0 packed rows of max_seq_len)
    ckpt = tmp_path / "checkpoints" / "step_0000003"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"config": {"seed": 3, "vocab_size": 500}}))
    assert config.saved_config(ckpt) == {**config.BEFORE_THE_FIELD, "seed": 3, "vocab_size": 500}
    assert config.saved_config(ckpt)["phrases"] is False and config.Config().phrases is True
    assert config.saved_config(ckpt)["text_row_len"] == 0 and config.Config().text_row_len == 256
    now = {"phrases": True, "ecg_seconds": True, "name_last_ecg": True, "text_row_len": 256}
    (ckpt / "state.json").write_text(json.dumps({"config": now}))
    assert config.saved_config(ckpt) == now


def test_a_log_file_gets_plain_progress_lines_not_bar_frames(tmp_path, capfd):
    train.train(tiny(tmp_path, stage0_steps=0, stage2_steps=0, stage3_steps=0, encoder_warmup_steps=20))
    out, err = capfd.readouterr()
    assert "\r" not in err and "\r" not in out
    assert [line.split("  ")[0] for line in out.splitlines() if line.startswith("encoder warm-up: step")] == \
        [f"encoder warm-up: step {k}/20" for k in range(2, 21, 2)]
    assert [line.split("  ")[0] for line in out.splitlines() if line.endswith("tok/s")] == \
        [f"stage 1 step {k}/3" for k in (1, 2, 3)]


@pytest.mark.parametrize("kind", ["qwen3", "llama3"])
def test_llm_a_tokenizer_json_checkpoint_trains_stages_1_to_3(tmp_path, kind):
    """--llm with a tiny Qwen3-style or Llama-3-style folder (byte-level BPE tokenizer.json, no sentencepiece)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as JSONTokenizer, decoders, models, pre_tokenizers, trainers
    folder = tmp_path / kind
    texts = [t for r in build_synthetic_dataset(6, seed=1).rows for t in (r["question"], r["answer"])]
    tk = JSONTokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=["<|begin_of_text|>", "<|eot|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    common = dict(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=512, eos_token_id=1)
    config = transformers.Qwen3Config(head_dim=16, tie_word_embeddings=True, **common) if kind == "qwen3" else \
        transformers.LlamaConfig(bos_token_id=0, rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta":
                                 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}, **common)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|eot|>", **({"bos_token": "<|begin_of_text|>"} if kind == "llama3" else {})}))
    train.train(tiny(tmp_path / "run", llm=str(folder), train_patients=6, stage1_steps=2, stage2_steps=2,
                     stage3_steps=2, test_rows=1))
    back = ECGChat.load(tmp_path / "run" / "model")
    assert (back.tokenizer.bos_id is None) == (kind == "qwen3") and back.tokenizer.tk is not None
    assert back.llm.config.qk_norm == (kind == "qwen3") and train.lora_layers(back.llm) == []   # LoRA merged
    losses = [r["loss"] for r in log_of(tmp_path / "run")]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    # the LoRA alone in peft's format: the --llm folder + the adapter == the saved LLM, on the base vocabulary
    base = LLM.from_pretrained(folder, dtype=torch.float32)
    load_peft_adapter(base, tmp_path / "run" / "model" / "lora_adapter")
    ids = torch.randint(0, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (base(ids) - back.llm.float()(ids)[..., :500]).abs().max() <= 1e-4


def test_a_frozen_encoder_has_its_tokens_cached_and_a_trained_one_or_fsdp_does_not(setup):
    cfg, data, model = setup
    stage = train.curriculum(cfg)[1]
    frozen = replace(stage, train=stage.train - {"encoder"})
    train.prepare_stage(model, frozen, cfg)
    assert model.token_cache == {} and model.token_cache_size == cfg.token_cache
    model.encode_ecgs(data["train"].inputs_of(data["train"].rows[0]))
    assert len(model.token_cache) == 1
    train.prepare_stage(model, frozen, cfg)            # the next frozen stage keeps what was encoded
    assert len(model.token_cache) == 1
    train.prepare_stage(model, replace(frozen, train=frozen.train | {"encoder"}), cfg)
    assert model.token_cache is None
    train.prepare_stage(model, frozen, replace(cfg, parallel="fsdp"))
    assert model.token_cache is None


@pytest.mark.parametrize("steps, warmup_frac", [(100, 0.2), (7, 0.1)])
def test_lr_warms_up_linearly_then_follows_one_cosine_over_the_rest_of_the_stage(steps, warmup_frac):
    cfg = config.Config(warmup_frac=warmup_frac, min_lr_frac=0.1)
    stage = train.Stage(1, "report", steps, 1e-3, {"report": 1.0}, {"projector"})
    warmup = max(1, int(warmup_frac * steps))                      # 20 of 100 steps; at least 1 of 7
    lrs = [train.lr_at(step, stage, cfg) for step in range(steps + 1)]
    assert lrs[:warmup] == pytest.approx([1e-3 * (k + 1) / warmup for k in range(warmup)])
    # half a cosine period from the peak at the warm-up's end to min_lr_frac * lr at the stage's end
    cosine = lambda t: 1e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * t)) / 2)
    assert lrs[warmup:] == pytest.approx([cosine((k - warmup) / (steps - warmup)) for k in range(warmup, steps + 1)])
    assert lrs[warmup] == pytest.approx(1e-3) and lrs[steps] == pytest.approx(1e-4)
    if (steps - warmup) % 2 == 0:                                  # the middle of the decay: halfway down
        assert lrs[(warmup + steps) // 2] == pytest.approx((1e-3 + 1e-4) / 2)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
