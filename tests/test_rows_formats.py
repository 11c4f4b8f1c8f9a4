"""Rows in every format data.load_rows reads: anyECG's, and the LLaVA-style rows of GEM (ECG-Grounding), PULSE
(ECGInstruct) and ECG-Bench (its arena and ecgqa shapes too), converted to anyECG's form; malformed rows counted in one
warning; a file of each format trains a few steps (train.py --data) and evaluates (eval.py), unreadable rows counted.

The fixture rows name the real records in ../shared/data/physionet, read in place (never copied here); the tests that
read them skip with a reason when that folder is absent. LLaVA rows name the 38 s PTB record s0010_re (GEM's records
are whole 10 s ECGs); MIT-BIH 100 (30 min) is read in 10 s clips by anyECG localization rows.
"""
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

import config
import eval as ev
import train
from data import (BEAT_NAMES, LIST_SEPARATOR, STANDARD_LEADS, RowECGReader, load_ecg, load_rows, localization_answer,
                  read_row)
from test_train import TINY

PHYSIONET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "physionet"
needs_physionet = pytest.mark.skipif(not all((PHYSIONET / f"{name}.hea").is_file() for name in ("100", "s0010_re")),
                                     reason=f"real records 100 and s0010_re not found at {PHYSIONET}")

GROUNDED = ("The rhythm is sinus at a heart rate of 68 bpm, with a PR interval of 164 ms and a QRS duration of 96 ms. "
            "Pathological Q waves in leads II, III and aVF with T wave inversion point to an old inferior myocardial "
            "infarction; the precordial leads show normal R wave progression.")


def human(text):
    return {"from": "human", "value": text}


def gpt(value):
    return {"from": "gpt", "value": value}


# ----------------------------------------------------------------------------- one file's rows per format

def anyecg_rows():
    """A localization row on a 10 s clip of MIT-BIH 100 around its first premature atrial beat (answer by the anyECG
    rule), and report rows on PTB s0010_re."""
    wfdb = pytest.importorskip("wfdb")
    ann = wfdb.rdann(str(PHYSIONET / "100"), "atr")
    start = int(next(s for s, sym in zip(ann.sample, ann.symbol) if sym == "A")) - 1800
    location = {"question": f"Locate the {BEAT_NAMES['A']} on this ECG.", "ecg_path": "100",
                "answer": localization_answer(ann.sample, ann.symbol, start, start + 3600, 360, "A"),
                "dataset": "mit_bih_arrhythmia", "task": "location", "abnormal_type": "A", "ecg_start": start,
                "ecg_end": start + 3600}
    report = {"question": "Write the report of this ECG.", "answer": "Sinus rhythm, inferior myocardial infarction.",
              "ecg_path": ["s0010_re"], "dataset": "ptb", "task": "report"}
    return [location, report, dict(report, question="What does this ECG show?")]


def grounding_rows():
    """GEM's ECG-Grounding: a grounded interpretation; its test rows add the report and machine measurements."""
    row = {"id": "40689238", "image": "mimic_gen/40689238.png", "ecg": "s0010_re",
           "conversations": [human("<image>\nInterpret this ECG and explain the evidence for your diagnosis."),
                             gpt(GROUNDED)],
           "report": "Sinus rhythm. Inferior infarct - age undetermined.",
           "machine_measurements": {"rr_interval": 882, "p_onset": 40, "qrs_onset": 122, "qrs_end": 218}}
    return [row, dict(row, id="40689239"), dict(row, id="40689240")]


def instruct_rows():
    """PULSE's ECGInstruct: multi-turn chats, <image> at the start of the first human turn; the second chat's first
    answer is closed (a yes/no), so that row is scored by set match, and its markers stand anywhere."""
    chat = {"id": "ptbxl-00010-chat", "image": "ptb-xl/00010.png", "ecg": "s0010_re",
            "conversations": [human("<image>\nWhat is the rhythm of this ECG?"),
                              gpt("The rhythm is regular sinus rhythm with a normal rate and normal P waves."),
                              human("Are there signs of a previous infarction?"),
                              gpt("Yes: Q waves in the inferior leads II, III and aVF suggest an old infarct."),
                              human("What would you recommend next?"),
                              gpt("Compare with earlier tracings and consider an echocardiogram to assess the wall.")]}
    closed = {"id": "ptbxl-00010-yn", "image": "ptb-xl/00010.png", "ecg": "s0010_re",
              "conversations": [human("Is there atrial <ecg> <image>\nfibrillation in this ECG? <image>"), gpt("No."),
                                human("Why not?"), gpt("P waves precede every QRS complex at regular intervals.")]}
    return [chat, closed, dict(chat, id="ptbxl-00010-chat2")]


def bench_rows():
    """ECG-Bench's closed subsets: no <image> in the text (their evaluator adds it)."""
    question = "Classify the ECG as normal or abnormal. Provide NORM or ABNORMAL as the output."
    code15 = {"id": "code15-1109348", "image": "code15/1109348-0.png", "ecg": "s0010_re",
              "conversations": [human(question), gpt("ABNORMAL")]}
    csn = {"id": "csn-JS00001", "image": "csn/JS00001.png", "ecg": "s0010_re",
           "conversations": [human("Which statement best describes this ECG? A. Sinus rhythm B. Atrial fibrillation "
                                   "C. Myocardial infarction D. Normal ECG. Answer with the option's letter."),
                             gpt("C")]}
    return [code15, csn, dict(code15, id="code15-1109349")]


def arena_rows():
    """ECG-Bench's arena: {question, answer} turns, two exchanges each."""
    row = {"id": "arena-17-0", "image": "arena/17.png", "ecg": "s0010_re",
           "conversations": [{"question": "<image>\nDescribe the main findings of this ECG in a few sentences.",
                              "answer": "Sinus rhythm with Q waves and inverted T waves in II, III and aVF, "
                                        "in keeping with an old inferior myocardial infarction."},
                             {"question": "How confident can one be about the age of the infarct?",
                              "answer": "Not very: without ST elevation it is most likely old, but only earlier "
                                        "tracings or the clinical history can date it."}]}
    return [row, dict(row, id="arena-18-0"), dict(row, id="arena-19-0")]


def ecgqa_rows():
    """ECG-Bench's ecgqa: the gpt value is a list of answers."""
    options = "Options: sinus rhythm, inferior myocardial infarction, left bundle branch block, none."
    row = {"id": "ecgqa-test-501", "image": "ecgqa/501.png", "ecg": "s0010_re",
           "conversations": [human(f"<image>\nWhich findings are present in this ECG? {options} Only answer based on "
                                   "the given Options without any explanation."),
                             gpt(["sinus rhythm", "inferior myocardial infarction"])]}
    yes = {"id": "ecgqa-test-502", "image": "ecgqa/502.png", "ecg": "s0010_re",
           "conversations": [human("<image>\nDoes this ECG show sinus rhythm? Options: yes, no, not sure. Only answer "
                                   "based on the given Options without any explanation."), gpt(["yes"])]}
    return [row, yes, dict(row, id="ecgqa-test-503")]


FORMATS = {"anyecg": anyecg_rows, "ecg_grounding": grounding_rows, "ecginstruct": instruct_rows,
           "ecgbench": bench_rows, "ecgbench_arena": arena_rows, "ecgbench_ecgqa": ecgqa_rows}


def write_rows(folder, name, rows):
    path = Path(folder) / f"{name}.json"
    path.write_text(json.dumps(rows, indent=1))
    return str(path)


# ----------------------------------------------------------------------------- conversion (no records read)

def test_gem_grounding_row_keeps_its_fields_and_loses_its_marker(tmp_path):
    (row,) = load_rows(write_rows(tmp_path, "g", grounding_rows()[:1]))
    assert row["question"] == "Interpret this ECG and explain the evidence for your diagnosis."
    assert row["answer"] == GROUNDED and row["ecg_path"] == ["s0010_re"] and "followups" not in row
    assert row["task"] == "report" and row["dataset"] == "llava"   # an id without a subset prefix
    assert row["id"] == "40689238" and row["image"] == "mimic_gen/40689238.png" and row["file_index"] == 0
    assert row["report"].startswith("Sinus rhythm") and row["machine_measurements"]["rr_interval"] == 882
    assert "conversations" not in row


def test_multi_turn_chat_keeps_its_turns_as_followups(tmp_path):
    chat, closed, _ = load_rows(write_rows(tmp_path, "i", instruct_rows()))
    assert chat["question"] == "What is the rhythm of this ECG?" and chat["task"] == "report"
    turns = instruct_rows()[0]["conversations"]
    assert chat["followups"] == [[turns[2]["value"], turns[3]["value"]], [turns[4]["value"], turns[5]["value"]]]
    assert chat["dataset"] == "ptbxl"
    # a marker anywhere in a turn goes; a closed first answer makes an ECG-QA-style row of its own question type
    assert closed["question"] == "Is there atrial fibrillation in this ECG?" and closed["answer"] == "No."
    assert closed["task"] == "ecgqa" and closed["question_type"] == "ptbxl" and len(closed["followups"]) == 1


def test_ecgbench_rows_are_closed_questions_of_their_subset(tmp_path):
    code15, csn, _ = load_rows(write_rows(tmp_path, "b", bench_rows()))
    assert code15["question"] == bench_rows()[0]["conversations"][0]["value"] and code15["answer"] == "ABNORMAL"
    assert (code15["dataset"], code15["task"], code15["question_type"]) == ("code15", "ecgqa", "code15")
    assert (csn["dataset"], csn["answer"]) == ("csn", "C")
    assert ev.set_match("Answer: C", csn["answer"]) == 1.0 and ev.set_match("ABNORMAL", code15["answer"]) == 1.0


def test_arena_question_answer_turns_become_a_row_and_its_followup(tmp_path):
    row = load_rows(write_rows(tmp_path, "a", arena_rows()))[0]
    turns = arena_rows()[0]["conversations"]
    assert row["question"] == turns[0]["question"].removeprefix("<image>\n") and row["answer"] == turns[0]["answer"]
    assert row["followups"] == [[turns[1]["question"], turns[1]["answer"]]]
    assert (row["task"], row["dataset"]) == ("report", "arena")


def test_a_list_answer_is_joined_as_set_answers_are_and_matches_in_any_order(tmp_path):
    row, yes, _ = load_rows(write_rows(tmp_path, "q", ecgqa_rows()))
    assert LIST_SEPARATOR == ", " and row["answer"] == "sinus rhythm, inferior myocardial infarction"
    assert row["question"].startswith("Which findings") and "<image>" not in row["question"]
    assert (row["task"], row["question_type"], yes["answer"]) == ("ecgqa", "ecgqa", "yes")
    assert ev.set_match("Inferior myocardial infarction, sinus rhythm.", row["answer"]) == 1.0
    assert ev.set_match("sinus rhythm", row["answer"]) == 0.0


def test_anyecg_and_llava_rows_mix_in_one_file(tmp_path):
    rows = load_rows(write_rows(tmp_path, "m", [{"question": "Report?", "answer": "Sinus rhythm.",
                                                 "ecg_path": "s0010_re", "dataset": "ptb", "task": "report"}]
                                + bench_rows()[:1]))
    assert [r["ecg_path"] for r in rows] == [["s0010_re"], ["s0010_re"]] and [r["file_index"] for r in rows] == [0, 1]
    assert "id" not in rows[0] and rows[1]["id"] == "code15-1109348"


def test_malformed_llava_rows_are_skipped_and_named_in_the_one_warning(tmp_path):
    good = grounding_rows()[0]
    convo = good["conversations"]
    bad = [
        {"id": "a-1", "ecg": "s0010_re"},                                              # no conversations
        dict(good, conversations=[]),
        dict(good, conversations=[{"from": "system", "value": "You are a cardiologist."}] + convo),
        dict(good, conversations=[convo[1], convo[0]]),                                # gpt speaks first
        dict(good, conversations=convo + [human("And then?")]),                         # a question left unanswered
        dict(good, conversations=[convo[0], gpt("")]),
        dict(good, conversations=[human("<image>\n"), convo[1]]),                       # nothing but the marker
        dict(good, conversations=[convo[0], gpt(None)]),
        dict(good, conversations=[human(["two", "questions"]), convo[1]]),
        dict(good, conversations=[convo[0], {"question": "q", "answer": "a"}]),        # two shapes mixed
        {k: v for k, v in good.items() if k != "ecg"},                                 # a printout alone
        {k: v for k, v in good.items() if k not in ("ecg", "image")},
        dict(good, ecg=["s0010_re"]),
        {"question": "no answer", "ecg_path": "x", "task": "report", "dataset": "d"},   # a malformed anyECG row
    ]
    reasons = [read_row(row)[1] for row in bad]
    for i, reason in enumerate(["field 'conversations' missing", "field 'conversations' missing or not a non-empty",
                                "conversations turn 0: from 'system', expected 'human'",
                                "conversations turn 0: from 'gpt', expected 'human'",
                                "conversations turn 2: a human turn with no gpt answer after it",
                                "conversations exchange 0 answer: empty",
                                "conversations exchange 0 question: empty besides its <image>/<ecg> marker",
                                "conversations exchange 0 answer: not a string or a list of strings",
                                "conversations exchange 0 question: not a string",
                                "conversations turn 1: not a {from, value} or {question, answer} object",
                                "no 'ecg' record, only the image 'mimic_gen/40689238.png': a printout alone is read "
                                "only by a model that reads printouts too", "field 'ecg' missing",
                                "field 'ecg' is not a record path",
                                "field 'answer' missing or not a string"]):
        assert reasons[i] and reasons[i].startswith(reason), (i, reasons[i])
    # in a file, good and bad rows mixed: the bad ones counted in one warning that names the first ten
    with pytest.warns(UserWarning) as caught:
        rows = load_rows(write_rows(tmp_path, "bad", [good] + bad))
    assert [r["file_index"] for r in rows] == [0]
    (message,) = [str(w.message) for w in caught if "malformed" in str(w.message)]
    assert f"skipped {len(bad)} of {len(bad) + 1} malformed rows" in message
    assert f"row 1: {reasons[0]}" in message and f"row 10: {reasons[9]}" in message and message.endswith(" ...)")


def test_a_llava_rows_record_is_read_only_inside_the_ecg_root(tmp_path):
    (row,) = load_rows(write_rows(tmp_path, "out", [dict(grounding_rows()[0], ecg="../outside/rec")]))
    with pytest.raises(ValueError, match="outside the ECG root"):
        RowECGReader(tmp_path / "root")(row)


@needs_physionet
def test_a_llava_rows_record_is_read_like_any_rows():
    """GEM reads the file's leads in file order at the file's rate; here they come in the standard order by name and
    resampled to the model's rate, as every other record (PTB's Frank leads vx, vy, vz dropped)."""
    converted, problem = read_row(bench_rows()[0])
    assert problem is None
    with pytest.warns(UserWarning, match="vx"):
        (rec,) = RowECGReader(PHYSIONET)(converted)
    assert rec.leads == STANDARD_LEADS and rec.fs == 100 and rec.signal.shape == (12, 3840)


# ----------------------------------------------------------------------------- printouts, for a model that reads them

def printout_rows():
    """GEM's row (a record and its printout), and PULSE's (the printout alone: ECGInstruct names no record)."""
    both = grounding_rows()[0]
    alone = {k: v for k, v in instruct_rows()[0].items() if k != "ecg"}
    return [both, alone, dict(both, id="40689241")]


@needs_physionet   # anyecg_rows reads MIT-BIH 100's annotations
def test_a_model_that_reads_printouts_gets_rows_of_both_modalities_and_others_refuse_them(tmp_path):
    path = write_rows(tmp_path, "p", printout_rows() + [dict(anyecg_rows()[1], modality="image")])
    both, alone, _, marked = load_rows(path, images=True)
    assert (both["modality"], both["ecg_path"], both["image"]) == ("both", ["s0010_re"], "mimic_gen/40689238.png")
    assert (alone["modality"], alone["ecg_path"], alone["image"]) == ("image", [], "ptb-xl/00010.png")
    assert (marked["modality"], marked["ecg_path"]) == ("image", ["s0010_re"])   # anyECG's row, marked by hand
    # a model without an image encoder reads the records alone; a printout alone, or a row marked so, it cannot read
    with pytest.warns(UserWarning, match="skipped 2 of 4 malformed rows") as caught:
        rows = load_rows(path)
    assert [r["file_index"] for r in rows] == [0, 2] and all("modality" not in r for r in rows)
    assert "row 1: no 'ecg' record" in str(caught[0].message) and "row 3: modality 'image': read only by a model" \
        in str(caught[0].message)
    assert read_row(dict(both, ecg_path="x", modality="paper"), images=True)[1].startswith("modality 'paper': not one")
    assert read_row({**anyecg_rows()[1], "modality": "image", "image": 3}, images=True)[1].startswith("field 'image'")


@needs_physionet
def test_a_printout_is_read_under_the_image_root_or_drawn_from_the_record(tmp_path):
    from images.paper import WIDTH_MM, render_ecg, write_png
    from images.rows import PrintoutReader
    both, alone, _ = load_rows(write_rows(tmp_path, "p", printout_rows()), images=True)
    with pytest.warns(UserWarning, match="vx"):
        ecg, drawn = PrintoutReader(PHYSIONET, width=224)(both)   # no image root: drawn from the record's first 10 s
    rec = load_ecg(PHYSIONET / "s0010_re", end=10000)   # 1 kHz
    assert ecg.leads == STANDARD_LEADS and drawn.dtype == np.uint8 and drawn.shape[1] == 224
    assert np.array_equal(drawn, render_ecg(rec.signal, rec.fs, rec.leads, px_per_mm=224 / WIDTH_MM))
    with pytest.raises(ValueError, match="ptb-xl/00010.png: a printout with no record beside it .* --image_root"):
        PrintoutReader(PHYSIONET)(alone)
    # under an image root: the file itself, for the printout alone and beside the record
    pytest.importorskip("PIL", reason="reading a PNG needs Pillow, an optional dependency")
    images = tmp_path / "images"
    for rel, value in [("ptb-xl/00010.png", 40), ("mimic_gen/40689238.png", 90)]:
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        write_png(np.full((30, 50, 3), value, np.uint8), images / rel)
    reader = PrintoutReader(PHYSIONET, image_root=images)
    (image,) = reader(alone)
    assert image.shape == (30, 50, 3) and (image == 40).all()
    with pytest.warns(UserWarning, match="vx"):
        assert (reader(both)[1] == 90).all()
    with pytest.raises(ValueError, match="outside the ECG root"):   # an image path is confined as a record's is
        reader(dict(alone, image="../p.json"))


@needs_physionet
def test_rows_with_printouts_train_and_evaluate_with_a_model_that_reads_them(tmp_path):
    """train.py --images --data --image_root: GEM's rows read their record and printout, PULSE's its printout alone;
    eval.py --image-root scores each modality apart."""
    pytest.importorskip("PIL", reason="reading a PNG needs Pillow, an optional dependency")
    from images.paper import write_png
    images = tmp_path / "images"
    for rel in ("ptb-xl/00010.png", "mimic_gen/40689238.png"):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        write_png(np.full((40, 60, 3), 200, np.uint8), images / rel)
    rows = printout_rows()
    path = write_rows(tmp_path, "p", rows + [dict(r, id=f"{r['id']}-b") for r in rows])
    with pytest.raises(ValueError, match="add both"):
        train.train(config.Config(out_dir=str(tmp_path / "x"), image_root=str(images), **TINY))
    cfg = config.Config(out_dir=str(tmp_path / "run"), data=path, ecg_root=str(PHYSIONET), images=True,
                        image_root=str(images), **{**TINY, **STEPS})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # PTB's Frank leads dropped
        losses = train.train(cfg)
        assert losses and all(math.isfinite(x) for x in losses)
        scores = ev.main(["--ckpt", str(tmp_path / "run" / "model"), "--data", path, "--ecg-root", str(PHYSIONET),
                          "--image-root", str(images), "--out", str(tmp_path / "r.json"), "--max-new-tokens", "4"])
    assert {name: s["n"] for name, s in scores.items() if name != "skipped"} == \
        {"report [both]": 4, "report [image]": 2} and scores["skipped"]["n"] == 0


# ----------------------------------------------------------------------------- a file of each format trains, evaluates

STEPS = dict(stage0_steps=1, stage1_steps=1, stage2_steps=1, stage3_steps=1, test_rows=1, workers=0)
CLOSED_ONLY = dict(stage1_tasks="ecgqa", stage2_tasks="ecgqa")   # stage 1 and 2 train reports by default


@needs_physionet
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_of_each_format_trains_and_evaluates_with_unreadable_rows_counted(fmt, tmp_path):
    good = FORMATS[fmt]()
    missing = dict(good[1], ecg_path="no_such_record") if fmt == "anyecg" else dict(good[1], ecg="no_such_record")
    malformed = {"question": "no answer", "ecg_path": "100", "task": "report", "dataset": "d"} if fmt == "anyecg" \
        else {"id": "x-1", "ecg": "s0010_re", "conversations": [human("<image>")]}
    path = write_rows(tmp_path, fmt, good + [missing, malformed])
    closed = fmt in ("ecgbench", "ecgbench_ecgqa")
    cfg = config.Config(out_dir=str(tmp_path / "run"), data=path, ecg_root=str(PHYSIONET),
                        **{**TINY, **STEPS, **(CLOSED_ONLY if closed else {})})
    with pytest.warns(UserWarning, match=f"skipped 1 of {len(good) + 2} malformed rows"):
        losses = train.train(cfg)
    assert losses and all(math.isfinite(x) for x in losses)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert next(r for r in log if r.get("event") == "data")["skipped"] == 1
    assert any("no_such_record" in x for r in log if r.get("event") == "skipped_rows" for x in r["new"])

    out = tmp_path / "results.json"
    with pytest.warns(UserWarning, match="skipped 1 of"):
        scores = ev.main(["--ckpt", str(tmp_path / "run" / "model"), "--data", path, "--ecg-root", str(PHYSIONET),
                          "--out", str(out), "--max-new-tokens", "4", "--batch-size", "4"])
    assert scores["skipped"]["n"] == 1 and scores["skipped"]["by_reason"] == {"ecg_path not found": 1}
    answered = {name: s["n"] for name, s in scores.items() if name != "skipped"}
    assert sum(answered.values()) == len(good)
    expected = {"anyecg": {"location", "report"}, "ecg_grounding": {"report"}, "ecginstruct": {"report", "ecgqa"},
                "ecgbench": {"ecgqa"}, "ecgbench_arena": {"report"}, "ecgbench_ecgqa": {"ecgqa"}}[fmt]
    assert set(answered) == expected
    predictions = json.loads(out.read_text())["predictions"]
    assert len(predictions) == len(good) and all(isinstance(p["prediction"], str) for p in predictions)


@needs_physionet
def test_a_stage_whose_every_row_is_unreadable_stops_with_the_reason_instead_of_drawing_forever(tmp_path):
    """ECG-Bench rows (closed: ecgqa) read, and the one free-text row (report, the only task of stage 1) names a missing
    record: get_batch used to draw again while any row of the split could be read, here for ever."""
    lost = {"id": "x-1", "ecg": "no_such_record",
            "conversations": [human("<image>\nDescribe this ECG."), gpt(GROUNDED)]}
    path = write_rows(tmp_path, "lost", bench_rows() + [lost])
    cfg = config.Config(out_dir=str(tmp_path / "run"), data=path, ecg_root=str(PHYSIONET), **{**TINY, **STEPS})
    with pytest.raises(RuntimeError, match=r"no record of the 1 rows could be read; first error: .*no_such_record"):
        train.train(cfg)
