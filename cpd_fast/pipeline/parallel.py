"""Methods distilled side by side, one worker process each, and each method's share of the cores.

The methods run ``jobs`` at a time (default: as many as there are methods and cores), each with its share
of the cores as torch threads (``distill.threads`` overrides it) and its evaluations in its own process; a
lone method trains on every core and evaluates in ``distill.eval_workers`` worker processes (default: one
per core, :mod:`cpd_fast.evalpool`). The share is fixed by the config, not by what is left to do, so a
resumed run computes what an uninterrupted one does; at the same ``distill.threads``, side by side or one
after another gives the same bits (tested in ``tests/test_pipeline.py``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Any

from cpd_fast.distill.config import DistillConfig
from cpd_fast.distill.run import run_distill
from cpd_fast.pipeline.config import PipelineConfig
from cpd_fast.runio import Ledger
from cpd_fast.workers import available_cores, core_share, process_pool, terminate

__all__ = ["beside", "distill_method", "distill_side_by_side", "method_jobs", "method_threads"]


def method_jobs(cfg: PipelineConfig) -> int:
    """Methods side by side: ``jobs``, or as many as there are methods and cores. Fixed by the config,
    not by what is left to do, so that a resumed method keeps its thread share (its float order)."""
    return max(1, min(cfg.jobs or available_cores(), len(cfg.methods)))


def method_threads(cfg: PipelineConfig) -> int:
    """Each method's torch threads: ``distill.threads``, or its share of the cores (0: torch's)."""
    return cfg.distill_config(cfg.methods[0]).thread_count(method_jobs(cfg))


def beside(config: dict[str, Any]) -> dict[str, Any]:
    """A method's DistillConfig dict as it runs beside other methods: without progress bars, evaluating in
    its own process unless ``eval_workers`` is set."""
    d = dict(config)
    d["progress"] = False
    if d.get("eval_workers") is None:
        d["eval_workers"] = 0
    return d


def distill_method(config: dict[str, Any], method_dir: str) -> dict[str, Any]:
    """One method's distillation (:func:`~cpd_fast.distill.run.run_distill`), its headline metrics and
    what made it (its results.json's provenance; None for a result older than that record); a
    module-level function so that a worker process can run it."""
    result = run_distill(DistillConfig.from_dict(config), method_dir)
    m = result.metrics()
    return {"acc": m.acc, "bwt": m.bwt, "forgetting": m.mean_forgetting, "relative": m.relative_performance,
            "provenance": result.extra.get("provenance")}  # fmt: skip


def distill_side_by_side(
    work: dict[str, tuple[dict[str, Any], str]],
    jobs: int,
    threads: int,
    done: Callable[[str, dict[str, Any]], None],
    console: Any,
) -> None:
    """Distil each method of ``work`` (``{method: (DistillConfig dict, method directory)}``) in worker
    processes, one pool of one process each (:func:`cpd_fast.workers.process_pool`), ``jobs`` at a time;
    ``done(method, record)`` is called as each ends. A method that raises or whose process dies does not
    stop the others; the first error is raised after them. An error in this process (or Ctrl-C) kills the
    workers at once."""
    t0, failed = time.perf_counter(), None
    shown = {m: set(Ledger(_progress_path(d)).steps) for m, (_, d) in work.items()}
    queue, futures, pools = list(work), {}, []
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [terminate(p) for p in pools])  # normally all idle by then
        while queue or futures:
            while queue and len(futures) < jobs:
                m = queue.pop(0)
                pool = process_pool(1, threads or core_share(jobs))
                pools.append(pool)
                futures[pool.submit(distill_method, *work[m])] = m, pool
            finished, _ = wait(futures, timeout=10, return_when=FIRST_COMPLETED)
            _show_progress(shown, work, t0, console)  # each method's finished phases and evaluations
            for fut in finished:
                m, pool = futures.pop(fut)
                pool.shutdown(wait=True)  # idle now: its process exits
                pools.remove(pool)
                try:
                    record = fut.result()
                except Exception as err:  # the others still finish and are kept; then this is raised
                    failed = failed or err
                    console.print(f"    [red]{m} failed[/red]: {err}")
                    continue
                record["time_s"] = round(time.perf_counter() - t0, 1)
                done(m, record)
                console.print(f"    [green]{m} done[/green] after {record['time_s']:.1f} s")
    if failed is not None:
        raise failed


def _progress_path(method_dir: str) -> str:
    return os.path.join(method_dir, "progress.json")  # the ledger of run_distill


def _show_progress(
    shown: dict[str, set[str]], work: dict[str, tuple[dict[str, Any], str]], t0: float, console: Any
) -> None:
    """One line per phase or evaluation a method finished since the last call (``shown``: those seen)."""
    for m, seen in shown.items():
        path = _progress_path(work[m][1])
        steps = Ledger(path).steps if os.path.isfile(path) else {}  # written atomically: never half
        for step in [s for s in steps if s not in seen]:
            seen.add(step)
            console.print(f"    {m}: {step} ({time.perf_counter() - t0:.0f} s)")
