"""The EWC / online-EWC tuning grids of the MT25 study (issue 29): the zoo's RL teachers, seed 0, the study's
settings (bf16, default budget, both evaluation modes), one shared set of teacher data:

    python bench/mt25_study/ewc_grid.py --out runs/ewc_grid              # resumable: finished points skip
    cpd report runs/ewc_grid/lambda/* --out bench/mt25_study/ewc_grid/lambda
    cpd report runs/ewc_grid/gamma/* --out bench/mt25_study/ewc_grid/gamma

* **λ** on MT25's first two stages (10 tasks): λ ∈ {1, 10, 1e2, 1e3, 1e4, 1e5}. On two stages online EWC
  computes exactly what EWC does — its one consolidated term after stage 0 is EWC's, and γ first scales
  an old Fisher at the second consolidation, after the last stage — so this grid serves both.
* **γ** of online EWC on the first three stages (15 tasks), where it acts in stage 2: γ ∈ {0.9, 0.99} at
  the two best λ of the first grid (best task-free relative performance; ties: less forgetting).

Points share what they compute alike (:mod:`cpd_fast.distill.fork`, tested bit for bit): stage 0 (no
penalty yet) is run once per grid and every other point starts from it. Not more: γ scales the old Fisher
in the consolidation at the end of stage 1, which the stage-1 checkpoint holds, so a γ point forked from
another γ's first two stages would train stage 2 with the other γ's penalty (that happened once: the
γ = 0.99 point forked so was bit-identical to γ = 0.9 and was discarded). Each run's ``fork.json`` says
where its first stages came from.
"""

from __future__ import annotations

import argparse
import os

from cpd_fast.distill.config import DistillConfig
from cpd_fast.distill.fork import fork_stages
from cpd_fast.distill.run import run_distill
from cpd_fast.fidelity import check_fidelity, save_report
from cpd_fast.metrics import RunResult
from cpd_fast.tasks import SUITES

LAMBDAS = (1.0, 10.0, 1e2, 1e3, 1e4, 1e5)
GAMMAS = (0.9, 0.99)


def config(out: str, n_tasks: int, **fields) -> DistillConfig:
    return DistillConfig(
        suite="mt25", tasks=list(SUITES["mt25"][:n_tasks]), tasks_per_stage=5, teachers="zoo",
        fidelity=os.path.join(out, "fidelity.json"), seed=0, precision="bf16",
        data_dir=os.path.join(out, "data"), progress=False, threads=1, eval_workers=1, **fields,
    )  # fmt: skip


def run_point(cfg: DistillConfig, run_dir: str, base: str | None, stages: int, differ: list[str]) -> None:
    """Run one grid point, forked from ``base``'s first ``stages`` stages when it is a new run."""
    if base is not None and not os.path.isfile(os.path.join(run_dir, "config.json")):
        fork_stages(base, cfg, run_dir, stages=stages, differ=differ)
    run_distill(cfg, run_dir)


def lambda_grid(out: str) -> list[str]:
    dirs = []
    for lam in LAMBDAS:
        d = os.path.join(out, "lambda", f"ewc-l{lam:g}")
        base = dirs[0] if dirs else None
        run_point(config(out, 10, method="ewc", ewc_lambda=lam), d, base, 1, ["ewc_lambda"])
        dirs.append(d)
    return dirs


def best(dirs: list[str], n: int) -> list[float]:
    """The ``n`` best λ: task-free relative performance, then less forgetting."""

    def key(run: RunResult) -> tuple[float, float]:
        m = run.metrics()
        return -m.relative_performance, m.mean_forgetting

    runs = sorted((RunResult.load(d) for d in dirs), key=key)
    return [r.extra["config"]["ewc_lambda"] for r in runs[:n]]


def gamma_grid(out: str, lambdas: list[float]) -> None:
    first = None
    for lam in lambdas:
        for gamma in GAMMAS:
            d = os.path.join(out, "gamma", f"online-ewc-l{lam:g}-g{gamma:g}")
            cfg = config(out, 15, method="online-ewc", ewc_lambda=lam, ewc_gamma=gamma)
            # stage 0 is every point's (no penalty before it); γ acts in the consolidation that ends stage 1
            run_point(cfg, d, first, 1, ["ewc_lambda", "ewc_gamma"])
            first = first or d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lambdas", type=float, nargs="+", default=None, help="γ grid's λ (default: the 2 best)")
    args = ap.parse_args()
    fidelity = os.path.join(args.out, "fidelity.json")
    if not os.path.isfile(fidelity):  # the env backend of each task, measured once for both grids
        tasks = list(SUITES["mt25"][:15])
        save_report(check_fidelity(tasks, seed=0), fidelity, episodes=8, seed=0)
    dirs = lambda_grid(args.out)
    lambdas = args.lambdas or best(dirs, 2)
    print(f"gamma grid at lambda {lambdas}")
    gamma_grid(args.out, lambdas)


if __name__ == "__main__":
    main()
