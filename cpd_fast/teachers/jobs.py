"""Training one teacher per task, in parallel: a local process pool, or Ray for a cluster.

The unit of work is a *teacher job* (:func:`run_teacher_job`): train PPO on one task into its own
directory (resuming from its checkpoint if one is there), then measure it with the official protocol.
A job is idempotent — re-running a finished job only re-reads its ``eval.json`` — so a killed worker is
simply run again:

* ``backend="local"`` (default): ``workers`` spawned processes on this machine. Each gets
  ``cores // workers`` threads (``torch.set_num_threads`` and ``OMP/MKL_NUM_THREADS``; see
  :mod:`cpd_fast.workers`) so that N workers do not oversubscribe the cores. A job whose process dies
  is resubmitted (``max_retries``).
* ``backend="ray"``: one Ray task per teacher with ``num_cpus``/``num_gpus`` resources and Ray's own
  ``max_retries`` for dead workers. ``ray_address=None`` starts a local Ray (``ray.init()``); ``"auto"``
  or ``"ray://host:port"`` joins an existing cluster (every node needs cpd_fast installed and a shared
  ``run_dir``, e.g. NFS). Ray is optional: ``pip install "cpd_fast[ray]"``.

:func:`cpd_fast.teachers.provide.train_teachers` runs the jobs of a suite, then applies the quality gate
and writes ``teachers.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from cpd_fast.runio import read_json, write_json_atomic
from cpd_fast.teachers.curve import train_measured
from cpd_fast.teachers.demos import ALGORITHM, DemoConfig, train_ppo_demos
from cpd_fast.teachers.ppo import PPOConfig, load_policy, train_ppo
from cpd_fast.teachers.records import evaluate_teacher
from cpd_fast.teachers.scripted import ScriptedExpert
from cpd_fast.workers import available_cores, core_share, process_pool, set_threads

__all__ = [
    "BACKENDS",
    "RAY_CONNECT_TIMEOUT_S",
    "check_ray_address",
    "run_jobs",
    "run_teacher_job",
    "trainer_of",
]

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
RAY_CONNECT_TIMEOUT_S = 5.0


# ----------------------------------------------------------------------------------------------------------
# One job (runs inside a worker process)
# ----------------------------------------------------------------------------------------------------------
def trainer_of(algorithm: str, demos: dict[str, Any] | None) -> Any:
    """The ``train_ppo``-like callable of a teacher ``algorithm`` (``"ppo"`` or ``"ppo+demos"``)."""
    if algorithm == "ppo":
        return train_ppo
    if algorithm == ALGORITHM:
        return functools.partial(train_ppo_demos, demos=DemoConfig.from_dict(demos or {}))
    raise ValueError(f"unknown teacher algorithm {algorithm!r}; choose ppo or {ALGORITHM}")


def run_teacher_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) one PPO teacher and evaluate it officially. Runs in a worker; plain-dict I/O.

    ``job`` keys: ``task``, ``out_dir``, ``config`` (a :class:`~cpd_fast.teachers.ppo.PPOConfig` dict),
    ``eval_goals``, ``eval_envs``, and optionally ``threads`` (torch threads), ``algorithm`` (``"ppo"``, or
    ``"ppo+demos"`` with ``demos``, a :class:`~cpd_fast.teachers.demos.DemoConfig` dict) and ``eval_every`` /
    ``stop_at`` (train in measured chunks and stop at that success: :func:`cpd_fast.teachers.curve.
    train_measured`), with ``give_up`` (``[env steps, success]``: stop a run still below that success
    there). Crash tests kill a job with the package's one fault-injection point (:mod:`cpd_fast.runio`:
    ``CPD_TEST_KILL_AFTER`` on its ``checkpoint.pt``, ``CPD_TEST_KILL_SCOPE=process``,
    ``CPD_TEST_KILL_ONCE``).

    Returns:
        ``{"task", "path", "success_rate", "protocol", "total_steps", "wall_time_s", "steps_per_s",
        "algorithm"}``; a ``ppo+demos`` job adds ``scripted_success`` (the expert's official success on the
        same goals: its bar) and ``extra_env_steps`` (demonstrations + critic warm-up); a run ended by its
        ``give_up`` rule adds ``gave_up_at``.
    """
    threads = int(job.get("threads") or 0)
    if threads > 0:
        set_threads(threads)
    task, out_dir = job["task"], job["out_dir"]
    cfg = PPOConfig.from_dict(job["config"])
    eval_path = os.path.join(out_dir, "eval.json")
    if os.path.isfile(eval_path):  # finished earlier (idempotent re-run)
        with open(eval_path) as f:
            return json.load(f)

    algorithm = job.get("algorithm", "ppo")
    trainer = trainer_of(algorithm, job.get("demos"))
    goals, envs, progress = job["eval_goals"], job["eval_envs"], bool(job.get("progress"))
    t0 = time.perf_counter()
    if job.get("eval_every"):
        stop_at = job.get("stop_at")
        curve = train_measured(task, cfg, out_dir, every=job["eval_every"], goals=goals, eval_envs=envs,
                               stop_at=2.0 if stop_at is None else stop_at, trainer=trainer,
                               algorithm=algorithm, progress=progress,
                               give_up=tuple(job["give_up"]) if job.get("give_up") else None)  # fmt: skip
        last = curve["points"][-1]
        path, steps, protocol = curve["policy_path"], last["env_steps"], curve["protocol"]
        success, steps_per_s = last["success"], last["steps_per_s"]
        wall = sum(p["wall_s"] for p in curve["points"])  # every chunk, over resumes
        gave_up_at = curve.get("gave_up_at")
    else:
        result = trainer(task, cfg, out_dir, progress=progress)
        measured = evaluate_teacher(load_policy(result.policy_path), task, num_goals=goals, num_envs=envs)
        path, steps, protocol = result.policy_path, result.global_step, measured["protocol"]
        success, steps_per_s = measured["success_rate"], result.steps_per_s
        wall, gave_up_at = time.perf_counter() - t0, None
    summary = {
        "task": task,
        "path": path,
        "success_rate": success,
        "protocol": protocol,
        "total_steps": steps,
        "wall_time_s": round(wall, 2),
        "steps_per_s": round(steps_per_s, 1),
        "algorithm": algorithm,
        "pid": os.getpid(),
    }
    if gave_up_at is not None:
        summary["gave_up_at"] = gave_up_at
    if algorithm == ALGORITHM:
        clone = read_json(os.path.join(out_dir, "clone.json"), {})
        summary["extra_env_steps"] = int(clone.get("demo_env_steps", 0)) + int(
            clone.get("warmup_env_steps", 0)
        )
        expert = evaluate_teacher(ScriptedExpert(task), task, num_goals=goals, num_envs=envs)
        summary["scripted_success"] = expert["success_rate"]
    write_json_atomic(eval_path, summary)
    return summary


# ----------------------------------------------------------------------------------------------------------
# Running many jobs
# ----------------------------------------------------------------------------------------------------------
def _error(job: dict[str, Any], err: BaseException) -> dict[str, Any]:
    return {"task": job["task"], "path": None, "success_rate": None, "error": f"{type(err).__name__}: {err}"}


def _run_local(jobs: list[dict[str, Any]], workers: int, max_retries: int) -> list[dict[str, Any]]:
    threads = core_share(workers)
    results: dict[int, dict[str, Any]] = {}
    attempts = dict.fromkeys(range(len(jobs)), 0)
    pending = list(range(len(jobs)))
    while pending:
        # A fresh pool per round: a worker killed mid-job breaks the whole pool (BrokenProcessPool).
        with process_pool(min(workers, len(pending)), threads) as pool:
            futures = {i: pool.submit(run_teacher_job, {**jobs[i], "threads": threads}) for i in pending}
            retry = []
            for i, fut in futures.items():
                attempts[i] += 1
                try:
                    results[i] = fut.result()
                except BrokenProcessPool as err:  # a worker died (this job's or another's): retry
                    if attempts[i] <= max_retries:
                        log.warning("%s: worker died (%s); retrying", jobs[i]["task"], err)
                        retry.append(i)
                    else:
                        results[i] = _error(jobs[i], err)
                except Exception as err:  # the job itself raised: report, do not retry
                    results[i] = _error(jobs[i], err)
        pending = retry
    return [results[i] for i in range(len(jobs))]


def _import_ray() -> Any:
    try:
        import ray  # lazy: optional dependency (pip install "cpd_fast[ray]"), only the ray backend needs it
    except ImportError as err:
        raise ImportError(
            "the ray backend needs Ray: pip install 'cpd_fast[ray]' (or 'ray[default]>=2.40'); "
            "or use --backend local"
        ) from err
    return ray


def check_ray_address(address: str | None, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Raise ``ConnectionError`` within ``timeout`` seconds when nothing listens at a Ray cluster address.

    ``ray.init(address=...)`` keeps retrying an address that does not answer for minutes; a TCP connect
    to ``HOST:PORT`` (``ray://HOST:PORT`` for Ray Client) tells a typo or a stopped cluster at once.
    ``None`` (start a local Ray) and ``"auto"`` (Ray finds a cluster on this node itself) defer to the
    ``RAY_ADDRESS`` environment variable as ``ray.init`` does; that address is checked when set.
    """
    where = "--ray-address"
    if not address or address == "auto":
        address, where = os.environ.get("RAY_ADDRESS", ""), "RAY_ADDRESS"
        if not address or address == "auto":
            return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    host = host.strip("[]")  # [IPv6]:port
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{where} {address!r} is not HOST:PORT, ray://HOST:PORT or 'auto' "
            "(the head node prints its address on `ray start --head`)"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        why = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise ConnectionError(
            f"no Ray cluster answers at {address} ({why}, {timeout:g} s connect timeout); start one with "
            f"`ray start --head` on the head node, or fix {where}"
        ) from err


def _run_ray(
    jobs: list[dict[str, Any]],
    address: str | None,
    num_cpus: float,
    num_gpus: float,
    max_retries: int,
    local_cpus: int | None,
) -> list[dict[str, Any]]:
    ray = _import_ray()
    started_here = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=local_cpus, include_dashboard=False)
        started_here = True
    threads = max(1, int(num_cpus))
    remote = ray.remote(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_retries=max_retries,  # re-runs a task whose worker process died; the job resumes its checkpoint
        retry_exceptions=False,  # a Python exception in the job is a bug or bad input: report it
    )(run_teacher_job)
    try:
        refs = [remote.remote({**job, "threads": threads}) for job in jobs]
        results = []
        for job, ref in zip(jobs, refs, strict=True):
            try:
                results.append(ray.get(ref))
            except Exception as err:  # RayTaskError, WorkerCrashedError after the retries
                results.append(_error(job, err))
        return results
    finally:
        if started_here:
            ray.shutdown()


def run_jobs(
    jobs: Sequence[dict[str, Any]],
    *,
    backend: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    num_cpus_per_job: float = 1,
    num_gpus_per_job: float = 0,
    max_retries: int = 2,
) -> list[dict[str, Any]]:
    """Run teacher jobs (see :func:`run_teacher_job`) on ``backend``; results in job order.

    A job that raised or kept dying is returned as ``{"task", "path": None, "success_rate": None, "error"}``.
    """
    jobs = list(jobs)
    if not jobs:
        return []
    if backend == "local":
        workers = workers or min(len(jobs), available_cores())
        if workers <= 0:
            raise ValueError(f"workers must be positive, got {workers}")
        return _run_local(jobs, workers, max_retries)
    if backend == "ray":
        check_ray_address(ray_address)
        return _run_ray(jobs, ray_address, num_cpus_per_job, num_gpus_per_job, max_retries, workers)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
