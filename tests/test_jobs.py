"""Teacher jobs in parallel (cpd_fast.teachers.jobs): local process pool and Ray (skipped when ray is not
installed), driven through train_teachers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("envpool")
pytest.importorskip("metaworld")

from conftest import tiny_ppo_config

from cpd_fast.teachers.jobs import run_jobs
from cpd_fast.teachers.provide import train_teachers

TASKS = ["reach-v3", "drawer-close-v3"]
TINY = tiny_ppo_config()


def check_trained(records, run_dir):
    assert list(records) == TASKS
    for task, rec in records.items():
        assert rec.history[0]["total_steps"] == 256
        assert os.path.isfile(rec.history[0]["path"])
        assert os.path.isfile(os.path.join(run_dir, "teachers", task, "ppo", "eval.json"))
    assert os.path.isfile(os.path.join(run_dir, "teachers.json"))


def kill_once_after_first_checkpoint(monkeypatch, run_dir, task):
    """The fault-injection point (cpd_fast.runio): ``task``'s worker SIGKILLs itself right after its first
    PPO checkpoint, once (a crash after real progress); the marker file records that it happened."""
    marker = run_dir / "killed-once"
    monkeypatch.setenv("CPD_TEST_KILL_AFTER", str(run_dir / "teachers" / task / "ppo" / "checkpoint.pt"))
    monkeypatch.setenv("CPD_TEST_KILL_SCOPE", "process")
    monkeypatch.setenv("CPD_TEST_KILL_ONCE", str(marker))
    return marker


def test_local_trains_two_in_parallel_and_retries_a_killed_worker(tmp_path, monkeypatch):
    marker = kill_once_after_first_checkpoint(monkeypatch, tmp_path, "drawer-close-v3")
    records = train_teachers(
        TASKS,
        tmp_path,
        TINY,
        backend="local",
        workers=2,
        on_fail="exclude",
        eval_goals=1,
        eval_envs=1,
    )
    check_trained(records, tmp_path)
    assert marker.exists()  # the drawer-close worker did die once, and was re-run from its checkpoint
    pids = {rec.history[0]["pid"] for rec in records.values()}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, not this one
    # idempotent: a re-run reuses the finished jobs
    again = train_teachers(TASKS, tmp_path, TINY, workers=2, on_fail="exclude", eval_goals=1, eval_envs=1)
    assert [r.history[0]["pid"] for r in again.values()] == [r.history[0]["pid"] for r in records.values()]


def test_ray_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'cpd_fast\[ray\]'"):
        run_jobs([{"task": "reach-v3"}], backend="ray")


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        run_jobs([{"task": "reach-v3"}], backend="slurm")


def test_ray_trains_two_and_survives_a_killed_worker(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    marker = kill_once_after_first_checkpoint(monkeypatch, tmp_path, "reach-v3")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        records = train_teachers(
            TASKS,
            tmp_path,
            TINY,
            backend="ray",
            on_fail="exclude",
            eval_goals=1,
            eval_envs=1,
            max_retries=2,
        )
    finally:
        ray.shutdown()
    check_trained(records, tmp_path)
    assert marker.exists()  # reach-v3's worker was killed once; Ray retried the task
    assert all(rec.history[0].get("error") is None for rec in records.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_pool_worker_dies_with_its_parent(tmp_path):
    """Killing `cpd teachers train` (SIGKILL, no cleanup) must not leave its workers training on into a
    run directory whose lock died with the parent."""
    script = (
        "import multiprocessing as mp, os, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from cpd_fast.workers import init_worker\n"
        "if __name__ == '__main__':\n"
        "    ex = ProcessPoolExecutor(1, mp_context=mp.get_context('spawn'), initializer=init_worker,"
        " initargs=(1,))\n"
        "    print(ex.submit(os.getpid).result(), flush=True)\n"
        "    ex.submit(time.sleep, 600)\n"
        "    time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(100):  # the kernel signals the orphan at once; allow it time to exit
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail(f"worker {worker} outlived its parent")
