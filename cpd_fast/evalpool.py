"""Official evaluations of the student: one task (:func:`evaluate_student`), or many tasks spread over
worker processes (:class:`EvalPool`).

:class:`StudentPolicy` runs a :class:`~cpd_fast.student.Student` under the official protocol
(:func:`cpd_fast.evaluation.evaluate_official`), with one observation history per env slot, with or
without the task id.

A run evaluates every task seen so far after every stage, in two modes (MT25: 150 evaluations of 50
episodes), and each evaluation is a single-threaded MuJoCo loop. :class:`EvalPool` runs them as jobs in
``workers`` spawned processes (:func:`cpd_fast.workers.process_pool`), each holding its own
:class:`~cpd_fast.envs.EnvCache` for the pool's lifetime, so envs survive across stages and modes
and every core steps.

One job is one evaluation (a task in one mode: all its goals in the same env slots and the same batch
shapes as in this process). A call's jobs on the same task run together, one after the other on the same
envs (a task's two modes build its envs once, where the cache has no room to keep them), and a worker's
student is a copy of this process's (its ``state_dict``, saved once per call and loaded once per worker
by ``Student.from_state_dict``). Every evaluation runs
the student on one torch thread, in a worker or in this process (whose thread count is restored after),
so a job's success flags are bit for bit the same whatever the number of workers and whichever worker
ran it (tested), and whatever threads training uses. Workers evaluate on the CPU.

``workers=0`` runs the jobs in this process, in order, with one cache: the same interface, no processes.
The pool's env budget ``max_envs`` (each env holds a copy of its MuJoCo model) is split between the
workers. Spawned workers import the calling script again, so a script that creates a pool (or calls
``run_distill``, which does by default) needs an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cpd_fast.envs import MAX_EPISODE_STEPS, EnvCache
from cpd_fast.errors import require_int
from cpd_fast.evaluation import NUM_OFFICIAL_GOALS, EvalResult, evaluate_official
from cpd_fast.student import HistoryBuffer, Student
from cpd_fast.workers import process_pool, terminate

__all__ = ["TMP_PREFIX", "EvalJob", "EvalPool", "StudentPolicy", "evaluate_student", "student_result"]

TMP_PREFIX = ".evalpool-"  # the pool's temporary directory (a killed run leaves it: see DistillRun)


class StudentPolicy:
    """Adapts a :class:`~cpd_fast.student.Student` to ``evaluate_official(..., episode_info=True)``: one
    observation history per env slot, restarted at each episode's first observation. The student runs on
    the active slots only (an evaluation's last episodes leave most slots idle)."""

    def __init__(self, student: Student, num_envs: int, task_id: int | None = None) -> None:
        self.student = student
        self.history = HistoryBuffer.for_student(student, num_envs)
        self.last = np.zeros((num_envs, student.config.obs_dim), np.float32)
        device = next(student.parameters()).device
        self.task_ids = None if task_id is None else torch.full((num_envs,), task_id, device=device)

    def __call__(self, obs: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        self.last[slots] = obs
        reset = np.zeros(len(self.last), bool)
        reset[slots] = fresh
        # idle slots push their stale observation: harmless, they restart before they act again
        obs_t, reset_t, rows = torch.from_numpy(self.last), torch.from_numpy(reset), torch.from_numpy(slots)
        task_ids = None if self.task_ids is None else self.task_ids[: len(slots)]
        return self.student.act(obs_t, self.history, reset_t, task_ids, rows=rows).cpu().numpy()


def evaluate_student(
    student: Student,
    task: str,
    *,
    num_goals: int = NUM_OFFICIAL_GOALS,
    num_envs: int = 25,
    max_episode_steps: int = MAX_EPISODE_STEPS,
    task_id: int | None = None,
    env_cache: EnvCache | None = None,
) -> float:
    """Official-protocol success of the student on ``task``: with ``task_id=None`` the task embedding is
    inferred from the history (no task id); otherwise the task's prototype conditions the policy."""
    return student_result(
        student, task, num_goals=num_goals, num_envs=num_envs, max_episode_steps=max_episode_steps,
        task_id=task_id, env_cache=env_cache,
    ).success_rate  # fmt: skip


def student_result(
    student: Student,
    task: str,
    *,
    num_goals: int,
    num_envs: int,
    max_episode_steps: int,
    task_id: int | None,
    env_cache: EnvCache | None = None,
) -> EvalResult:
    """:func:`evaluate_student` with the whole :class:`EvalResult` (per-goal flags and lengths)."""
    n_envs = min(num_envs, num_goals)
    was_training = student.training
    student.eval()  # once here, not in each step's act
    try:
        with torch.inference_mode():
            return evaluate_official(
                StudentPolicy(student, n_envs, task_id), task, num_envs=n_envs, num_goals=num_goals,
                max_episode_steps=max_episode_steps, episode_info=True, env_cache=env_cache,
            )  # fmt: skip
    finally:
        student.train(was_training)


@dataclass(frozen=True)
class EvalJob:
    """One official evaluation: ``task`` with the task's prototype (``task_id``) or inferred (``None``)."""

    task: str
    task_id: int | None = None


# the worker process's state (set by its initializer; never touched in the parent)
_WORKER: dict[str, Any] = {}


def _worker_start(max_envs: int) -> None:
    _WORKER.update(cache=EnvCache(max_envs), path=None, student=None)


def _evaluate_task(student: Any, jobs: list[EvalJob], cache: EnvCache, settings: dict[str, int]) -> list:
    """``jobs`` (all on one task) in order, on the same envs: ``cache``'s, or, when it has no room for
    them, envs built for these jobs alone (then closed)."""
    n = min(settings["num_envs"], settings["num_goals"])
    own = cache if cache.holds(jobs[0].task, n) else EnvCache(n)
    try:
        return [student_result(student, j.task, task_id=j.task_id, env_cache=own, **settings) for j in jobs]
    finally:
        if own is not cache:
            own.close()


def _worker_jobs(path: str, jobs: list[EvalJob], settings: dict[str, int]) -> list[EvalResult]:
    """``jobs`` in this worker; each result's ``meta["worker_cpu_s"]`` is its equal share of the CPU time
    this worker spent on the call (loading the student included), for the parent to add up."""
    c0 = time.process_time()
    if _WORKER["path"] != path:  # a new student (one per call): load it once per worker
        state = torch.load(path, map_location="cpu", weights_only=True)
        _WORKER["student"] = Student.from_state_dict(state).eval()
        _WORKER["path"] = path
    results = _evaluate_task(_WORKER["student"], jobs, _WORKER["cache"], settings)
    share = (time.process_time() - c0) / len(results)
    for r in results:
        r.meta["worker_cpu_s"] = share
    return results


def by_task(jobs: list[EvalJob]) -> list[list[int]]:
    """The indices of ``jobs`` grouped by task, in order of each task's first job."""
    groups: dict[str, list[int]] = {}
    for i, j in enumerate(jobs):
        groups.setdefault(j.task, []).append(i)
    return list(groups.values())


def _in_job_order(groups: list[list[int]], done: list[list[EvalResult]]) -> list[EvalResult]:
    """The results of each group of :func:`by_task` put back at their jobs' places."""
    results: list[Any] = [None] * sum(map(len, groups))
    for g, rs in zip(groups, done, strict=True):
        for i, r in zip(g, rs, strict=True):
            results[i] = r
    return results


class EvalPool:
    """Runs :func:`student_result` jobs in ``workers`` processes (0: this process).

    Use it as a context manager (or call :meth:`close`): it owns the worker processes, their envs and a
    temporary directory holding the student each call evaluates.
    """

    def __init__(self, workers: int = 0, max_envs: int = 200, tmp_dir: str | None = None) -> None:
        require_int("eval_workers", workers, minimum=0)
        require_int("max_envs", max_envs, minimum=0)
        self.workers = workers
        self._calls = 0
        self._cache = EnvCache(max_envs) if workers == 0 else None
        self._pool = process_pool(workers, 1, _worker_start, max_envs // workers) if workers else None
        # the student file of each call (tmp_dir: e.g. inside the run directory, swept at its start)
        self._dir = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=tmp_dir) if workers else None

    def evaluate(
        self, student: Any, jobs: list[EvalJob], *, num_goals: int, num_envs: int, max_episode_steps: int
    ) -> list[EvalResult]:
        """One :class:`EvalResult` per job, in job order."""
        settings = {"num_goals": num_goals, "num_envs": num_envs, "max_episode_steps": max_episode_steps}
        groups = by_task(jobs)
        if self._pool is None:
            if self._cache is None:
                raise RuntimeError("this EvalPool is closed")
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in the workers: the same arithmetic whatever training uses
            try:
                done = [_evaluate_task(student, [jobs[i] for i in g], self._cache, settings) for g in groups]
            finally:
                torch.set_num_threads(threads)
            return _in_job_order(groups, done)
        self._calls += 1
        path = os.path.join(self._dir, f"student{self._calls}.pt")
        torch.save(student.state_dict(), path)
        futures = [self._pool.submit(_worker_jobs, path, [jobs[i] for i in g], settings) for g in groups]
        try:
            return _in_job_order(groups, [f.result() for f in futures])
        except BrokenProcessPool as err:
            self.close()
            raise RuntimeError(
                f"an evaluation worker died ({err}); nothing was recorded for this evaluation. Re-run: "
                "a run resumes here (to evaluate in the main process: --eval-workers 0 for cpd distill, "
                "--set distill.eval_workers=0 for cpd run)"
            ) from err
        finally:
            for f in futures:  # after a failed job, the rest of this call is not run
                f.cancel()
            if os.path.exists(path):
                os.remove(path)

    def close(self, kill: bool = False) -> None:
        """Shut the workers down (``kill``: at once, without waiting for running jobs) and free the envs."""
        if self._pool is not None:
            if kill:
                terminate(self._pool)
            else:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> EvalPool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(kill=exc_type is not None)  # an error or Ctrl-C here: do not wait for the workers
