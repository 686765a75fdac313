"""One way to get a run's teachers: trained by PPO, from a teacher zoo, or Meta-World's scripted experts.

:func:`provide` is the entry point. Every source ends the same way: the quality gate
(:mod:`cpd_fast.teachers.gate`, which holds the policy) judges each task's teacher, ``gate.on_fail``'s
remedy is applied to the failed ones (:func:`_apply_gate`, the one place it happens), and the verdicts go to
``RUN/teachers.json``, which later steps read (:func:`cpd_fast.teachers.gate.usable_teachers`,
:func:`~cpd_fast.teachers.gate.teacher_specs`).

* ``"ppo"`` — :func:`train_teachers`: one PPO job per task (:mod:`cpd_fast.teachers.jobs`: a local process
  pool or Ray), each measured with the official protocol; a failed teacher is trained again (``retrain``,
  ``demos``), replaced by the scripted expert or excluded.
* ``"zoo"`` — the records a teacher zoo was built with (:mod:`cpd_fast.teachers.zoo`, measured on the 50
  official goals when exported); a task the zoo lacks is a failed teacher. A zoo cannot be trained, so a
  gap that ``retrain`` or ``demos`` would have to fill is refused before anything is written
  (:func:`check_zoo`).
* ``"scripted"`` — Meta-World's hand-written experts, measured; one below the threshold stays unused (there
  is nothing to fall back to).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from cpd_fast.errors import UserError, require_int
from cpd_fast.fidelity import collection_backends
from cpd_fast.runio import RunLock
from cpd_fast.tasks import resolve_tasks
from cpd_fast.teachers.curve import check_give_up
from cpd_fast.teachers.demos import ALGORITHM, DemoConfig
from cpd_fast.teachers.gate import (
    DEFAULT_THRESHOLD,
    ON_FAIL,
    TeacherRecord,
    apply_remedy,
    gate_scripted,
    passes,
    verdict,
    write_teachers_json,
)
from cpd_fast.teachers.jobs import BACKENDS, check_ray_address, run_jobs, trainer_of
from cpd_fast.teachers.ppo import PPOConfig
from cpd_fast.teachers.zoo import DEFAULT_ZOO, missing_message, zoo_name, zoo_records

__all__ = ["SOURCES", "GateSettings", "check_zoo", "provide", "train_teachers"]

log = logging.getLogger(__name__)

SOURCES = ("scripted", "ppo", "zoo")


class GateSettings(Protocol):
    """What :func:`provide` reads of the gate's settings (``cpd run``'s ``gate`` section has them)."""

    threshold: float  # official success a teacher needs, in [0, 1]
    on_fail: str  # one of :data:`cpd_fast.teachers.gate.ON_FAIL`
    eval_goals: int  # official goals each teacher is measured on (50: the full protocol)
    eval_envs: int  # envs the measurement runs in parallel
    retrain_factor: float  # PPO only: budget of a retrained teacher, in multiples of ``ppo.total_steps``


def provide(
    source: str,
    tasks: str | Sequence[str],
    run_dir: str | os.PathLike,
    gate: GateSettings,
    *,
    zoo: str | os.PathLike = DEFAULT_ZOO,
    ppo: PPOConfig | None = None,
    backend: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    env_backends: dict[str, str] | None = None,
    progress: bool = True,
    behaviours: dict[str, str] | None = None,
) -> dict[str, TeacherRecord]:
    """The teachers of ``tasks`` from ``source``, gated, written to ``run_dir/teachers.json``.

    Args:
        source: ``"ppo"``, ``"zoo"`` or ``"scripted"`` (:data:`SOURCES`).
        tasks: suite name or task list (validated here; everything below trusts it).
        run_dir: the run directory; ``teachers.json`` goes there, PPO teachers under ``teachers/<task>/``.
        gate: the quality gate's settings (:class:`GateSettings`).
        zoo: ``source="zoo"``: a shipped zoo's name or a zoo directory.
        ppo / backend / workers / ray_address / env_backends: ``source="ppo"``: the PPO config and where
            the jobs run (see :func:`train_teachers`).
        progress: progress bars.
        behaviours: ``source="zoo"``: ``{task: acting task}``, the zoo teacher of the acting task acts for the
            task (the record keeps the task's own teacher's success, the yardstick, and names the acting
            one in ``acts_as``). Both must pass the gate.

    Returns:
        ``{task: TeacherRecord}`` as written to ``teachers.json`` (unused teachers included, ``used`` false).
    """
    if source not in SOURCES:
        raise ValueError(f"unknown teacher source {source!r}; choose one of {', '.join(SOURCES)}")
    task_list = resolve_tasks(tasks)
    if source == "ppo":
        return train_teachers(
            task_list, run_dir, ppo, backend=backend, workers=workers, ray_address=ray_address,
            env_backends=env_backends, threshold=gate.threshold, on_fail=gate.on_fail,
            retrain_factor=gate.retrain_factor, eval_goals=gate.eval_goals, eval_envs=gate.eval_envs,
            progress=progress,
        )  # fmt: skip
    g = gate
    _check_gate(g.threshold, g.on_fail, g.retrain_factor, g.eval_goals, g.eval_envs)
    with RunLock(run_dir):
        if source == "zoo":
            path, held = check_zoo(zoo, task_list, g)
            records = _zoo_verdicts(task_list, path, held, zoo_name(zoo), g.threshold)
            behaviours = behaviours or {}
            acting = _zoo_verdicts(sorted(set(behaviours.values())), path, held, zoo_name(zoo), g.threshold)
            for task, by in behaviours.items():
                if not acting[by].passed:
                    raise UserError(f"behaviours.{task}: the zoo's teacher of {by} does not pass the gate")
                records[task] = dataclasses.replace(
                    records[task],
                    acts_as=by,
                    history=[*records[task].history, {"acts_as": by, "why": "the run's behaviours setting"}],
                )
            return _apply_gate(run_dir, records, g.on_fail, g.eval_goals, g.eval_envs, tasks=task_list,
                               threshold=g.threshold, eval_goals=g.eval_goals, zoo=path,
                               **({"behaviours": behaviours} if behaviours else {}))  # fmt: skip
        records = gate_scripted(task_list, g.threshold, eval_goals=g.eval_goals, eval_envs=g.eval_envs,
                                progress=progress)  # fmt: skip
        return _apply_gate(run_dir, records, None, g.eval_goals, g.eval_envs, tasks=task_list,
                           threshold=g.threshold, eval_goals=g.eval_goals)  # fmt: skip


def _apply_gate(
    run_dir: str | os.PathLike,
    records: dict[str, TeacherRecord],
    remedy: str | None,
    goals: int,
    envs: int,
    *,
    retrain: Callable[[list[str]], Sequence[dict[str, Any]]] | None = None,
    dated: bool = False,
    **settings: Any,
) -> dict[str, TeacherRecord]:
    """The gate's last step for every source: the ``remedy`` (``on_fail``) on the failed ``records``, in
    place (``None``: none, a failed teacher stays unused; a replacement is measured on ``goals`` official
    goals in ``envs`` envs), then ``run_dir/teachers.json`` with ``settings`` (``dated``: and the time the
    verdicts were final, after any retraining)."""
    if remedy is not None:
        apply_remedy(records, remedy, retrain=retrain, eval_goals=goals, eval_envs=envs)
    if dated:
        settings["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_teachers_json(run_dir, records, **settings)
    return records


def _check_gate(
    threshold: float, on_fail: str, retrain_factor: float, eval_goals: int, eval_envs: int
) -> None:
    if on_fail not in ON_FAIL:
        raise ValueError(f"unknown --on-fail {on_fail!r}; choose one of {', '.join(ON_FAIL)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if not (retrain_factor > 0 and math.isfinite(retrain_factor)):
        raise ValueError(f"retrain_factor must be a finite number > 0, got {retrain_factor}")
    require_int("eval_goals", eval_goals)
    require_int("eval_envs", eval_envs)


def _check_training(
    backend: str,
    algorithm: str,
    demos: DemoConfig,
    eval_every: int | None,
    stop_at: float | None,
    give_up: tuple[int, float] | None = None,
) -> None:
    """Refuse :func:`train_teachers`' job settings before anything runs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    trainer_of(algorithm, demos.to_dict())  # an unknown algorithm
    if eval_every is not None:
        require_int("eval_every", eval_every)
    if stop_at is not None and not 0.0 <= stop_at <= 1.0:
        raise ValueError(f"stop_at must be a success rate in [0, 1], got {stop_at}")
    if give_up is not None:
        check_give_up(give_up)
        if eval_every is None:
            raise ValueError("give_up acts on measurements: set eval_every too")


# ----------------------------------------------------------------------------------------------------------
# Zoo
# ----------------------------------------------------------------------------------------------------------
def check_zoo(
    zoo: str | os.PathLike, tasks: Sequence[str], gate: GateSettings
) -> tuple[str, dict[str, TeacherRecord]]:
    """Refuse a zoo that does not exist, or one whose gaps (tasks it lacks or holds below
    ``gate.threshold``) ``gate.on_fail`` would have to fill by training (retrain, demos); returns
    ``(path of its teachers.json, its records)``. Cheap: ``cpd run`` calls it before its first step."""
    path, records = zoo_records(zoo)
    lacking = [t for t in tasks if t not in records or not records[t].used]
    weak = [t for t in tasks if t not in lacking and not passes(records[t].success_rate, gate.threshold)]
    if (lacking or weak) and gate.on_fail in ("retrain", "demos"):
        why = [missing_message(path, records, lacking)] if lacking else []
        why += [f"{path} holds {', '.join(weak)} below gate.threshold {gate.threshold:g}"] if weak else []
        raise UserError(f"{'; '.join(why)}; gate.on_fail={gate.on_fail} cannot train a zoo")
    return path, records


def _zoo_verdicts(
    tasks: Sequence[str], path: str, held: dict[str, TeacherRecord], name: str, threshold: float
) -> dict[str, TeacherRecord]:
    """The gate's verdict on each task's teacher in the zoo ``name`` (its ``teachers.json`` at ``path``
    holds the records ``held``, measured on the 50 official goals); a task the zoo lacks is a failed
    teacher. Each record's ``path`` names the zoo, as dataset manifests do."""
    records = {}
    for t in tasks:
        z = held.get(t)
        if z is not None and z.used:
            ok = passes(z.success_rate, threshold)
            records[t] = dataclasses.replace(z, path=name, threshold=threshold, passed=ok, used=ok,
                                             status="ok" if ok else "failed", flagged=not ok)  # fmt: skip
        else:
            records[t] = TeacherRecord(
                task=t, source="zoo", path=name, success_rate=None, protocol="official",
                threshold=threshold, passed=False, status="failed", used=False, flagged=True,
                history=[{"source": "zoo", "missing_from": path}],
            )  # fmt: skip
    return records


# ----------------------------------------------------------------------------------------------------------
# PPO: train a suite's teachers and gate them
# ----------------------------------------------------------------------------------------------------------
def train_teachers(
    tasks: str | Sequence[str],
    run_dir: str | os.PathLike,
    config: Any = None,
    *,
    backend: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    num_gpus_per_job: float = 0,
    env_backends: dict[str, str] | None = None,
    threshold: float | None = None,
    on_fail: str = "retrain",
    retrain_factor: float = 2.0,
    eval_goals: int = 50,
    eval_envs: int = 10,
    max_retries: int = 2,
    progress: bool = False,
    algorithm: str = "ppo",
    demos: Any = None,
    eval_every: int | None = None,
    stop_at: float | None = None,
    give_up: tuple[int, float] | None = None,
) -> dict[str, Any]:
    """Train one PPO teacher per task into ``run_dir/teachers/<task>/``, gate them, write ``teachers.json``.

    Args:
        tasks: suite name or task list.
        run_dir: the run directory (locked while this runs: :class:`cpd_fast.runio.RunLock`).
        config: a :class:`~cpd_fast.teachers.ppo.PPOConfig` for every task (``backend`` field overridden
            per task by ``env_backends``, e.g. from ``cpd envs check``: dial-turn-v3 -> gymnasium; None: the
            known mismatches, :data:`cpd_fast.fidelity.KNOWN_BAD_ENVPOOL`).
        backend / workers / ray_address / num_gpus_per_job / max_retries: see
            :func:`cpd_fast.teachers.jobs.run_jobs`.
        threshold, on_fail, retrain_factor, eval_goals, eval_envs: the quality gate
            (:mod:`cpd_fast.teachers.gate`, which holds the whole policy).
        algorithm: ``"ppo"`` or ``"ppo+demos"`` (demonstration-augmented, :mod:`cpd_fast.teachers.demos`,
            settings ``demos``: a :class:`~cpd_fast.teachers.demos.DemoConfig`; also ``on_fail="demos"``).
        eval_every / stop_at: measure every teacher officially (``eval_goals``) every ``eval_every`` env
            steps and stop it at ``stop_at`` success (:func:`cpd_fast.teachers.curve.train_measured`).
        give_up: ``(env steps, success)``: end a teacher's *first* attempt at the first measurement at or
            after that many env steps still below that success (it then fails the gate and ``on_fail``'s
            remedy follows at once; the remedy's own attempt runs its whole budget). Needs ``eval_every``.

    Returns:
        ``{task: TeacherRecord}`` as written to ``run_dir/teachers.json``.
    """
    task_list = resolve_tasks(tasks)
    cfg = config if config is not None else PPOConfig()
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    _check_gate(threshold, on_fail, retrain_factor, eval_goals, eval_envs)
    demos = demos if demos is not None else DemoConfig()
    _check_training(backend, algorithm, demos, eval_every, stop_at, give_up)
    run_dir = os.fspath(run_dir)
    if env_backends is None:  # no fidelity report: the known envpool mismatches (dial-turn-v3) still apply
        env_backends = collection_backends(None)
    jobs = _PPOJobs(
        run_dir, cfg, env_backends, algorithm, demos.to_dict(),
        evaluation=dict(eval_goals=eval_goals, eval_envs=eval_envs, progress=progress),
        eval_every=eval_every, stop_at=stop_at,
        where=dict(backend=backend, workers=workers, ray_address=ray_address,
                   num_gpus_per_job=num_gpus_per_job, max_retries=max_retries),
    )  # fmt: skip

    def retrain(failed: list[str]) -> list[dict[str, Any]]:
        return jobs.retrain(failed, round(cfg.total_steps * retrain_factor), on_fail == "demos")

    if backend == "ray":
        check_ray_address(ray_address)  # an address that does not answer: refused before anything is written
    with RunLock(run_dir):
        first = jobs.run([{**jobs.job(t, jobs.first_dir, cfg.total_steps), "give_up": give_up}
                          for t in task_list])  # fmt: skip
        records = {t: verdict(t, "ppo", sm, threshold) for t, sm in zip(task_list, first, strict=True)}
        for task, rec in records.items():  # one warning line per failed teacher
            if not rec.passed:
                log.warning(
                    "%s: teacher below the gate (success %s < %.2f)", task, rec.success_rate, threshold
                )
        return _apply_gate(
            run_dir, records, on_fail, eval_goals, eval_envs, retrain=retrain, dated=True,
            tasks=task_list, threshold=threshold, on_fail=on_fail, retrain_factor=retrain_factor,
            eval_goals=eval_goals, backend=backend,
            env_backends={t: env_backends.get(t, cfg.backend) for t in task_list}, config=cfg.to_dict(),
            algorithm=algorithm, demos=demos.to_dict(), eval_every=eval_every, stop_at=stop_at,
            **({"give_up": list(give_up)} if give_up is not None else {}),
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _PPOJobs:
    """The teacher jobs of one :func:`train_teachers` call (:func:`cpd_fast.teachers.jobs.run_teacher_job`
    dicts) and where they run."""

    run_dir: str
    cfg: PPOConfig
    env_backends: dict[str, str]
    algorithm: str
    demos: dict[str, Any]
    evaluation: dict[str, Any]  # eval_goals, eval_envs, progress
    eval_every: int | None
    stop_at: float | None
    where: dict[str, Any]  # run_jobs' keyword arguments: backend, workers, ...

    @property
    def first_dir(self) -> str:
        """Each task's first teacher's directory under ``RUN/teachers/<task>/``."""
        return "ppo" if self.algorithm == "ppo" else "ppo-demos"

    def job(self, task: str, out: str, total_steps: int, algorithm: str | None = None) -> dict[str, Any]:
        task_cfg = dataclasses.replace(
            self.cfg, total_steps=total_steps, backend=self.env_backends.get(task, self.cfg.backend)
        )
        return {
            "task": task,
            "out_dir": os.path.join(self.run_dir, "teachers", task, out),
            "config": task_cfg.to_dict(),
            **self.evaluation,
            "algorithm": algorithm or self.algorithm,
            "demos": self.demos,
            "eval_every": self.eval_every,
            "stop_at": self.stop_at,
        }

    def run(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return run_jobs(jobs, **self.where)

    def retrain(self, failed: list[str], budget: int, with_demos: bool) -> list[dict[str, Any]]:
        """Train the ``failed`` tasks again with ``budget`` env steps, by PPO or (``with_demos``) PPO from
        the scripted expert's demonstrations, each into a directory of its own."""
        if with_demos:
            out = "ppo-demos" if self.algorithm == "ppo" else "ppo-demos-retrain"
            return self.run([self.job(t, out, budget, ALGORITHM) for t in failed])
        return self.run([self.job(t, f"{self.first_dir}-retrain", budget) for t in failed])
