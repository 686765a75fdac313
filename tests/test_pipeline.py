"""``cpd run``: config layering, resume, integrity checks, and a real kill-and-resume test.

The kill test runs a tiny config end to end twice: once without interruption, once SIGKILLed at four
points and resumed after each (``CPD_TEST_KILL_AFTER``, see :mod:`cpd_fast.runio`: the process kills its
whole process group right after writing a matching file — a deterministic power cut):

1. during PPO teacher training, right after the first resume checkpoint of the first teacher;
2. during collection, after the first task's dataset;
3. during a distillation phase: after cpd's stage-1 Phase-1 checkpoint is written, before the phase is
   recorded as finished (so the resumed run must redo the phase and overwrite the checkpoint);
4. inside cpd's stage-1 evaluation: its success rates computed, not yet written or recorded
   (:data:`KILL_IN_EVAL`: ``cpd`` run through a script that wraps :class:`~cpd_fast.evalpool.EvalPool`).

The final success matrices, student weights and datasets must equal the uninterrupted run's. The one
source of nondeterminism is PPO: a resumed teacher restores its learner state exactly but restarts its
envs with fresh episodes (cpd_fast.teachers.ppo), so teacher 1's weights differ between the two runs. The
tiny teachers (192 env steps) fail the quality gate in both runs and are replaced by the scripted experts
(``gate.on_fail: scripted``), which makes everything downstream comparable; the test checks that the
interrupted teacher really resumed (its checkpoint had 1 update at the kill, it finished all 3).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from cpd_fast.cli import main
from cpd_fast.pipeline import Pipeline, config_diff, resolve_config, run_pipeline
from cpd_fast.pipeline.parallel import method_jobs, method_threads
from cpd_fast.runio import CorruptFileError, load_torch_checked, save_torch_atomic
from cpd_fast.workers import available_cores

TINY = {
    "preset": "quick",
    "tasks": ["push-v3", "pick-place-v3"],
    "tasks_per_stage": 1,
    "teachers": "ppo",
    "methods": ["cpd", "finetune"],
    "workers": 1,  # one PPO worker: the teachers train one after the other (a fixed kill point)
    "progress": False,
    "fidelity": {"episodes": 1, "num_envs": 1},
    "gate": {"threshold": 0.8, "on_fail": "scripted", "eval_goals": 1, "eval_envs": 1},
    "ppo": {"total_steps": 192, "num_envs": 4, "num_steps": 16, "num_minibatches": 2, "update_epochs": 1,
            "hidden_sizes": [16, 16], "checkpoint_every": 1, "max_episode_steps": 50},
    "distill": {"episodes_per_task": 2, "collect_envs": 2, "max_episode_steps": 60, "steps_per_stage": 16,
                "batch_size": 16, "warmup_steps": 2, "eval_goals": 1, "eval_envs": 1, "eval_max_steps": 100,
                "eval_modes": ["inferred"], "fisher_batches": 4, "tensorboard": False, "threads": 1,
                "student": {"d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64, "expert_hidden": 32}},
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


# `cpd` with a kill inside one evaluation, for point 4 of the module docstring. No file is written when an
# evaluation starts, so cpd_fast.runio's kill-after-a-write hook cannot land there; this wraps the
# evaluation pool instead. Its top level also runs in the spawned processes that distil the methods side by
# side (multiprocessing's spawn imports the parent's main script again), so the wrap is in place wherever
# the evaluation runs. The pool of run directory RUN (its tmp_dir) asked to evaluate TASKS distinct tasks
# computes the results, writes them to MARKER and SIGKILLs the process group before returning them.
KILL_IN_EVAL = """
import os, signal, sys

from cpd_fast.evalpool import EvalPool

RUN, TASKS = os.environ["KILL_IN_EVAL_RUN"], int(os.environ["KILL_IN_EVAL_TASKS"])
MARKER = os.environ["KILL_IN_EVAL_MARKER"]
init, evaluate = EvalPool.__init__, EvalPool.evaluate


def noting_its_run(self, *args, **kwargs):
    self.run_dir = os.path.abspath(kwargs.get("tmp_dir") or "")
    init(self, *args, **kwargs)


def evaluate_then_die(self, student, jobs, **kwargs):
    results = evaluate(self, student, jobs, **kwargs)
    if self.run_dir == RUN and len({j.task for j in jobs}) == TASKS:
        with open(MARKER, "w") as f:
            f.write(" ".join(sorted(f"{j.task}={r.success_rate}" for j, r in zip(jobs, results))))
        os.killpg(os.getpgrp(), signal.SIGKILL)
    return results


EvalPool.__init__, EvalPool.evaluate = noting_its_run, evaluate_then_die

if __name__ == "__main__":
    from cpd_fast.cli import main

    sys.exit(main())
"""


def _cpd_run(
    cfg: str, out: str, kill_after: str | None = None, kill_in_eval: tuple[str, int] | None = None
) -> int:
    """``cpd run``; ``kill_after``: SIGKILLed right after writing ``out/kill_after`` (cpd_fast.runio's hook);
    ``kill_in_eval`` (method, number of tasks): SIGKILLed inside that method's evaluation of that many tasks
    (:data:`KILL_IN_EVAL`; what it computed goes to ``out.killed``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CPD_TEST_KILL", "KILL_IN_EVAL"))}
    cmd = [sys.executable, "-m", "cpd_fast.cli"]
    if kill_after:
        env["CPD_TEST_KILL_AFTER"] = os.path.join(os.path.abspath(out), kill_after)
    if kill_in_eval:
        cmd = [sys.executable, out + ".kill_in_eval.py"]
        with open(cmd[1], "w") as f:
            f.write(KILL_IN_EVAL)
        method, tasks = kill_in_eval
        env.update(KILL_IN_EVAL_RUN=os.path.join(os.path.abspath(out), "methods", method),
                   KILL_IN_EVAL_TASKS=str(tasks), KILL_IN_EVAL_MARKER=out + ".killed")  # fmt: skip
    # a session of its own: the kill takes down the process group (cpd run, its PPO and method workers)
    proc = subprocess.run(
        [*cmd, "run", "--config", cfg, "--out", out],
        env=env, start_new_session=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if kill_after is None and kill_in_eval is None and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    with open(out + ".stdout", "a") as f:  # beside the run directory: what `cpd run` printed
        f.write(proc.stdout)
    return proc.returncode


def _log(run: str) -> str:
    with open(run + ".stdout") as f:
        return f.read()


@pytest.fixture(scope="module")
def uninterrupted(tiny_config, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("runs") / "A")
    assert _cpd_run(tiny_config, out) == 0
    return out


def _results(run: str, method: str) -> dict:
    with open(os.path.join(run, "methods", method, "results.json")) as f:
        d = json.load(f)
    return {
        "R": d["success_matrix"],
        "modes": d["extra"]["success_matrix_modes"],
        "teacher": d["teacher_success"],
    }


def _assert_identical(a, b, where: str) -> None:
    """Bitwise equality of two checkpoint payloads (nested dicts/lists of tensors and scalars)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _manifest_files(run: str, task: str) -> dict:
    with open(os.path.join(run, "datasets", f"{task}.collected.json")) as f:
        return json.load(f)["files"]


def test_kill_and_resume_matches_uninterrupted(tiny_config, uninterrupted, tmp_path):
    out = str(tmp_path / "B")
    for point in (
        "teachers/push-v3/ppo/checkpoint.pt",
        "datasets/push-v3.collected.json",
        "methods/cpd/checkpoints/stage1-phase1.pt",
    ):
        assert _cpd_run(tiny_config, out, kill_after=point) == -signal.SIGKILL, f"no kill at {point}"
        if point.startswith("teachers"):  # killed mid-training: one update done, no policy yet
            ppo_dir = os.path.join(out, "teachers", "push-v3", "ppo")
            assert load_torch_checked(os.path.join(ppo_dir, "checkpoint.pt"))["update"] == 1
            assert not os.path.exists(os.path.join(ppo_dir, "policy.pt"))
        if point.startswith("datasets"):
            assert not os.path.exists(os.path.join(out, "datasets", "pick-place-v3.collected.json"))
        if point.endswith("stage1-phase1.pt"):
            with open(os.path.join(out, "methods", "cpd", "progress.json")) as f:
                assert "stage1/phase1" not in json.load(f)["steps"]
    # inside cpd's stage-1 evaluation (both tasks): its rates computed, the run killed before recording them
    assert _cpd_run(tiny_config, out, kill_in_eval=("cpd", 2)) == -signal.SIGKILL, "no kill in the evaluation"
    with open(out + ".killed") as f:
        assert re.fullmatch(r"pick-place-v3=[0-9.]+ push-v3=[0-9.]+", f.read())
    cpd_dir = os.path.join(out, "methods", "cpd")
    with open(os.path.join(cpd_dir, "progress.json")) as f:
        done = json.load(f)["steps"]
    assert "stage1/replay" in done and "stage1/eval" not in done  # the evaluation that follows the replay
    assert os.path.exists(os.path.join(cpd_dir, "eval", "stage0.json"))
    assert not os.path.exists(os.path.join(cpd_dir, "eval", "stage1.json"))
    assert _cpd_run(tiny_config, out) == 0

    # the interrupted PPO teacher resumed from its checkpoint and finished its budget
    with open(os.path.join(out, "teachers", "push-v3", "ppo", "eval.json")) as f:
        assert json.load(f)["total_steps"] == 192
    for run in (uninterrupted, out):  # both runs' tiny PPO teachers were gated out and replaced
        with open(os.path.join(run, "teachers.json")) as f:
            records = json.load(f)["teachers"]
        assert {r["source"] for r in records.values()} == {"scripted"}, records
    for task in TINY["tasks"]:
        assert _manifest_files(out, task) == _manifest_files(uninterrupted, task)
    for method in TINY["methods"]:
        assert _results(out, method) == _results(uninterrupted, method)
        ckpts = sorted(os.listdir(os.path.join(uninterrupted, "methods", method, "checkpoints")))
        last = [c for c in ckpts if c.endswith(".pt")][-1]
        a, b = (
            load_torch_checked(os.path.join(r, "methods", method, "checkpoints", last))
            for r in (uninterrupted, out)
        )
        _assert_identical(a, b, f"{method}/{last}")
    assert os.path.isfile(os.path.join(out, "report", "results.md"))
    # CPU time: each pipeline step's, and each method's across the kill (its record resumed with it)
    with open(os.path.join(out, "pipeline.json")) as f:
        steps = json.load(f)["steps"]
    assert steps["collect"]["cpu_s"] > 0 and steps["fidelity"]["cpu_s"] > 0
    for method in TINY["methods"]:
        with open(os.path.join(out, "methods", method, "results.json")) as f:
            assert json.load(f)["extra"]["cpu_time_s"] > 0


def test_methods_side_by_side_compute_what_one_after_another_does(tiny_config, uninterrupted, tmp_path):
    """jobs=2 (the methods in two worker processes, as `uninterrupted` ran on 2 cores) and jobs=1 (one
    after the other in the main process) give the same results and final checkpoints, bit for bit."""
    assert "side by side (2 processes" in _log(uninterrupted) or available_cores() == 1
    cfg = yaml.safe_load(open(tiny_config))
    cfg["jobs"] = 1
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(cfg))
    out = str(tmp_path / "one")
    assert _cpd_run(str(one), out) == 0
    assert "side by side" not in _log(out)
    for method in TINY["methods"]:
        assert _results(out, method) == _results(uninterrupted, method)
        for ckpt in ("stage1-phase2.pt", "stage1-train.pt"):
            paths = [os.path.join(r, "methods", method, "checkpoints", ckpt) for r in (uninterrupted, out)]
            if os.path.isfile(paths[0]):
                _assert_identical(*map(load_torch_checked, paths), f"{method}/{ckpt}")


def _file_states(run: str) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``run`` but its lock (which names each holder): (inode, mtime in ns, contents).
    An atomic rewrite (temp file + rename) changes the inode even within the file system's timestamp
    granularity; an in-place write changes the rest."""
    states = {}
    for root, _, files in os.walk(run):
        for name in files:
            if root == run and name == ".lock":
                continue
            path = os.path.join(root, name)
            st = os.stat(path)
            with open(path, "rb") as f:
                states[os.path.relpath(path, run)] = (st.st_ino, st.st_mtime_ns, f.read())
    return states


def test_resume_finished_run_skips_every_step(uninterrupted, capsys):
    cfg = resolve_config(config_file=os.path.join(uninterrupted, "config.yaml"))
    steps = [name for name, _, _ in Pipeline(cfg, uninterrupted, console=None).steps()]
    assert {f"distill:{m}" for m in TINY["methods"]} <= set(steps)  # the run's own config, not a preset
    before = _file_states(uninterrupted)
    assert main(["run", "--out", uninterrupted, "--no-progress"]) == 0  # --out alone: its own config
    text = capsys.readouterr().out
    assert text.count("done earlier, skipped") == len(steps)
    for i, name in enumerate(steps, 1):
        assert f"[{i}/{len(steps)}] {name}: done earlier, skipped" in text
    assert " done in " not in text
    after = _file_states(uninterrupted)
    assert after.keys() == before.keys()
    assert [f for f in before if after[f] != before[f]] == []  # nothing rewritten, not even pipeline.json


def test_different_config_is_refused(tiny_config, uninterrupted):
    cfg = resolve_config(config_file=tiny_config, overrides={"distill": {"steps_per_stage": 17}})
    with pytest.raises(ValueError, match=r"different config \(distill.steps_per_stage: 16 -> 17\)"):
        run_pipeline(cfg, uninterrupted)
    # runtime-only keys may change on resume
    saved = yaml.safe_load(open(os.path.join(uninterrupted, "config.yaml")))
    cfg = resolve_config(config_file=tiny_config, overrides={"backend": "ray", "progress": True})
    assert config_diff(saved, cfg.to_dict()) == []


@pytest.fixture
def damageable_run(uninterrupted, tmp_path):
    """The uninterrupted run, to damage in place; put back as it was afterwards, pass or fail.

    In place, not in a copy: a run directory records its own path (its methods' config.json name the
    teachers and datasets they used, and run_distill refuses a copy whose paths differ).
    """
    pristine = tmp_path / "pristine"
    shutil.copytree(uninterrupted, pristine, symlinks=True)  # contents and mtimes
    yield uninterrupted
    shutil.rmtree(uninterrupted)
    shutil.copytree(pristine, uninterrupted, symlinks=True)


def test_corrupt_files_are_named_and_the_remedy_works(tiny_config, damageable_run):
    # following the remedies restores exactly what was there (the steps are deterministic)
    run = damageable_run
    before = {m: _results(run, m) for m in TINY["methods"]}
    data_before = _manifest_files(run, "pick-place-v3")
    cfg = resolve_config(config_file=tiny_config)
    # a truncated dataset file: named, with the manifest to delete; doing so re-collects that task only
    rel = next(r for r in _manifest_files(run, "pick-place-v3") if r.endswith(".hdf5"))
    path = os.path.join(run, "datasets", rel)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(
        CorruptFileError, match=re.escape(path) + r" is corrupt.*delete .*pick-place-v3\.collected"
    ):
        run_pipeline(cfg, run)
    os.remove(os.path.join(run, "datasets", "pick-place-v3.collected.json"))
    # a flipped byte in a checkpoint: named, with the method directory to delete; doing so redoes cpd
    ckpt = os.path.join(run, "methods", "cpd", "checkpoints", "stage0-train.pt")
    data = bytearray(open(ckpt, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(ckpt, "wb").write(bytes(data))
    with pytest.raises(
        CorruptFileError, match=r"stage0-train\.pt is corrupt.*sha256.*delete .*methods/cpd and re-run"
    ):
        run_pipeline(cfg, run)
    shutil.rmtree(os.path.join(run, "methods", "cpd"))
    run_pipeline(cfg, run)
    assert _manifest_files(run, "pick-place-v3") == data_before
    assert {m: _results(run, m) for m in TINY["methods"]} == before


def test_checked_loader_detects_truncation_and_bit_flips(tmp_path):
    path = str(tmp_path / "x.pt")
    save_torch_atomic({"w": torch.arange(1000.0)}, path)
    assert torch.equal(load_torch_checked(path)["w"], torch.arange(1000.0))
    assert open(path + ".sha256").read().split()[1] == "x.pt"  # sha256sum -c format
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-100])  # truncated, and its checksum no longer matches
    with pytest.raises(
        CorruptFileError, match=r"x.pt is corrupt or truncated \(sha256 mismatch\); delete it"
    ):
        load_torch_checked(path)
    os.remove(path + ".sha256")  # without a sidecar the load itself must fail cleanly
    with pytest.raises(CorruptFileError, match=r"x\.pt is corrupt or truncated"):
        load_torch_checked(path, recover="do X")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_torch_checked(str(tmp_path / "nope.pt"))


def test_config_file_round_trip_and_flag_overrides(tmp_path, capsys):
    args = ["run", "--preset", "quick", "--seed", "3", "--methods", "cpd", "ewc", "--device", "cpu",
            "--set", "distill.steps_per_stage=7", "--set", "gate.threshold=0.5",
            "--print-config"]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr().out
    d = yaml.safe_load(first)
    assert (d["seed"], d["methods"], d["distill"]["steps_per_stage"], d["gate"]["threshold"]) == (
        3, ["cpd", "ewc"], 7, 0.5)  # fmt: skip
    assert d["distill"]["batch_size"] == 128  # from the preset; the rest from DistillConfig()
    path = tmp_path / "c.yaml"
    path.write_text(first)
    assert main(["run", "--config", str(path), "--print-config"]) == 0
    assert capsys.readouterr().out == first
    assert main(["run", "--config", str(path), "--seed", "4", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 4  # flags beat the file
    assert main(["run", "--teachers", "ppo", "--ray-address", "auto", "--print-config"]) == 0
    d = yaml.safe_load(capsys.readouterr().out)
    assert (d["backend"], d["ray_address"]) == ("ray", "auto")  # an address implies the Ray backend
    assert main(["run", "--ray-address", "auto", "--print-config"]) == 2  # scripted teachers: unused
    assert "--ray-address: only used to train PPO teachers" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distill.steps_per_stage=0", "distill: steps_per_stage: input should be greater than 0, got 0"),
        ("distill.stepz=3", "unknown key.*stepz"),
        ("distill.seed=3", "set seed at the top level"),
        ("tasks_per_stage=3", "does not split into stages"),
        ("gate.on_fail=ignore", "unknown gate.on_fail"),
        ("nonsense", "KEY=VALUE"),
        ("seed=abc", "seed: input should be a valid integer, got 'abc'"),
        ("gate.threshold=abc", "gate.threshold: input should be a valid number, got 'abc'"),
        ("distill.student=3", "student: input should be a dictionary or an instance of StudentConfig"),
        ("distill.lr=[1]", r"lr: input should be a valid number, got \[1\]"),
        ("x=[", "not a YAML value"),
    ],
)
def test_bad_config_values_give_one_line_errors(override, message, capsys):
    assert main(["run", "--set", override, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err


def test_presets_resolve():
    for name in ("quick", "mt10", "mt25", "mt25-plus"):
        cfg = resolve_config(name)
        assert cfg.preset == name and len(cfg.task_list()) % cfg.tasks_per_stage == 0
    assert (
        resolve_config("mt25").distill["steps_per_stage"] == resolve_config("mt10").distill["steps_per_stage"]
    )


def test_thread_share_is_fixed_by_the_config_not_by_what_is_left():
    """A resumed side-by-side run whose other methods are done keeps each method's thread share."""
    cores = available_cores()
    two = resolve_config("quick")  # cpd + finetune
    assert method_jobs(two) == min(2, cores) and method_threads(two) == max(1, cores // method_jobs(two))
    one = resolve_config("quick", overrides={"methods": ["cpd"]})
    assert method_jobs(one) == 1 and method_threads(one) == cores
    pinned = resolve_config("quick", overrides={"jobs": 1, "distill": {"threads": 3}})
    assert method_threads(pinned) == 3
