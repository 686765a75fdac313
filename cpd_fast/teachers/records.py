"""The quality gate's records: :class:`TeacherRecord`, ``teachers.json``, the pass rule and the measurement.

What a verdict is made of, below every teacher source: the gate's policy (:mod:`cpd_fast.teachers.gate`)
and the teacher zoos (:mod:`cpd_fast.teachers.zoo`, whose ``teachers.json`` has this format) both build on
it. A teacher is measured with Meta-World's official protocol (:func:`evaluate_teacher`: the 50 fixed goals
of :func:`cpd_fast.evaluation.evaluate_official`, or fewer for quick runs) and passes at ``threshold``
(:func:`passes`; :func:`bar` for demonstration-augmented teachers).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from cpd_fast.evaluation import evaluate_official
from cpd_fast.runio import write_json_atomic

__all__ = [
    "TEACHERS_JSON",
    "TeacherRecord",
    "bar",
    "evaluate_teacher",
    "load_teachers_json",
    "passes",
    "read_teachers_json",
    "records_of",
    "usable_teachers",
    "write_teachers_json",
]

TEACHERS_JSON = "teachers.json"


@dataclass
class TeacherRecord:
    """The gate's verdict on one task's teacher.

    Attributes:
        task: Meta-World task name.
        source: teacher source in use: ``"ppo"``, ``"scripted"``, ``"checkpoint"`` or ``"zoo"``.
        path: checkpoint path (``None`` for scripted; for ``"zoo"`` the zoo's name or directory in a run's
            record, the policy file in the zoo's own).
        success_rate: official success in [0, 1] of the teacher in ``source``/``path`` (None: not measured).
        protocol: ``"official"`` (50 goals) or ``"official-subset"`` (fewer goals, for quick runs only).
        passed: ``success_rate >= threshold``.
        status: ``"ok"`` (first teacher passed), ``"retrained"``, ``"retrained-with-demos"``,
            ``"replaced-by-scripted"``, ``"excluded"`` or ``"failed"`` (still below the threshold after the
            configured remedy).
        used: whether downstream stages may use this teacher. False for excluded / failed teachers.
        flagged: True when any attempt fell below the threshold (kept even after a successful remedy).
        history: every attempt: ``{"source", "path", "success_rate", "total_steps", "wall_time_s", ...}``.
        algorithm: what made the teacher in use: ``"ppo"``, ``"ppo+demos"`` or ``"scripted"``.
        env_steps / wall_time_s: its training cost (env steps incl. demonstrations and warm-up; seconds).
        acts_as: the task whose policy acts for this task (None: its own). Set where tasks a task-free
            student cannot tell apart get one behaviour, their group's best (:func:`cpd_fast.teachers.zoo.
            add_behaviour`); written to ``teachers.json`` only when set.
        fresh_goals: the teacher's success on goal sets it was not selected on (a teacher stopped at its
            first measurement ≥ the bar on the official 50 goals reads high there): ``{"goal_seeds",
            "success_rates", "success_rate" (their mean), "goals", "sha256", "date"}``
            (:func:`cpd_fast.teachers.zoo.measure_fresh_goals`); written only when set.
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
    algorithm: str | None = None
    env_steps: int | None = None
    wall_time_s: float | None = None
    acts_as: str | None = None
    fresh_goals: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as ``teachers.json`` holds it (``acts_as`` / ``fresh_goals`` only when set: files stay
        as they were)."""
        d = dataclasses.asdict(self)
        for key in ("acts_as", "fresh_goals"):
            if d[key] is None:
                del d[key]
        return d


def passes(success_rate: float | None, threshold: float) -> bool:
    """The gate's rule: measured, and at least ``threshold``."""
    return success_rate is not None and success_rate >= threshold


def bar(summary: dict[str, Any], threshold: float) -> float:
    """The success a measured teacher must reach: ``threshold``, or for a demonstration-augmented teacher
    the scripted expert's own official success when that is lower (``summary["scripted_success"]``)."""
    expert = summary.get("scripted_success")
    return threshold if expert is None else min(threshold, float(expert))


def evaluate_teacher(
    teacher: Any, task: str, *, num_goals: int = 50, num_envs: int = 10, goal_seed: int = 0
) -> dict[str, Any]:
    """Official-protocol success of ``teacher.action_mean`` on ``task``: ``{"success_rate", "protocol",
    "successes"}`` (``successes``: 0/1 per goal). ``goal_seed`` picks the 50-goal set (0: the official one,
    the set teachers are selected on)."""
    result = evaluate_official(
        teacher.action_mean, task, num_envs=num_envs, num_goals=num_goals, goal_seed=goal_seed
    )
    return {
        "success_rate": result.success_rate,
        "protocol": result.protocol,
        "successes": result.successes.astype(int).tolist(),
    }


def write_teachers_json(
    run_dir: str | os.PathLike, records: dict[str, TeacherRecord], **settings: Any
) -> str:
    """Write ``run_dir/teachers.json`` (atomically): ``{"settings": ..., "teachers": {task: record}}``."""
    path = os.path.join(os.fspath(run_dir), TEACHERS_JSON)
    write_json_atomic(path, {"settings": settings, "teachers": {t: r.to_json() for t, r in records.items()}})
    return path


def read_teachers_json(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(path of teachers.json, its payload)``; ``path`` is the file or the run directory holding it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, TEACHERS_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no teachers.json at {path!r}; run `cpd teachers train` first")
    with open(path) as f:
        return path, json.load(f)


def records_of(payload: dict[str, Any]) -> dict[str, TeacherRecord]:
    """The records of a ``teachers.json`` payload (keys this version does not know are ignored)."""
    known = {f.name for f in dataclasses.fields(TeacherRecord)}
    return {
        t: TeacherRecord(**{k: v for k, v in r.items() if k in known}) for t, r in payload["teachers"].items()
    }


def load_teachers_json(path: str | os.PathLike) -> dict[str, TeacherRecord]:
    """Read the records back; ``path`` is ``teachers.json`` or the run directory holding it."""
    return records_of(read_teachers_json(path)[1])


def usable_teachers(path: str | os.PathLike) -> dict[str, TeacherRecord]:
    """Records that downstream stages may use (``used`` true), in file order."""
    return {t: r for t, r in load_teachers_json(path).items() if r.used}
