"""Teacher-in-the-loop data (DAgger) in a continual-distillation run: tiny, CPU, scripted teachers."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

pytest.importorskip("envpool")
pytest.importorskip("metaworld")

from test_distill import _one_thread, run_killed_after, tiny_config  # noqa: F401  (_one_thread: autouse)

from cpd_fast.distill import DistillConfig, run_distill
from cpd_fast.distill.dagger import round_boundaries

DAGGER = dict(dagger=True, dagger_rounds=2, dagger_episodes=2, dagger_beta=0.5)


@pytest.fixture(scope="module")
def dagger_run(tmp_path_factory):
    # a module fixture runs outside the per-test _one_thread fixture: set and restore the count itself
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("dagger") / "cpd"
        cfg = tiny_config(**DAGGER)
        yield cfg, run_dir, run_distill(cfg, run_dir)
    finally:
        torch.set_num_threads(n)


def test_rounds_collect_student_driven_data_labelled_by_the_teacher(dagger_run):
    import minari

    from cpd_fast.data import load_teacher_data
    from cpd_fast.teachers.scripted import ScriptedExpert

    cfg, run_dir, result = dagger_run
    assert result.method == "cpd (2 episodes/task, history 4, DAgger 2x2 beta 0.5)"
    assert result.extra["complete"]
    records = result.extra["dagger"]
    assert sorted(records) == ["0", "1"]  # every stage
    for s, stage_tasks in ((0, cfg.tasks[:2]), (1, cfg.tasks[2:])):
        recs = records[str(s)]
        assert [(r["round"], r["task"]) for r in recs] == [(r, t) for r in (1, 2) for t in stage_tasks]
        for r in recs:
            assert r["beta"] == 0.5 ** r["round"] and r["episodes"] == 2
            assert 0 <= r["teacher_steps"] <= r["env_steps"] and r["env_steps"] >= 2 * cfg.max_episode_steps
        task = stage_tasks[0]
        root = run_dir / "dagger"
        data = load_teacher_data([f"dagger-s{s}-r1/{task}-v0"], root)
        # the stored target is the teacher's action at every state the student visited
        expert = ScriptedExpert(task).action_mean(data.obs.numpy())
        np.testing.assert_allclose(data.action_mean.numpy(), expert, atol=1e-6)
        os.environ["MINARI_DATASETS_PATH"] = str(root)
        try:
            meta = minari.load_dataset(f"dagger-s{s}-r1/{task}-v0")
            assert "student-driven" in meta.storage.metadata["description"]
        finally:
            del os.environ["MINARI_DATASETS_PATH"]
    # replay draws from the teacher's and the student-driven transitions together
    replay = result.extra["replay"]["per_task"]
    assert all(v["fraction"] <= cfg.replay_fraction for v in replay.values())


def test_boundaries_split_the_phase_evenly():
    assert round_boundaries(30, 2) == [10, 20]
    assert round_boundaries(40, 3) == [10, 20, 30]


def test_kill_mid_round_resumes_to_the_same_run(dagger_run, tmp_path, monkeypatch):
    from cpd_fast.distill.dagger import Rounds

    cfg, run_dir, result = dagger_run
    killed = tmp_path / "killed"
    # SIGKILL right after stage 1's round state is saved, before that round's data is collected
    assert run_killed_after(cfg, killed, killed / "checkpoints" / "stage1-phase1-round.pt") == -signal.SIGKILL
    done = json.load(open(killed / "progress.json"))["steps"]
    assert "stage0/eval" in done and "stage1/phase1" not in done
    assert not (killed / "dagger" / f"dagger-s1-r1-{cfg.tasks[2]}.json").exists()
    resumed_at = []
    original = Rounds.resume

    def spy(self):
        out = original(self)
        resumed_at.append((self.s, None if out is None else out[0]))
        return out

    monkeypatch.setattr(Rounds, "resume", spy)
    resumed = run_distill(cfg, killed)
    assert resumed_at == [(1, 1)]  # stage 1's phase restarted from its round-1 state, not from scratch
    np.testing.assert_array_equal(np.array(resumed.success_matrix, dtype=float),
                                  np.array(result.success_matrix, dtype=float))  # fmt: skip
    a = torch.load(run_dir / "checkpoints" / "stage1-phase2.pt", weights_only=True)["student"]
    b = torch.load(killed / "checkpoints" / "stage1-phase2.pt", weights_only=True)["student"]
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    assert resumed.extra["replay"] == result.extra["replay"]
    assert not (killed / "checkpoints" / "stage1-phase1-round.pt").exists()  # removed once the phase is done


@pytest.mark.parametrize(
    "bad, field",
    [({"dagger_rounds": 0}, "dagger_rounds"), ({"dagger_beta": 1.5}, "dagger_beta"),
     ({"dagger_episodes": 0}, "dagger_episodes"), ({"replay_fraction": 0.0}, "replay_fraction")],
)  # fmt: skip
def test_bad_dagger_settings(bad, field):
    with pytest.raises(ValueError, match=field):
        DistillConfig(**{**DAGGER, **bad})


def test_dagger_needs_queryable_teachers(tmp_path):
    teachers = tmp_path / "t"
    teachers.mkdir()
    rec = dict(source="ppo", path=str(tmp_path / "gone.pt"), success_rate=1.0, protocol="official",
               threshold=0.8, passed=True, status="ok", used=True)  # fmt: skip
    json.dump({"settings": {}, "teachers": {t: {**rec, "task": t} for t in tiny_config().tasks}},
              open(teachers / "teachers.json", "w"))  # fmt: skip
    with pytest.raises(FileNotFoundError, match="teacher checkpoint"):
        run_distill(tiny_config(teachers=str(teachers), **DAGGER), tmp_path / "run")


def test_dagger_settings_without_dagger_are_refused_by_the_cli(capsys):
    from cpd_fast.cli import main

    argv = ["distill", "--tasks", "reach-v3", "drawer-close-v3", "--dagger-rounds", "3", "--out", "/tmp/x"]
    assert main(argv) == 2
    assert "dagger" in capsys.readouterr().err
