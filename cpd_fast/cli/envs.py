"""``cpd envs check``: scripted experts under envpool and Meta-World's envs, a backend per task
(:mod:`cpd_fast.fidelity`)."""

from __future__ import annotations

import argparse
import logging
import time

from cpd_fast.cli.checks import fraction, positive_int, seed
from cpd_fast.fidelity import DEFAULT_PASS_THRESHOLD, check_fidelity, format_table, save_report
from cpd_fast.tasks import resolve_tasks

__all__ = ["add_cli"]


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cpd envs check`` on the top-level ``cpd`` subparsers."""
    envs = subparsers.add_parser("envs", help="environment utilities (fidelity check)")
    envs_sub = envs.add_subparsers(dest="envs_command", metavar="ENVS_COMMAND", required=True)
    check = envs_sub.add_parser(
        "check",
        help="run scripted experts under envpool and Meta-World's envs; pick a backend per task",
        description="Runs each task's scripted Meta-World expert under both env backends, prints success "
        "side by side and the backend chosen per task (gymnasium where envpool is unfaithful).",
    )
    check.add_argument("--suite", default="mt25", help="task suite: mt10, mt25, mt50, cw10 (default mt25)")
    check.add_argument("--tasks", nargs="+", default=None, help="explicit -v3 task names (override --suite)")
    check.add_argument(
        "--episodes", type=positive_int, default=8, help="episodes per task and backend (default 8)"
    )
    check.add_argument(
        "--num-envs", type=positive_int, default=8, help="episodes run side by side (default 8)"
    )
    check.add_argument("--seed", type=seed, default=0)
    check.add_argument(
        "--threshold", type=fraction, default=DEFAULT_PASS_THRESHOLD, help="success rate counted as a pass"
    )
    check.add_argument("--out", default=None, help="write the results as JSON here")
    check.set_defaults(func=_cli_check)


def _cli_check(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    task_list = resolve_tasks(args.tasks if args.tasks else args.suite)  # errors: one line (cli.main)
    print(f"fidelity check: {len(task_list)} tasks, {args.episodes} episodes per task and backend")
    print(format_table([]).splitlines()[0])  # the header; check_fidelity prints each task's row
    rows = check_fidelity(
        task_list,
        episodes=args.episodes,
        num_envs=args.num_envs,
        seed=args.seed,
        pass_threshold=args.threshold,
        progress=True,
    )
    print()
    print(format_table(rows))
    switched = [r.task for r in rows if r.backend == "gymnasium"]
    print(
        f"\n{len(rows) - len(switched)} tasks on envpool, {len(switched)} on gymnasium:",
        ", ".join(switched) or "-",
    )
    if args.out:
        save_report(
            rows,
            args.out,
            tasks=task_list,
            episodes=args.episodes,
            num_envs=args.num_envs,
            seed=args.seed,
            threshold=args.threshold,
            date=time.strftime("%Y-%m-%d"),
        )
        print(f"wrote {args.out}")
    return 0
