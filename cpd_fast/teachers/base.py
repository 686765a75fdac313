"""The one interface every teacher exposes, and a factory over the teacher sources.

A teacher is anything with ``action_mean(obs [B, 39]) -> [B, 4]``: batched, deterministic, float32, in
``[-1, 1]``. Collection (:mod:`cpd_fast.data`), the quality gate and distillation only use that method,
so the three sources are interchangeable:

* ``"ppo"`` — trained here by :func:`cpd_fast.teachers.ppo.train_ppo` (loaded from its ``policy.pt``);
* ``"scripted"`` — Meta-World's hand-written expert (:class:`cpd_fast.teachers.scripted.ScriptedExpert`);
* ``"checkpoint"`` — any saved ``policy.pt`` given by path
  (:class:`cpd_fast.teachers.checkpoint.CheckpointTeacher`);
* ``"zoo"`` — a shipped RL teacher (:mod:`cpd_fast.teachers.zoo`); ``path`` names the zoo (default
  ``"mt25"``) or its directory.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from cpd_fast.tasks import validate_task
from cpd_fast.teachers.checkpoint import CheckpointTeacher
from cpd_fast.teachers.scripted import ScriptedExpert
from cpd_fast.teachers.zoo import DEFAULT_ZOO, zoo_teacher

__all__ = ["TEACHER_SOURCES", "Teacher", "make_teacher"]

TEACHER_SOURCES = ("ppo", "scripted", "checkpoint", "zoo")


@runtime_checkable
class Teacher(Protocol):
    """Batched deterministic policy of one task."""

    task: str | None

    def action_mean(self, obs: np.ndarray) -> np.ndarray:
        """``obs`` ``[B, 39]`` float -> action means ``[B, 4]`` float32 in ``[-1, 1]``."""
        ...


def make_teacher(source: str, task: str, path: str | None = None, device: str = "cpu") -> Teacher:
    """A teacher for ``task`` from ``source``; ``"ppo"`` and ``"checkpoint"`` need ``path`` (a policy.pt),
    ``"zoo"`` takes the zoo's name or directory (default ``"mt25"``). The task name is checked here, once."""
    task = validate_task(task)
    if source == "zoo":
        return zoo_teacher(task, path or DEFAULT_ZOO, device=device)
    if source == "scripted":
        return ScriptedExpert(task)
    if source in ("ppo", "checkpoint"):
        if not path:
            raise ValueError(f"teacher source {source!r} needs the path of a policy checkpoint")
        return CheckpointTeacher(path, task=task, device=device)
    raise ValueError(f"unknown teacher source {source!r}; choose one of {', '.join(TEACHER_SOURCES)}")
