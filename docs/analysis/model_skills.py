"""
model_skills.py — what a trained model still knows of stage 0's answering steps. An analysis behind docs/RESULTS.md
(issue 29), not part of the library.

train.py scores each skill family while stage 0's texts train it (at its end, and every --skill_eval_interval
steps); the ECG stages after it train on ECG rows alone, so the model saved at the end of a run may have forgotten
some of it. This scores a saved model on exactly the held-out texts the run scored (synthetic/skills.py's texts of
the test seed's people, made with the run's own answer flags as its log's config records them; 40 texts a family,
the reading given, the model writing check and answer, greedy) and prints them beside the run's own last stage-0
figures from that log.

  python -m docs.analysis.model_skills out/model [runs/other/model ...]   # ~10 s a model on 2 cores

Then the per-ECG report texts by how many ECGs they are about: how many parts the model wrote, and whether they were
ECG1, ECG2, ... in order (the task rows have 2-4 ECGs; the skill texts 2-6).
"""

import json
import re
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from config import Config
from images.chat import load_chat
from synthetic.skills import SKILL_VAL_PATIENTS, answer_prompt, skill_accuracy, skill_rows
from synthetic.tasks import TEST_SEED


def run_log(model_dir):
    """(the run's config, its last stage-0 "skills" accuracy or {}) from the log.jsonl beside the model folder (the
    default config's values where there is none)."""
    log = Path(model_dir).parent / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    config = next((r for r in records if r.get("event") == "config"), {})
    found = [r["accuracy"] for r in records if r.get("event") == "skills" and r.get("stage") == 0]
    return {**asdict(Config()), **config}, (found[-1] if found else {})


def parts_written(model, rows):
    """{(ECGs the text is about, parts written, in order): texts} over the per-ECG report texts of `rows`."""
    rows = [r for r in rows if r["family"] == "per_ecg_report"][:40]   # the 40 skill_accuracy scores
    written = model.generate([answer_prompt(model, r) for r in rows], [[] for _ in rows], max_new_tokens=80)
    counts = Counter()
    for r, ids in zip(rows, written):
        names = re.findall(r"ECG(\d+):", model.tokenizer.decode(ids))
        counts[r["n_ecgs"], len(names), names == [str(k + 1) for k in range(r["n_ecgs"])]] += 1
    return counts


def main(model_dirs):
    for model_dir in model_dirs:
        cfg, then = run_log(model_dir)
        # train.load_data's val skill texts
        rows = skill_rows(min(SKILL_VAL_PATIENTS, cfg["skill_patients"] or SKILL_VAL_PATIENTS), TEST_SEED,
                          after_reading=cfg["question_after_reading"], worked=cfg["worked_checks"])
        model = load_chat(model_dir).eval()
        now = skill_accuracy(model, rows)
        print(f"{model_dir}: mean {sum(now.values()) / len(now):.3f} at the end of the run" +
              (f", {sum(then.values()) / len(then):.3f} at the end of stage 0" if then else ""))
        for family, score in now.items():
            print(f"  {family:20s} {score:.2f}" + (f"  (stage 0: {then[family]:.2f})" if family in then else ""))
        for (n, parts, in_order), texts in sorted(parts_written(model, rows).items()):
            print(f"  per-ECG report of {n} ECGs: {parts} parts written{', in order' if in_order else ''}: {texts}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["out/model"])
