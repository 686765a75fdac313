"""The teacher zoo's gate table (markdown) from its teachers.json: one row per MT25 task, in stage order.

    python bench/zoo_table.py [--zoo mt25]

Every number is the zoo's own record (``cpd teachers export`` measured the shipped file on the official
50 goals); tasks the zoo does not have yet are listed as missing. Re-measure with
``cpd teachers eval --zoo mt25``.
"""

from __future__ import annotations

import argparse

from cpd_fast.tasks import MT25
from cpd_fast.teachers.zoo import zoo_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="mt25")
    args = ap.parse_args()
    path, records = zoo_records(args.zoo)
    print(f"From `{path}`:\n")
    cols = ["stage", "task", "algorithm", "env steps", "wall (train + measurements)",
            "official success (50 goals)", "measured at (M steps: success)"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|---|---|---|---|---|---|---|")
    have = 0
    for i, task in enumerate(MT25):
        r = records.get(task)
        if r is None or not r.used:
            print(f"| {i // 5} | {task} | missing | | | | |")
            continue
        have += 1
        h = r.history[-1]
        curve = ", ".join(f"{s / 1e6:.2f}: {v:.2f}" for s, v in h.get("curve", []))
        curve = curve or "(not in the record; see bench/zoo_runs)"
        wall = f"{r.wall_time_s / 60:.1f} min" if r.wall_time_s else "-"
        algo = f"{r.algorithm} (seed {h.get('seed', 0)})"
        row = [str(i // 5), task, algo, f"{r.env_steps / 1e6:.2f}M", wall, f"**{r.success_rate:.2f}**", curve]
        print("| " + " | ".join(row) + " |")
    print(f"\n{have} of {len(MT25)} MT25 tasks have a zoo teacher.")


if __name__ == "__main__":
    main()
