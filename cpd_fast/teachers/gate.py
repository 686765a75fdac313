"""Quality gate: every teacher is measured with Meta-World's official protocol before it is used.

A teacher whose official success (50 fixed goals, :func:`cpd_fast.evaluation.evaluate_official`) is below
``threshold`` (default 0.8) is *flagged*, and what happens next is configured, never implicit:

* ``retrain`` — train again with a larger budget (``retrain_factor`` x steps); if it still fails it
  stays flagged and is not used;
* ``scripted`` — replace it by Meta-World's scripted expert (itself measured and recorded);
* ``demos`` — train again by demonstration-augmented PPO from the scripted expert
  (:mod:`cpd_fast.teachers.demos`, ``retrain_factor`` x steps); its bar is the threshold, or the scripted
  expert's own official success where that is lower (a box-close-like task); below it, flagged and unused;
* ``exclude`` — drop the task's teacher (downstream steps skip the task).

The verdicts go to ``teachers.json`` in the run directory (:func:`write_teachers_json`), one
:class:`TeacherRecord` per task with every attempt in ``history``; :func:`usable_teachers` is what later
stages read, and it returns only records with ``used`` true. The records, the file and the pass rule
(:func:`passes`) live in :mod:`cpd_fast.teachers.records` (re-exported here); this module holds the policy —
the first verdict (:func:`verdict`, :func:`gate_scripted`) and the remedies (:func:`apply_remedy`). The
teacher sources (:func:`cpd_fast.teachers.provide.provide`) only supply the measurements and apply the
remedy in one place.

Downstream, :func:`teacher_specs` turns ``teachers.json`` into what collection needs per task, and
:func:`record_success` stores each teacher's official success with its dataset, measured once: the gate's
own measurement when it used the same number of goals as the distillation's evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tqdm import tqdm

from cpd_fast.errors import UserError
from cpd_fast.runio import read_json, write_json_atomic
from cpd_fast.teachers.base import make_teacher
from cpd_fast.teachers.records import (
    TeacherRecord,
    bar,
    evaluate_teacher,
    load_teachers_json,
    passes,
    read_teachers_json,
    records_of,
    usable_teachers,
    write_teachers_json,
)
from cpd_fast.teachers.scripted import ScriptedExpert
from cpd_fast.teachers.zoo import DEFAULT_ZOO, missing_message, zoo_dir, zoo_name

__all__ = [
    "DEFAULT_THRESHOLD",
    "ON_FAIL",
    "TeacherRecord",
    "TeacherSpec",
    "apply_remedy",
    "bar",
    "evaluate_teacher",
    "gate_scripted",
    "load_teachers_json",
    "passes",
    "record_success",
    "teacher_specs",
    "trained_teachers",
    "usable_teachers",
    "verdict",
    "write_teachers_json",
]

DEFAULT_THRESHOLD = 0.8
ON_FAIL = ("retrain", "demos", "scripted", "exclude")


def _cost(summary: dict[str, Any]) -> dict[str, Any]:
    steps = summary.get("total_steps")
    if steps is not None:
        steps = int(steps) + int(summary.get("extra_env_steps") or 0)
    return {
        "algorithm": summary.get("algorithm"),
        "env_steps": steps,
        "wall_time_s": summary.get("wall_time_s"),
    }


# ----------------------------------------------------------------------------- the policy


def verdict(task: str, source: str, summary: dict[str, Any], threshold: float) -> TeacherRecord:
    """The gate's first verdict on a measured teacher (``summary``: ``path``, ``success_rate``, ...)."""
    ok = passes(summary.get("success_rate"), bar(summary, threshold))
    return TeacherRecord(
        task=task, source=source, path=summary.get("path"), success_rate=summary.get("success_rate"),
        protocol=summary.get("protocol", "official"), threshold=threshold, passed=ok,
        status="ok" if ok else "failed", used=ok, flagged=not ok,
        history=[{"source": source, **{k: v for k, v in summary.items() if k != "task"}}],
        **_cost({"algorithm": "scripted" if source == "scripted" else "ppo", **summary}),
    )  # fmt: skip


def apply_remedy(
    records: dict[str, TeacherRecord],
    on_fail: str,
    *,
    retrain: Callable[[list[str]], Sequence[dict[str, Any]]] | None = None,
    eval_goals: int = 50,
    eval_envs: int = 10,
) -> list[str]:
    """Apply ``on_fail`` to the failed records in place; returns the tasks that were failing.

    ``retrain(tasks)`` trains those tasks again (``retrain``: plain PPO with the larger budget; ``demos``:
    demonstration-augmented PPO) and returns their summaries; ``scripted`` measures Meta-World's scripted
    expert instead; ``exclude`` drops the teacher. A teacher still below its bar after its remedy stays
    flagged and unused: never silently used.
    """
    if on_fail not in ON_FAIL:
        raise ValueError(f"unknown --on-fail {on_fail!r}; choose one of {', '.join(ON_FAIL)}")
    failed = [t for t, r in records.items() if not r.passed]
    if not failed:
        return failed
    if on_fail in ("retrain", "demos"):
        if retrain is None:
            raise ValueError(f"on_fail {on_fail!r} needs a trainer (PPO teachers)")
        for task, summary in zip(failed, retrain(failed), strict=True):
            rec = records[task]
            rec.history.append({"source": rec.source, **{k: v for k, v in summary.items() if k != "task"}})
            if passes(summary.get("success_rate"), bar(summary, rec.threshold)):
                rec.path, rec.success_rate = summary["path"], summary["success_rate"]
                rec.passed, rec.used = True, True
                rec.status = "retrained" if on_fail == "retrain" else "retrained-with-demos"
                for k, v in _cost(summary).items():
                    setattr(rec, k, v)
            else:
                rec.status = "failed"
    elif on_fail == "scripted":
        for task in failed:
            rec = records[task]
            measured = evaluate_teacher(ScriptedExpert(task), task, num_goals=eval_goals, num_envs=eval_envs)
            rec.history.append({"source": "scripted", "path": None, **measured})
            rec.source, rec.path, rec.success_rate = "scripted", None, measured["success_rate"]
            rec.protocol, rec.algorithm, rec.env_steps, rec.wall_time_s = (
                measured["protocol"],
                "scripted",
                0,
                0.0,
            )
            rec.passed = passes(measured["success_rate"], rec.threshold)
            rec.used = rec.passed  # a scripted expert below the gate is not used either
            rec.status = "replaced-by-scripted" if rec.passed else "failed"
    else:  # exclude
        for task in failed:
            records[task].used, records[task].status = False, "excluded"
    return failed


def gate_scripted(
    tasks: Sequence[str], threshold: float, *, eval_goals: int, eval_envs: int, progress: bool = False
) -> dict[str, TeacherRecord]:
    """The gate on Meta-World's scripted experts: measured and recorded; one below the threshold is unused
    (there is nothing to fall back to)."""
    records = {}
    for task in tqdm(tasks, desc="gate", disable=not progress, leave=False):
        m = evaluate_teacher(ScriptedExpert(task), task, num_goals=eval_goals, num_envs=eval_envs)
        records[task] = verdict(task, "scripted", {"path": None, **m}, threshold)
        records[task].history = [{"source": "scripted", "path": None, "success_rate": m["success_rate"]}]
    return records


# ----------------------------------------------------------------------------- downstream


@dataclass(frozen=True)
class TeacherSpec:
    """What collection needs to know of one task's teacher (see :func:`teacher_specs`)."""

    source: str  # "scripted", "ppo", "checkpoint" or "zoo" (cpd_fast.teachers.base.make_teacher)
    path: str | None  # a checkpoint; for "zoo" the zoo's name or directory
    success: float | None = None  # the gate's official-protocol measurement, if any
    goals: int | None = None  # how many of the official goals that measurement used
    # "zoo": the task whose teacher acts for this task (a run's ``behaviours``); success stays the task's own
    acts_as: str | None = None

    def name(self, task: str) -> str:
        """The teacher's name in dataset manifests (``scripted:reach-v3``, ``ppo:RUN/.../policy.pt``,
        ``zoo:mt25/reach-v3``; ``zoo:metaworld-v3/pick-place-v3@reach-v3`` for a behaviour)."""
        if self.source == "zoo":
            return f"zoo:{self.path}/{self.acts_as}@{task}" if self.acts_as else f"zoo:{self.path}/{task}"
        return f"{self.source}:{self.path or task}"

    def make(self, task: str, device: str = "cpu") -> Any:
        return make_teacher(self.source, self.acts_as or task, self.path, device=device)


def trained_teachers(specs: dict[str, TeacherSpec]) -> dict[str, Any]:
    """``{task: teacher}`` of every spec that is not a scripted expert, loaded now: a missing or damaged
    policy fails before any collection, and each says which simulator it was trained in."""
    return {t: s.make(t) for t, s in specs.items() if s.source != "scripted"}


def teacher_specs(teachers: str, tasks: Sequence[str]) -> dict[str, TeacherSpec]:
    """``{task: TeacherSpec}`` from ``"scripted"``, ``"zoo"`` / ``"zoo:NAME"`` (a teacher zoo,
    :mod:`cpd_fast.teachers.zoo`) or a run directory's ``teachers.json``; one-line errors for a task without
    a usable teacher or a missing checkpoint."""
    if teachers == "scripted":
        return {t: TeacherSpec("scripted", None) for t in tasks}
    if teachers == "zoo" or teachers.startswith("zoo:"):
        teachers = zoo_dir(teachers.partition(":")[2] or DEFAULT_ZOO)
    path_json, payload = read_teachers_json(teachers)
    records = records_of(payload)
    lacking = [t for t in tasks if t not in records or not records[t].used]
    if lacking and any(r.source == "zoo" for r in records.values()):
        raise UserError(missing_message(path_json, records, lacking))
    subset_goals = payload.get("settings", {}).get("eval_goals")
    root = os.path.dirname(path_json)
    out = {}
    for t in tasks:
        r = records.get(t)
        if r is None or not r.used:
            raise ValueError(f"no usable teacher for {t} in {path_json}")
        goals = 50 if r.protocol == "official" else subset_goals
        if r.source == "zoo":  # a zoo's own record (path: its file) or a run's copy (path: the zoo)
            if os.path.isfile(os.path.join(root, r.path or "")):  # the zoo's own record: it knows its file
                out[t] = TeacherSpec("zoo", zoo_name(root), r.success_rate, goals)
            else:  # a run's copy (path: the zoo), possibly with another task's teacher acting (behaviours)
                out[t] = TeacherSpec("zoo", zoo_name(r.path), r.success_rate, goals, r.acts_as)
            continue
        path = r.path
        if path and not os.path.isabs(path) and not os.path.isfile(path):
            path = os.path.join(root, path)
        if r.source != "scripted" and (not path or not os.path.isfile(path)):
            raise FileNotFoundError(f"teacher checkpoint for {t} not found: {path!r}")
        out[t] = TeacherSpec(r.source, path, r.success_rate, goals)
    return out


def record_success(
    manifest_path: str, task: str, spec: TeacherSpec, *, eval_goals: int, eval_envs: int
) -> float:
    """The teacher's official success on ``eval_goals`` goals, stored in its dataset manifest: read when
    there, else the gate's measurement when it used the same goals, else measured now (once). For a
    behaviour (``spec.acts_as``) it is the task's own teacher's: the yardstick of relative performance."""
    manifest = read_json(manifest_path)
    if "teacher_success" not in manifest:
        if spec.success is not None and spec.goals == eval_goals:
            manifest["teacher_success"] = float(spec.success)
        else:
            own = replace(spec, acts_as=None)  # the yardstick is the task's own teacher, not a behaviour
            measured = evaluate_teacher(own.make(task), task, num_goals=eval_goals, num_envs=eval_envs)
            manifest["teacher_success"] = float(measured["success_rate"])
        write_json_atomic(manifest_path, manifest)
    return float(manifest["teacher_success"])
