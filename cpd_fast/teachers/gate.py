"""Quality gate: every teacher is measured with Meta-World's official protocol before it is used.

A teacher whose official success (50 fixed goals, :func:`cpd_fast.evaluation.evaluate_official`) is below
``threshold`` (default 0.8) is *flagged*, and what happens next is configured, never implicit:

* ``retrain`` — train again with a larger budget (``retrain_factor`` x steps); if it still fails it
  stays flagged and is not used;
* ``scripted`` — replace it by Meta-World's scripted expert (itself measured and recorded);
* ``exclude`` — drop the task's teacher (downstream steps skip the task).

The verdicts go to ``teachers.json`` in the run directory (:func:`write_teachers_json`), one
:class:`TeacherRecord` per task with every attempt in ``history``; :func:`usable_teachers` is what later
stages read, and it returns only records with ``used`` true.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_THRESHOLD",
    "ON_FAIL",
    "TeacherRecord",
    "evaluate_teacher",
    "load_teachers_json",
    "passes",
    "usable_teachers",
    "write_teachers_json",
]

DEFAULT_THRESHOLD = 0.8
ON_FAIL = ("retrain", "scripted", "exclude")
TEACHERS_JSON = "teachers.json"


@dataclass
class TeacherRecord:
    """The gate's verdict on one task's teacher.

    Attributes:
        task: Meta-World task name.
        source: teacher source in use: ``"ppo"``, ``"scripted"`` or ``"checkpoint"``.
        path: checkpoint path (``None`` for scripted).
        success_rate: official success in [0, 1] of the teacher in ``source``/``path`` (None: not measured).
        protocol: ``"official"`` (50 goals) or ``"official-subset"`` (fewer goals, for quick runs only).
        passed: ``success_rate >= threshold``.
        status: ``"ok"`` (first teacher passed), ``"retrained"``, ``"replaced-by-scripted"``, ``"excluded"``
            or ``"failed"`` (still below the threshold after the configured remedy).
        used: whether downstream stages may use this teacher. False for excluded / failed teachers.
        flagged: True when any attempt fell below the threshold (kept even after a successful remedy).
        history: every attempt: ``{"source", "path", "success_rate", "total_steps", "wall_time_s", ...}``.
    """

    task: str
    source: str
    path: str | None
    success_rate: float | None
    protocol: str
    threshold: float
    passed: bool
    status: str
    used: bool
    flagged: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def passes(success_rate: float | None, threshold: float) -> bool:
    """The gate's rule: measured, and at least ``threshold``."""
    return success_rate is not None and success_rate >= threshold


def evaluate_teacher(teacher: Any, task: str, *, num_goals: int = 50, num_envs: int = 10) -> dict[str, Any]:
    """Official-protocol success of ``teacher.action_mean`` on ``task``: ``{"success_rate", "protocol"}``."""
    from cpd_fast.evaluation import evaluate_official

    result = evaluate_official(teacher.action_mean, task, num_envs=num_envs, num_goals=num_goals)
    return {
        "success_rate": result.success_rate,
        "protocol": result.protocol,
        "successes": result.successes.astype(int).tolist(),
    }


def write_teachers_json(
    run_dir: str | os.PathLike, records: dict[str, TeacherRecord], **settings: Any
) -> str:
    """Write ``run_dir/teachers.json`` (atomically): ``{"settings": ..., "teachers": {task: record}}``."""
    from cpd_fast.runio import write_json_atomic

    path = os.path.join(os.fspath(run_dir), TEACHERS_JSON)
    write_json_atomic(
        path, {"settings": settings, "teachers": {t: dataclasses.asdict(r) for t, r in records.items()}}
    )
    return path


def load_teachers_json(path: str | os.PathLike) -> dict[str, TeacherRecord]:
    """Read the records back; ``path`` is ``teachers.json`` or the run directory holding it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, TEACHERS_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no teachers.json at {path!r}; run `cpd teachers train` first")
    with open(path) as f:
        payload = json.load(f)
    known = {f.name for f in dataclasses.fields(TeacherRecord)}
    return {
        t: TeacherRecord(**{k: v for k, v in r.items() if k in known}) for t, r in payload["teachers"].items()
    }


def usable_teachers(path: str | os.PathLike) -> dict[str, TeacherRecord]:
    """Records that downstream stages may use (``used`` true), in file order."""
    return {t: r for t, r in load_teachers_json(path).items() if r.used}
