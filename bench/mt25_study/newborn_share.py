"""The cold-start gate bias at work (the paper's Mechanism 2; issue 29's gate-bias ablation): how much of the
new and of the old tasks' expert routing goes to the experts born in each stage, at their birth, after
Phase 1 and at the end of the stage, for each run given:

    python bench/mt25_study/newborn_share.py bench/mt25_study/ablations/gate_bias/* [--per-stage] [--out F]

One row per run (the means over stages 1.. of each moment), or with ``--per-stage`` one row per stage and
moment.
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


def summary(paths: list[str]) -> str:
    """Markdown, one row per run: the newborn experts' mean share over stages 1.. at birth, after Phase 1
    and at the stage's end, on the new and the old tasks, beside the run's task-free relative performance
    and forgetting."""
    lines = [
        "| run | gate bias | new → newborn: birth / Phase 1 / end (%) "
        "| old → newborn: birth / Phase 1 / end (%) | relative performance (%) | forgetting (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for path in paths:
        run = RunResult.load(path)
        rows = newborn_shares(run)
        cells = []
        for key in ("new_tasks", "old_tasks"):
            means = []
            for moment in ("birth", "phase1", "end"):
                v = [r[key] for r in rows if r["moment"] == moment]
                means.append(f"{100 * sum(v) / len(v):.1f}" if v else "–")
            cells.append(" / ".join(means))
        m, name = run.metrics(), os.path.basename(os.path.normpath(path))
        bias = run.extra.get("config", {}).get("gate_bias", "?")
        rel, forget = 100 * m.relative_performance, 100 * m.mean_forgetting
        lines.append(f"| {name} | {bias} | {cells[0]} | {cells[1]} | {rel:.1f} | {forget:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (or results.json files)")
    ap.add_argument("--out", default=None, help="write the table here too")
    ap.add_argument("--per-stage", action="store_true", help="one row per stage and moment")
    args = ap.parse_args()
    text = table(args.runs) if args.per_stage else summary(args.runs)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
