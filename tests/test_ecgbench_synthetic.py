"""Tests for synthetic/ecgbench.py: every subset's file is written in ECG-Bench's shapes, a perfect answers file scores
1.0 corrected on each, eval.py's row reader keeps every row and reads its ECG, the labels follow the generator's
truth through the documented maps, and the same seed writes the same rows."""
import json
import warnings

import numpy as np
import pytest

from data import STATEMENTS, STANDARD_LEADS, RowECGReader, load_rows
from ecgbench import score
from synthetic.ecgbench import CHOICE_POOL, CODE15_MAP, CPSC_MAP, PTB_MAP, build, labels, questions
from synthetic.generator import make_patient, synth_ecg

N_PATIENTS = 12


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_bench")
    return out, build(out, N_PATIENTS)


def perfect_answer(subset, gold):
    """What a model that is always right writes: the labels, "Answer: X", the items joined by commas."""
    kind = score.SUBSETS[subset]["kind"]
    return gold if kind == "labels" else f"Answer: {gold[0]}" if kind == "choice" else ", ".join(gold)


@pytest.mark.parametrize("subset", list(score.SUBSETS))
def test_a_perfect_answers_file_scores_one_on_every_subset(written, subset, capsys):
    out, rows = written
    path = out / f"{score.SUBSETS[subset]['file']}.json"
    answers = out / f"{subset}-answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": r["id"], "text": perfect_answer(subset, r["conversations"][1]
                                                                                          ["value"])}) + "\n"
                               for r in rows[subset]))
    result = score.main(["--data", str(path), "--answers", str(answers)])   # the bench told from the ids
    assert result["bench"] == subset and result["n"] == len(rows[subset]) > 0 and result["missing"] == 0
    key = "f1" if score.SUBSETS[subset]["kind"] == "labels" else "accuracy"
    assert result["corrected"][key] == 1.0
    assert result["corrected"].get("parse_failures", 0) == 0


def test_rows_are_kept_by_the_row_reader_and_their_ecgs_read(written):
    out, rows = written
    for subset, spec in score.SUBSETS.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_rows(out / f"{spec['file']}.json")
        assert len(loaded) == len(rows[subset]) and not [w for w in caught if "skipped" in str(w.message)]
    (ecg,) = RowECGReader(out, fs=100)(loaded[0])
    assert ecg.leads == STANDARD_LEADS and ecg.fs == 100 and ecg.signal.shape == (12, 1000)


def test_rows_have_the_subsets_shapes(written):
    _, rows = written
    for row in rows["csn"] + rows["g12"]:
        prompt, gold = (t["value"] for t in row["conversations"])
        assert gold[1:3] == ". " and f"\n{gold}" in prompt
        assert prompt.count("\n") == 2 + 7   # after the header, after the question, between the 8 options
    for row in rows["mmmu"]:
        prompt, gold = (t["value"] for t in row["conversations"])
        assert gold in "ABCD" and len(gold) == 1 and "\nD. " in prompt and "\nE. " not in prompt
    for row in rows["ecgqa"]:
        prompt, gold = (t["value"] for t in row["conversations"])
        assert isinstance(gold, list) and set(gold) <= set(score.ecgqa_candidates(prompt))
    assert {row["conversations"][1]["value"] for row in rows["code15"]} <= {"NORM", "ABNORMAL"}


def test_multiple_choice_has_one_statement_the_ecg_has_among_ones_it_has_not():
    rng = np.random.default_rng(0)
    _, truth = synth_ecg(make_patient(1, findings={"af", "lbbb", "pvc"}), 10.0, 500.0, seed=1)
    for _ in range(20):
        prompt, gold = questions(truth.statements, rng)["csn"]
        options = [line[3:] for line in prompt.splitlines()[-8:]]
        assert len(set(options)) == 8 and set(options) <= set(CHOICE_POOL)
        assert [o for o in options if o in truth.statements] == [gold[3:]]


def test_labels_follow_the_generators_truth():
    _, normal = synth_ecg(make_patient(3, findings=set()), 10.0, 500.0, seed=3)
    _, sick = synth_ecg(make_patient(4, findings={"af", "lbbb", "pvc"}), 10.0, 500.0, seed=4)
    assert normal.statements == ["Sinus rhythm", "Normal ECG"]
    assert labels(normal.statements, PTB_MAP) == ["NORM"] and labels(normal.statements, CPSC_MAP) == ["NORM"]
    assert labels(sick.statements, PTB_MAP) == ["CD"] and labels(sick.statements, CPSC_MAP) == ["AF", "LBBB", "PVC"]
    assert questions(sick.statements, np.random.default_rng(0))["code15"][1] == "ABNORMAL"
    # the maps name only statements the generator writes, and codes of their own label space
    assert set(PTB_MAP) | set(CPSC_MAP) | set(CODE15_MAP) <= set(STATEMENTS)
    assert set(PTB_MAP.values()) == {"NORM", "STTC", "CD"}   # MI and HYP: no synthetic counterpart
    assert set(CPSC_MAP.values()) == set(score.CPSC_NAMES)


def test_the_same_seed_writes_the_same_rows(written, tmp_path):
    out, rows = written
    assert build(tmp_path, 3) == {s: [r for r in subset_rows if int(r["id"].split("-")[-1]) < 3]
                                  for s, subset_rows in rows.items()}
    assert (tmp_path / "records" / "synth00002.dat").read_bytes() == (out / "records" / "synth00002.dat").read_bytes()
