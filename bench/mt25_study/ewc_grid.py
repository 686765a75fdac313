"""The EWC / online-EWC tuning grid of the MT25 study (issue 29): MT25's first two stages (10 tasks), the
zoo's RL teachers, seed 0, the study's settings (bf16, default budget, both evaluation modes), one run per
grid point on one shared set of teacher data:

    python bench/mt25_study/ewc_grid.py --out runs/ewc_grid        # resumable: finished points are skipped
    cpd report runs/ewc_grid/runs/* --out bench/mt25_study/ewc_grid

EWC: lambda in {1, 10, 1e2, 1e3, 1e4, 1e5}; online EWC: the same lambdas x gamma in {0.9, 0.99}. The
chosen values (best task-free relative performance; ties: less forgetting) go to the mt25-study preset's
``per_method``.
"""

from __future__ import annotations

import argparse
import os

from cpd_fast.distill.config import DistillConfig
from cpd_fast.distill.run import run_distill
from cpd_fast.fidelity import check_fidelity, save_report
from cpd_fast.tasks import SUITES

LAMBDAS = (1.0, 10.0, 1e2, 1e3, 1e4, 1e5)
GAMMAS = (0.9, 0.99)


def grid() -> list[tuple[str, dict]]:
    """``(name, DistillConfig fields)`` of every grid point, EWC first."""
    points = [(f"ewc-l{lam:g}", {"method": "ewc", "ewc_lambda": lam}) for lam in LAMBDAS]
    points += [
        (f"online-ewc-l{lam:g}-g{g:g}", {"method": "online-ewc", "ewc_lambda": lam, "ewc_gamma": g})
        for lam in LAMBDAS
        for g in GAMMAS
    ]
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", default=None, help="grid point names to run (default: all)")
    args = ap.parse_args()
    tasks = list(SUITES["mt25"][:10])
    fidelity = os.path.join(args.out, "fidelity.json")
    if not os.path.isfile(fidelity):  # the env backend of each task, measured once for the whole grid
        save_report(check_fidelity(tasks, seed=args.seed), fidelity, episodes=8, seed=args.seed)
    for name, fields in grid():
        if args.only and name not in args.only:
            continue
        cfg = DistillConfig(
            suite="mt25", tasks=tasks, tasks_per_stage=5, teachers="zoo", fidelity=fidelity, seed=args.seed,
            precision="bf16", data_dir=os.path.join(args.out, "data"), progress=False, **fields,
        )  # fmt: skip
        run_distill(cfg, os.path.join(args.out, "runs", name))


if __name__ == "__main__":
    main()
