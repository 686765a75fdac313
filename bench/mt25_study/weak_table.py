"""The teacher-quality table of the MT25 study (issue 29): what weakened teachers cost the student, and what
the quality gate does about it, from the committed runs of ``ablations/weak_teachers/runs/``:

    python bench/mt25_study/weak_table.py bench/mt25_study/ablations/weak_teachers/runs/* \\
        --out bench/mt25_study/ablations/weak_teachers/results.md

Relative performance divides by each run's own teacher, which means nothing for a teacher that almost
never succeeds; the yardstick here is the full zoo's teacher of each task (``--zoo``, default the shipped
MT25 zoo). Per run: the teachers used for the weakened tasks (source, official success), their final
success, the other tasks' mean final success, ACC, forgetting and relative performance against the zoo,
task-free and with the task id.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from cpd_fast.metrics import RunResult, compute_metrics
from cpd_fast.teachers.zoo import zoo_records

WEAKENED = ("push-v3", "pick-place-v3", "door-open-v3")


def rows(paths: list[str], zoo: str) -> list[str]:
    _, records = zoo_records(zoo)
    out = []
    for path in paths:
        run = RunResult.load(path)
        with open(os.path.join(path, "pipeline", "teachers.json")) as f:
            used = json.load(f)["teachers"]
        yardstick = [records[t].success_rate for t in run.tasks]
        teachers = ", ".join(
            f"{t.split('-v3')[0]} {used[t]['source']} {used[t]['success_rate']:.2f}" for t in WEAKENED
        )
        modes = {
            run.extra["eval_mode"]: run.R,
            **{m: np.array(R, dtype=float) for m, R in run.extra["success_matrix_modes"].items()},
        }
        for mode, R in sorted(modes.items()):
            m = compute_metrics(R, yardstick, run.task_stage)
            final = dict(zip(run.tasks, R[-1], strict=True))
            weak = " / ".join(f"{final[t]:.2f}" for t in WEAKENED)
            others = np.mean([v for t, v in final.items() if t not in WEAKENED])
            name = os.path.basename(os.path.normpath(path)) + ("" if mode == "inferred" else " [task id]")
            out.append(f"| {name} | {teachers} | {weak} | {others:.2f} | {100 * m.acc:.1f} | "
                       f"{100 * m.mean_forgetting:.1f} | {100 * m.relative_performance:.1f} |")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--zoo", default="mt25", help="the yardstick teachers' zoo")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    text = "\n".join([
        "| run | teachers of push, pick-place, door-open (official success) | their final success "
        "| other 7 tasks | ACC (%) | forgetting (%) | relative to the zoo's teachers (%) |",
        "|---|---|---|---:|---:|---:|---:|",
        *rows(args.runs, args.zoo),
    ])  # fmt: skip
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
