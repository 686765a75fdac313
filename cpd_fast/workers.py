"""Worker processes on this machine: how many cores there are, and pools whose workers share them well.

Every local pool in the package (teacher training, :mod:`cpd_fast.teachers.jobs`; evaluation,
:mod:`cpd_fast.evalpool`; methods side by side, :mod:`cpd_fast.pipeline.parallel`) is made here, so all of
them:

* start workers by ``spawn`` (torch's and envpool's threads do not survive ``fork``);
* cap each worker's intra-op threads (``torch.set_num_threads`` and ``OMP/MKL/OPENBLAS_NUM_THREADS``)
  so that N workers do not oversubscribe the cores;
* let the kernel end a worker when the process that spawned it dies (Linux ``PR_SET_PDEATHSIG``): a
  killed parent leaves no orphan still writing into a run directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import resource
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from cpd_fast.errors import require_int

__all__ = [
    "THREAD_VARS",
    "available_cores",
    "core_share",
    "cpu_seconds",
    "die_with_parent",
    "init_worker",
    "process_pool",
    "set_threads",
    "terminate",
]

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity (which ``taskset`` narrows), capped by a cgroup v2
    CPU quota (``cpu.max``, which ``docker --cpus`` sets)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


def core_share(processes: int) -> int:
    """Threads for one of ``processes`` processes sharing this machine's cores (at least 1)."""
    return max(1, available_cores() // processes)


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its child processes that have ended and been
    waited for (a pool's workers count once the pool is shut down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def set_threads(threads: int) -> None:
    """This process's intra-op threads: torch's, and the variables libraries read when they start."""
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    torch.set_num_threads(threads)


def die_with_parent() -> None:
    """Linux: ask the kernel to SIGTERM this worker when the process that spawned it dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def init_worker(threads: int, then: Any = None, *args: Any) -> None:
    """A pool worker's initializer: die with the parent, cap threads, then ``then(*args)`` if given."""
    die_with_parent()
    set_threads(threads)
    if then is not None:
        then(*args)


@contextlib.contextmanager
def _thread_env(threads: int) -> Iterator[None]:
    """Set the thread variables while worker processes are spawned (they inherit ``os.environ``)."""
    saved = {v: os.environ.get(v) for v in THREAD_VARS}
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def process_pool(workers: int, threads: int, then: Any = None, *args: Any) -> Any:
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes with ``threads`` threads each, whose
    initializer runs ``then(*args)`` after :func:`init_worker`'s set-up. Use it as a context manager or
    call ``shutdown()``; a worker that dies breaks the pool (``BrokenProcessPool``), as in the library."""
    require_int("workers", workers, minimum=1)
    require_int("threads", threads, minimum=1)
    with _thread_env(threads):
        pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=mp.get_context("spawn"), initializer=init_worker,
            initargs=(threads, then, *args),
        )  # fmt: skip
        # spawn the workers now, while the thread variables are set (the executor starts them lazily)
        try:
            for f in [pool.submit(os.getpid) for _ in range(workers)]:
                f.result()
        except BrokenProcessPool as err:
            pool.shutdown(wait=False, cancel_futures=True)
            raise RuntimeError(
                "worker processes could not start: a script that runs cpd_fast's pools must guard its "
                "entry point with `if __name__ == '__main__':` (spawned workers import it again)"
            ) from err
    return pool


def terminate(pool: Any) -> None:
    """Stop ``pool`` now: cancel what has not started and kill its workers (``ProcessPoolExecutor`` has
    no public way to kill running jobs before Python 3.14), without waiting for them."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.kill()
    for p in processes:
        p.join(timeout=10)
