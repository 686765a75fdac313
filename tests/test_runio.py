"""The run-directory layer (cpd_fast.runio): ledger, config compatibility, JSON reads, logger, lock, and the
one fault-injection point."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

import cpd_fast.distill.run as distill_run
import cpd_fast.pipeline.steps as pipeline_steps
import cpd_fast.teachers.provide as provide
from cpd_fast import cli
from cpd_fast.runio import (
    CorruptFileError,
    Ledger,
    RunLock,
    RunLogger,
    check_same_config,
    config_diff,
    read_json,
    write_json_atomic,
)


def test_read_json_default_missing_and_corrupt(tmp_path):
    assert read_json(tmp_path / "none.json", {"a": 1}) == {"a": 1}
    with pytest.raises(FileNotFoundError, match=r"none\.json"):
        read_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(CorruptFileError, match=r"bad\.json"):
        read_json(tmp_path / "bad.json", {})


def test_ledger_records_steps_and_reads_the_old_format(tmp_path):
    ledger = Ledger(tmp_path / "progress.json")
    assert "a" not in ledger and not ledger.done("a")
    out = tmp_path / "out.txt"
    ledger.mark("a", {"time_s": 1.5})
    assert "a" in ledger and not ledger.done("a", [str(out)])  # its output is gone: not done
    out.write_text("x")
    assert ledger.done("a", [str(out)])
    assert Ledger(tmp_path / "progress.json").steps == {"a": {"time_s": 1.5}}  # persisted
    write_json_atomic(tmp_path / "old.json", {"done": ["stage0/train", "stage0/eval"]})
    assert list(Ledger(tmp_path / "old.json").steps) == ["stage0/train", "stage0/eval"]
    write_json_atomic(tmp_path / "other.json", {"something": 1})
    with pytest.raises(CorruptFileError, match=r"other\.json"):
        Ledger(tmp_path / "other.json")


def test_config_diff_ignores_runtime_keys_and_their_subtrees():
    a = {"lr": 0.1, "device": "cpu", "ppo": {"lr": 1}, "distill": {"threads": 1, "steps": 5}, "t": (1, 2)}
    b = {"lr": 0.2, "device": "cuda", "ppo": {"lr": 2}, "distill": {"threads": 4, "steps": 5}, "t": [1, 2]}
    assert config_diff(a, b) == ["device", "distill.threads", "lr", "ppo.lr"]
    assert config_diff(a, b, ("device", "ppo", "distill.threads")) == ["lr"]
    with pytest.raises(
        ValueError, match=r"RUN holds a run made with a different config \(lr: 0.1 -> 0.2\); fix"
    ):
        check_same_config(a, b, ("device", "ppo", "distill.threads"), "RUN", "fix")
    check_same_config(a, {**a, "device": "cuda"}, ("device",), "RUN", "fix")  # runtime only: accepted


def test_logger_writes_jsonl_lines_in_order(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log(3, {"mse": 0.5}, prefix="loss/", phase="stage0/train")
        log.event({"stage": 0, "success": {}})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 3, "phase": "stage0/train", "mse": 0.5}, {"stage": 0, "success": {}}]
    with RunLogger(tmp_path / "quiet", enabled=False) as log:  # a non-main DDP rank writes nothing
        log.log(0, {"mse": 1.0})
    assert not (tmp_path / "quiet").exists()


# ----------------------------------------------------------------------------- the lock

HOLD = "import sys, time; from cpd_fast.runio import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"  # noqa: E501


@pytest.fixture
def held(tmp_path):
    """A live process holding the lock on ``tmp_path / 'run'``; yields (run_dir, process)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    proc.kill()
    proc.wait()


def test_lock_is_reentrant_in_one_process_and_released(tmp_path):
    with RunLock(tmp_path), RunLock(tmp_path):  # the pipeline locks RUN, then trains teachers into it
        assert f"pid {os.getpid()} on {socket.gethostname()}" in (tmp_path / ".lock").read_text()
    probe = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"), str(tmp_path)])
    assert probe.returncode == 0  # released: another process takes it


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--preset", "quick", "--out", "{run}"],
        ["distill", "--tasks", "reach-v3", "push-v3", "--out", "{run}"],
        ["teachers", "train", "--tasks", "reach-v3", "--run-dir", "{run}"],
    ],
    ids=["cpd run", "cpd distill", "cpd teachers train"],
)
def test_second_process_is_refused_at_once_then_takes_over_a_dead_holder(held, argv, capsys, monkeypatch):
    run, proc = held
    before = sorted(os.listdir(run))
    code = cli.main([a.format(run=run) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert f"is in use by pid {proc.pid} on {socket.gethostname()}" in err
    assert sorted(os.listdir(run)) == before  # nothing written
    # the holder dies without cleaning up (SIGKILL): its flock went with it, the next process takes over
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    calls = []
    monkeypatch.setattr(pipeline_steps.Pipeline, "run", lambda self: calls.append("run") or {})
    monkeypatch.setattr(pipeline_steps, "print_summary", lambda *a: None)
    monkeypatch.setattr(distill_run.DistillRun, "run", lambda self: calls.append("distill") or _Result())
    monkeypatch.setattr(
        provide, "run_jobs", lambda jobs, **kw: calls.append("jobs") or [_job(j) for j in jobs]
    )
    assert cli.main([a.format(run=run) for a in argv]) == 0
    assert calls and f"pid {os.getpid()} " in (run / ".lock").read_text()


class _Result:
    def metrics(self):
        return type("M", (), {"acc": 1.0, "bwt": 0.0, "relative_performance": 1.0})()


def _job(job):
    return {"task": job["task"], "path": None, "success_rate": 1.0, "protocol": "official"}


# ----------------------------------------------------------------------------- fault injection


def test_kill_point_once_and_process_scope(tmp_path):
    target = tmp_path / "a.json"
    env = {**os.environ, "CPD_TEST_KILL_AFTER": str(target), "CPD_TEST_KILL_SCOPE": "process",
           "CPD_TEST_KILL_ONCE": str(tmp_path / "once")}  # fmt: skip
    code = f"from cpd_fast.runio import write_json_atomic; write_json_atomic({str(target)!r}, {{'x': 1}})"
    first = subprocess.run([sys.executable, "-c", code], env=env)
    assert first.returncode == -signal.SIGKILL and json.loads(target.read_text()) == {"x": 1}
    second = subprocess.run([sys.executable, "-c", code], env=env)
    assert second.returncode == 0  # killed once only
    delayed = subprocess.run([sys.executable, "-c", code + "; import time; time.sleep(30)"],
                             env={**env, "CPD_TEST_KILL_ONCE": "", "CPD_TEST_KILL_DELAY": "0.5"})  # fmt: skip
    assert delayed.returncode == -signal.SIGKILL  # from the timer, inside the work after the write
