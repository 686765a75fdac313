"""Teacher protocol, checkpoint teacher, quality gate and the `cpd teachers` CLI (CPU, CI-sized)."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("envpool")
pytest.importorskip("metaworld")

from conftest import tiny_ppo_config

import cpd_fast.teachers.provide as teacher_sources
from cpd_fast.cli import main
from cpd_fast.errors import UserError
from cpd_fast.teachers.base import Teacher, make_teacher
from cpd_fast.teachers.checkpoint import CheckpointTeacher
from cpd_fast.teachers.gate import load_teachers_json, usable_teachers
from cpd_fast.teachers.ppo import train_ppo
from cpd_fast.teachers.provide import provide, train_teachers
from cpd_fast.teachers.scripted import ScriptedExpert
from cpd_fast.teachers.zoo import zoo_records

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


def gate_settings(**overrides):
    """What `cpd run`'s gate section gives provide(), with 2 of the official goals."""
    return SimpleNamespace(**{"threshold": 0.8, "on_fail": "retrain", "eval_goals": 2, "eval_envs": 2,
                              "retrain_factor": 2.0, **overrides})  # fmt: skip


def test_provide_scripted_measures_and_records(tmp_path):
    records = provide("scripted", ["reach-v3"], tmp_path, gate_settings(threshold=1.0), progress=False)
    rec = records["reach-v3"]  # Meta-World's scripted reach expert solves both goals
    assert (rec.source, rec.status, rec.used, rec.success_rate) == ("scripted", "ok", True, 1.0)
    assert rec.protocol == "official-subset" and rec.algorithm == "scripted"
    doc = json.load(open(tmp_path / "teachers.json"))
    assert doc["settings"] == {"tasks": ["reach-v3"], "threshold": 1.0, "eval_goals": 2}
    assert load_teachers_json(tmp_path) == records


def test_provide_zoo_fills_a_gap_by_on_fail_and_refuses_one_it_would_train(tmp_path):
    shipped, _ = zoo_records()
    zoo = tmp_path / "zoo"  # the shipped zoo's reach teacher alone: a zoo without hammer-v3
    zoo.mkdir()
    for name in ("reach-v3.pt", "reach-v3.pt.sha256"):
        shutil.copy(os.path.join(os.path.dirname(shipped), name), zoo / name)
    doc = json.load(open(shipped))
    doc["teachers"] = {"reach-v3": doc["teachers"]["reach-v3"]}
    json.dump(doc, open(zoo / "teachers.json", "w"))
    records = provide(
        "zoo", ["reach-v3", "hammer-v3"], tmp_path / "run", gate_settings(on_fail="scripted"), zoo=zoo
    )
    reach, hammer = records["reach-v3"], records["hammer-v3"]
    assert (reach.source, reach.path, reach.status, reach.used) == ("zoo", str(zoo), "ok", True)
    assert reach.protocol == "official" and reach.threshold == 0.8
    assert hammer.source == "scripted" and hammer.flagged and hammer.path is None
    assert hammer.history[0]["source"] == "zoo" and hammer.history[1]["source"] == "scripted"
    settings = json.load(open(tmp_path / "run" / "teachers.json"))["settings"]
    assert settings["zoo"] == hammer.history[0]["missing_from"]
    assert settings["zoo"] == str(zoo / "teachers.json")
    with pytest.raises(UserError, match=r"no teacher for hammer-v3.*gate.on_fail=retrain cannot train a zoo"):
        provide("zoo", ["reach-v3", "hammer-v3"], tmp_path / "refused", gate_settings(), zoo=zoo)
    with pytest.raises(UserError, match=r"holds reach-v3 below gate\.threshold 1; gate\.on_fail=demos"):
        provide("zoo", ["reach-v3"], tmp_path / "refused", gate_settings(threshold=1.0, on_fail="demos"))
    assert not (tmp_path / "refused" / "teachers.json").exists()


def test_provide_ppo_retrains_a_failed_teacher_with_the_larger_budget(tmp_path, monkeypatch):
    """The gate's remedy on PPO teachers: the jobs are stubbed, the gate and teachers.json are real."""
    calls = []

    def run_jobs(jobs, **where):
        calls.append([(j["task"], os.path.relpath(j["out_dir"], tmp_path), j["config"]["total_steps"],
                       j["algorithm"], where["workers"]) for j in jobs])  # fmt: skip
        success = 0.1 if len(calls) == 1 else 0.9  # the first teacher fails, its retrained one passes
        return [{"task": j["task"], "path": os.path.join(j["out_dir"], "policy.pt"), "success_rate": success,
                 "protocol": "official-subset", "total_steps": j["config"]["total_steps"],
                 "wall_time_s": 1.0, "algorithm": j["algorithm"]} for j in jobs]  # fmt: skip

    monkeypatch.setattr(teacher_sources, "run_jobs", run_jobs)
    records = provide("ppo", "reach-v3", tmp_path, gate_settings(), ppo=UNDERTRAINED, workers=1)
    assert calls == [
        [("reach-v3", os.path.join("teachers", "reach-v3", "ppo"), 128, "ppo", 1)],
        [("reach-v3", os.path.join("teachers", "reach-v3", "ppo-retrain"), 256, "ppo", 1)],
    ]
    rec = records["reach-v3"]
    assert (rec.status, rec.used, rec.flagged, rec.env_steps, rec.success_rate) == (
        "retrained",
        True,
        True,
        256,
        0.9,
    )
    assert [h["success_rate"] for h in rec.history] == [0.1, 0.9]
    settings = json.load(open(tmp_path / "teachers.json"))["settings"]
    assert settings["on_fail"] == "retrain" and settings["retrain_factor"] == 2.0
    assert settings["config"]["total_steps"] == 128 and settings["tasks"] == ["reach-v3"]


def test_provide_refuses_bad_input_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown teacher source 'oracle'"):
        provide("oracle", ["reach-v3"], tmp_path, gate_settings())
    with pytest.raises(ValueError, match="unknown Meta-World v3 task 'reech-v3'"):
        provide("scripted", ["reech-v3"], tmp_path, gate_settings())
    with pytest.raises(ValueError, match="unknown --on-fail 'retry'"):
        provide("scripted", ["reach-v3"], tmp_path, gate_settings(on_fail="retry"))
    with pytest.raises(ValueError, match="threshold must be in"):
        provide("zoo", ["reach-v3"], tmp_path, gate_settings(threshold=1.5))
    assert os.listdir(tmp_path) == []


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
