"""Tests for eval.py: every metric on hand-made cases with known values, perfect answers
scoring perfectly on every synthetic task, `evaluate` (batching, skipped rows, --ablate-ecg),
and the command line end to end on a tiny random checkpoint and real MIT-BIH record 100."""

import io
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as ev
from chat import SPECIAL_TOKENS, ECGChat
from data import BEAT_NAMES, STANDARD_LEADS, ECGRecord, load_ecg, localization_answer, merge_intervals
from ecg_encoder import ECGEncoder, EncoderConfig
from model import LLM, LLMConfig, train_tokenizer
from synthetic.tasks import build_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
PHYSIONET = ROOT.parent / "shared" / "data" / "physionet"

# ----------------------------------------------------------------------------- localization IoU

NO_A = "No Atrial premature beat Found"


def test_iou_not_found_cases():
    assert ev.localization_iou(NO_A, NO_A) == 1.0
    assert ev.localization_iou("no atrial premature beat found.", NO_A) == 1.0          # case and punctuation aside
    # asked about one beat, the answer says another is absent: wrong (seen on record 100: RBBB asked, PVC answered)
    assert ev.localization_iou("No Premature ventricular contraction Found", NO_A) == 0.0
    assert ev.localization_iou(NO_A, "Duration: 1.0s-2.0s") == 0.0
    assert ev.localization_iou("Duration: 1.0s-2.0s", NO_A) == 0.0


def test_iou_garbage_is_zero():
    for garbage in ["", "Sinus rhythm", "Duration: soon", "Duration: 3.0s-1.0s"]:
        assert ev.localization_iou(garbage, "Duration: 1.0s-2.0s") == 0.0
        assert ev.localization_iou(garbage, NO_A) == 0.0


@pytest.mark.parametrize("pred, ref, iou", [
    ("Duration: 1.0s-3.0s", "Duration: 1.0s-3.0s", 1.0),
    ("Duration: 1.0s-3.0s", "Duration: 2.0s-4.0s", 1 / 3),            # overlap 1 s of 3 s
    ("Duration: 0.0s-1.0s", "Duration: 1.0s-2.0s", 0.0),              # touching, no overlap
    ("Duration: 0.0s-1.0s, 1.0s-2.0s", "Duration: 0.0s-2.0s", 1.0),   # touching spans merge
    ("Duration: 1.0s-3.0s, 2.0s-4.0s", "Duration: 1.0s-4.0s", 1.0),   # overlapping spans count once
    ("Duration: 0.0s-2.0s, 5.0s-6.0s", "Duration: 1.0s-3.0s, 5.5s-7.0s", 1.5 / 5.0),
    ("Duration: 0.4s-3.7s, 4.6s-9.3s", "Duration: 0.4s-3.7s, 4.6s-9.3s", 1.0),
])
def test_iou_intervals(pred, ref, iou):
    assert ev.localization_iou(pred, ref) == pytest.approx(iou)
    assert ev.localization_iou(ref, pred) == pytest.approx(iou)               # symmetric


@pytest.mark.parametrize("pred, ref, theirs", [
    (NO_A, NO_A, 1.0),                                                      # identical texts
    ("No Premature ventricular contraction Found", NO_A, 0.0),             # differ, and nothing parses
    ("Duration: 1.0s-3.0s", "Duration: 2.0s-4.0s", 1 / 3),
    ("Duration: 1.0s-3.0s.", "Duration: 1.0s-3.0s", 0.0),                  # their parser: "3.0s." is no number
    ("Duration: 1.0s-3.0s, 2.0s-4.0s", "Duration: 1.0s-4.0s", 4 / 3),      # overlaps summed pairwise: 2 + 2 over 3
    ("Duration: 0.0s-2.0s, 1.0s-3.0s", "Duration: 1.0s-2.0s, 2.5s-4.0s", 2.5 / 4.0),   # (1 + 1 + 0.5) / 4
    ("Duration: 3.2s", "Duration: 3.0s-4.0s", 0.0),                        # a span without its end: 0, no crash
    ("Duration: 1.0s-2.0s-3.0s", "Duration: 1.0s-3.0s", 0.0),               # "2.0s-3.0s" is no number
])
def test_anyecg_own_iou_sums_pairwise_overlaps(pred, ref, theirs):
    assert ev.anyecg_iou(pred, ref) == pytest.approx(theirs)


def test_location_scores_report_ours_and_anyecgs():
    rows = [{"task": "location", "abnormal_type": t, "answer": a, "question": "q"}
            for t, a in [("V", "Duration: 1.0s-4.0s"), ("A", NO_A)]]
    s = ev.score_rows(rows, ["Duration: 1.0s-3.0s, 2.0s-4.0s", NO_A])["location"]
    assert s["iou_micro"] == 1.0 and s["anyecg_iou_micro"] == pytest.approx((4 / 3 + 1) / 2)
    assert s["anyecg_iou_macro"] == pytest.approx((4 / 3 + 1) / 2)


def test_merge_intervals():
    assert merge_intervals([(5, 6), (0, 1), (1, 2), (1.5, 3)]) == [(0, 3), (5, 6)]


def test_group_mean_micro_and_macro():
    g = ev.group_mean([1.0, 1.0, 0.0], ["A", "A", "V"])
    assert g["micro"] == pytest.approx(2 / 3)
    assert g["macro"] == pytest.approx(0.5)                                   # mean of A 1.0, V 0.0
    assert g["per_type"] == {"A": {"n": 2, "mean": 1.0}, "V": {"n": 1, "mean": 0.0}}

# ----------------------------------------------------------------------------- BLEU, ROUGE-L


def test_bleu_hand_computed():
    # 1-grams 5/6, 2-grams 3/5, 3-grams 1/4, 4-grams 0/3; equal lengths -> no brevity penalty
    b = ev.bleu(["the cat sat on the mat"], ["the cat is on the mat"])
    assert b == pytest.approx([5 / 6, math.sqrt(5 / 6 * 3 / 5), 0.5, 0.0])


def test_bleu_brevity_penalty_and_corpus_sums():
    b = ev.bleu(["the cat"], ["the cat sat on the mat"])                      # precision 1, BP e^(1-6/2)
    assert b == pytest.approx([math.exp(-2), math.exp(-2), 0.0, 0.0])
    # counts are summed over the corpus before dividing: 1-grams (2 + 0) / 3, 2-grams 1 / 1
    b = ev.bleu(["a b", "c"], ["a b", "d"], max_n=2)
    assert b == pytest.approx([2 / 3, math.sqrt(2 / 3)])
    assert ev.bleu(["Report: Sinus rhythm."], ["report sinus RHYTHM"]) == pytest.approx([1.0, 1.0, 1.0, 0.0])
    assert ev.bleu([""], ["anything"]) == [0.0] * 4


def test_rouge_l_hand_computed():
    assert ev.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert ev.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert ev.rouge_l("a b c d", "a c") == pytest.approx(2 / 3)              # P 1/2, R 1
    assert ev.rouge_l("x y", "a b") == 0.0 and ev.rouge_l("", "a") == 0.0

# ----------------------------------------------------------------------------- statements, exact match


def test_find_statements_longest_first_and_whole_words():
    found = ev.find_statements("Report: Sinus rhythm, Normal ECG except for rate")
    assert found == {"Sinus rhythm", "Normal ECG except for rate"}           # not also "Normal ECG"
    assert ev.find_statements("sinus RHYTHM, 1st degree a-v block") == {"Sinus rhythm", "1st degree A-V block"}
    assert ev.find_statements("sinus rhythmic, abnormal ECGs") == set()
    assert ev.find_statements("nothing here") == set()


def test_statement_prf_hand_computed():
    preds = ["Report: Sinus rhythm, Normal ECG", "Report: Atrial fibrillation, Abnormal ECG"]
    refs = ["Report: Sinus rhythm, Normal ECG except for rate",
            "Report: Atrial fibrillation, Premature ventricular contractions, Abnormal ECG"]
    s = ev.statement_prf(preds, refs)                                         # tp 3, fp 1, fn 2
    assert s["precision"] == pytest.approx(3 / 4) and s["recall"] == pytest.approx(3 / 5)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["macro_f1"] == pytest.approx(3 / 6)                               # SR, AF, Abnormal 1; three 0


def test_exact_match_normalises_case_space_punctuation():
    assert ev.exact_match("Sinus rhythm.", "sinus  rhythm") == 1.0
    assert ev.exact_match(" 1st degree A-V block ", "1st degree a-v block") == 1.0
    assert ev.exact_match("yes", "no") == 0.0
    assert ev.exact_match("ECG2", "ecg 2") == 0.0

# ----------------------------------------------------------------------------- measurements


def test_parse_measurements():
    text = ("Measurements: Heart rate: 72 bpm, PR: 164 ms, QRS: 92 ms, QT/QTc: 380/417 ms, Axis: 45°. "
            "Reasoning: PR 220 ms is long. QTc 417 ms is normal.")
    assert ev.parse_measurements(text) == {"hr": 72, "pr": 164, "qrs": 92, "qt": 380}
    assert ev.parse_measurements("Heart rate: 110 bpm, PR: n/a, QRS: 140 ms")["pr"] is None
    assert ev.parse_measurements("QTc 430 ms")["qt"] is None                  # a QTc is not a QT
    free = ev.parse_measurements("heart rate of 80.5 bpm, QRS duration 100 ms, QT interval is 400 ms")
    assert free == {"hr": 80.5, "pr": None, "qrs": 100, "qt": 400}


def test_measurement_mae_counts_missing():
    preds = ["Heart rate: 70 bpm, QRS: 100 ms", "garbage"]
    refs = ["Heart rate: 72 bpm, PR: n/a, QRS: 90 ms, QT/QTc: 400/420 ms",
            "Heart rate: 60 bpm, PR: 160 ms, QRS: 80 ms, QT/QTc: 380/400 ms"]
    m = ev.measurement_mae(preds, refs)
    assert m["hr"] == {"mae": 2.0, "n": 2, "missing": 1}
    assert m["qrs"] == {"mae": 10.0, "n": 2, "missing": 1}
    assert m["pr"] == {"mae": None, "n": 1, "missing": 1}


# ----------------------------------------------------------------------------- scoring whole tasks

@pytest.fixture(scope="module")
def synthetic():
    return build_synthetic_dataset(n_patients=12, split="test")


def test_perfect_answers_score_perfectly_on_every_task(synthetic):
    rows = synthetic.rows
    scores = ev.score_rows(rows, [r["answer"] for r in rows])
    assert {"report", "grounded", "ecgqa", "location", "multi"} <= set(scores)
    assert scores["location"]["iou_micro"] == scores["location"]["iou_macro"] == 1.0
    assert scores["ecgqa"]["accuracy_micro"] == scores["multi"]["accuracy_micro"] == 1.0
    assert scores["report"]["bleu4"] == pytest.approx(1.0) and scores["report"]["statement_f1"] == 1.0
    assert scores["grounded"]["statement_f1"] == 1.0
    for name, m in scores["grounded"]["measurements"].items():
        assert m["missing"] == 0 and m["mae"] == 0.0, name
    assert scores["grounded"]["measurements"]["hr"]["n"] == scores["grounded"]["n"]   # every answer states HR


def test_wrong_answers_score_lower(synthetic):
    rows = sorted(synthetic.rows, key=lambda r: r["task"])
    shifted = [rows[i + 1]["answer"] if i + 1 < len(rows) and rows[i + 1]["task"] == r["task"] else "?"
               for i, r in enumerate(rows)]                                   # another row's answer, same task
    scores = ev.score_rows(rows, shifted)
    of = lambda task: [(p, r["answer"]) for r, p in zip(rows, shifted) if r["task"] == task]
    # each figure recomputed here from the texts, in the simplest way these synthetic answers allow
    items = lambda text: {x.strip(" .").lower() for x in text.split(",")}
    accuracy = np.mean([items(p) == items(r) for p, r in of("ecgqa")])
    said, true = zip(*[(items(p.removeprefix("Report:")) - {"?"}, items(r.removeprefix("Report:")))   # "?" names none
                       for p, r in of("report")])
    tp, n = sum(len(a & b) for a, b in zip(said, true)), sum(len(a) + len(b) for a, b in zip(said, true))
    iou = np.mean([grid_iou(p, r) for p, r in of("location")])
    assert scores["ecgqa"]["accuracy_micro"] == pytest.approx(accuracy) and 0 < accuracy < 1
    assert scores["report"]["statement_f1"] == pytest.approx(2 * tp / n) and 0 < tp < n / 2
    assert scores["location"]["iou_micro"] == pytest.approx(iou, abs=2e-3) and 0 < iou < 1


def grid_iou(pred, ref):
    """Localization IoU on a 1 ms grid, written apart from eval's: "No X Found" on both sides -> 1 if they name the
    same beat; else the covered milliseconds' intersection over their union."""
    if pred.startswith("No ") or ref.startswith("No "):
        return float(pred == ref)
    covered = []
    for text in (pred, ref):
        mask = np.zeros(100_000, bool)
        for a, b in re.findall(r"([\d.]+)s-([\d.]+)s", text):
            mask[round(float(a) * 1000):round(float(b) * 1000)] = True
        covered.append(mask)
    return (covered[0] & covered[1]).sum() / (covered[0] | covered[1]).sum()


def test_free_text_multi_rows_are_scored_as_text():
    rows = [{"task": "multi", "question": "q", "answer": "ECG1 shows sinus bradycardia"},
            {"task": "multi", "question": "q", "answer": "yes", "question_type": "rhythm_change"}]
    scores = ev.score_rows(rows, ["ECG1 shows sinus bradycardia", "no"])
    assert scores["multi (free text)"]["bleu1"] == pytest.approx(1.0)
    assert scores["multi"]["accuracy_micro"] == 0.0


def test_print_table(synthetic, capsys):
    rows = synthetic.rows
    scores = ev.score_rows(rows, [r["answer"] for r in rows])
    scores["skipped"] = {"n": 1, "by_reason": {"ecg_path not found": 1},
                         "rows": [{"index": 3, "error": "x.hea: no such WFDB header"}]}
    ev.print_table(scores)
    out = capsys.readouterr().out
    for needle in ["report", "location", "IoU micro 1.000", "statement F1 1.000", "HR MAE (bpm) 0.000",
                   "single-verify", "skipped 1 rows: ecg_path not found 1", "row 3: x.hea"]:
        assert needle in out, needle


# ----------------------------------------------------------------------------- evaluate() on a tiny model

def tiny_chat(tmp, seed=0):
    """An untrained ECGChat with a tiny LLM: answers are noise, but every code path runs."""
    texts = [r["answer"] for r in build_synthetic_dataset(n_patients=6, split="val").rows] * 3
    tok = train_tokenizer(texts + list(BEAT_NAMES.values()), Path(tmp) / "tok", vocab_size=600,
                          special_tokens=SPECIAL_TOKENS)
    torch.manual_seed(seed)
    llm = LLM(LLMConfig(vocab_size=tok.base_vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)).init_weights()
    return ECGChat(llm, ECGEncoder(EncoderConfig(d_model=32, n_layers=2, n_heads=2)), tok).eval()


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return tiny_chat(tmp_path_factory.mktemp("chat"))


def test_evaluate_batches_skips_bad_rows_and_ablates(chat, synthetic, monkeypatch):
    rows = synthetic.rows[:10] + [{**synthetic.rows[0], "ecg_path": ["nowhere/x"]},
                                  {**synthetic.rows[0], "ecg_path": ["blip"]}]

    def inputs_of(row):
        if row["ecg_path"] == ["nowhere/x"]:
            raise FileNotFoundError("nowhere/x.hea: no such WFDB header")
        if row["ecg_path"] == ["blip"]:                                       # 0.2 s: less than one patch
            return [ECGRecord(np.zeros((1, 20), np.float32), 100.0, ["II"])]
        return synthetic.inputs(row)

    scores, preds = ev.evaluate(chat, rows, inputs_of, batch_size=4, max_new_tokens=6, progress=False)
    assert [p["index"] for p in preds] == list(range(10))
    assert sum(s["n"] for t, s in scores.items() if t != "skipped") == 10
    assert scores["skipped"]["by_reason"] == {"ecg_path not found": 1, "unreadable ECG": 1}
    assert all(isinstance(p["prediction"], str) for p in preds)
    # batched answers equal one-at-a-time answers (greedy)
    _, alone = ev.evaluate(chat, rows[:3], inputs_of, batch_size=1, max_new_tokens=6, progress=False)
    assert [p["prediction"] for p in alone] == [p["prediction"] for p in preds[:3]]

    seen, real_generate = [], chat.generate

    def spy(prompts, inputs, **kw):                                           # what the model is given
        seen.append(inputs)
        return real_generate(prompts, inputs, **kw)
    monkeypatch.setattr(chat, "generate", spy)
    ev.evaluate(chat, rows[:2], inputs_of, max_new_tokens=2, ablate_ecg=True, progress=False)
    blanked = [x.signal for sample in seen[0] for x in sample]
    originals = [e.signal for r in rows[:2] for e in synthetic.inputs(r)]
    assert [x.shape for x in blanked] == [x.shape for x in originals]
    assert all(not x.any() for x in blanked) and any(x.any() for x in originals)


# ----------------------------------------------------------------------------- command line, real record 100

def mitbih_rows(n=5):
    """anyECG-format localization rows on MIT-BIH record 100 (10 s clips around its
    premature atrial beats, and one beat-free clip), answers by data.localization_answer."""
    wfdb = pytest.importorskip("wfdb")
    if not (PHYSIONET / "100.hea").is_file():
        pytest.skip(f"MIT-BIH record 100 not found under {PHYSIONET}")
    ann = wfdb.rdann(str(PHYSIONET / "100"), "atr")
    a_beats = [s for s, sym in zip(ann.sample, ann.symbol) if sym == "A"]
    starts = [int(s) - 1800 for s in a_beats[1:n]] + [10_000]
    rows = []
    for start, symbol in zip(starts, ["A"] * (n - 1) + ["V"]):
        answer = localization_answer(ann.sample, ann.symbol, start, start + 3600, 360, symbol)
        rows.append({"question": f"Locate the {BEAT_NAMES[symbol]} on this ECG.", "answer": answer,
                     "ecg_path": "100", "dataset": "mit_bih_arrhythmia", "task": "location",
                     "abnormal_type": symbol, "ecg_start": start, "ecg_end": start + 3600})
    return rows


def test_eval_cli_end_to_end_on_mitbih_100(chat, tmp_path):
    rows = mitbih_rows()
    assert rows[0]["answer"].startswith("Duration:") and rows[-1]["answer"].startswith("No ")
    rows.append({**rows[0], "ecg_path": ["not_a_record"]})                   # missing: counted, not fatal
    data = tmp_path / "loc.json"
    data.write_text(json.dumps(rows))
    chat.save(tmp_path / "ckpt")
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "eval.py"), "--ckpt", str(tmp_path / "ckpt"), "--data", str(data),
           "--ecg-root", str(PHYSIONET), "--out", str(out), "--max-new-tokens", "12", "--batch-size", "4"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "location" in run.stdout and "IoU micro" in run.stdout
    assert "skipped 1 rows: ecg_path not found 1" in run.stdout and "not_a_record" in run.stdout
    result = json.loads(out.read_text())
    loc, preds = result["scores"]["location"], result["predictions"]
    assert loc["n"] == 5 and set(loc["per_type"]) == {"A", "V"} and result["scores"]["skipped"]["n"] == 1
    assert [p["index"] for p in preds] == [0, 1, 2, 3, 4] and [p["answer"] for p in preds] == [r["answer"] for r in rows[:5]]
    # each row's score is the metric of its own texts, and the table is their mean
    assert all(p["score"] == ev.localization_iou(p["prediction"], p["answer"]) for p in preds)
    assert loc["iou_micro"] == pytest.approx(sum(p["score"] for p in preds) / 5)
    # --ablate-ecg: the same prompts, a blank ECG, so the answers change; --limit keeps the first rows
    run = subprocess.run(cmd + ["--ablate-ecg", "--limit", "3"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    ablated = json.loads(out.read_text())
    assert ablated["ablate_ecg"] is True and len(ablated["predictions"]) == 3
    assert [p["prediction"] for p in ablated["predictions"]] != [p["prediction"] for p in preds[:3]]



def test_eval_help_names_its_options(capsys):
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    assert "--ecg-root" in capsys.readouterr().out


def test_eval_cli_bad_checkpoint_and_data(chat, tmp_path):
    chat.save(tmp_path / "ckpt")
    (tmp_path / "rows.json").write_text("[]")
    os.remove(tmp_path / "ckpt" / "model.safetensors")
    run = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--ckpt", str(tmp_path / "ckpt"),
                          "--data", str(tmp_path / "rows.json")], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "model.safetensors: missing" in run.stderr
    assert "Traceback" not in run.stderr


def test_prior_answers_is_the_most_frequent_training_answer_per_question():
    from eval import prior_answers
    train = [{"task": "ecgqa", "question": "Rhythm?", "answer": a} for a in ("AF", "sinus", "sinus")] + \
            [{"task": "ecgqa", "question": "QT?", "answer": "normal"},
             {"task": "report", "question": "Report.", "answer": "Report: Normal ECG"}]
    rows = [{"task": "ecgqa", "question": "Rhythm?"}, {"task": "ecgqa", "question": "QT?"},
            {"task": "ecgqa", "question": "Never asked in training?"}, {"task": "multi", "question": "x"}]
    # the same wording -> its most frequent answer; unseen wording -> the task's; unseen task -> ""
    assert prior_answers(train, rows) == ["sinus", "normal", "sinus", ""]


def test_eval_cli_checks_first_keeps_file_indices_and_reads_only_inside_the_root(chat, tmp_path, capsys, monkeypatch):
    import wfdb
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    for folder in (root, outside):
        folder.mkdir()
        wfdb.wrsamp("rec", fs=250, units=["mV"], sig_name=["II"], p_signal=np.sin(np.arange(2500)[:, None] / 9),
                    fmt=["16"], write_dir=str(folder))
    (outside / "secret.csv").write_text("II\nthe-password-is-swordfish\n")
    chat.save(tmp_path / "ckpt")
    good = {"question": "Report?", "answer": "Report: Sinus rhythm", "dataset": "d", "task": "report"}
    rows = ["not a row", {**good, "ecg_path": "rec"}, {**good, "ecg_path": str(outside / "rec")},
            {**good, "ecg_path": "../elsewhere/rec"}, {**good, "ecg_path": "../elsewhere/secret.csv"},
            {**good, "ecg_path": "rec", "task": "vibes"}, {**good, "ecg_path": ["rec"]}]   # the last repeats row 1
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    base = ["--ckpt", str(tmp_path / "ckpt"), "--data", str(data), "--ecg-root", str(root), "--max-new-tokens", "3"]

    def fails(*extra):
        with pytest.raises(SystemExit) as e:
            ev.main(base + list(extra))
        assert e.value.code not in (0, None)
        return str(e.value.code) + capsys.readouterr().err
    assert "a folder; give the path" in fails("--out", str(tmp_path))     # refused before the evaluation
    assert "new/folder does not exist" in fails("--out", str(tmp_path / "new" / "folder" / "r.json"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real_access = os.access   # root writes into a 0o555 folder anyway: answer as the folder's mode says for a user
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == locked and mode & os.W_OK
                        else real_access(path, mode, **kw))
    assert "locked is not writable" in fails("--out", str(locked / "r.json"))
    monkeypatch.undo()
    assert "--batch-size must be at least 1" in fails("--out", str(tmp_path / "r.json"), "--batch-size", "0")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(SystemExit, match="no rows to evaluate"):
        ev.main(base[:2] + ["--data", str(tmp_path / "empty.json"), "--out", str(tmp_path / "r.json")])
    out = tmp_path / "r.json"
    with pytest.warns(UserWarning) as caught:
        ev.main(base + ["--out", str(out)])
    assert any("skipped 1 of 7 malformed rows" in str(w.message) for w in caught)
    assert any("dropped 1 duplicate rows" in str(w.message) and "rows 6)" in str(w.message) for w in caught)
    assert any("tasks ['vibes'] are not nanoECG's" in str(w.message) for w in caught)
    result = json.loads(out.read_text())
    assert sorted(p["index"] for p in result["predictions"]) == [1, 5]      # positions in the file, not in the list
    skipped = result["scores"]["skipped"]
    assert sorted(r["index"] for r in skipped["rows"]) == [2, 3, 4] and skipped["by_reason"] == {"outside the ECG root": 3}
    assert "swordfish" not in out.read_text() and "swordfish" not in capsys.readouterr().out


def test_a_csv_error_names_the_cell_not_its_content(tmp_path):
    (tmp_path / "x.csv").write_text("I,II\n0.1,0.2\n0.3,swordfish\n")
    with pytest.raises(ValueError) as e:
        load_ecg(tmp_path / "x.csv", fs=100)
    assert "x.csv: non-numeric value in the table (line 3, column 2)" in str(e.value) and "swordfish" not in str(e.value)


# --- bootstrap intervals


def answered_rows(seed=2):
    """Synthetic test rows of every task, answered right for two thirds of them and with another row's answer of the
    same task (right or wrong) for the rest."""
    rows = build_synthetic_dataset(10, seed=seed).rows
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r["answer"])
    preds = [r["answer"] if i % 3 else by_task[r["task"]][(i * 7) % len(by_task[r["task"]])] for i, r in enumerate(rows)]
    return rows, preds


def test_bootstrap_point_is_each_tasks_own_metric_and_its_interval_holds_it():
    rows, preds = answered_rows()
    scores = ev.score_rows(rows, preds)
    main = {"location": lambda s: s["iou_micro"], "location_long": lambda s: s["iou_micro"],
            "ecgqa": lambda s: s["accuracy_micro"], "multi": lambda s: s["accuracy_micro"],
            "report": lambda s: s["statement_f1"], "grounded": lambda s: s["measurements"]["hr"]["mae"]}
    assert set(main) <= set(scores)
    for task, get in main.items():
        m = scores[task]["main"]
        assert m["value"] == pytest.approx(get(scores[task]), abs=1e-12), task
        lo, hi = m["interval95"]
        assert lo <= m["value"] <= hi and (lo < hi or task == "location_long"), task   # right and wrong: a spread


def test_bootstrap_interval_narrows_with_more_rows_and_a_paired_difference_is_paired():
    rows = [{"task": "ecgqa", "question_type": "t", "answer": "yes"}] * 40
    preds = ["yes", "no"] * 20
    _, v, lo, hi = ev.bootstrap(rows, preds)
    _, v4, lo4, hi4 = ev.bootstrap(rows * 4, preds * 4)
    assert v == v4 == 0.5 and hi4 - lo4 < 0.7 * (hi - lo)          # ~1/sqrt(4) as wide
    assert ev.bootstrap(rows, preds, preds)[1:] == (0.0, 0.0, 0.0)      # the same answers: no difference, no spread
    _, d, dlo, dhi = ev.bootstrap(rows, preds, ["no"] * 40)
    assert d == 0.5 and 0.3 < dlo < 0.5 < dhi < 0.7


def test_bootstrap_interval_is_the_2_5_and_97_5_percentiles_of_the_draws():
    rng = np.random.default_rng(0)
    n = 400
    rows = [{"task": "ecgqa", "question_type": "t", "answer": "yes"}] * n
    right = rng.permutation(np.arange(n) < n // 2)                   # half right, in no pattern
    preds = ["yes" if r else "no" for r in right]
    _, value, lo, hi = ev.bootstrap(rows, preds, draws=2000, seed=0)
    # the same draws, their accuracies and percentiles computed here
    weights = ev.bootstrap_weights(n, draws=2000, seed=0)[1:]         # (draws, n): how often each row is drawn
    drawn = weights @ right.astype(float) / n
    assert (lo, hi) == pytest.approx(tuple(np.percentile(drawn, [2.5, 97.5])), abs=1e-12)
    # and as theory has it: 0.5 +- 1.96 standard errors (a 90 % interval would be +- 1.64)
    half = 1.96 * math.sqrt(0.25 / n)
    assert value == 0.5 and lo == pytest.approx(0.5 - half, abs=0.004) and hi == pytest.approx(0.5 + half, abs=0.004)


def test_paired_difference_pairs_answers_by_row_and_prints():
    rows, preds = answered_rows()
    with_ecg = [{"index": i, **r, "prediction": p} for i, (r, p) in enumerate(zip(rows, preds))]
    blanked = [{**p, "prediction": ""} for p in with_ecg][::-1]       # another order: paired by index, not position
    effect = ev.paired_difference(with_ecg, blanked)
    report = effect["report"]
    assert report[0] == "statement F1" and report[1] == pytest.approx(ev.score_rows(rows, preds)["report"]["statement_f1"])
    assert effect["ecgqa"][2] > 0   # right answers against empty ones: the interval excludes 0
    out = io.StringIO()
    ev.print_difference(effect, file=out)
    assert "report" in out.getvalue() and "95 % interval" in out.getvalue()


def test_paired_difference_pairs_each_answer_with_the_baseline_of_its_own_row():
    rows, preds = answered_rows()
    _, wrong = answered_rows(seed=5)   # another dataset's answers, of its own tasks: mostly wrong here
    base = [r["answer"] if i % 4 == 0 else wrong[(i * 5) % len(wrong)] for i, r in enumerate(rows)]
    with_ecg = [{"index": i, **r, "prediction": p} for i, (r, p) in enumerate(zip(rows, preds))]
    order = np.random.default_rng(1).permutation(len(rows))
    baseline = [{**with_ecg[i], "prediction": base[i]} for i in order]      # the baseline in another order
    effect = ev.paired_difference(with_ecg, baseline)
    for task, idx in ev.task_groups(rows).items():
        expected = ev.bootstrap([rows[i] for i in idx], [preds[i] for i in idx], [base[i] for i in idx])
        assert effect[task] == pytest.approx(expected), task
    # a subset asked again (the follow-ups: ECG-QA rows only) pairs with those rows of the full baseline
    subset = [p for p in with_ecg if p["task"] == "ecgqa" and p["index"] % 2]
    again = ev.paired_difference(subset, baseline)
    idx = [p["index"] for p in subset]
    assert set(again) == {"ecgqa"}
    assert again["ecgqa"] == pytest.approx(ev.bootstrap([rows[i] for i in idx], [preds[i] for i in idx],
                                                        [base[i] for i in idx]))


def test_rows_from_several_files_get_indices_that_pair_and_repeated_ones_are_refused():
    a = [{"task": "ecgqa", "answer": "yes", "file_index": i} for i in range(2)]
    b = [{"task": "ecgqa", "answer": "no", "file_index": i} for i in range(3)]   # b.json starts again at 0
    assert ev.unique_indices(a) is a
    assert [r["file_index"] for r in ev.unique_indices(a + b)] == [0, 1, 2, 3, 4]
    answers = [{"index": r["file_index"], "prediction": "yes", "question_type": "t", **r} for r in a + b]
    with pytest.raises(ValueError, match=r"repeat row indices \[0, 1\]"):
        ev.paired_difference(answers, answers)


def test_exact_duplicate_rows_are_dropped_with_one_warning():
    rows = [{"task": "ecgqa", "question": "q", "answer": a, "ecg_path": ["r"], "file_index": i}
            for i, a in enumerate(["yes", "no", "yes", "yes"])]
    with pytest.warns(UserWarning, match=r"rows.json: dropped 2 duplicate rows .*rows 2, 3\)"):
        kept = ev.drop_duplicates(rows, "rows.json")
    assert kept == rows[:2]                                   # the first of each, with its own file index
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ev.drop_duplicates(rows[:2], "rows.json") == rows[:2]   # nothing repeated: nothing said


def test_lists_of_findings_are_right_in_any_order_and_exact_match_stays_beside():
    row = {"task": "multi", "question_type": "new_findings", "answer": "premature ventricular contractions, lvh",
           "ecg_path": ["a", "b"]}
    assert ev.row_score(row, "LVH, premature ventricular contractions.") == 1.0
    assert ev.row_score(row, "lvh") == 0.0 and ev.row_score(row, "lvh, lvh, premature ventricular contractions") == 1
    s = ev.score_task("multi", [row, row], ["LVH, premature ventricular contractions", "lvh"])
    assert s["accuracy_micro"] == 0.5 and s["exact_match"] == 0.0


def test_a_per_ecg_report_is_scored_ecg_by_ecg_and_its_shape_is_counted():
    ref = "ECG1: Sinus rhythm, Normal ECG. ECG2: Atrial fibrillation, Abnormal ECG."
    row = {"task": "multi", "question_type": "per_ecg_report", "answer": ref, "ecg_path": ["a", "b"]}
    assert ev.row_score(row, ref) == 1.0
    swapped = "ECG1: Atrial fibrillation, Abnormal ECG. ECG2: Sinus rhythm, Normal ECG."
    assert ev.row_score(row, swapped) == 0.0   # the right statements on the wrong ECGs
    repeated = "ECG1: Sinus rhythm, Normal ECG. ECG2: Atrial fibrillation, Abnormal ECG. ECG2: Atrial fibrillation."
    invented = ref + " ECG3: Sinus rhythm."
    assert ev.row_score(row, repeated) == 1.0 and ev.row_score(row, invented) == pytest.approx(2 * 4 / (2 * 4 + 1))
    s = ev.score_task("multi", [row] * 3, [ref, repeated, invented])
    assert s["one_part_per_ecg"] == pytest.approx(1 / 3) and s["exact_match"] == pytest.approx(1 / 3)


def test_followups_ask_an_ecgqa_row_after_the_report_of_its_ecg_and_pair_with_it():
    rows = build_synthetic_dataset(12, split="test").rows
    asked = [r for r in rows if r["task"] in ("ecgqa", "report")]
    follow = ev.as_followups(asked, rows)
    single = [i for i, r in enumerate(asked) if r["task"] == "ecgqa" and len(r["ecg_path"]) == 1]
    assert [f["file_index"] for f in follow] == single
    for f in follow:
        report = next(r for r in rows if r["task"] == "report" and r["ecg_path"] == f["ecg_path"])
        assert f["history"] == [[report["question"], report["answer"]]]
        assert ev.turns_of(f, answered=False)[-1] == ("user", f["question"])


def test_the_test_rows_are_drawn_per_task_and_per_question_type():
    rows = build_synthetic_dataset(200, split="test").rows
    picked = ev.rows_per_task(rows, 20, per_type=5)
    for task in ("report", "grounded", "location"):
        assert sum(r["task"] == task for r in picked) == 20
    for task in ("ecgqa", "multi"):
        kinds = {r["question_type"] for r in rows if r["task"] == task}
        mine = [r["question_type"] for r in picked if r["task"] == task]
        assert set(mine) == kinds and all(mine.count(k) == min(5, sum(r.get("question_type") == k for r in rows))
                                          for k in kinds)
    assert picked == ev.rows_per_task(rows, 20, per_type=5)   # fixed
    assert sum("followups" in r for r in rows) > 0.2 * sum(r["task"] == "report" for r in rows)


def test_eval_bench_scores_the_models_answers_as_the_answers_file_path_does(chat, tmp_path):
    """--bench with a model: its answers to ECG-Bench rows (LLaVA-style) scored by both rule sets, the unreadable row
    counted as missing; the same answers written as JSONL and scored by --answers (no model) give the same blocks."""
    if not (PHYSIONET / "s0010_re.hea").is_file():
        pytest.skip(f"PTB record s0010_re not found under {PHYSIONET}")
    prompt = "Classify the ECG as normal or abnormal. Provide NORM or ABNORMAL as the output."
    rows = [{"id": f"code15-{k}", "image": f"code15/{k}-0.png", "ecg": ecg,
             "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": gold}]}
            for k, (ecg, gold) in enumerate([("s0010_re", "ABNORMAL"), ("s0010_re", "NORM"), ("gone", "NORM")])]
    data = tmp_path / "code15.json"
    data.write_text(json.dumps(rows))
    chat.save(tmp_path / "ckpt")
    out = tmp_path / "results.json"
    ev.main(["--ckpt", str(tmp_path / "ckpt"), "--data", str(data), "--ecg-root", str(PHYSIONET), "--out", str(out),
             "--max-new-tokens", "6", "--bench", "auto"])
    result = json.loads(out.read_text())
    bench = result["bench"]
    assert (bench["bench"], bench["n"], bench["missing"], bench["published_n"]) == ("code15", 3, 1, 1400)
    assert {"f1", "hamming"} <= set(bench["corrected"]) and {"f1", "hamming"} <= set(bench["compatible"])
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": rows[p["index"]]["id"], "text": p["prediction"]}) + "\n"
                               for p in result["predictions"]))
    again = ev.main(["--bench", "code15", "--data", str(data), "--answers", str(answers),
                     "--out", str(tmp_path / "again.json")])
    assert again["compatible"] == bench["compatible"]
    # the corrected AUC needs scores: the model's own (label_scores) when it is run, none from an answers file
    assert {**again["corrected"], "auc": None} == {**bench["corrected"], "auc": None}
    assert again["corrected"]["auc"] is None and 0 <= bench["corrected"]["auc"] <= 1
    with pytest.raises(SystemExit):   # answers without a subset name, a model without --ckpt: argparse's errors
        ev.main(["--data", str(data), "--answers", str(answers)])


def test_label_scores_are_each_labels_log_probability_alone_or_in_a_padded_batch(chat):
    """The options of one row go as one right-padded batch; each label's score is what it gets scored alone, a
    log-probability (< 0), and the options differ."""
    from ecgbench.score import label_scores
    rec = ECGRecord(np.random.default_rng(0).standard_normal((12, 1000)).astype(np.float32) * 0.3, 100,
                    list(STANDARD_LEADS))
    row = {"id": "cpsc-1", "question": "Classify the ECG.", "answer": "AF"}
    labels = ["NORM", "I-AVB", "STE"]   # of different token lengths, so the batch is padded
    together = label_scores(chat, [row], lambda r: [rec], labels)["cpsc-1"]
    alone = {label: label_scores(chat, [row], lambda r: [rec], [label])["cpsc-1"][label] for label in labels}
    assert together == pytest.approx(alone, abs=1e-4)
    assert all(v < 0 for v in together.values()) and len(set(together.values())) == 3
