"""Teacher protocol, checkpoint teacher, quality gate and the `cpd teachers` CLI (CPU, CI-sized)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("envpool")
pytest.importorskip("metaworld")

from conftest import tiny_ppo_config

from cpd_fast.cli import main
from cpd_fast.distributed import train_teachers
from cpd_fast.teachers.base import Teacher, make_teacher
from cpd_fast.teachers.checkpoint import CheckpointTeacher
from cpd_fast.teachers.gate import load_teachers_json, usable_teachers
from cpd_fast.teachers.ppo import train_ppo
from cpd_fast.teachers.scripted import ScriptedExpert

# One update of 8 envs x 16 steps: a deliberately under-trained teacher.
UNDERTRAINED = tiny_ppo_config(total_steps=128)


def cpd(argv: list[str]) -> int:
    """The ``cpd`` command in-process: errors are one line on stderr, exit status 2."""
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse rejects a bad value before the command runs
        return exit_.code


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory):
    return train_ppo("reach-v3", UNDERTRAINED, tmp_path_factory.mktemp("ppo"), tensorboard=False).policy_path


def test_sources_share_the_protocol(policy_path):
    obs = np.random.default_rng(0).uniform(-0.5, 0.5, size=(3, 39)).astype(np.float32)
    for teacher in (
        ScriptedExpert("reach-v3"),
        CheckpointTeacher(policy_path),
        make_teacher("ppo", "reach-v3", policy_path),
    ):
        assert isinstance(teacher, Teacher)
        out = teacher.action_mean(obs)
        assert out.shape == (3, 4) and out.dtype == np.float32
    assert isinstance(make_teacher("scripted", "reach-v3"), ScriptedExpert)
    assert CheckpointTeacher(policy_path).task == "reach-v3"


def test_teacher_bad_input(policy_path, tmp_path):
    with pytest.raises(ValueError, match="unknown teacher source"):
        make_teacher("oracle", "reach-v3")
    with pytest.raises(ValueError, match="needs the path"):
        make_teacher("checkpoint", "reach-v3")
    with pytest.raises(FileNotFoundError):
        make_teacher("checkpoint", "reach-v3", str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="not 'push-v3'"):
        CheckpointTeacher(policy_path, task="push-v3")
    with pytest.raises(ValueError, match="unknown Meta-World v3 task"):
        make_teacher("scripted", "reech-v3")
    with pytest.raises(ValueError, match="shape"):
        CheckpointTeacher(policy_path).action_mean(np.zeros((2, 7), np.float32))


@pytest.mark.parametrize("on_fail", ["exclude", "scripted"])
def test_gate_flags_an_undertrained_teacher(tmp_path, on_fail):
    records = train_teachers(
        ["reach-v3"], tmp_path, UNDERTRAINED, workers=1, on_fail=on_fail, eval_goals=2, eval_envs=2
    )
    rec = records["reach-v3"]
    assert rec.flagged and rec.history[0]["source"] == "ppo" and rec.history[0]["success_rate"] < 0.8
    saved = load_teachers_json(tmp_path)["reach-v3"]
    assert saved.flagged and saved.status == rec.status
    if on_fail == "exclude":
        assert rec.status == "excluded" and not rec.used and usable_teachers(tmp_path) == {}
    else:  # Meta-World's scripted reach expert solves both goals
        assert rec.source == "scripted" and rec.status == "replaced-by-scripted" and rec.used
        assert rec.success_rate == 1.0 and list(usable_teachers(tmp_path)) == ["reach-v3"]
    settings = json.load(open(tmp_path / "teachers.json"))["settings"]
    assert settings["threshold"] == 0.8 and settings["on_fail"] == on_fail


def test_gate_retrain_keeps_failure_flagged_and_unused(tmp_path):
    records = train_teachers(
        ["reach-v3"],
        tmp_path,
        UNDERTRAINED,
        workers=1,
        on_fail="retrain",
        retrain_factor=2,
        eval_goals=1,
        eval_envs=1,
    )
    rec = records["reach-v3"]
    assert [h["total_steps"] for h in rec.history] == [128, 256]  # retrained with the larger budget
    assert rec.flagged and rec.status == "failed" and not rec.used


def test_cli_bad_input(tmp_path, capsys, policy_path):
    assert cpd(["teachers", "train", "--tasks", "reech-v3", "--run-dir", str(tmp_path)]) == 2
    assert "unknown Meta-World v3 task 'reech-v3'" in capsys.readouterr().err
    assert (
        cpd(["teachers", "train", "--tasks", "reach-v3", "--run-dir", str(tmp_path), "--total-steps", "0"])
        == 2
    )
    assert "argument --total-steps: must be a positive int" in capsys.readouterr().err
    assert cpd(["teachers", "eval", "--task", "reach-v3", "--checkpoint", str(tmp_path / "x.pt")]) == 2
    assert "no PPO policy checkpoint" in capsys.readouterr().err
    assert cpd(["teachers", "collect", "--run-dir", str(tmp_path / "empty")]) == 2
    assert "no teachers.json" in capsys.readouterr().err
    assert cpd(["teachers", "eval", "--task", "reach-v3", "--checkpoint", policy_path, "--goals", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == "official-subset" and 0 <= out["success_rate"] <= 1


def test_cli_train_then_collect(tmp_path, capsys, monkeypatch):
    run = str(tmp_path)
    argv = [
        "teachers",
        "train",
        "--tasks",
        "reach-v3",
        "--run-dir",
        run,
        "--total-steps",
        "128",
        "--num-envs",
        "8",
    ]
    argv += ["--num-steps", "16", "--workers", "1", "--eval-goals", "1", "--on-fail", "scripted"]
    assert cpd(argv) == 0
    out = capsys.readouterr().out
    assert "reach-v3" in out and "teachers.json" in out
    assert usable_teachers(run)["reach-v3"].source in ("ppo", "scripted")
    argv = ["teachers", "collect", "--run-dir", run, "--episodes", "2", "--num-envs", "2"]
    assert cpd([*argv, "--max-episode-steps", "10"]) == 0
    assert "cpd/reach-v3-v0" in capsys.readouterr().out
    monkeypatch.setenv("MINARI_DATASETS_PATH", os.path.join(run, "datasets"))
    import minari

    assert minari.load_dataset("cpd/reach-v3-v0").total_episodes == 2
