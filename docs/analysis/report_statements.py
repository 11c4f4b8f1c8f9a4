"""
report_statements.py — which statements a model's reports get right: statement F1 one statement at a time, over the
report rows of one or more runs' test_predictions.jsonl (the same test rows), side by side. An analysis behind
docs/RESULTS.md (issue 29), not part of the library: the run's table gives the micro F1 over all statements only, and
a few statements read at F1 0 hide behind the common ones.

    python -m docs.analysis.report_statements runs/a/test_predictions.jsonl [runs/b/test_predictions.jsonl ...]
"""
import argparse
import json

from data import STATEMENTS
from eval import statement_counts


def per_statement(path, task="report"):
    """{statement: (reference count, F1)} over the `task` rows of one predictions file, and the row count."""
    with open(path) as f:
        rows = [r for r in map(json.loads, f) if r["task"] == task]
    counts = statement_counts([r["prediction"] for r in rows], [r["answer"] for r in rows])
    return {s: (tp + fn, 2 * tp / max(1, 2 * tp + fp + fn)) for s, (tp, fp, fn) in counts.items()}, len(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("predictions", nargs="+", help="test_predictions.jsonl files of runs on the same test split")
    p.add_argument("--task", default="report")
    args = p.parse_args(argv)
    runs = [per_statement(path, args.task) for path in args.predictions]
    print(f"{args.task} rows: {', '.join(str(n) for _, n in runs)}; F1 per statement, one column per file")
    print(f"| statement | in the references | {' | '.join(args.predictions)} |")
    print("|---|---|" + "---|" * len(runs))
    for s in sorted(STATEMENTS, key=lambda s: -runs[0][0][s][0]):
        if runs[0][0][s][0]:
            print(f"| {s} | {runs[0][0][s][0]} | {' | '.join(f'{table[s][1]:.2f}' for table, _ in runs)} |")


if __name__ == "__main__":
    main()
