"""Judge-free grounding metrics (ecgbench/grounding.py) on hand-made ECG-Grounding rows; every figure worked by hand."""
import json
import math

import pytest

from ecgbench import grounding as g


def row(rid, report, mm):
    return {"id": rid, "ecg": f"files/{rid}", "report": report, "machine_measurements": mm,
            "conversations": [{"from": "human", "value": "<image>\nInterpret this ECG."},
                              {"from": "gpt", "value": "(GPT-4o's interpretation, not read here)"}]}


# a: MIMIC-IV-ECG's own columns. HR = 60000 / 833 = 72.03 bpm; PR = 200 - 40 = 160; QRS = 298 - 200 = 98;
#    QT = 600 - 200 = 400; QTc = 400 / sqrt(0.833) = 438.3; axis -40.
# b: ready numbers. c: a text. d: MIMIC columns with p_onset missing (29999): no PR; it has no answer.
ROWS = [row("a", "Sinus rhythm. Left axis deviation. Abnormal ECG.",
            {"rr_interval": 833, "p_onset": 40, "p_end": 130, "qrs_onset": 200, "qrs_end": 298, "t_end": 600,
             "p_axis": 50, "qrs_axis": -40, "t_axis": 30}),
        row("b", "Atrial fibrillation. Abnormal ECG.",
            {"heart_rate": 110, "qrs": 90, "qt": 320, "qtc": 433, "qrs_axis": 60}),
        row("c", "Sinus rhythm. Normal ECG.",
            "Heart Rate: 64 bpm, PR: 150 ms, QRS: 88 ms, QT/QTc: 410/423 ms, QRS axis: 45°"),
        row("d", "Sinus bradycardia.",
            {"rr_interval": 1200, "p_onset": 29999, "qrs_onset": 200, "qrs_end": 290, "t_end": 640})]
ANSWERS = {
    # leads II, III, aVF, V1, V2, V3 = 6/12; statements {Sinus rhythm, Left axis deviation} vs the report's three:
    # tp 2, fn 1 (Abnormal ECG); HR 75 vs 72.03 within ±5; QRS 130 vs 98 off by 32 > 20; axis -30 vs -40 within ±15.
    # 25 words.
    "a": "Sinus rhythm, HR 75 bpm. Q waves in leads II, III, aVF and V1-V3. QRS 130 ms. "
         "Left axis deviation with an axis of -30°.",
    # leads V5, V6 = 2/12; {Atrial fibrillation, ST depression} vs {Atrial fibrillation, Abnormal ECG}: tp 1, fp 1,
    # fn 1; HR 118 vs 110 off by 8 > 5; QTc 450 vs 433 within ±30. 19 words.
    "b": "Atrial fibrillation with rapid ventricular response, heart rate 118 bpm. ST depression in V5 and V6. "
         "QTc 450 ms.",
    # no lead, no number; {Normal ECG} vs {Sinus rhythm, Normal ECG}: tp 1, fn 1. 2 words.
    "c": "Normal ECG.",
    # "d" has no answer: scored as "" (0 leads, 0 words; Sinus bradycardia a false negative).
}


def test_lead_coverage_counts_names_and_ranges():
    assert g.leads_mentioned(ANSWERS["a"]) == ["II", "III", "aVF", "V1", "V2", "V3"]
    assert g.lead_coverage(ANSWERS["a"]) == 0.5                                       # 6 / 12
    assert g.leads_mentioned("AVL and v5; lead ii; V4 to V6") == ["II", "aVL", "V4", "V5", "V6"]
    assert g.leads_mentioned("ST elevation in V1-3") == ["V1", "V2", "V3"]          # "V1-3" is a range
    # not leads: a lower-case "i" outside "lead i", Mobitz II, type I, V7, "aVRT"
    assert g.leads_mentioned("i.e. Mobitz II block, type I pattern, V7, aVRT") == []
    assert g.lead_coverage("I, II, III, aVR, aVL, aVF, V1-V6") == 1.0


def test_numbers_read_from_text():
    got = g.extract_numbers("PR interval of 0.16 seconds; QRS axis is +60 degrees; QT/QTc: 400/430 ms; "
                            "QRS complexes are narrow, heart rate is approximately 72 bpm.")
    # 0.16 s -> 160 ms; "QRS complexes are narrow" states no QRS duration; QT 400 and QTc 430 from one pair
    assert got == {"hr": 72.0, "pr": 160.0, "qrs": None, "qt": 400.0, "qtc": 430.0, "axis": 60.0}
    # a P or T axis is not the QRS axis; a bare "88 bpm" is the heart rate
    assert g.extract_numbers("sinus rhythm at 88 bpm, P axis 50°, T-axis 30°")["axis"] is None
    assert g.extract_numbers("sinus rhythm at 88 bpm")["hr"] == 88.0


def test_machine_measurement_shapes():
    mimic = g.reference_numbers(ROWS[0]["machine_measurements"])
    assert mimic["hr"] == pytest.approx(60000 / 833) and mimic["pr"] == 160 and mimic["qrs"] == 98
    assert mimic["qt"] == 400 and mimic["qtc"] == pytest.approx(400 / math.sqrt(0.833)) and mimic["axis"] == -40
    assert g.reference_numbers(ROWS[3]["machine_measurements"])["pr"] is None            # 29999: not measured
    ready = g.reference_numbers({"Heart_Rate": "72 bpm", "PR": 160, "axis": "-30", "qrs": float("nan")})
    assert ready == {"hr": 72.0, "pr": 160.0, "qrs": None, "qt": None, "qtc": None, "axis": -30.0}
    text = g.reference_numbers(ROWS[2]["machine_measurements"])
    assert text == {"hr": 64.0, "pr": 150.0, "qrs": 88.0, "qt": 410.0, "qtc": 423.0, "axis": 45.0}
    assert g.reference_numbers(None) == dict.fromkeys(g.FIELDS)


def test_an_answer_without_numbers_is_not_stated_not_wrong():
    result = g.grounding_scores(ROWS[:1], {"a": "Sinus rhythm with left axis deviation."})
    for field in g.FIELDS:
        assert result["numbers"][field] == {"stated": 0.0, "within": None, "n_stated": 0, "n_compared": 0}


def test_grounding_scores_by_hand():
    r = g.grounding_scores(ROWS, ANSWERS)
    assert r["n"] == 4 and r["missing"] == 1
    assert r["lead_coverage"] == pytest.approx((6 / 12 + 2 / 12 + 0 + 0) / 4)            # 1/6
    # tp 2+1+1+0 = 4, fp 0+1+0+0 = 1, fn 1+1+1+1 = 4: precision 4/5, recall 4/8, F1 8/13
    assert r["diagnosis"] == pytest.approx({"precision": 0.8, "recall": 0.5, "f1": 8 / 13, "n": 4})
    n = r["numbers"]
    assert n["hr"] == {"stated": 0.5, "within": 0.5, "n_stated": 2, "n_compared": 2}    # a within, b not
    assert n["qrs"] == {"stated": 0.25, "within": 0.0, "n_stated": 1, "n_compared": 1}  # 130 vs 98
    assert n["qtc"] == {"stated": 0.25, "within": 1.0, "n_stated": 1, "n_compared": 1}  # 450 vs 433
    assert n["axis"] == {"stated": 0.25, "within": 1.0, "n_stated": 1, "n_compared": 1}  # -30 vs -40
    assert n["pr"]["within"] is None and n["qt"]["stated"] == 0.0
    assert r["length"] == {"mean": 11.5, "median": 10.5}                                 # words 25, 19, 2, 0


def test_a_stated_number_without_a_measurement_is_not_compared():
    # row d has no PR (29999): "PR 180 ms" counts as stated, and is left out of `within`
    n = g.grounding_scores(ROWS[3:], {"d": "Sinus bradycardia, PR 180 ms."})["numbers"]["pr"]
    assert n == {"stated": 1.0, "within": None, "n_stated": 1, "n_compared": 0}


def test_cli(tmp_path, capsys):
    data, answers, out = tmp_path / "rows.json", tmp_path / "answers.jsonl", tmp_path / "r.json"
    data.write_text(json.dumps(ROWS))
    answers.write_text("\n".join(json.dumps({"question_id": k, "text": v}) for k, v in ANSWERS.items()) + "\n")
    result = g.main(["--data", str(data), "--answers", str(answers), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["lead_coverage"] == pytest.approx(1 / 6)
    printed = capsys.readouterr().out
    assert "4 rows, 1 without an answer" in printed and "lead coverage" in printed and "±30" in printed
