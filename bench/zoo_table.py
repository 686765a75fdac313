"""The teacher zoo's table (markdown) from its teachers.json: one row per Meta-World v3 task, in the order of
the ``mt50`` stream (MT25's five stages, then the other 25 tasks' five).

    python bench/zoo_table.py                       # writes bench/zoo_table.md (quoted in docs/teachers.md)
    python bench/zoo_table.py --zoo DIR --out -     # another zoo, to stdout

Every number is the zoo's own record: ``cpd teachers export`` measured the shipped file on the official 50
goals (the goal set the teacher was selected on: training stopped at the first measurement at or above the
bar), and ``cpd teachers eval --zoo metaworld-v3 --goal-seeds 1 2 3 --record`` measured it on three other
50-goal sets (``fresh_goals``, free of that selection). Tasks the zoo does not have yet are listed as
missing.
"""

from __future__ import annotations

import argparse
import os
import sys

from cpd_fast.tasks import MT25, stages
from cpd_fast.teachers.zoo import DEFAULT_ZOO, zoo_records

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = [
    "stage", "task", "algorithm", "env steps", "wall (train + measurements)",
    "official success (50 goals, selected on)", "fresh goals (3 × 50: mean; per set)",
    "measured at (M steps: success)",
]  # fmt: skip


def row(stage: int, task: str, r) -> list[str]:
    if r is None or not r.used:
        return [str(stage), task, "missing", *[""] * (len(COLUMNS) - 3)]
    h = r.history[-1]
    curve = ", ".join(f"{s / 1e6:.2f}: {v:.2f}" for s, v in h.get("curve", []))
    wall = f"{r.wall_time_s / 60:.1f} min" if r.wall_time_s else "-"
    fresh = "not measured"
    f = r.fresh_goals
    if f and f.get("sha256") == h.get("sha256"):
        fresh = f"{f['success_rate']:.2f}; " + " / ".join(f"{x:.2f}" for x in f["success_rates"])
    elif f:
        fresh = "stale (measured another file)"
    algorithm = f"{r.algorithm} (seed {h.get('seed', 0)})" + "".join(  # attempts below the gate before it
        f" after {a['algorithm']} {a['total_steps'] / 1e6:.2f}M: {a['success_rate']:.2f}"
        f" ({a['wall_time_s'] / 60:.0f} min)" for a in h.get("earlier_attempts", [])
    )  # fmt: skip
    return [
        str(stage), task, algorithm, f"{r.env_steps / 1e6:.2f}M", wall,
        f"**{r.success_rate:.2f}**", fresh, curve or "(not in the record; see bench/zoo_runs)",
    ]  # fmt: skip


def table(zoo: str) -> str:
    path, records = zoo_records(zoo)
    lines = [f"From `{os.path.relpath(path, os.path.dirname(HERE))}`:", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    have = fresh = 0
    for s, tasks in enumerate(stages("mt50", 5)):
        for task in tasks:
            r = records.get(task)
            lines.append("| " + " | ".join(row(s, task, r)) + " |")
            have += r is not None and r.used
            fresh += r is not None and r.used and r.fresh_goals is not None
    mt25 = sum(t in records and records[t].used for t in MT25)
    lines += ["", f"{have} of 50 Meta-World v3 tasks have a zoo teacher ({mt25} of MT25's 25); {fresh} "
              "measured on fresh goals."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=DEFAULT_ZOO)
    ap.add_argument("--out", default=os.path.join(HERE, "zoo_table.md"), help="file to write ('-': stdout)")
    args = ap.parse_args()
    text = table(args.zoo)
    if args.out == "-":
        sys.stdout.write(text)
        return
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("# The teacher zoo\n\n`python bench/zoo_table.py` (from the zoo's teachers.json).\n\n" + text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
