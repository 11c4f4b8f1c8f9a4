"""ECG-Bench (PULSE's benchmark, reused by GEM and ECG-R1) scored offline: the subsets, their answers read from
LLaVA-style JSONL, and two figures side by side for each, the published scorer's rules as written and the same rules
corrected (score.py): python -m ecgbench.score --bench NAME --data ROWS.json --answers ANSWERS.jsonl."""
