"""
synthetic/skills.py — the answering steps, taught on purpose: short texts from the generator's truth.

The default model reads most of what a question needs and does not answer from it (docs/RESULTS.md, issue 29).
Here each step from a reading to an answer is a family of short texts in the exact surface form the task rows
use: the task's own question, and an answer that writes the reading first and the conclusion last:

    Does this ECG show atrial flutter? Please answer briefly.
    Reading: lead II, 148 bpm, Atrial flutter, Abnormal ECG. Answer: yes

The reading (synthetic/tasks.py's `reading_of`) is what the report task already teaches the model to write from an
ECG, its statements, after its leads (what it could show at all) and heart rate (some questions need a number);
with several ECGs each is named ("ECG1: ... ECG2: ..."). Trained as text, with the loss on every token, a family
teaches the step alone; in the ECG stages the model writes its own reading and concludes from it the same way, and
the final answer stays the dataset's own ("yes").

Families are the question types of synthetic/tasks.py's builders (verify, choose, query; two ECGs compared;
serial ECGs: new and resolved findings, first appearance, heart-rate trend, rhythm change, each ECG's report),
so the texts are the builders' own rows with the reading added, never a second copy of their rules. With
--worked_checks (the default) the lookups an answer needs stand between the reading and the answer ("Check: atrial
flutter not in the reading.", tasks.worked_check): a set comparison worked one finding at a time, an asked finding
looked up in each ECG the question names, all in one form, so that the families share the lookup they teach; a
family is then scored on the check and answer the model writes, never on a check it is given.
"""
from collections import defaultdict

import numpy as np
import torch

from chat import ANSWER, answer_text
from eval import one_part_per_ecg, row_score
from synthetic.generator import make_patient, patient_history, synth_truth
from synthetic.tasks import CHECKED, LEAD_SETS, ecgqa_comparison_row, ecgqa_single_row, in_answer_form, multi_row

SKILL_VAL_PATIENTS = 150    # held-out people whose texts score each family (about 1,200 texts, fixed across runs)
# With the question after the reading, a skill text's user turn does not say it: the question's words in the answer
# can then be predicted only from the reading (half the asked findings are in it), so the loss on them rewards
# looking back at the list, which is what the answer needs (docs/RESULTS.md, "Where the question stands").
BLIND_QUESTION = "Read, then answer."


def family(row):
    """The skill a row teaches: its question type, the two kinds of ECG pair merged (the step is the same)."""
    return row["question_type"].replace("_consecutive", "").replace("_irrelevant", "")


def _truths(patient, n_visits, rng):
    """The truths of serial 10 s records of one simulated person at 100 Hz, each visit in its own lead set as in the
    dataset (no signal is drawn: only the truth is used) -> (days, truths)."""
    visits = patient_history(patient, n_visits, rng)
    truths = []
    for _, p, _ in visits:
        leads = list(LEAD_SETS[rng.choice(len(LEAD_SETS), p=[s for _, s in LEAD_SETS])][0])
        truths.append(synth_truth(p, 10.0, 100.0, leads, seed=int(rng.integers(2**31))))
    return [d for d, _, _ in visits], truths


def skill_rows(n_patients, seed=0, questions=8, after_reading=False, worked=False):
    """Text rows {"question", "asked" (the task's question), "answer" (the reading, then the answer), "final" (the
    answer alone), "task": "skills",
    "family", "skill_of" (the task it comes from), "question_type", "n_ecgs"} from `n_patients` simulated people:
    each gets 1-6 visits and `questions` questions about one visit, a pair of visits or the series.
    after_reading: the answer repeats the question after the reading (tasks.question_after_reading) and the user
    turn is BLIND_QUESTION. worked: the answer's lookups are written before it (tasks.worked_check)."""
    rows = []
    for i in range(n_patients):
        rng = np.random.default_rng([7, seed, i])
        n_visits = int(rng.choice([1, 2, 3, 4, 5, 6], p=[0.3, 0.25, 0.15, 0.1, 0.1, 0.1]))
        days, truths = _truths(make_patient(rng), n_visits, rng)
        for _ in range(questions):
            kind = rng.integers(3) if n_visits > 1 else 0
            if kind == 0:
                row = ecgqa_single_row("", truths[int(rng.integers(n_visits))], rng)
            elif kind == 1:
                k = int(rng.integers(n_visits - 1))
                row = ecgqa_comparison_row(["", ""], truths[k:k + 2], rng, consecutive=True)
            else:
                row = multi_row([""] * n_visits, truths, days, rng)
            asked = row["question"]
            blind = {"question": BLIND_QUESTION} if after_reading and row.get("reading") else {}
            row = in_answer_form(row, after_reading=after_reading, worked=worked) | blind
            rows.append({"question": row["question"], "asked": asked, "answer": answer_text(row),
                         "final": row["answer"],
                         "task": "skills", "family": family(row), "skill_of": row["task"],
                         "question_type": row["question_type"], "n_ecgs": len(row["ecg_path"])})
    return rows


def answer_prompt(model, row, check_given=False):
    """The chat up to the step: the question, then the answer turn's reading (given, so the score is of the step
    from the reading to the answer alone) through "Answer:", or up to a worked check, which the model writes.
    check_given: through "Check:" too, so the model need not know where the reading ends (the step alone)."""
    ids = model.prompt([("user", row["question"])], [], add_generation_prompt=True)[0]
    text = row["answer"]
    if (cut := text.rfind(" " + CHECKED)) >= 0:
        end = cut + len(" " + CHECKED) if check_given else cut
        return ids + model.tokenizer.encode(text[:end])
    cut = text.rfind(ANSWER)
    return ids + (model.tokenizer.encode(text[:cut + len(ANSWER)]) if cut >= 0 else [])


def score(row, text):
    """A skill text's answer scored as eval.py scores its task. A per-ECG report as text has no reading to copy (its
    answer is the reading, which only an ECG holds), so what it can teach is the shape: one part per ECG, in order."""
    if row["question_type"] == "per_ecg_report":
        return float(one_part_per_ecg(text, row["n_ecgs"]))
    return row_score(dict(row, task=row["skill_of"], answer=row["final"]), text)


@torch.no_grad()
def skill_accuracy(model, rows, per_family=40, batch_size=32, check_given=False):
    """{family: share right} over up to per_family held-out rows each (those that fit the context), the model writing
    the answer after the given reading (greedy; with check_given after "Check:" too), each scored by `score`."""
    by = defaultdict(list)
    for r in rows:
        if r.get("task") == "skills" and len(by[r["family"]]) < per_family:
            by[r["family"]].append(r)
    was_training = model.training
    model.eval()
    out = {}
    for fam, group in sorted(by.items()):
        scores = []
        # tokens the model may write: a per-ECG report, a worked check (up to ~10 findings tagged) and its answer,
        # or a short answer
        budget = 80 if fam == "per_ecg_report" else 112 if any(CHECKED in r["answer"] for r in group) else 16
        prompts = [(r, ids) for r in group
                   if len(ids := answer_prompt(model, r, check_given)) + budget <= model.max_seq_len]
        for k in range(0, len(prompts), batch_size):
            chunk, asked = zip(*prompts[k:k + batch_size])
            written = model.generate(list(asked), [[] for _ in chunk], max_new_tokens=budget)
            scores += [score(r, model.tokenizer.decode(w)) for r, w in zip(chunk, written)]
        if scores:
            out[fam] = float(np.mean(scores))
    model.train(was_training)
    return out
