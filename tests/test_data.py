"""Teacher rollouts -> Minari datasets -> contiguous tensors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cpd_fast.data import collect_dataset, dataset_id, load_teacher_data
from cpd_fast.tasks import MT50
from cpd_fast.teachers.scripted import ScriptedExpert

pytest.importorskip("envpool")
pytest.importorskip("metaworld")
minari = pytest.importorskip("minari")

STEPS = 30


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    # 3 episodes from 2 envs: the second round is cut short, and auto-reset steps must not leak in
    collect_dataset(
        ScriptedExpert("reach-v3"),
        "reach-v3",
        root,
        episodes=3,
        num_envs=2,
        noise_std=0.0,
        max_episode_steps=STEPS,
    )
    collect_dataset(
        ScriptedExpert("drawer-close-v3"),
        "drawer-close-v3",
        root,
        episodes=2,
        num_envs=2,
        noise_std=0.3,
        max_episode_steps=STEPS,
        seed=1,
    )
    return root


def test_minari_reads_the_dataset_back(root, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    ds = minari.load_dataset("cpd/reach-v3-v0")
    assert ds.total_episodes == 3 and ds.total_steps == 3 * STEPS
    expert = ScriptedExpert("reach-v3")
    for ep in ds.iterate_episodes():
        assert ep.observations.shape == (STEPS + 1, 39) and ep.actions.shape == (STEPS, 4)
        assert ep.rewards.shape == (STEPS,) and ep.truncations[-1] and not ep.terminations.any()
        assert ep.infos["action_mean"].shape == (STEPS + 1, 4) and ep.infos["success"].shape == (STEPS + 1,)
        assert (ep.infos["task_id"] == MT50.index("reach-v3")).all()
        # the stored target is the teacher's mean at each stored observation
        np.testing.assert_allclose(ep.infos["action_mean"], expert.action_mean(ep.observations), atol=1e-6)
        np.testing.assert_allclose(ep.actions, ep.infos["action_mean"][:-1], atol=1e-6)  # noise_std=0
        # consecutive observations: no auto-reset jump inside an episode (hand moves < 5 cm per step)
        assert np.abs(np.diff(ep.observations[:, :3], axis=0)).max() < 0.05


def test_noise_makes_executed_actions_differ(root, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    ep = next(minari.load_dataset("cpd/drawer-close-v3-v0").iterate_episodes())
    assert np.abs(ep.actions - ep.infos["action_mean"][:-1]).mean() > 0.05


def test_loader_gives_contiguous_tensors(root):
    data = load_teacher_data(["reach-v3", "cpd/drawer-close-v3-v0"], root)
    n = 5 * STEPS
    assert len(data) == n and data.tasks == ["reach-v3", "drawer-close-v3"]
    assert data.obs.shape == (n, 39) and data.obs.dtype == torch.float32 and data.obs.is_contiguous()
    assert data.action_mean.shape == (n, 4) and data.action.shape == (n, 4)
    assert data.task_id.tolist() == [0] * 3 * STEPS + [1] * 2 * STEPS
    assert data.step.tolist() == list(range(STEPS)) * 5 and data.episode.unique().tolist() == [0, 1, 2, 3, 4]
    assert data.done.sum() == 5 and data.done.view(5, STEPS)[:, -1].all()


def test_rerun_is_a_noop_and_bad_input(root, tmp_path):
    path = os.path.join(root, "cpd", "reach-v3-v0")
    before = os.path.getmtime(path)
    assert collect_dataset(ScriptedExpert("reach-v3"), "reach-v3", root, episodes=3) == dataset_id("reach-v3")
    assert os.path.getmtime(path) == before
    with pytest.raises(ValueError, match="episodes must be a positive int"):
        collect_dataset(ScriptedExpert("reach-v3"), "reach-v3", tmp_path, episodes=0)
    with pytest.raises(ValueError, match="unknown Meta-World v3 task"):
        collect_dataset(ScriptedExpert("reach-v3"), "reech-v3", tmp_path)
    with pytest.raises(FileNotFoundError, match="cpd teachers collect"):
        load_teacher_data(["push-v3"], root)
