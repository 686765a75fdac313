"""Teacher zoos: trained RL teachers shipped with the package (or kept in any directory), ready to distil.

A zoo is a directory holding ``teachers.json`` (the gate's format, :mod:`cpd_fast.teachers.records`: one
record per task with ``source: "zoo"``, the policy file, its official success on the 50 fixed goals, the
algorithm that made it, its env steps, wall time, seed and the command that re-trains it) and one
actor-only policy file per task (``<task>.pt`` + ``<task>.pt.sha256``: actor weights, observation
normaliser and PPO config; no critic, no optimizer state — :func:`cpd_fast.teachers.ppo.export_policy`).
The package ships one zoo, ``metaworld-v3``, under ``cpd_fast/zoo/``: a teacher per Meta-World v3 task it
has one for, so ``--teachers zoo`` serves any suite (``mt10``, ``mt25``, ``mt50``, ``cw10``, a task list)
whose tasks it covers; a zoo is named by that name (``mt25``, its name until 2026-12-07, still resolves to
it) or by its directory. A record may also hold ``fresh_goals``: the teacher's success on goal sets it was not
selected on (:func:`measure_fresh_goals`, ``cpd teachers eval --zoo Z --goal-seeds 1 2 3 --record``).

* :func:`zoo_teacher` (= ``make_teacher("zoo", task)``) loads one teacher;
* :func:`add_teacher` (= ``cpd teachers export``) exports a trained checkpoint into a zoo, measures it
  with the official protocol and records it;
* :func:`add_behaviour` makes another task's teacher act for a task (``acts_as``): for tasks a task-free
  student cannot tell apart, one behaviour that does well on all of them (``bench/task_free/``);
* ``cpd teachers eval --zoo metaworld-v3`` re-measures a whole zoo.

Every failure is one line naming the file and the remedy: an unknown zoo, a task the zoo lacks, a file
whose bytes do not match its checksum or do not parse (truncated, corrupt), a policy whose observation or
action sizes are not Meta-World's.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

from cpd_fast.errors import UserError
from cpd_fast.runio import CorruptFileError, file_sha256, read_json, write_json_atomic
from cpd_fast.tasks import MT25, MT50, validate_task
from cpd_fast.teachers.checkpoint import CheckpointTeacher
from cpd_fast.teachers.ppo import export_policy
from cpd_fast.teachers.records import TeacherRecord, bar, evaluate_teacher, load_teachers_json, passes

__all__ = [
    "ALIASES",
    "DEFAULT_ZOO",
    "FRESH_GOAL_SEEDS",
    "ZOO_SOURCE",
    "add_behaviour",
    "add_teacher",
    "check_goal_seeds",
    "measure_fresh_goals",
    "missing_message",
    "shipped_zoos",
    "zoo_dir",
    "zoo_name",
    "zoo_records",
    "zoo_teacher",
]

DEFAULT_ZOO = "metaworld-v3"
ALIASES = {"mt25": DEFAULT_ZOO}  # the shipped zoo's former name, kept so older configs and scripts resolve
ZOO_SOURCE = "zoo"  # TeacherRecord.source of a zoo teacher
_REINSTALL = (
    "reinstall cpd_fast (pip install --force-reinstall cpd_fast) or re-export it with `cpd teachers export`"
)


def _root() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "zoo")


def shipped_zoos() -> list[str]:
    """Names of the zoos shipped with the package."""
    root = _root()
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "teachers.json")))


def zoo_dir(zoo: str | os.PathLike = DEFAULT_ZOO) -> str:
    """The directory of ``zoo``: a shipped zoo's name, or a directory holding ``teachers.json``."""
    zoo = os.fspath(zoo)
    if os.path.isfile(os.path.join(zoo, "teachers.json")):
        return os.path.abspath(zoo)
    zoo = ALIASES.get(zoo, zoo)
    if os.sep not in zoo and zoo in shipped_zoos():
        return os.path.join(_root(), zoo)
    shipped = ", ".join(shipped_zoos()) or "none"
    raise UserError(
        f"no teacher zoo {zoo!r}: not a shipped zoo (shipped: {shipped}) and not a directory holding "
        "teachers.json; build one with `cpd teachers export --zoo DIR ...`"
    )


def zoo_name(zoo: str | os.PathLike) -> str:
    """How dataset manifests and reports name ``zoo``: the shipped name, else its directory."""
    path = zoo_dir(zoo)
    return os.path.basename(path) if os.path.dirname(path) == _root() else path


def zoo_records(zoo: str | os.PathLike = DEFAULT_ZOO) -> tuple[str, dict[str, Any]]:
    """``(teachers.json path, {task: TeacherRecord})`` of ``zoo``."""
    path = os.path.join(zoo_dir(zoo), "teachers.json")
    try:
        return path, load_teachers_json(path)
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise UserError(f"cannot read the zoo's {path} ({type(err).__name__}: {err}); {_REINSTALL}") from None


def missing_message(path: str, records: dict[str, Any], tasks: list[str]) -> str:
    """The one-line error for ``tasks`` that the zoo at ``path`` has no usable teacher for."""
    have = ", ".join(t for t, r in records.items() if r.used) or "none"
    return (
        f"the teacher zoo {path} has no teacher for {', '.join(tasks)} (it has: {have}); train one with "
        f"`cpd teachers train --tasks {' '.join(tasks)}`, or use the scripted expert (--teachers "
        "scripted, or gate.on_fail=scripted / exclude to fill or drop the zoo's gaps in `cpd run`)"
    )


def zoo_teacher(task: str, zoo: str | os.PathLike = DEFAULT_ZOO, device: str = "cpu") -> Any:
    """The zoo's teacher of ``task`` (a validated name; one the zoo lacks is a one-line error):
    ``action_mean(obs [B, 39]) -> [B, 4]`` of the shipped policy."""
    path, records = zoo_records(zoo)
    rec = records.get(task)
    if rec is None or not rec.used:
        raise UserError(missing_message(path, records, [task]))
    file = os.path.join(os.path.dirname(path), rec.path)
    try:
        return CheckpointTeacher(file, task=rec.acts_as or task, device=device, remedy=_REINSTALL)
    except FileNotFoundError:
        raise UserError(f"zoo teacher file {file} is missing; {_REINSTALL}") from None
    except CorruptFileError as err:
        raise UserError(
            f"zoo teacher file {file} is damaged ({str(err).split(';')[0]}); {_REINSTALL}"
        ) from None


def add_teacher(
    zoo: str | os.PathLike,
    task: str,
    checkpoint: str | os.PathLike,
    *,
    provenance: dict[str, Any] | None = None,
    eval_goals: int = 50,
    eval_envs: int = 10,
) -> Any:
    """Export ``checkpoint`` (a PPO ``checkpoint.pt`` / ``policy.pt``) as ``zoo``'s teacher of ``task``.

    The zoo directory (created if new) gets ``<task>.pt`` (actor only) and its record in ``teachers.json``:
    the exported file's official success (measured here, ``eval_goals`` goals) and ``provenance``
    (``algorithm``, ``env_steps``, ``wall_time_s``, ``seed``, ``recipe``, ``command``, ...); returns the
    record.
    A teacher below the zoo's bar (``provenance["threshold"]``, default 0.9, or the scripted expert's
    success where that is lower) is refused and nothing is written.
    """
    task = validate_task(task)
    zoo = os.fspath(zoo)
    os.makedirs(zoo, exist_ok=True)
    file = f"{task}.pt"
    with tempfile.TemporaryDirectory(
        dir=zoo, prefix=".export-"
    ) as tmp:  # measured before it replaces anything
        staged = os.path.join(tmp, file)
        payload = export_policy(checkpoint, staged, actor_only=True)
        if payload["task"] not in (None, task):
            raise UserError(f"{os.fspath(checkpoint)!r} is a {payload['task']!r} teacher, not {task!r}")
        measured = evaluate_teacher(CheckpointTeacher(staged, task=task), task, num_goals=eval_goals,
                                    num_envs=eval_envs)  # fmt: skip
        prov = dict(provenance or {})
        threshold = float(prov.pop("threshold", 0.9))
        if not passes(measured["success_rate"], bar(prov, threshold)):
            raise UserError(
                f"{task}: official success {measured['success_rate']:.2f} is below the zoo's bar "
                f"{bar(prov, threshold):.2f}; not added to {zoo} (train it further: its run resumes)"
            )
        sha = file_sha256(staged)
        for name in (file, f"{file}.sha256"):
            os.replace(os.path.join(tmp, name), os.path.join(zoo, name))
    measured_at = {
        "exported_from": os.fspath(checkpoint), "global_step": payload["global_step"], "sha256": sha,
        "successes": "".join(map(str, measured["successes"])), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    rec = TeacherRecord(
        task=task, source="zoo", path=file, success_rate=measured["success_rate"],
        protocol=measured["protocol"], threshold=threshold, passed=True, status="ok", used=True,
        algorithm=prov.pop("algorithm", "ppo"), env_steps=prov.pop("env_steps", payload["global_step"]),
        wall_time_s=prov.pop("wall_time_s", None), history=[{**prov, **measured_at}],
    )  # fmt: skip
    fresh = {
        "zoo": os.path.basename(os.path.abspath(zoo)),
        "eval_goals": eval_goals,
        "protocol": measured["protocol"],
    }
    _write_record(zoo, rec, fresh)
    return rec


def add_behaviour(
    zoo: str | os.PathLike, task: str, acting: str, *, why: str, eval_goals: int = 50, eval_envs: int = 10
) -> TeacherRecord:
    """Make ``zoo``'s teacher of ``acting`` act for ``task`` too: the record of ``task`` points at the
    policy file of ``acting`` (``acts_as``), with its official success measured on ``task`` (``eval_goals``
    goals) and ``why`` (e.g. the cross-success measurement that chose it) in its history. No bar applies
    here: the run's quality gate judges the measured success like any teacher's."""
    task, acting = validate_task(task), validate_task(acting)
    zoo = os.fspath(zoo)
    _, records = zoo_records(zoo)
    src = records.get(acting)
    if src is None or not src.used or src.acts_as:
        raise UserError(f"{zoo} holds no teacher of its own for {acting}")
    file = os.path.join(zoo, src.path)
    measured = evaluate_teacher(CheckpointTeacher(file, task=acting), task, num_goals=eval_goals,
                                num_envs=eval_envs)  # fmt: skip
    rec = dataclasses.replace(
        src, task=task, success_rate=measured["success_rate"], protocol=measured["protocol"], passed=True,
        status="ok", flagged=False, acts_as=acting,
        history=[{"acts_as": acting, "why": why, "successes": "".join(map(str, measured["successes"])),
                  "sha256": file_sha256(file), "date": time.strftime("%Y-%m-%d")}],
    )  # fmt: skip
    _write_record(zoo, rec, {"zoo": os.path.basename(os.path.abspath(zoo)), "eval_goals": eval_goals,
                             "protocol": measured["protocol"]})  # fmt: skip
    return rec


FRESH_GOAL_SEEDS = (1, 2, 3)  # MT1 goal seeds other than the official 0: three fresh 50-goal sets


def check_goal_seeds(goal_seeds: Any, record: bool) -> tuple[int, ...]:
    """``goal_seeds`` as ints: at least one, distinct, and (for a record) not 0, the official set."""
    seeds = tuple(int(s) for s in goal_seeds)
    if not seeds or len(set(seeds)) != len(seeds) or (record and 0 in seeds):
        raise UserError(f"goal seeds must be distinct and, to be recorded, not 0 (the official set): {seeds}")
    return seeds


def measure_fresh_goals(
    zoo: str | os.PathLike,
    task: str,
    goal_seeds: tuple[int, ...] = FRESH_GOAL_SEEDS,
    *,
    eval_goals: int = 50,
    eval_envs: int = 10,
    record: bool = True,
) -> dict[str, Any]:
    """``zoo``'s teacher of ``task`` on the goal sets of ``goal_seeds`` (the first ``eval_goals`` of each
    set's 50): ``{"goal_seeds", "success_rates", "success_rate" (their mean), "goals", "sha256", "date"}``,
    stored as its record's ``fresh_goals`` when ``record``.

    A teacher kept at its first measurement at or above the bar on the official goals (seed 0) is measured
    on the goals it was chosen on, so that figure reads high; a recorded measurement must be free of that
    selection, so seed 0 is refused there."""
    task, seeds = validate_task(task), check_goal_seeds(goal_seeds, record)
    zoo = zoo_dir(zoo)
    path, records = zoo_records(zoo)
    rec = records.get(task)
    if rec is None or not rec.used:
        raise UserError(missing_message(path, records, [task]))
    teacher = zoo_teacher(task, zoo)
    rates = [
        evaluate_teacher(teacher, task, num_goals=eval_goals, num_envs=eval_envs, goal_seed=s)["success_rate"]
        for s in seeds
    ]
    fresh = {
        "goal_seeds": list(seeds), "success_rates": rates, "success_rate": round(sum(rates) / len(rates), 4),
        "goals": eval_goals * len(seeds), "sha256": file_sha256(os.path.join(zoo, rec.path)),
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    if record:
        _write_record(zoo, dataclasses.replace(rec, fresh_goals=fresh), {})
    return fresh


def _write_record(zoo: str, rec: TeacherRecord, fresh_settings: dict[str, Any]) -> None:
    """Put ``rec`` into ``zoo/teachers.json`` (made with ``fresh_settings`` if new), tasks in suite order."""
    path = os.path.join(zoo, "teachers.json")
    doc = read_json(path, {"settings": fresh_settings, "teachers": {}})
    doc["teachers"][rec.task] = rec.to_json()
    doc["teachers"] = dict(sorted(doc["teachers"].items(), key=lambda kv: _order(kv[0])))
    write_json_atomic(path, doc)


def _order(task: str) -> tuple[int, int, str]:
    return (MT25.index(task) if task in MT25 else len(MT25), MT50.index(task) if task in MT50 else 0, task)
