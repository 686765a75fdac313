"""Fidelity gate: does envpool's Meta-World behave like Meta-World's own envs, task by task?

envpool reimplements Meta-World v3 in C++, and it is not always faithful: Meta-World's scripted
expert solves ``dial-turn-v3`` in every episode under Meta-World's envs but in none under envpool
1.2.5. Teachers trained in a wrong simulator are useless, so before training we run each task's
scripted expert under both backends and pick, per task, the backend to train it with:

* envpool if the expert passes there (success >= ``pass_threshold``) — it is several times faster;
* gymnasium (Meta-World's envs) if it fails under envpool but passes under gymnasium, with a warning;
* envpool, flagged ``"unverified"``, if the expert fails under both (the gate cannot tell).

CLI: ``cpd envs check [--suite mt25] [--tasks ...] [--episodes N] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from cpd_fast.runio import write_json_atomic
from cpd_fast.tasks import resolve_tasks

__all__ = [
    "KNOWN_BAD_ENVPOOL",
    "FidelityRow",
    "add_cli",
    "backend_choices",
    "check_fidelity",
    "collection_backends",
    "format_table",
    "load_backend_choices",
    "save_report",
]

log = logging.getLogger(__name__)

DEFAULT_PASS_THRESHOLD = 0.8
# Tasks whose scripted expert fails under envpool 1.2.5 (DESIGN.md §3): collect them with gymnasium when no
# fidelity report was made.
KNOWN_BAD_ENVPOOL = {"dial-turn-v3": "gymnasium"}


@dataclass
class FidelityRow:
    """One task's result. Success rates are fractions of ``episodes`` in [0, 1]."""

    task: str
    envpool_success: float
    gymnasium_success: float
    episodes: int
    backend: str  # chosen backend: "envpool" or "gymnasium"
    status: str  # "ok", "envpool-mismatch" (fell back to gymnasium) or "unverified" (expert fails on both)


def _choose(task: str, envpool_rate: float, gym_rate: float, threshold: float) -> tuple[str, str]:
    if envpool_rate >= threshold:
        return "envpool", "ok"
    if gym_rate >= threshold:
        log.warning(
            "%s: scripted expert succeeds %.0f%% under envpool but %.0f%% under Meta-World's envs; "
            "using the gymnasium backend for this task",
            task,
            100 * envpool_rate,
            100 * gym_rate,
        )
        return "gymnasium", "envpool-mismatch"
    log.warning(
        "%s: scripted expert fails under both backends (envpool %.0f%%, gymnasium %.0f%%); "
        "keeping envpool, fidelity unverified",
        task,
        100 * envpool_rate,
        100 * gym_rate,
    )
    return "envpool", "unverified"


def check_fidelity(
    tasks: str | list[str] = "mt25",
    *,
    episodes: int = 8,
    num_envs: int = 8,
    seed: int = 0,
    pass_threshold: float = DEFAULT_PASS_THRESHOLD,
    progress: bool = False,
) -> list[FidelityRow]:
    """Run each task's scripted expert for ``episodes`` random-goal episodes under both backends.

    Args:
        tasks: a suite name or a list of task names (see :func:`cpd_fast.tasks.resolve_tasks`).
        episodes: episodes per task and backend.
        num_envs: episodes run side by side.
        seed: env seed (same for both backends; their goal draws still differ).
        pass_threshold: success rate at or above which the expert "passes" a backend.
        progress: print one line per task as it finishes.

    Returns:
        one :class:`FidelityRow` per task, in suite order.
    """
    from cpd_fast.evaluation import evaluate_monitoring
    from cpd_fast.teachers.scripted import ScriptedExpert

    if episodes <= 0:
        raise ValueError(f"episodes must be positive, got {episodes}")
    rows = []
    for task in resolve_tasks(tasks):
        expert = ScriptedExpert(task)
        t0 = time.perf_counter()
        rates = {
            backend: evaluate_monitoring(
                expert.action_mean, task, num_episodes=episodes, num_envs=num_envs, backend=backend, seed=seed
            ).success_rate
            for backend in ("envpool", "gymnasium")
        }
        backend, status = _choose(task, rates["envpool"], rates["gymnasium"], pass_threshold)
        rows.append(FidelityRow(task, rates["envpool"], rates["gymnasium"], episodes, backend, status))
        if progress:
            print(f"  {format_row(rows[-1])}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return rows


def _header() -> str:
    return f"| {'task':<30} | envpool | gymnasium | backend   | status           |"


def format_row(row: FidelityRow) -> str:
    return (
        f"| {row.task:<30} | {row.envpool_success:7.2f} | {row.gymnasium_success:9.2f} | "
        f"{row.backend:<9} | {row.status:<16} |"
    )


def format_table(rows: list[FidelityRow]) -> str:
    """A markdown table: task, envpool success, gymnasium success, chosen backend, status."""
    lines = [
        _header(),
        "|--------------------------------|---------|-----------|-----------|------------------|",
    ]
    lines += [format_row(r) for r in rows]
    return "\n".join(lines)


def backend_choices(rows: list[FidelityRow]) -> dict[str, str]:
    """``{task: backend}`` from a fidelity check."""
    return {r.task: r.backend for r in rows}


def save_report(rows: list[FidelityRow], path: str, **settings: object) -> None:
    """Write ``{"settings": ..., "rows": [...], "backend": {task: backend}}`` as JSON (atomically)."""
    write_json_atomic(
        path,
        {"settings": settings, "rows": [asdict(r) for r in rows], "backend": backend_choices(rows)},
    )


def load_backend_choices(path: str) -> dict[str, str]:
    """Read ``{task: backend}`` back from a report written by :func:`save_report` / ``cpd envs check``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no fidelity report at {path!r}; write one with `cpd envs check --out FILE`")
    with open(path) as f:
        try:
            payload = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path!r} is not JSON ({err}); re-run `cpd envs check --out {path}`") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("backend"), dict):
        raise ValueError(f"{path!r} is not a `cpd envs check` report (no 'backend' table)")
    return dict(payload["backend"])


def collection_backends(report: str | None, teachers: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``{task: backend}`` for collection and training: from a fidelity report, else the known mismatches
    (:data:`KNOWN_BAD_ENVPOOL`); tasks not listed use envpool.

    A trained teacher in ``teachers`` (``{task: teacher}``) collects in the simulator it was trained in (its
    ``trained_in``), whatever the report says: a policy can lean on details of a simulator that the scripted
    expert the report runs does not (measured: a lever-pull-v3 policy trained under envpool succeeds in 10
    of 30 episodes there and in none under Meta-World's envs, where the scripted expert passes both).
    """
    backends = load_backend_choices(report) if report else dict(KNOWN_BAD_ENVPOOL)
    for task, teacher in (teachers or {}).items():
        trained_in = getattr(teacher, "trained_in", None)
        if trained_in is not None:
            backends[task] = trained_in
    return backends


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cpd envs check`` on the top-level ``cpd`` subparsers."""
    from cpd_fast.errors import fraction, positive_int, seed

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
    print(_header())
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
