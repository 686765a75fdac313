"""cpd_fast.evalpool: official evaluations in worker processes, bit for bit the in-process ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cpd_fast.envs import EnvCache
from cpd_fast.evalpool import EvalJob, EvalPool, by_task
from cpd_fast.runio import load_torch_checked
from cpd_fast.student import Student

# a trained student (MT25 stage 0, committed with its bench run): real successes at varied episode lengths
RUN = Path(__file__).parents[1] / "bench" / "dagger_stage0" / "runs" / "cpd"
CKPT = RUN / "checkpoints" / "stage0-train.pt"
JOBS = [EvalJob("reach-v3", None), EvalJob("reach-v3", 0), EvalJob("drawer-open-v3", 4)]
SETTINGS = dict(num_goals=6, num_envs=3, max_episode_steps=150)


@pytest.fixture(scope="module")
def student():
    return Student.from_state_dict(load_torch_checked(CKPT)["student"]).eval()


def _flags(results):
    return [(r.task, r.successes.tolist(), r.episode_lengths.tolist()) for r in results]


@pytest.fixture(scope="module")
def in_process(student):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: the same arithmetic
    try:
        with EvalPool(0) as pool:
            return _flags(pool.evaluate(student, JOBS, **SETTINGS))
    finally:
        torch.set_num_threads(n)


def test_the_reference_is_not_trivial(in_process):
    """Some goals succeed and some do not, at different lengths: flags that could tell a difference."""
    flags = [f for _, s, _ in in_process for f in s]
    lengths = {n for _, _, ls in in_process for n in ls}
    assert any(flags) and not all(flags) and len(lengths) > 3, in_process


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_in_process_flags_bit_for_bit(student, in_process, workers):
    with EvalPool(workers) as pool:
        first = _flags(pool.evaluate(student, JOBS, **SETTINGS))
        again = _flags(pool.evaluate(student, JOBS[::-1], **SETTINGS))[::-1]  # reused envs, other order
    assert first == in_process
    assert again == in_process


def test_in_process_evaluation_ignores_the_training_threads(student, in_process):
    """Evaluation runs on one thread whatever training uses (the thread count is restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with EvalPool(0) as pool:
            assert _flags(pool.evaluate(student, JOBS, **SETTINGS)) == in_process
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)


def test_a_tasks_jobs_share_envs_the_cache_cannot_keep(student, in_process, monkeypatch):
    """With no room in the cache, a task's jobs of one call (its two modes) still build its envs once,
    and give the same flags."""

    built, take = [], EnvCache.take

    def counting_take(self, task, n):
        before = self.built
        out = take(self, task, n)
        built.extend([task] * (self.built - before))
        return out

    monkeypatch.setattr(EnvCache, "take", counting_take)
    n = torch.get_num_threads()
    try:
        with EvalPool(0, max_envs=0) as pool:
            assert _flags(pool.evaluate(student, JOBS, **SETTINGS)) == in_process
    finally:
        torch.set_num_threads(n)
    assert built == ["reach-v3"] * 3 + ["drawer-open-v3"] * 3  # num_envs each, reach once for both modes
    assert by_task([EvalJob("b"), EvalJob("a", 1), EvalJob("b", 0), EvalJob("a")]) == [[0, 2], [1, 3]]


def test_a_changed_student_is_reloaded(student):
    """The workers evaluate the student of each call, not the one they loaded first."""
    zeroed = Student.from_state_dict(student.state_dict()).eval()
    with torch.no_grad():
        for p in zeroed.head.parameters():
            p.zero_()
    with EvalPool(1) as pool:
        a = pool.evaluate(student, JOBS[:1], **SETTINGS)[0]
        b = pool.evaluate(zeroed, JOBS[:1], **SETTINGS)[0]
    assert a.successes.any() and not b.successes.any()
    # each result carries its share of the worker's CPU time, for the run's CPU record
    assert a.meta["worker_cpu_s"] > 0 and b.meta["worker_cpu_s"] > 0


def test_bad_input_and_job_errors(student):
    with pytest.raises(ValueError, match="eval_workers"):
        EvalPool(-1)
    with EvalPool(1) as pool, pytest.raises(ValueError, match="no-such-task"):
        pool.evaluate(student, [EvalJob("no-such-task-v3")], **SETTINGS)  # the worker's error, raised here
    pool = EvalPool(0)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.evaluate(student, JOBS[:1], **SETTINGS)
