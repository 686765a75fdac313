"""Official evaluations of one student on many tasks, spread over worker processes.

A run evaluates every task seen so far after every stage, in two modes (MT25: 150 evaluations of 50
episodes), and each evaluation is a single-threaded MuJoCo loop. :class:`EvalPool` runs them as jobs in
``workers`` spawned processes (:func:`cpd_fast.workers.process_pool`), each holding its own
:class:`~cpd_fast.evaluation.EnvCache` for the pool's lifetime, so envs survive across stages and modes
and every core steps.

One job is one evaluation (a task in one mode: all its goals in the same env slots and the same batch
shapes as in this process), and a worker's student is a copy of this process's (its ``state_dict``,
saved once per call and loaded once per worker by ``Student.from_state_dict``). So a job's success flags
are bit for bit those of the in-process evaluation with the same torch threads, whatever the number of
workers and whichever worker ran it (tested). Workers run one torch thread each, as distillation does by
default (``DistillConfig.threads=1``), and evaluate on the CPU.

``workers=0`` runs the jobs in this process, in order, with one cache: the same interface, no processes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from cpd_fast.evaluation import EnvCache, EvalResult, student_result

__all__ = ["EvalJob", "EvalPool"]


@dataclass(frozen=True)
class EvalJob:
    """One official evaluation: ``task`` with the task's prototype (``task_id``) or inferred (``None``)."""

    task: str
    task_id: int | None = None


# the worker process's state (set by its initializer; never touched in the parent)
_WORKER: dict[str, Any] = {}


def _worker_start(max_envs: int) -> None:
    _WORKER.update(cache=EnvCache(max_envs), path=None, student=None)


def _worker_job(path: str, job: EvalJob, settings: dict[str, int]) -> EvalResult:
    import torch

    from cpd_fast.student import Student

    if _WORKER["path"] != path:  # a new student (one per call): load it once per worker
        state = torch.load(path, map_location="cpu", weights_only=True)
        _WORKER["student"] = Student.from_state_dict(state).eval()
        _WORKER["path"] = path
    return student_result(_WORKER["student"], job.task, task_id=job.task_id, env_cache=_WORKER["cache"],
                          **settings)  # fmt: skip


class EvalPool:
    """Runs :func:`~cpd_fast.evaluation.student_result` jobs in ``workers`` processes (0: this process).

    Use it as a context manager (or call :meth:`close`): it owns the worker processes, their envs and a
    temporary directory holding the student each call evaluates.
    """

    def __init__(self, workers: int = 0, max_envs: int = 100) -> None:
        from cpd_fast.errors import require_int
        from cpd_fast.workers import process_pool

        require_int("eval_workers", workers, minimum=0)
        require_int("max_envs", max_envs, minimum=0)
        self.workers = workers
        self._calls = 0
        self._cache = EnvCache(max_envs) if workers == 0 else None
        self._pool = process_pool(workers, 1, _worker_start, max_envs) if workers else None
        self._dir = tempfile.mkdtemp(prefix="cpd-evalpool-") if workers else None

    def evaluate(
        self, student: Any, jobs: list[EvalJob], *, num_goals: int, num_envs: int, max_episode_steps: int
    ) -> list[EvalResult]:
        """One :class:`EvalResult` per job, in job order."""
        settings = {"num_goals": num_goals, "num_envs": num_envs, "max_episode_steps": max_episode_steps}
        if self._pool is None:
            if self._cache is None:
                raise RuntimeError("this EvalPool is closed")
            return [student_result(student, j.task, task_id=j.task_id, env_cache=self._cache, **settings)
                    for j in jobs]  # fmt: skip
        from concurrent.futures.process import BrokenProcessPool

        import torch

        self._calls += 1
        path = os.path.join(self._dir, f"student{self._calls}.pt")
        torch.save(student.state_dict(), path)
        futures = [self._pool.submit(_worker_job, path, job, settings) for job in jobs]
        try:
            return [f.result() for f in futures]
        except BrokenProcessPool as err:
            self.close()
            raise RuntimeError(
                f"an evaluation worker died ({err}); nothing was recorded for this evaluation. Re-run: "
                "a run resumes here (with --set eval_workers=0 to evaluate in the main process)"
            ) from err
        finally:
            for f in futures:  # after a failed job, the rest of this call is not run
                f.cancel()
            if os.path.exists(path):
                os.remove(path)

    def close(self) -> None:
        if self._pool is not None:
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

    def __exit__(self, *exc: object) -> None:
        self.close()
