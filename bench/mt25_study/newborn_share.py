"""The cold-start gate bias at work (the paper's Mechanism 2; issue 29's gate-bias ablation): how much of the
new and of the old tasks' expert routing goes to the experts born in each stage, at their birth, after
Phase 1 and at the end of the stage, for each run given:

    python bench/mt25_study/newborn_share.py bench/mt25_study/runs/gate_bias_* [--out FILE.md]

Reads each run's ``results.json`` (``cpd_fast.distill.stats.newborn_shares``); runs made before the
within-stage record existed give their end-of-stage rows only.
"""

from __future__ import annotations

import argparse
import os

from cpd_fast.distill.stats import newborn_shares
from cpd_fast.metrics import RunResult


def table(paths: list[str]) -> str:
    """Markdown: run | gate bias | stage | moment | share of the new tasks' / old tasks' routing (%)."""
    lines = [
        "| run | gate bias | stage | moment | new tasks → newborn experts (%) "
        "| old tasks → newborn experts (%) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for path in paths:
        run = RunResult.load(path)
        bias = run.extra.get("config", {}).get("gate_bias", "?")
        for row in newborn_shares(run):
            lines.append(
                f"| {os.path.basename(os.path.normpath(path))} | {bias} | {row['stage']} | {row['moment']} "
                f"| {100 * row['new_tasks']:.1f} | {100 * row['old_tasks']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (or results.json files)")
    ap.add_argument("--out", default=None, help="write the table here too")
    args = ap.parse_args()
    text = table(args.runs)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
