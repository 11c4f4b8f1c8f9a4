"""
synthetic/ecgbench.py — synthetic ECG-Bench-style rows, so every subset can be scored offline. NOT ECG-Bench.

These rows are the project's generator's ECGs (synthetic/generator.py) written in ECG-Bench's format: LLaVA-style rows,
the subsets' file names, id prefixes, prompts and answer shapes as ecgbench/score.py reads them. The labels are exact
(the generator's own statements, mapped below), but the ECGs, the label mix and the questions are nanoECG's, so
figures on these rows are not comparable with any paper's ECG-Bench table. They show that each subset's path runs
end to end (rows -> eval.py -> ecgbench.score) and how the model does on ECGs whose truth is known.

    python -m synthetic.ecgbench --out DIR [--patients 60] [--seed 2024]
    python -m ecgbench.score --data DIR/cpsc-test.json --answers ANSWERS.jsonl
    python eval.py --ckpt out/model --bench cpsc --data DIR/cpsc-test.json --ecg-root DIR

DIR/records/ holds one WFDB record a patient (12 standard leads in mV, 500 Hz, 10 s); DIR/<file>.json one file a
subset in ecgbench.score.SUBSETS. Patients come from the held-out test seed (synthetic.tasks.TEST_SEED), the same
stream as the test split's patients, so no training patient is reused. A patient with no label in a subset's label
space (e.g. atrial flutter alone, for cpsc) has no row in that subset.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import wfdb

from data import STATEMENTS, STANDARD_LEADS, atomic_write
from ecgbench.score import CPSC_NAMES, PTB_NAMES, SUBSETS
from synthetic.generator import make_patient, synth_ecg
from synthetic.tasks import SPLIT_CODES, TEST_SEED

FS, SECONDS = 500.0, 10.0   # the generator's default rate; ECG-Bench's records are 10 s at 500 Hz too
NOTE = "Synthetic ECG-Bench-style rows from nanoECG's generator: NOT ECG-Bench; figures are not comparable with papers."

# The generator's statements in each label space. PTB-XL keeps rhythm (SR, SBRAD, STACH, AFIB, AFLT), ectopy (PAC,
# PVC), axis and QRS voltage outside its five diagnostic superclasses, so those statements map to none; "Normal ECG
# except for rate" is NORM (a normal ECG in sinus bradycardia/tachycardia: the rate is a rhythm statement); long QT is
# STTC (PTB-XL's LNGQT). The generator's ST elevation has no Q waves and no infarct pattern, so it is STTC, not MI.
# No synthetic counterpart: MI and HYP (the generator draws no Q waves, no hypertrophy voltage).
PTB_MAP = {"Normal ECG": "NORM", "Normal ECG except for rate": "NORM", "1st degree A-V block": "CD",
           "Left bundle branch block": "CD", "Right bundle branch block": "CD", "ST elevation": "STTC",
           "ST depression": "STTC", "T wave inversion": "STTC", "Prolonged QT interval": "STTC"}
# CPSC 2018: all nine classes have a counterpart. Its "Normal" is normal sinus rhythm, so "Normal ECG except for rate"
# maps to none; flutter, sinus brady/tachycardia, axis, low voltage, T inversion and long QT have no CPSC class.
CPSC_MAP = {"Normal ECG": "NORM", "Atrial fibrillation": "AF", "1st degree A-V block": "I-AVB",
            "Left bundle branch block": "LBBB", "Right bundle branch block": "RBBB",
            "Premature atrial contractions": "PAC", "Premature ventricular contractions": "PVC",
            "ST depression": "STD", "ST elevation": "STE"}
# CODE-15's normal exam has none of its abnormalities (1dAVb, RBBB, LBBB, SB, ST, AF): the verdict "Normal ECG" alone.
# Every other verdict (including "except for rate": SB and ST are CODE-15 abnormalities) is ABNORMAL.
CODE15_MAP = {"Normal ECG": "NORM"}
# Multiple-choice options: every statement but the vague verdicts, which would be neither clearly right nor wrong.
CHOICE_POOL = [s for s in STATEMENTS if s not in ("Normal ECG except for rate", "Borderline ECG", "Abnormal ECG")]

PROMPTS = {
    "ptb": "Classify the ECG into the following diagnostic superclasses:\n"
           + ", ".join(f"{code}({name})" for code, name in PTB_NAMES.items())
           + "\nSeparate the classes with a semicolon.",
    "code15": "Classify the ECG as normal or abnormal. Provide NORM or ABNORMAL as the output.",
    "cpsc": "You are provided with an ECG signal image. Please classify the ECG image into the following diagnostic "
            "statement classes:\n" + ", ".join(f"{code}({name})" for code, name in CPSC_NAMES.items())
            + "\nDirectly output the class name and separate with a semicolon.",
    "choice": "Answer the following multiple choice question. The last line of your response should be of the "
              "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of options.\n"
              "Question: Which of the following is present in this ECG?\n",
}
ECGQA_TAIL = "Only answer based on the given Options without any explanation."


def labels(statements, mapping):
    """The codes a record's statements map to, in the subset's label order."""
    codes = {mapping[s] for s in statements if s in mapping}
    order = list(PTB_NAMES) + list(CPSC_NAMES)
    return sorted(codes, key=order.index)


def choice(statements, n_options, rng):
    """(options, right index): one statement the ECG has, n_options - 1 it does not, shuffled."""
    right = str(rng.choice([s for s in statements if s in CHOICE_POOL]))
    wrong = rng.choice([s for s in CHOICE_POOL if s not in statements], n_options - 1, replace=False)
    options = [right] + [str(s) for s in wrong]
    order = rng.permutation(n_options)
    return [options[k] for k in order], int(np.nonzero(order == 0)[0][0])


def choice_row(statements, n_options, rng, letter_only):
    """A csn / g12 (gold "C. <option>") or mmmu (gold "C") question."""
    options, right = choice(statements, n_options, rng)
    letters = "ABCDEFGH"[:n_options]
    prompt = PROMPTS["choice"] + "\n".join(f"{letter}. {text}" for letter, text in zip(letters, options))
    return prompt, letters[right] if letter_only else f"{letters[right]}. {options[right]}"


def ecgqa_row(statements, rng):
    """An ECG-QA-style question: verify (yes/no/not sure) or query (which of 4 findings; gold a list, or none)."""
    findings = [s for s in CHOICE_POOL if s != "Normal ECG"]
    if rng.random() < 0.5:
        asked = str(rng.choice([s for s in findings if s in statements] if rng.random() < 0.5 else findings))
        question, options = f"Does this ECG show {asked.lower()}?", ["yes", "no", "not sure"]
        gold = ["yes" if asked in statements else "no"]
    else:
        shown = [str(s) for s in rng.choice(findings, 4, replace=False)]
        question, options = "Which of the following findings does this ECG show?", [s.lower() for s in shown] + ["none"]
        gold = [s.lower() for s in shown if s in statements] or ["none"]
    return f"Question: {question}\nOptions: {', '.join(options)}\n{ECGQA_TAIL}", gold


def questions(statements, rng):
    """{subset: (prompt, gold) or None (no label in that space)} for one ECG."""
    ptb, cpsc = labels(statements, PTB_MAP), labels(statements, CPSC_MAP)
    return {"ptb": (PROMPTS["ptb"], "; ".join(ptb)) if ptb else None,
            "code15": (PROMPTS["code15"], CODE15_MAP.get(statements[-1], "ABNORMAL")),
            "cpsc": (PROMPTS["cpsc"], "; ".join(cpsc)) if cpsc else None,
            "csn": choice_row(statements, 8, rng, letter_only=False),
            "g12": choice_row(statements, 8, rng, letter_only=False),
            "mmmu": choice_row(statements, 4, rng, letter_only=True),
            "ecgqa": ecgqa_row(statements, rng)}


def write_record(records, name, patient, rng):
    """One 12-lead WFDB record of a patient -> the generator's Truth."""
    noise, seed = float(rng.uniform(0.2, 1.5)), int(rng.integers(2**31))   # the synthetic split's noise range
    rec, truth = synth_ecg(patient, SECONDS, FS, STANDARD_LEADS, noise, seed)
    wfdb.wrsamp(name, fs=FS, units=["mV"] * len(rec.leads), sig_name=list(rec.leads),
                p_signal=rec.signal.T.astype(np.float64), fmt=["16"] * len(rec.leads), write_dir=str(records))
    return truth


def build(out, n_patients=60, seed=TEST_SEED):
    """Write DIR/records/ and one rows file a subset; -> {subset: rows}."""
    out = Path(out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    rows = {name: [] for name in SUBSETS}
    for i in range(n_patients):
        rng = np.random.default_rng([SPLIT_CODES["test"], seed, i])   # the test split's patient stream
        name = f"synth{i:05d}"
        truth = write_record(out / "records", name, make_patient(rng, pid=name), rng)
        for subset, asked in questions(truth.statements, rng).items():
            if asked is None:
                continue
            spec = SUBSETS[subset]
            rows[subset].append({
                "id": f"{spec['prefix']}{i}", "image": f"{subset}/{name}-0.png", "ecg": f"records/{name}",
                "conversations": [{"from": "human", "value": asked[0]}, {"from": "gpt", "value": asked[1]}],
                "source": NOTE})
    for subset, subset_rows in rows.items():
        atomic_write(out / f"{SUBSETS[subset]['file']}.json", json.dumps(subset_rows, indent=1) + "\n")
    atomic_write(out / "README.txt", NOTE + "\n")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write synthetic ECG-Bench-style rows (NOT ECG-Bench).")
    parser.add_argument("--out", required=True, help="folder for records/ and one <subset>.json a subset")
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--seed", type=int, default=TEST_SEED, help="default: the held-out test split's seed")
    args = parser.parse_args(argv)
    start = time.time()
    rows = build(args.out, args.patients, args.seed)
    print(NOTE)
    print(f"{args.patients} records, {time.time() - start:.1f} s; rows: "
          + ", ".join(f"{SUBSETS[s]['file']} {len(r)}" for s, r in rows.items()))


if __name__ == "__main__":
    main()
