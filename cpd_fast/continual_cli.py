"""``cpd distill``: one continual-distillation run (see :mod:`cpd_fast.continual`).

Register it on the top-level parser with ``add_cli(sub)`` (``from cpd_fast.continual_cli import add_cli``).
"""

from __future__ import annotations

import argparse
import os

__all__ = ["add_cli"]


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cpd distill`` on the top-level ``cpd`` subparsers."""
    from cpd_fast.continual import EVAL_MODES, METHODS, DistillConfig
    from cpd_fast.errors import finite_float, fraction, nonnegative_float, positive_float, positive_int, seed

    d = DistillConfig()
    p = subparsers.add_parser(
        "distill",
        help="continual distillation of teachers into one student, stage by stage",
        description="Collects teacher data, trains the student stage by stage with METHOD, evaluates every "
        "seen task after each stage (Meta-World's official protocol) and writes RUN_DIR/results.json. A "
        "killed run resumes from its last finished phase when re-run with the same arguments.",
    )
    p.add_argument("--suite", default=d.suite, help="mt10 | mt25 | mt50 | cw10 (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=None, help="explicit task list (overrides --suite's tasks)")
    p.add_argument("--tasks-per-stage", type=positive_int, default=None, help="default 5 (2 with --tasks)")
    p.add_argument(
        "--teachers", default="scripted", help="'scripted' or a teachers RUN_DIR with teachers.json"
    )
    p.add_argument("--fidelity", default=None, help="`cpd envs check` JSON choosing each task's data backend")
    p.add_argument("--method", default="cpd", choices=METHODS)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--budget", type=positive_float, default=1.0, help="scales the optimizer steps per stage")
    p.add_argument(
        "--steps-per-stage", type=positive_int, default=d.steps_per_stage, help="before --budget scaling"
    )
    p.add_argument(
        "--data-dir", default=None,
        help="teacher datasets directory shared between runs (default RUN_DIR/datasets); a task's data is "
        "reused when its collection settings match",
    )  # fmt: skip
    p.add_argument(
        "--episodes", type=positive_int, default=d.episodes_per_task, help="teacher episodes per task"
    )
    p.add_argument(
        "--noise-std", type=nonnegative_float, default=d.noise_std, help="exploration noise of the data"
    )
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--lr", type=positive_float, default=d.lr)
    p.add_argument(
        "--eval-modes", nargs="+", choices=EVAL_MODES, default=list(d.eval_modes),
        help="evaluation modes, the first one is the main matrix: inferred (no task id) and/or prototype "
        "(the task id selects its prototype embedding) (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--eval-goals", type=positive_int, default=d.eval_goals, help="official goals per evaluation (50)"
    )
    p.add_argument("--eval-envs", type=positive_int, default=d.eval_envs)
    p.add_argument("--replay-fraction", type=positive_float, default=d.replay_fraction)
    p.add_argument("--replay-selection", choices=("dpp", "uniform"), default=None,
                   help="default: dpp for cpd/static-moe, uniform for replay")  # fmt: skip
    p.add_argument(
        "--no-freeze-shared", action="store_true", help="ablation: keep the shared layers trainable"
    )
    p.add_argument("--no-phase2", action="store_true", help="ablation: skip Phase 2 (all steps in Phase 1)")
    p.add_argument("--gate-bias", type=finite_float, default=d.gate_bias, help="gate bias of new experts")
    p.add_argument(
        "--no-route-new-experts", action="store_true",
        help="ablation: Phase 1 routes by top-k only (newborn experts may never be routed)",
    )  # fmt: skip
    p.add_argument("--ewc-lambda", type=nonnegative_float, default=d.ewc_lambda)
    p.add_argument("--ewc-gamma", type=fraction, default=d.ewc_gamma, help="online-EWC decay")
    p.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads (default 1: fastest on a busy CPU)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--ddp", action="store_true",
        help="data-parallel training over the processes torchrun starts (automatic under torchrun): "
        "torchrun --nproc-per-node N -m cpd_fast.cli distill ... --ddp (docs/scale.md)",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.set_defaults(func=_cli_distill)


def _cli_distill(args: argparse.Namespace) -> int:
    # bad values raise ValueError/FileNotFoundError: cpd_fast.cli.main prints them as one line (exit 2)
    from cpd_fast.continual import DistillConfig, run_distill

    tps = args.tasks_per_stage or (2 if args.tasks else 5)
    cfg = DistillConfig(
        suite=args.suite, tasks=args.tasks, tasks_per_stage=tps, method=args.method,
        teachers=args.teachers, fidelity=args.fidelity, seed=args.seed, device=args.device,
        budget=args.budget, data_dir=args.data_dir,
        steps_per_stage=args.steps_per_stage, episodes_per_task=args.episodes, noise_std=args.noise_std,
        batch_size=args.batch_size, lr=args.lr, eval_goals=args.eval_goals, eval_envs=args.eval_envs,
        eval_modes=tuple(args.eval_modes),
        replay_fraction=args.replay_fraction, replay_selection=args.replay_selection,
        freeze_shared=not args.no_freeze_shared, phase2=not args.no_phase2, gate_bias=args.gate_bias,
        route_new_experts=not args.no_route_new_experts,
        ewc_lambda=args.ewc_lambda, ewc_gamma=args.ewc_gamma, threads=args.threads,
        progress=not args.no_progress,
    )  # fmt: skip
    result = run_distill(cfg, args.out, data_parallel=True if args.ddp else None)
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel: rank 0 reports
        return 0
    m = result.metrics()
    print(f"{args.out}/results.json: ACC {m.acc:.3f}  BWT {m.bwt:.3f}  relative {m.relative_performance:.3f}")
    return 0
