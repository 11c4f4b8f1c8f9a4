"""
synthetic/tasks.py — the anyECG / GEM tasks, and the synthetic dataset the default run trains on.

  1. Task builders   question templates (about 10-18 paraphrases per task) and the rows of every task: report,
                     location, location_long, ecgqa (verify / choose / query, single and comparison), multi
                     (2-6 serial ECGs), grounded (GEM).
  2. Synthetic data  `build_synthetic_dataset`: seeded patients -> rows + ECGs, with a held-out test split
                     disjoint by patient. Synthetic ECGs live in memory, keyed by a path like
                     "synth/train/tr0-00012/v2_loc"; the dataset regenerates them from their spec (same seed ->
                     same bytes). `add_image_rows`: the same reports read from paper printouts (train.py --images).
Rows are plain dicts in the anyECG format (see data.py for reading such files).
"""
import functools
import multiprocessing
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import numpy as np

from chat import answer_text
from data import (BEAT_NAMES, LOCATION_TASKS, STANDARD_LEADS, STATEMENTS, TASKS, cut_ecg, localization_answer,
                  prepare_ecg, row_paths)
from images.paper import render_ecg
from synthetic.generator import (FAST_BPM, LEFT_AXIS, LONG_PR_MS, LONG_QTC_MS, LOW_VOLTAGE_MV, RIGHT_AXIS, SLOW_BPM,
                                 ST_SHIFT_MV, T_INVERTED_MV, T_UPRIGHT_LEADS, WIDE_QRS_MS, Patient, make_patient,
                                 patient_history, sees_frontal_plane, synth_ecg, synth_truth)

# --------------------------------------------------------------------------- 1. task builders
# Question paraphrases per task (the location ones are anyECG's own wording).
REPORT_QUESTIONS = [
    "May I have the official report for the ECG provided?", "Give me a detailed report on this ECG.",
    "Provide me with the report of this ECG.", "Please write the machine report for this ECG.",
    "Generate a report for this electrocardiogram.", "Could you interpret this ECG and give me the report?",
    "Read this ECG and report your findings.", "What is the report for this recording?",
    "Write the diagnostic statements for this ECG.", "I need the report for this ECG tracing.",
    "Summarise this ECG as a clinical report.", "What does this ECG show? Give the report.",
    "Report on this ECG, please.", "Produce the interpretation report for this ECG."]
LOCATION_QUESTIONS = [
    "Locate the {name} on this ECG for me, please.", "Examine this ECG and point out where the {name} is located.",
    "Where should I look to find the {name} on this ECG?", "Can you locate the {name} on this ECG?",
    "Determine where the {name} is on this electrocardiogram.", "Please locate the specific location of the {name} on this ECG.",
    "Tell me where to find the {name} on this ECG.", "Help me locate the {name} on this ECG.",
    "Could you identify where the {name} is on this ECG?", "On this ECG, where can I see the {name}?",
    "Where is the {name} located in this ECG?", "Can you show me where the {name} occurred on this ECG?",
    "Help me find where the {name} shows up on this ECG.", "Check this ECG and tell me where the {name} appears.",
    "Determine where the {name} is located on this electrocardiogram.",
    "I need to find the {name} on this ECG; where should I look?"]
GROUNDED_QUESTIONS = [
    "Interpret this ECG step by step: measure it first, then reason, then give the diagnosis.",
    "What are the measured features of this ECG, and what do they tell you?",
    "Please analyse this ECG: report heart rate and intervals, explain your reasoning, and conclude.",
    "Walk me through this ECG from measurements to diagnosis.", "Give a grounded interpretation of this ECG.",
    "Measure this ECG and explain the diagnosis the measurements support.",
    "Which measurements of this ECG are abnormal, and what diagnosis follows?",
    "Explain this ECG like a cardiologist: intervals and axis first, then the conclusion.",
    "Analyse this ECG and justify each finding with a measurement.",
    "Can you interpret this ECG and show the evidence for each finding?",
    "Describe the key measurements of this ECG and the resulting interpretation.",
    "Read this ECG systematically (rate, rhythm, intervals, axis, ST-T) and diagnose it."]
BRIEF = " Please answer briefly."
VERDICTS = {"Normal ECG", "Normal ECG except for rate", "Borderline ECG", "Abnormal ECG"}
# findings any single lead shows (rhythm, ectopy, blocks, QT); the others need more leads
LEAD_INDEPENDENT = {"Sinus rhythm", "Sinus bradycardia", "Sinus tachycardia", "Atrial fibrillation", "Atrial flutter",
                    "Premature atrial contractions", "Premature ventricular contractions", "1st degree A-V block",
                    "Left bundle branch block", "Right bundle branch block", "Prolonged QT interval"}
RHYTHMS = ["Sinus rhythm", "Sinus bradycardia", "Sinus tachycardia", "Atrial fibrillation", "Atrial flutter"]


def findings_of(truth):
    """The record's statements without the overall verdict, in report order."""
    return [s for s in truth.statements if s not in VERDICTS]


def askable(truths):
    """Findings a question may ask about: all on 12-lead records, only lead-independent ones if any ECG has fewer."""
    full = all(len(t.leads) == 12 for t in truths)
    return [s for s in STATEMENTS if s not in VERDICTS and (full or s in LEAD_INDEPENDENT)]


def listing(items):
    return ", ".join(s.lower() for s in items) if items else "none"


def reading_of(truths):
    """What a reader writes of the ECGs before answering a question about them (a row's "reading", chat.turns_of):
    each one's leads, heart rate and report statements, named ECG1, ECG2, ... when there are several. The leads say
    what a record could show at all (one lead shows no axis), which questions over several ECGs depend on.
    -> 'Reading: 12 leads, 72 bpm, Sinus rhythm, Normal ECG.'"""
    each = [f"{leads_said(t.leads)}, {t.hr_bpm:.0f} bpm, " + ", ".join(t.statements) for t in truths]
    if len(each) == 1:
        return f"Reading: {each[0]}."
    return "Reading: " + " ".join(f"ECG{k + 1}: {s}." for k, s in enumerate(each))


ASKED = "Question:"   # with train.py --question_after_reading: 'Reading: R. Question: Q? Answer: a'


def question_after_reading(row):
    """The row answered with its question repeated after the reading: the answer's last step then sees the question
    and the list it is about side by side, the form in which the skills probe learns membership fastest
    (docs/RESULTS.md, "Where the question stands"). Rows without a reading are returned as they are."""
    if not row.get("reading"):
        return row
    return row | {"reading": f"{row['reading']} {ASKED} {row['question'].removesuffix(BRIEF)}"}


def leads_said(leads):
    return "12 leads" if len(leads) == 12 else f"lead {leads[0]}" if len(leads) == 1 else "leads " + ", ".join(leads)


def report_row(path, truth, rng):
    return {"question": str(rng.choice(REPORT_QUESTIONS)), "answer": "Report: " + ", ".join(truth.statements),
            "ecg_path": [path], "task": "report"}


def location_row(path, truth, start, end, symbol, rng, task="location"):
    return {"question": str(rng.choice(LOCATION_QUESTIONS)).format(name=BEAT_NAMES[symbol]),
            "answer": localization_answer(truth.beat_samples, truth.beat_symbols, start, end, truth.fs, symbol),
            "ecg_path": [path], "task": task, "abnormal_type": symbol, "ecg_start": int(start), "ecg_end": int(end)}


def grounded_answer(truth):
    """GEM-style: measurements -> reasoning -> diagnosis, every finding tied to a number."""
    t, found = truth, set(truth.statements)
    pr = f"{t.pr_ms:.0f} ms" if t.pr_ms is not None else "n/a"
    m = f"Heart rate: {t.hr_bpm:.0f} bpm, PR: {pr}, QRS: {t.qrs_ms:.0f} ms, QT/QTc: {t.qt_ms:.0f}/{t.qtc_ms:.0f} ms"
    m += f", Axis: {t.axis_deg:.0f}°" if sees_frontal_plane(t.leads) else ""
    why = []
    if "Atrial fibrillation" in found:
        why.append("Irregularly irregular RR intervals with no P waves and a fibrillatory baseline: atrial fibrillation.")
    elif "Atrial flutter" in found:
        why.append("Regular sawtooth flutter waves instead of P waves: atrial flutter.")
    else:
        rate = (f"below {SLOW_BPM}" if t.hr_bpm < SLOW_BPM else f"above {FAST_BPM}" if t.hr_bpm > FAST_BPM
                else f"between {SLOW_BPM} and {FAST_BPM}")
        why.append(f"A P wave precedes every QRS and the rate is {rate} bpm: {t.statements[0].lower()}.")
    if "1st degree A-V block" in found:
        why.append(f"PR {t.pr_ms:.0f} ms is longer than {LONG_PR_MS} ms: 1st degree A-V block.")
    if t.qrs_ms >= WIDE_QRS_MS:
        shape = ("with broad notched R waves and no septal q waves laterally: left bundle branch block"
                 if "Left bundle branch block" in found else
                 "with a late R' wave in V1 and a wide S wave in lead I: right bundle branch block")
        why.append(f"QRS {t.qrs_ms:.0f} ms is {WIDE_QRS_MS} ms or more, {shape}.")
    else:
        why.append(f"QRS {t.qrs_ms:.0f} ms is narrow.")
    if "Premature atrial contractions" in found:
        why.append("Early narrow beats with an abnormal P wave and a non-compensatory pause: premature atrial contractions.")
    if "Premature ventricular contractions" in found:
        why.append("Early wide beats without a P wave, followed by a compensatory pause: premature ventricular contractions.")
    if "Left axis deviation" in found or "Right axis deviation" in found:
        left = t.axis_deg < LEFT_AXIS
        why.append(f"Axis {t.axis_deg:.0f}° is beyond {LEFT_AXIS if left else f'+{RIGHT_AXIS}'}°: "
                   f"{'left' if left else 'right'} axis deviation.")
    if "Low QRS voltages" in found:
        why.append(f"QRS amplitude is below {LOW_VOLTAGE_MV} mV in every limb lead: low QRS voltages.")
    for name, test, word in [("ST elevation", lambda v: v >= ST_SHIFT_MV, "elevated"),
                             ("ST depression", lambda v: v <= -ST_SHIFT_MV, "depressed")]:
        if name in found:
            leads = [x for x in t.leads if test(t.lead_st_mv[x])]
            why.append(f"ST segment {word} in {', '.join(leads)}: {name.lower()}.")
    if "T wave inversion" in found:
        leads = [x for x in t.leads if x in T_UPRIGHT_LEADS and t.lead_t_mv[x] <= T_INVERTED_MV]
        why.append(f"T waves inverted in {', '.join(leads)}: T wave inversion.")
    qt = f"longer than {LONG_QTC_MS} ms: prolonged QT interval" if "Prolonged QT interval" in found else "normal"
    why.append(f"QTc {t.qtc_ms:.0f} ms is {qt}.")
    return f"Measurements: {m}. Reasoning: {' '.join(why)} Diagnosis: {', '.join(t.statements)}."


def grounded_row(path, truth, rng):
    return {"question": str(rng.choice(GROUNDED_QUESTIONS)), "answer": grounded_answer(truth),
            "ecg_path": [path], "task": "grounded"}


CHECKED = "Check:"   # with train.py --worked_checks: 'Reading: R. Check: ... Answer: a'


def lookup(finding, found, name):
    """One lookup as every check writes it: 'atrial flutter not in ECG1'."""
    return f"{finding.lower()} {'in' if found else 'not in'} {name}"


def membership_check(source, other, k_other, pool):
    """A set comparison worked one finding at a time: each of `source`'s findings, in its reading's order, tagged
    with whether ECG`k_other` (findings `other`) shows it; a finding the lead sets cannot compare says so. The answer
    then only gathers the tags; walked this way the comparisons are learned faster than answered at once
    (docs/RESULTS.md, "Working the comparison").
    -> 'Check: atrial fibrillation not in ECG1; left bundle branch block in ECG1.'"""
    tags = [lookup(s, s in other, f"ECG{k_other}") if s in pool else f"{s.lower()} not comparable"
            for s in findings_of(source)]
    return f"{CHECKED} {'; '.join(tags) or 'none'}."


def lookups(finding, lists, names=None):
    """One finding looked up in each ECG's findings (named ECG1, ECG2, ... or `names`), in the tags a set
    comparison's check writes, so the steps that ask about one finding share what the set comparisons teach.
    -> 'Check: atrial flutter in ECG1; atrial flutter not in ECG2.' (tagging each ECG "ECG1 yes; ECG2 no" measured
    worse than answering, and a yes/no question answered at once stays at chance: docs/RESULTS.md, "The lookup
    written out")"""
    names = names or [f"ECG{k + 1}" for k in range(len(lists))]
    tags = [lookup(finding, finding in f, name) for f, name in zip(lists, names)]
    return f"{CHECKED} {'; '.join(tags)}."


def worked_check(row):
    """The row answered with its check (the lookups its answer needs, written one by one) after the reading (and
    after the repeated question, which the check depends on). Rows without one are returned as they are."""
    if not row.get("check") or not row.get("reading"):
        return row
    return row | {"reading": f"{row['reading']} {row['check']}"}


def ecgqa_single_row(path, t, rng):
    """One ECG-QA style question about one ECG: verify (yes/no), choose, or query."""
    have = set(findings_of(t))
    kind = str(rng.choice(["verify", "choose", "query"]))
    # QT as the report states it: Bazett's QTc of the measured rate can cross 470 ms where the patient's does not
    long_qt = "Prolonged QT interval" in have
    check = None
    if kind == "verify":
        s = str(rng.choice(sorted(have))) if have and rng.random() < 0.5 else str(rng.choice(askable([t])))
        q, a, tid = f"Does this ECG show {s.lower()}?", "yes" if s in have else "no", 1
        check = lookups(s, [have], ["the reading"])
    elif kind == "choose":
        options = [("Is the QRS complex of this ECG narrow or wide?", "wide" if t.qrs_ms >= WIDE_QRS_MS else "narrow",
                    20),
                   ("Is the heart rate of this ECG slow, normal or fast?",
                    "slow" if t.hr_bpm < SLOW_BPM else "fast" if t.hr_bpm > FAST_BPM else "normal", 21),
                   ("Is the QT interval of this ECG normal or prolonged?",
                    "prolonged" if long_qt else "normal", 22)]
        other = str(rng.choice([r for r in RHYTHMS if r != t.statements[0]]))
        a_, b_ = (t.statements[0], other) if rng.random() < 0.5 else (other, t.statements[0])
        options.append((f"Which rhythm does this ECG show, {a_.lower()} or {b_.lower()}?", t.statements[0].lower(), 23))
        q, a, tid = options[rng.integers(len(options))]
    else:
        above = [n for n, hit in [("heart rate", t.hr_bpm > FAST_BPM), ("pr interval", (t.pr_ms or 0) > LONG_PR_MS),
                                  ("qrs duration", t.qrs_ms >= WIDE_QRS_MS), ("qt interval", long_qt)]
                 if hit]
        options = [("What is the rhythm of this ECG?", t.statements[0].lower(), 30),
                   ("Which premature beats does this ECG show?",
                    listing([s for s in findings_of(t) if s.startswith("Premature")]), 31),
                   ("Which conduction abnormalities does this ECG show?",
                    listing([s for s in findings_of(t) if "block" in s]), 32),
                   ("Which numeric features of this ECG are above the normal range?", ", ".join(above) or "none", 42)]
        if len(t.leads) == 12:
            options.append(("Which abnormal findings does this ECG show?",
                            listing([s for s in findings_of(t) if s not in RHYTHMS]), 33))
        q, a, tid = options[rng.integers(len(options))]
    row = {"question": q + BRIEF, "answer": a, "reading": reading_of([t]), "ecg_path": [path], "task": "ecgqa",
           "question_type": f"single-{kind}", "template_id": int(tid)}
    return row | ({"check": check} if check else {})


def ecgqa_comparison_row(paths, truths, rng, consecutive):
    """ECG-QA comparison form on two ECGs (same patient: consecutive; else irrelevant)."""
    pool = set(askable(truths))
    first, second = ([s for s in findings_of(t) if s in pool] for t in truths)
    kind = "verify" if rng.random() < 0.4 else "query"
    if kind == "verify":
        s = str(rng.choice(sorted(set(first) | set(second)) if rng.random() < 0.6 else sorted(pool)))
        q, a = f"Do both ECGs show {s.lower()}?", "yes" if s in first and s in second else "no"
        check = lookups(s, [first, second])
    else:
        j = int(rng.integers(3))
        q, a = [("Which findings are present in the first ECG but absent in the second ECG?",
                 listing([s for s in first if s not in second])),
                ("Which findings are present in the second ECG but absent in the first ECG?",
                 listing([s for s in second if s not in first])),
                ("Which findings do both ECGs share?", listing([s for s in first if s in second]))][j]
        src = 1 if j == 1 else 0   # walk the ECG the answer's findings come from, against the other one
        check = membership_check(truths[src], set((first, second)[1 - src]), 2 - src, pool)
    row = {"question": q + BRIEF, "answer": a, "reading": reading_of(truths), "ecg_path": list(paths), "task": "ecgqa",
           "question_type": f"comparison_{'consecutive' if consecutive else 'irrelevant'}-{kind}"}
    return row | ({"check": check} if check else {})


def multi_row(paths, truths, days, rng):
    """2-6 ECGs of one patient over time; short answers that can be checked exactly."""
    pool = set(askable(truths))
    seen = [[s for s in findings_of(t) if s in pool] for t in truths]
    span = f"These {len(truths)} ECGs of one patient were recorded over {days[-1] - days[0]} days. "
    kind = str(rng.choice(["per_ecg_report", "new_findings", "resolved_findings", "first_appearance",
                           "hr_trend", "rhythm_change"]))
    check = None   # the worked step (worked_check)
    if kind == "per_ecg_report":
        q = "What are the key findings in each ECG report?"
        a = " ".join(f"ECG{k + 1}: {', '.join(t.statements)}." for k, t in enumerate(truths))
    elif kind == "new_findings":
        q, a = "Which findings appear in the last ECG that were not in the first ECG?", listing(
            [s for s in seen[-1] if s not in seen[0]])
        check = membership_check(truths[-1], set(seen[0]), 1, pool)
    elif kind == "resolved_findings":
        q, a = "Which findings of the first ECG are no longer present in the last ECG?", listing(
            [s for s in seen[0] if s not in seen[-1]])
        check = membership_check(truths[0], set(seen[-1]), len(truths), pool)
    elif kind == "first_appearance":
        present = sorted({s for f in seen for s in f})
        s = str(rng.choice(present if present and rng.random() < 0.7 else sorted(pool)))
        first = next((k for k, f in enumerate(seen) if s in f), None)
        q, a = f"In which ECG does {s.lower()} first appear?", f"ECG{first + 1}" if first is not None else "none"
        check = lookups(s, seen[:len(seen) if first is None else first + 1])   # up to the first that shows it
    elif kind == "hr_trend":
        first, last = round(truths[0].hr_bpm), round(truths[-1].hr_bpm)   # the rates as a reading writes them
        d = last - first
        q, a = "How does the heart rate change from the first to the last ECG?", (
            "increased" if d >= 10 else "decreased" if d <= -10 else "unchanged")
        # the two rates copied side by side: the comparison then needs no search through up to six readings
        check = f"{CHECKED} ECG1 {first} bpm; ECG{len(truths)} {last} bpm."
    else:
        q, a = "Does the rhythm change across these ECGs?", "yes" if len({t.statements[0] for t in truths}) > 1 else "no"
        check = f"{CHECKED} " + "; ".join(f"ECG{k + 1} {t.statements[0].lower()}" for k, t in enumerate(truths)) + "."
    row = {"question": span + q + BRIEF, "answer": a, "ecg_path": list(paths), "task": "multi",
           "question_type": kind, "days": list(days)}
    if kind == "per_ecg_report":   # that answer is a reading
        return row
    return row | {"reading": reading_of(truths)} | ({"check": check} if check else {})


# --------------------------------------------------------------------------- 2. synthetic data
LEAD_SETS = [  # (leads, share): home-style reduced-lead records are half of the data
    (tuple(STANDARD_LEADS), 0.5), (("I",), 0.15), (("II",), 0.15), (("II", "V5"), 0.1), (("II", "V1"), 0.1)]
NATIVE_FS = [100, 250, 360, 500]        # rates records are "recorded" at, before resampling
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
TEST_SEED = 2024                        # the held-out test set is the same for every run
FOLLOWUP_SHARE = 0.3                    # report / grounded chats that go on with an ECG-QA question


class RecordSpec(NamedTuple):
    """Everything that regenerates one synthetic record, byte for byte."""
    patient: Patient
    duration_s: float
    fs: float
    leads: tuple
    noise: float
    seed: int

    def generate(self):
        return synth_ecg(self.patient, self.duration_s, self.fs, list(self.leads), self.noise, self.seed)

    def truth(self):   # generate()'s Truth without the signal: a row's answer needs only this
        return synth_truth(self.patient, self.duration_s, self.fs, list(self.leads), self.seed)


class SyntheticDataset:
    """Rows in anyECG format plus the ECGs they name. `specs` maps each synthetic path
    to its RecordSpec; signals are regenerated on demand (and cached at model rate)."""

    def __init__(self, rows, specs, fs=100):
        self.rows, self.specs, self.fs = rows, specs, fs
        self._cache = functools.lru_cache(maxsize=2048)(self._prepared)
        self._made = {}   # (path, clip) -> the ECG at model rate, made ahead by make_ahead
        self._images = functools.lru_cache(maxsize=512)(self._rendered)
        self.px_per_mm = None   # set by add_image_rows

    def record(self, path):
        """(ECGRecord at native rate, Truth) of one synthetic path."""
        return self.specs[path].generate()

    def inputs(self, row):
        """The row's model inputs: its ECGs at model rate, or for rows of modality "image" /
        "both" the paper printout of its record (with "both": the ECG, then the image)."""
        modality = row.get("modality", "signal")
        signals = [self._made[key] if key in self._made else self._cache(*key)
                   for key in signal_keys(row)] if modality != "image" else []
        return signals + ([self._images(p) for p in row_paths(row)] if modality != "signal" else [])

    def make_ahead(self, workers):
        """Every row's ECGs at model rate, made now by `workers` processes and kept. On a GPU the training loop would
        otherwise wait ~4 ms of synthesis for each record it meets first (about half a small model's step); the
        records are the ones made on demand, byte for byte (each RecordSpec holds its seed)."""
        keys = list(dict.fromkeys(key for r in self.rows if r.get("modality", "signal") != "image"
                                  for key in signal_keys(r)))   # each once, in the rows' order
        jobs = [(self.specs[p], p, clip, self.fs) for p, clip in keys]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            self._made.update(zip(keys, pool.map(_prepare_record, jobs, chunksize=64)))
        return len(keys)

    def _rendered(self, path):
        rec, _ = self.record(path)
        return render_ecg(rec.signal, rec.fs, list(rec.leads), px_per_mm=self.px_per_mm)

    def _prepared(self, path, clip):
        return _prepare_record((self.specs[path], path, clip, self.fs))


def signal_keys(row):
    """(path, clip or None) of each ECG a row reads: a localization row reads its clip [ecg_start, ecg_end)."""
    clip = (row["ecg_start"], row["ecg_end"]) if row["task"] in LOCATION_TASKS else None
    return [(p, clip) for p in row_paths(row)]


def _prepare_record(job):
    """(RecordSpec, path, clip or None, model rate) -> the ECG as the model reads it (a worker process's task too)."""
    spec, path, clip, fs = job
    rec, _ = spec.generate()
    if clip:
        rec = cut_ecg(rec, *clip, name=path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_ecg(rec, fs, name=path)


def in_answer_form(row, read_first=True, after_reading=False, worked=False):
    """A row answered as train.py's flags say: without its reading (read_first False), with the question repeated
    after the reading (after_reading), with its lookups written before the answer (worked). Unchanged by default."""
    if not read_first:
        return {k: v for k, v in row.items() if k != "reading"}
    row = question_after_reading(row) if after_reading else row
    return worked_check(row) if worked else row


def build_synthetic_dataset(n_patients=200, seed=0, split="train", tasks=None, max_visits=4,
                            long_share=0.1, max_long_s=60.0, fs=100, read_first=True, after_reading=False,
                            worked=False):
    """The one call train.py needs: `n_patients` simulated people -> SyntheticDataset.

    Per patient: 1 visit (half of them) or 2..max_visits visits over time (max 6); each visit a 10 s record in a
    random lead set and native rate, with a report, a grounded interpretation, ECG-QA questions (one asked as the
    follow-up of the report or the grounded chat in FOLLOWUP_SHARE of them: rows' "followups"), and (mostly for
    patients with ectopy or a block) a 10 s localization clip. Some patients add a long clip (20 s .. max_long_s);
    patients with several visits add multi-ECG and comparison questions. split: "train", "val" or "test"; the test
    split always uses TEST_SEED, so it is fixed across runs, and the splits draw their patients from disjoint seeds.
    read_first, after_reading, worked: the answers' form (in_answer_form), the follow-ups' answers in it too: a
    follow-up answered without its reading and check taught the model to skip them when asked second (issue 29)."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    tasks = set(tasks or TASKS)
    seed = TEST_SEED if split == "test" else seed
    rows, specs, previous = [], {}, None
    for i in range(n_patients):
        rng = np.random.default_rng([SPLIT_CODES[split], seed, i])
        patient = make_patient(rng, pid=f"{split[:2]}{seed}-{i:05d}")
        n_visits = 1 if rng.random() < 0.5 else int(rng.integers(2, min(max_visits, 6) + 1))
        visits = patient_history(patient, n_visits, rng)
        visit_paths, visit_truths = [], []
        for v, (day, p, _) in enumerate(visits):
            path = f"synth/{split}/{patient.pid}/v{v}"
            truth = _add_spec(specs, path, p, 10.0, rng)
            visit_paths.append(path)
            visit_truths.append(truth)
            visit_rows = [report_row(path, truth, rng), grounded_row(path, truth, rng)]
            visit_rows += [ecgqa_single_row(path, truth, rng) for _ in range(int(rng.integers(1, 3)))]
            if rng.random() < FOLLOWUP_SHARE:   # a second question about the same ECG, in the same chat
                then = in_answer_form(ecgqa_single_row(path, truth, rng), read_first, after_reading, worked)
                visit_rows[int(rng.integers(2))]["followups"] = [[then["question"], answer_text(then)]]
            rows += [r for r in visit_rows if r["task"] in tasks]
            if "location" in tasks and rng.random() < clip_chance(p):
                rows.append(location_clip(specs, f"{path}_loc", p, 10.0, rng, "location"))
        if "location_long" in tasks and rng.random() < long_share:
            length = float(rng.uniform(20, max_long_s)) if max_long_s > 20 else max_long_s
            rows.append(location_clip(specs, f"synth/{split}/{patient.pid}/long", visits[-1][1], length, rng,
                                       "location_long", holter=True))
        if n_visits >= 2 and "multi" in tasks:
            rows.append(multi_row(visit_paths, visit_truths, [d for d, _, _ in visits], rng))
        if n_visits >= 2 and "ecgqa" in tasks:
            k = int(rng.integers(n_visits - 1))
            rows.append(ecgqa_comparison_row(visit_paths[k:k + 2], visit_truths[k:k + 2], rng, consecutive=True))
        if previous and "ecgqa" in tasks and rng.random() < 0.3:
            rows.append(ecgqa_comparison_row([previous[0], visit_paths[0]], [previous[1], visit_truths[0]], rng,
                                             consecutive=False))
        previous = (visit_paths[0], visit_truths[0])
    rows = [in_answer_form(row, read_first, after_reading, worked) | {"dataset": "synthetic"} for row in rows]
    return SyntheticDataset(rows, specs, fs)


def add_image_rows(ds, px_per_mm):
    """GEM's second modality: every report and grounded row of a 12-lead record is marked "modality": "signal"
    and gets two copies, one answered from the paper printout alone ("image") and one from the signal and the
    printout together ("both"), so the three can be scored on the same records. Printouts render on demand."""
    ds.px_per_mm = px_per_mm
    originals = [r for r in ds.rows if r["task"] in ("report", "grounded") and len(ds.specs[r["ecg_path"][0]].leads) == 12]
    for r in originals:
        r["modality"] = "signal"
    ds.rows.extend(dict(r, modality=m) for r in originals for m in ("image", "both"))
    return ds


def _add_spec(specs, path, patient, duration, rng, holter=False):
    """Draw a lead set, rate, noise level and seed for a record; store the spec; -> Truth."""
    leads = ([("II", "V5"), ("II", "V1"), ("I",), ("II",)][rng.integers(4)] if holter
             else LEAD_SETS[rng.choice(len(LEAD_SETS), p=[s for _, s in LEAD_SETS])][0])
    spec = RecordSpec(patient, duration, float(rng.choice(NATIVE_FS)), tuple(leads),
                      float(rng.uniform(0.2, 1.5)), int(rng.integers(2**31)))
    specs[path] = spec
    return spec.truth()


def clip_chance(patient):
    """How likely a visit gets a 10 s localization clip: always for people with ectopic beats; blocks (whole-clip
    answers) and beat-free records (the "No ... Found" answers) less often."""
    return 1.0 if patient.pac_per_min > 0 or patient.pvc_per_min > 0 else 0.4 if patient.conduction != "normal" \
        else 0.25


def location_clip(specs, path, patient, length, rng, task, holter=False):
    """A clip [start, end) inside a slightly longer record, so the beats just outside it decide its edge spans as in
    anyECG; asks for a beat type present in the clip (70 %; PACs/PVCs before L/R beats) or an absent one."""
    before, after = rng.uniform(0, 3, 2)
    truth = _add_spec(specs, path, patient, round(before + length + after, 2), rng, holter)
    start = int(round(before * truth.fs))
    end = start + int(round(length * truth.fs))
    inside = {s for x, s in zip(truth.beat_samples, truth.beat_symbols) if start <= x < end} & set(BEAT_NAMES)
    ectopic = inside & {"A", "V"}          # prefer them: an L/R answer is usually the whole clip
    pool = ectopic if ectopic and rng.random() < 0.8 else inside
    symbol = str(rng.choice(sorted(pool))) if pool and rng.random() < 0.7 else str(rng.choice(sorted(BEAT_NAMES)))
    return location_row(path, truth, start, end, symbol, rng, task)


