"""Fidelity gate: does envpool's Meta-World behave like Meta-World's own envs, task by task?

envpool reimplements Meta-World v3 in C++, and it is not always faithful: Meta-World's scripted
expert solves ``dial-turn-v3`` in every episode under Meta-World's envs but in none under envpool
1.2.5. Teachers trained in a wrong simulator are useless, so before training we run each task's
scripted expert under both backends and pick, per task, the backend to train it with:

* envpool if the expert passes there (success >= ``pass_threshold``) — it is faster (``bench/env_steps.py``);
* gymnasium (Meta-World's envs) if it fails under envpool but passes under gymnasium, with a warning;
* envpool, flagged ``"unverified"``, if the expert fails under both (the gate cannot tell).

The report (:func:`save_report`) is read back where envs are built, by
:func:`cpd_fast.envs.collection_backends` (re-exported here, with :data:`~cpd_fast.envs.KNOWN_BAD_ENVPOOL`
and :func:`~cpd_fast.envs.load_backend_choices`).

CLI: ``cpd envs check [--suite mt25] [--tasks ...] [--episodes N] [--out FILE.json]``
(:mod:`cpd_fast.cli.envs`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from cpd_fast.envs import KNOWN_BAD_ENVPOOL, collection_backends, load_backend_choices
from cpd_fast.evaluation import evaluate_monitoring
from cpd_fast.runio import write_json_atomic
from cpd_fast.tasks import resolve_tasks
from cpd_fast.teachers.scripted import ScriptedExpert

__all__ = [
    "KNOWN_BAD_ENVPOOL",
    "FidelityRow",
    "backend_choices",
    "check_fidelity",
    "collection_backends",
    "format_table",
    "load_backend_choices",
    "save_report",
]

log = logging.getLogger(__name__)

DEFAULT_PASS_THRESHOLD = 0.8


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
