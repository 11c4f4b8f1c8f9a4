"""Tests for ecgbench/score.py: one test per fault of the published ECG-Bench scorer, each on hand-made rows and
answers, asserting the corrected figure worked out by hand in its comment and that `compatible` (the published rule as
written) gives another; the rank-based ROC AUC on a small case with ties; the answers reader and the command line."""
import json
import re

import pytest

from ecgbench.score import read_answers, roc_auc, score, subset_of, main

PTB_PROMPT = "Classify the ECG into NORM, MI, STTC, CD, HYP. Separate the classes with a semicolon."
CPSC_OPTIONS = ("NORM(Normal ECG), AF(Atrial fibrillation), I-AVB(First-degree atrioventricular block), "
                "LBBB(Left bundle branch block), RBBB(Right bundle branch block), PAC(Premature atrial contraction), "
                "PVC(Premature ventricular contraction), STD(ST-segment depression), STE(ST-segment elevated)")
CPSC_PROMPT = ("You are provided with an ECG signal image. Please classify the ECG image into the following diagnostic "
               f"statement classes:\n{CPSC_OPTIONS}\nDirectly output the class name and separate with a semicolon.")
G12_PROMPT = ("Answer the following multiple choice question. The last line of your response should be of the "
              "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of options.\n"
              + "\n".join(f"{letter}. option {letter}" for letter in "ABCDEFGH"))
ECGQA_PROMPT = ("Question: Does this ECG show left ventricular hypertrophy?\nOptions: no, not sure, yes\n"
                "Only answer based on the given Options without any explanation.")


def row(row_id, gold, prompt):
    return {"id": row_id, "image": f"{row_id}.png",
            "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": gold}]}


def rows_and_answers(prefix, prompt, cases):
    """[(gold, answer or None)] -> (rows, {id: answer}) with ids prefix-0, prefix-1, ..."""
    rows = [row(f"{prefix}-{i}", gold, prompt) for i, (gold, _) in enumerate(cases)]
    answers = {f"{prefix}-{i}": text for i, (_, text) in enumerate(cases) if text is not None}
    return rows, answers


def test_roc_auc_by_ranks_with_ties():
    """truth 1 1 0 0 1, scores .9 .5 .5 .1 .3. Positive-negative pairs: .9>.5, .9>.1, .5=.5 (one half), .5>.1,
    .3<.5, .3>.1 -> 4.5 of 6 = 0.75. A perfect ranking is 1, its reverse 0, all ties 0.5, one class None."""
    assert roc_auc([1, 1, 0, 0, 1], [0.9, 0.5, 0.5, 0.1, 0.3]) == pytest.approx(0.75)
    assert roc_auc([0, 0, 1, 1], [1, 2, 3, 4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [1, 2, 3, 4]) == 0.0
    assert roc_auc([1, 0, 1, 0], [7, 7, 7, 7]) == 0.5
    assert roc_auc([1, 1, 1], [0.2, 0.3, 0.4]) is None


def test_labels_are_whole_words_any_case_by_code_or_full_name():
    """Fault 1 on ptb. Row 1 gold MI, answer "IMI"; row 2 gold STTC, answer "ABNORMAL: STTC"; row 3 gold CD, answer
    "conduction disturbance"; row 4 gold NORM, answer "NORM"; row 5 gold HYP, answer "IVCD; HYP".
    corrected reads {}, {STTC}, {CD}, {NORM}, {HYP}: NORM tp1 -> F1 1; MI fn1 -> 0; STTC 1; CD 1; HYP 1.
    Macro F1 4/5 = 0.8; Hamming 1 wrong of 25 = 0.04.
    compatible reads {MI} (in IMI), {NORM, STTC} (NORM in ABNORMAL), {} (case-sensitive), {NORM}, {CD, HYP} (CD in
    IVCD): CD tp0 fp1 fn1 -> 0, HYP 1, MI 1, NORM 2/3 (tp1 fp1), STTC 1 -> 11/15 = 0.733; Hamming 3 of 25 = 0.12."""
    rows, answers = rows_and_answers("ptb", PTB_PROMPT, [("MI", "IMI"), ("STTC", "ABNORMAL: STTC"),
                                                         ("CD", "conduction disturbance"), ("NORM", "NORM"),
                                                         ("HYP", "IVCD; HYP")])
    result = score("ptb", rows, answers)
    assert result["corrected"]["f1"] == pytest.approx(0.8)
    assert result["corrected"]["hamming"] == pytest.approx(0.04)
    assert result["compatible"]["f1"] == pytest.approx(11 / 15)
    assert result["compatible"]["hamming"] == pytest.approx(0.12)


def test_an_echoed_option_list_names_no_label_and_afl_is_not_af():
    """Fault 1 on cpsc. Row 1 gold AF, answer = the prompt's option line, then "AF"; row 2 gold NORM, answer "AFL".
    corrected: the echoed line is not read, so {AF}, {}: AF tp1 -> F1 1, NORM fn1 -> 0, the rest undefined:
    macro 0.5; Hamming 1 wrong of 18.
    compatible: row 1 names all nine labels, row 2 names AF (in AFL); over the gold labels AF NORM: AF tp1 fp1 ->
    2/3, NORM fp1 fn1 -> 0, macro 1/3; Hamming 3 wrong of 4 (row 1 NORM, row 2 AF and NORM)."""
    rows, answers = rows_and_answers("cpsc", CPSC_PROMPT, [("AF", CPSC_OPTIONS + "\nAF"), ("NORM", "AFL")])
    result = score("cpsc", rows, answers)
    assert result["corrected"]["f1"] == pytest.approx(0.5)
    assert result["corrected"]["hamming"] == pytest.approx(1 / 18)
    assert result["compatible"]["f1"] == pytest.approx(1 / 3)
    assert result["compatible"]["hamming"] == pytest.approx(0.75)


def test_a_constant_answer_has_auc_from_scores_not_from_its_zero_one_answers():
    """Fault 2 on code15: gold NORM, NORM, ABNORMAL, ABNORMAL, every answer "NORM".
    compatible: each label's 0/1 column is constant, all ties -> AUC exactly 0.5, with or without scores.
    corrected without scores: None. With scores NORM .9 .4 .6 .1 and ABNORMAL .1 .6 .4 .9: NORM's positives
    {.9, .4} against negatives {.6, .1} win 3 of 4 pairs -> 0.75; ABNORMAL's {.4, .9} against {.1, .6} -> 0.75;
    the mean 0.75."""
    rows, answers = rows_and_answers("code15", "Provide NORM or ABNORMAL as the output.",
                                     [("NORM", "NORM"), ("NORM", "NORM"), ("ABNORMAL", "NORM"), ("ABNORMAL", "NORM")])
    scores = {f"code15-{i}": {"NORM": n, "ABNORMAL": a} for i, (n, a) in enumerate([(.9, .1), (.4, .6), (.6, .4),
                                                                                    (.1, .9)])}
    assert score("code15", rows, answers)["compatible"]["auc"] == 0.5
    assert score("code15", rows, answers)["corrected"]["auc"] is None
    result = score("code15", rows, answers, label_scores=scores)
    assert result["corrected"]["auc"] == pytest.approx(0.75)
    assert result["compatible"]["auc"] == 0.5


def test_a_predicted_label_no_gold_row_has_counts_as_a_false_positive():
    """Fault 3 on ptb: gold NORM twice, answers "NORM" and "NORM; HYP".
    corrected: NORM tp2 -> F1 1; HYP fp1 -> F1 0; macro 0.5; Hamming 1 wrong of 10 = 0.1.
    compatible fits its labels on the gold answers (NORM only): HYP vanishes, F1 1.0, Hamming 0."""
    rows, answers = rows_and_answers("ptb", PTB_PROMPT, [("NORM", "NORM"), ("NORM", "NORM; HYP")])
    result = score("ptb", rows, answers)
    assert result["corrected"]["f1"] == pytest.approx(0.5)
    assert result["corrected"]["hamming"] == pytest.approx(0.1)
    assert result["compatible"]["f1"] == 1.0 and result["compatible"]["hamming"] == 0.0


def test_multiple_choice_is_read_from_answer_only_and_unparsable_is_wrong_and_counted():
    """Fault 4 on g12. Row 1 gold C, "Answer: C"; row 2 gold A, "This ECG. Answer: A"; row 3 gold D, "I cannot tell
    from this image".
    corrected: C right, A right, row 3 unparsable -> wrong, one parse failure: accuracy 2/3.
    compatible: row 2 reads G (the "G." of "ECG."), wrong; row 3 is a guess with seed 42, which draws B, wrong:
    accuracy 1/3, one guess; the same on every run."""
    cases = [("C. option C", "Answer: C"), ("A. option A", "This ECG. Answer: A"),
             ("D. option D", "I cannot tell from this image")]
    rows, answers = rows_and_answers("g12", G12_PROMPT, cases)
    result = score("g12", rows, answers)
    assert result["corrected"] == {"accuracy": pytest.approx(2 / 3), "parse_failures": 1}
    assert result["compatible"]["accuracy"] == pytest.approx(1 / 3) and result["compatible"]["guessed"] == 1
    assert score("g12", rows, answers)["compatible"] == result["compatible"]


def test_strict_letters_accept_the_lone_letter_and_refuse_a_word():
    """Fault 4's parser on mmmu (options A-D): "B", "(B)", "B." and "answer: B" read B; "Answer: ECG" and "Answer: E"
    (no option E) read nothing: 4 right of 6 (4/6), two parse failures."""
    texts = ["B", "(B)", "B.", "answer: B", "Answer: ECG", "Answer: E"]
    rows, answers = rows_and_answers("mmmu", "Pick one.\nA. a\nB. b\nC. c\nD. d", [("B", t) for t in texts])
    assert score("mmmu", rows, answers)["corrected"] == {"accuracy": pytest.approx(4 / 6), "parse_failures": 2}


def test_a_file_of_the_wrong_length_is_reported_not_skipped():
    """Fault 5 on csn: three rows (published 1611), two answered, both right.
    corrected: the unanswered row is wrong: accuracy 2/3; n 3 beside published_n 1611, missing 1.
    compatible scores the answers it has (1.0) and says the published scorer would skip this file."""
    rows, answers = rows_and_answers("csn", G12_PROMPT, [("A. a", "Answer: A"), ("B. b", "Answer: B"), ("C. c", None)])
    result = score("csn", rows, answers)
    assert (result["n"], result["published_n"], result["missing"]) == (3, 1611, 1)
    assert result["corrected"]["accuracy"] == pytest.approx(2 / 3)
    assert result["compatible"]["accuracy"] == 1.0 and result["compatible"]["their_scorer_would_skip"]


def test_ecgqa_compares_sets_of_items_so_not_sure_is_not_no():
    """Fault 6. Gold / answer: [not sure] / "not sure"; [no] / "normal"; [yes] / "Yes."; [not sure] / "Answer: not
    sure".
    corrected: {not sure} right, {normal} wrong, {yes} right, {not sure} right: accuracy 3/4.
    compatible: "no" is found in "not sure" twice -> {no, not sure}, wrong both times; "no" in "normal" -> {no},
    right; "yes" in "yes." right: accuracy 2/4."""
    rows, answers = rows_and_answers("ecgqa", ECGQA_PROMPT, [(["not sure"], "not sure"), (["no"], "normal"),
                                                             (["yes"], "Yes."), (["not sure"], "Answer: not sure")])
    result = score("ecgqa", rows, answers)
    assert result["corrected"]["accuracy"] == pytest.approx(0.75)
    assert result["compatible"]["accuracy"] == pytest.approx(0.5)


def test_subsets_are_told_from_row_ids():
    assert [subset_of(i) for i in ["code15-1109348", "cpsc-A6504", "g12-E10228", "ptb-00123", "csn-JS001",
                                   "mmmu-17", "ecgqa-5", "mimic-1"]] == \
        ["code15", "cpsc", "g12", "ptb", "csn", "mmmu", "ecgqa", None]


def test_read_answers_takes_question_id_or_id_and_names_a_bad_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": "g12-1", "text": "Answer: A"}\n\n{"id": 7, "text": "B"}\n')
    assert read_answers(path) == {"g12-1": "Answer: A", "7": "B"}
    path.write_text('{"question_id": "g12-1", "text": "A"}\n{"question_id": "g12-2", "text": \n')
    with pytest.raises(ValueError, match=r"answers.jsonl, line 2: not valid JSON"):
        read_answers(path)
    path.write_text('{"text": "A"}\n')
    with pytest.raises(ValueError, match=r"line 1: needs a question_id"):
        read_answers(path)


def test_command_line_prints_both_blocks_and_writes_the_json(tmp_path, capsys):
    rows, answers = rows_and_answers("g12", G12_PROMPT, [("A. a", "Answer: A"), ("B. b", "ECG.")])
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps({"question_id": k, "text": v}) + "\n"
                                                    for k, v in answers.items()))
    main(["--data", str(tmp_path / "rows.json"), "--answers", str(tmp_path / "answers.jsonl"),
          "--out", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert "compatible" in printed and "corrected" in printed and "not the published size" in printed
    # "ECG." reads as G under the published rule, so nothing was guessed; the strict rule cannot read it
    assert re.search(r"guessed\s+0\s+-\n", printed) and re.search(r"parse_failures\s+-\s+1\n", printed)
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["bench"] == "g12" and written["corrected"] == {"accuracy": 0.5, "parse_failures": 1}
