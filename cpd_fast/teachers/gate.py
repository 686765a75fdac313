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
stages read, and it returns only records with ``used`` true. This module holds the whole policy — the pass
rule (:func:`passes`), the first verdict (:func:`verdict`) and the remedies (:func:`apply_remedy`); the
trainers (:func:`cpd_fast.distributed.train_teachers`, ``cpd run``'s scripted gate) only supply the
measurements.

Downstream, :func:`teacher_specs` turns ``teachers.json`` into what collection needs per task, and
:func:`record_success` stores each teacher's official success with its dataset, measured once: the gate's
own measurement when it used the same number of goals as the distillation's evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    "usable_teachers",
    "verdict",
    "write_teachers_json",
]

DEFAULT_THRESHOLD = 0.8
ON_FAIL = ("retrain", "demos", "scripted", "exclude")
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
        status: ``"ok"`` (first teacher passed), ``"retrained"``, ``"retrained-with-demos"``,
            ``"replaced-by-scripted"``, ``"excluded"`` or ``"failed"`` (still below the threshold after the
            configured remedy).
        used: whether downstream stages may use this teacher. False for excluded / failed teachers.
        flagged: True when any attempt fell below the threshold (kept even after a successful remedy).
        history: every attempt: ``{"source", "path", "success_rate", "total_steps", "wall_time_s", ...}``.
        algorithm: what made the teacher in use: ``"ppo"``, ``"ppo+demos"`` or ``"scripted"``.
        env_steps / wall_time_s: its training cost (env steps incl. demonstrations and warm-up; seconds).
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


def passes(success_rate: float | None, threshold: float) -> bool:
    """The gate's rule: measured, and at least ``threshold``."""
    return success_rate is not None and success_rate >= threshold


def bar(summary: dict[str, Any], threshold: float) -> float:
    """The success a measured teacher must reach: ``threshold``, or for a demonstration-augmented teacher
    the scripted expert's own official success when that is lower (``summary["scripted_success"]``)."""
    expert = summary.get("scripted_success")
    return threshold if expert is None else min(threshold, float(expert))


def _cost(summary: dict[str, Any]) -> dict[str, Any]:
    steps = summary.get("total_steps")
    if steps is not None:
        steps = int(steps) + int(summary.get("extra_env_steps") or 0)
    return {
        "algorithm": summary.get("algorithm"),
        "env_steps": steps,
        "wall_time_s": summary.get("wall_time_s"),
    }


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


def _read_teachers_json(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(path of teachers.json, its payload)``; ``path`` is the file or the run directory holding it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, TEACHERS_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no teachers.json at {path!r}; run `cpd teachers train` first")
    with open(path) as f:
        return path, json.load(f)


def _records(payload: dict[str, Any]) -> dict[str, TeacherRecord]:
    known = {f.name for f in dataclasses.fields(TeacherRecord)}
    return {
        t: TeacherRecord(**{k: v for k, v in r.items() if k in known}) for t, r in payload["teachers"].items()
    }


def load_teachers_json(path: str | os.PathLike) -> dict[str, TeacherRecord]:
    """Read the records back; ``path`` is ``teachers.json`` or the run directory holding it."""
    return _records(_read_teachers_json(path)[1])


def usable_teachers(path: str | os.PathLike) -> dict[str, TeacherRecord]:
    """Records that downstream stages may use (``used`` true), in file order."""
    return {t: r for t, r in load_teachers_json(path).items() if r.used}


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
        from cpd_fast.teachers.scripted import ScriptedExpert

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
    from tqdm import tqdm

    from cpd_fast.teachers.scripted import ScriptedExpert

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

    def name(self, task: str) -> str:
        """The teacher's name in dataset manifests (``scripted:reach-v3``, ``ppo:RUN/.../policy.pt``,
        ``zoo:mt25/reach-v3``)."""
        if self.source == "zoo":
            return f"zoo:{self.path}/{task}"
        return f"{self.source}:{self.path or task}"

    def make(self, task: str, device: str = "cpu") -> Any:
        from cpd_fast.teachers.base import make_teacher

        return make_teacher(self.source, task, self.path, device=device)


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
        from cpd_fast.teachers.zoo import DEFAULT_ZOO, zoo_dir

        teachers = zoo_dir(teachers.partition(":")[2] or DEFAULT_ZOO)
    path_json, payload = _read_teachers_json(teachers)
    records = _records(payload)
    lacking = [t for t in tasks if t not in records or not records[t].used]
    if lacking and any(r.source == "zoo" for r in records.values()):
        from cpd_fast.errors import UserError
        from cpd_fast.teachers.zoo import missing_message

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
            from cpd_fast.teachers.zoo import zoo_name

            zoo = root if os.path.isfile(os.path.join(root, r.path or "")) else r.path
            out[t] = TeacherSpec("zoo", zoo_name(zoo), r.success_rate, goals)
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
    there, else the gate's measurement when it used the same goals, else measured now (once)."""
    from cpd_fast.runio import read_json, write_json_atomic

    manifest = read_json(manifest_path)
    if "teacher_success" not in manifest:
        if spec.success is not None and spec.goals == eval_goals:
            manifest["teacher_success"] = float(spec.success)
        else:
            measured = evaluate_teacher(spec.make(task), task, num_goals=eval_goals, num_envs=eval_envs)
            manifest["teacher_success"] = float(measured["success_rate"])
        write_json_atomic(manifest_path, manifest)
    return float(manifest["teacher_success"])
