"""Demonstration-augmented PPO and the measured training curve (CPU, CI-sized, reach-v3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("envpool")
pytest.importorskip("metaworld")

from conftest import tiny_ppo_config

from cpd_fast.evaluation import evaluate_official
from cpd_fast.teachers.curve import train_measured
from cpd_fast.teachers.demos import DemoConfig, clone_expert, record_demos, train_ppo_demos, warm_up_critic
from cpd_fast.teachers.ppo import ActorCritic, PPOPolicy, load_policy
from cpd_fast.teachers.provide import train_teachers
from cpd_fast.teachers.scripted import ScriptedExpert

TASK = "reach-v3"
CFG = tiny_ppo_config(total_steps=256, hidden_sizes=(64, 64), max_episode_steps=100)
DEMOS = DemoConfig(episodes=20, bc_epochs=40, critic_rollouts=2, critic_epochs=2, clone_goals=4)
# Tolerance of the clone on held-out expert states (the expert's actions are in [-1, 1]): mean-squared
# error 2e-3 (RMS 0.045). Measured for this 64-64 actor on 2,000 states: 2.9e-4, and the clone solved all
# 8 of the first official goals.
BC_MSE = 2e-3


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return record_demos(TASK, tmp_path_factory.mktemp("demos"), DEMOS, seed=0, max_episode_steps=100)


def _actor(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("critic.")}


def test_clone_matches_the_expert_then_critic_warm_up_leaves_the_actor_alone(demos):
    obs, target = demos
    assert obs.shape == (DEMOS.episodes * 100, 39) and target.shape == (obs.shape[0], 4)
    assert np.array_equal(target[:5].numpy(), ScriptedExpert(TASK).action_mean(obs[:5].numpy()))
    torch.manual_seed(0)
    model = ActorCritic(CFG)
    report = clone_expert(model, obs, target, DEMOS, seed=0)
    assert report["bc_mse_holdout"] < BC_MSE and report["bc_mse_train"] < BC_MSE, report
    assert torch.allclose(model.actor_logstd, torch.full((4,), DEMOS.init_log_std))
    before = _actor(model)
    critic_before = model.critic[0].weight.clone()
    warm = warm_up_critic(model, TASK, CFG, DEMOS)
    after = _actor(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(critic_before, model.critic[0].weight)  # the critic did learn
    assert warm["env_steps"] == DEMOS.critic_rollouts * CFG.batch_size and warm["reward_scaler"]["count"] > 1


def test_short_ppo_from_the_clone_is_no_worse_than_the_clone(tmp_path):
    """BC-initialised actor -> critic warm-up -> two PPO updates with the cloning term: success on the
    official protocol (4 goals) does not drop."""
    run = tmp_path / "dapg"
    first = train_ppo_demos(TASK, CFG, run, demos=DEMOS, tensorboard=False, stop_after_updates=1)
    assert first.global_step == CFG.batch_size
    clone = json.load(open(run / "clone.json"))
    assert clone["bc_mse_holdout"] < BC_MSE and clone["demo_env_steps"] == DEMOS.episodes * 100
    # the clone as it was before PPO moved it: rebuild it from the same seed and data
    obs, target = record_demos(TASK, run / "demos", DEMOS, seed=CFG.seed, max_episode_steps=100)
    torch.manual_seed(CFG.seed)
    start = ActorCritic(CFG)
    clone_expert(start, obs, target, DEMOS, seed=CFG.seed)
    goals = 4
    at_start = evaluate_official(PPOPolicy(start, CFG, TASK).action_mean, TASK, num_goals=goals, num_envs=4)
    # the report measured the same clone the same way, before PPO moved it
    assert clone["clone_success"] == {"success_rate": at_start.success_rate, "protocol": at_start.protocol,
                                      "successes": at_start.successes.astype(int).tolist(),
                                      "goals": goals}  # fmt: skip
    train_ppo_demos(TASK, CFG, run, demos=DEMOS, tensorboard=False)  # resumes to the end (2 updates)
    after = evaluate_official(load_policy(run / "policy.pt").action_mean, TASK, num_goals=goals, num_envs=4)
    assert at_start.success_rate >= 0.75  # the clone already solves reach
    assert after.success_rate >= at_start.success_rate
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [round(m["bc_weight"], 6) for m in metrics] == [
        DEMOS.bc_coef,
        round(DEMOS.bc_coef * DEMOS.bc_decay, 6),
    ]


def test_dagger_clone_rounds_add_the_clones_states_and_resume(tmp_path):
    """clone_rounds=1: the clone's own episodes, labelled by the scripted expert, join the demonstrations
    (a second Minari dataset); the report keeps each round; a resumed run reads both datasets again."""
    from cpd_fast.data import load_teacher_data

    dcfg = DemoConfig(**{**DEMOS.to_dict(), "episodes": 4, "clone_rounds": 1})
    train_ppo_demos(TASK, CFG, tmp_path, demos=dcfg, tensorboard=False, stop_after_updates=1)
    clone = json.load(open(tmp_path / "clone.json"))
    assert [r["states"] for r in clone["rounds"]] == [400, 800] and clone["demo_env_steps"] == 800
    relabelled = load_teacher_data([TASK], tmp_path / "demos-round1")
    expert = ScriptedExpert(TASK).action_mean(relabelled.obs.numpy())
    np.testing.assert_allclose(relabelled.action_mean.numpy(), expert, atol=1e-6)  # the expert's labels
    r = train_ppo_demos(TASK, CFG, tmp_path, demos=dcfg, tensorboard=False)  # resumes: no re-cloning
    assert r.global_step == CFG.total_steps and json.load(open(tmp_path / "clone.json")) == clone


def test_demos_settings_must_match_on_resume(tmp_path):
    train_ppo_demos(TASK, CFG, tmp_path, demos=DEMOS, tensorboard=False, stop_after_updates=1)
    saved = json.loads((tmp_path / "demos.json").read_text())
    del saved["bc_floor"]  # written before the field existed: it resumes with the field's default
    (tmp_path / "demos.json").write_text(json.dumps(saved))
    train_ppo_demos(TASK, CFG, tmp_path, demos=DEMOS, tensorboard=False, stop_after_updates=1)
    other = DemoConfig(**{**DEMOS.to_dict(), "bc_coef": 0.5})
    with pytest.raises(ValueError, match="bc_coef"):
        train_ppo_demos(TASK, CFG, tmp_path, demos=other, tensorboard=False)


def test_cloning_weight_decays_to_its_floor():
    from cpd_fast.teachers.demos import _bc_term

    obs, target = torch.zeros(8, 39), torch.zeros(8, 4)
    model = ActorCritic(CFG)

    def weights(dcfg):
        terms = _bc_term(obs, target, dcfg, seed=0)
        return [None if (t := terms(k)) is None else round(float(t(model, 4)[1]["bc_weight"]), 6)
                for k in (0, 1, 3, 40)]  # fmt: skip

    assert weights(DemoConfig(bc_decay=0.5)) == [1.0, 0.5, 0.125, None]  # DAPG's: fades out
    assert weights(DemoConfig(bc_decay=0.5, bc_floor=0.2, bc_coef=2.0)) == [2.0, 1.0, 0.4, 0.4]


@pytest.mark.parametrize(
    "bad", [{"episodes": 0}, {"bc_decay": 1.5}, {"bc_coef": -1.0}, {"bc_batch_size": 0}, {"bc_floor": 2.0}]
)
def test_demo_config_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DemoConfig(**bad)


def test_train_measured_stops_at_the_target_and_resumes_as_a_no_op(tmp_path):
    cfg = tiny_ppo_config(total_steps=1024)
    curve = train_measured(TASK, cfg, tmp_path, every=256, stop_at=0.0, goals=1, eval_envs=1)
    assert len(curve["points"]) == 1 and curve["steps_to_target"] == 256  # 0.0 is reached at once
    assert load_policy(curve["policy_path"]).task == TASK
    again = train_measured(TASK, cfg, tmp_path, every=256, stop_at=0.0, goals=1, eval_envs=1)
    assert again["points"] == curve["points"]
    with pytest.raises(ValueError, match="every"):
        train_measured(TASK, cfg, tmp_path, every=512, stop_at=0.0, goals=1, eval_envs=1)


def test_give_up_ends_a_run_still_below_its_bar_and_the_gate_remedy_follows(tmp_path):
    """give_up=(steps, success): the first measurement at or after `steps` still below `success` ends the run
    (recorded as gave_up_at; re-running does not train on); a teacher job's first attempt records it and the
    gate's remedy follows. A measurement at or above the bar does not stop it."""
    cfg = tiny_ppo_config(total_steps=1024)  # 128 env steps per update
    curve = train_measured(TASK, cfg, tmp_path / "a", every=384, stop_at=2.0, goals=1, eval_envs=1,
                           give_up=(384, 1.0))  # fmt: skip
    first = curve["points"][0]
    if first["success"] < 1.0:  # the 1-goal measurement of a 384-step policy: a miss, almost always
        assert [p["env_steps"] for p in curve["points"]] == [384] and curve["gave_up_at"] == 384
    else:
        assert "gave_up_at" not in curve and len(curve["points"]) > 1
    assert json.load(open(tmp_path / "a" / "curve.json"))["give_up"] == [384, 1.0]
    again = train_measured(TASK, cfg, tmp_path / "a", every=384, stop_at=2.0, goals=1, eval_envs=1,
                           give_up=(384, 1.0))  # fmt: skip
    assert again["points"] == curve["points"]
    late = train_measured(TASK, cfg, tmp_path / "b", every=384, stop_at=2.0, goals=1, eval_envs=1,
                          give_up=(10_000, 1.0))  # fmt: skip
    assert [p["env_steps"] for p in late["points"]] == [384, 768, 1024] and "gave_up_at" not in late
    for bad in [(0, 0.5), (100, 0.0), (100, 1.5), (100,)]:
        with pytest.raises(ValueError, match="give_up"):
            train_measured(TASK, cfg, tmp_path / "c", every=384, stop_at=2.0, give_up=bad)
    with pytest.raises(ValueError, match="eval_every"):
        train_teachers([TASK], tmp_path / "d", CFG, workers=1, give_up=(128, 0.5))

    records = train_teachers([TASK], tmp_path / "gate", CFG, workers=1, threshold=1.0, on_fail="exclude",
                             eval_goals=2, eval_envs=2, eval_every=128, give_up=(128, 1.0))  # fmt: skip
    history = records[TASK].history
    if history[0]["success_rate"] < 1.0:
        assert history[0]["gave_up_at"] == 128 and history[0]["total_steps"] == 128
        assert records[TASK].status != "ok"
    saved = json.load(open(tmp_path / "gate" / "teachers.json"))
    assert saved["settings"]["give_up"] == [128, 1.0]


def test_a_run_killed_mid_chunk_is_still_measured_every_every_steps(tmp_path):
    """A kill between measurements (here: one update of training before the curve starts) must not shift
    the measurement points: they stay at multiples of `every` (then the budget's end)."""
    from cpd_fast.teachers.ppo import train_ppo

    cfg = tiny_ppo_config(total_steps=1024)  # 128 env steps per update
    train_ppo(TASK, cfg, tmp_path, stop_after_updates=1, tensorboard=False)  # killed after 1 update
    curve = train_measured(TASK, cfg, tmp_path, every=384, stop_at=2.0, goals=1, eval_envs=1)
    assert [p["env_steps"] for p in curve["points"]] == [384, 768, 1024]
    # each measured policy is kept: the teacher at that point of its curve, loadable like any teacher
    import torch

    for p in curve["points"]:
        assert p["snapshot"] == f"snapshots/policy-{p['env_steps']}.pt"
        assert load_policy(str(tmp_path / p["snapshot"])).task == TASK
    last = torch.load(tmp_path / curve["points"][-1]["snapshot"], weights_only=False)
    final = torch.load(curve["policy_path"], weights_only=False)
    assert last["state_dict"].keys() == final["state_dict"].keys()
    assert all(torch.equal(v, final["state_dict"][k]) for k, v in last["state_dict"].items())
    # `until` stops early on the same schedule: the first two points of the same curve, bit for bit
    train_ppo(TASK, cfg, tmp_path / "early", stop_after_updates=1, tensorboard=False)  # the same kill
    early = train_measured(
        TASK, cfg, tmp_path / "early", every=384, stop_at=2.0, goals=1, eval_envs=1, until=700
    )
    assert [p["env_steps"] for p in early["points"]] == [384, 768]
    again = torch.load(tmp_path / "early" / early["points"][1]["snapshot"], weights_only=False)["state_dict"]
    assert all(
        torch.equal(v, again[k])
        for k, v in torch.load(tmp_path / curve["points"][1]["snapshot"], weights_only=False)[
            "state_dict"
        ].items()
    )


def test_gate_on_fail_demos_records_the_algorithm_and_the_expert_bar(tmp_path):
    """An under-trained PPO teacher fails a 1.0 threshold; --on-fail demos trains it from the scripted
    expert and records ppo+demos, its extra env steps and the expert's own success (its bar)."""
    records = train_teachers([TASK], tmp_path, CFG, workers=1, threshold=1.0, on_fail="demos",
                             demos=DEMOS, retrain_factor=1, eval_goals=2, eval_envs=2)  # fmt: skip
    rec = records[TASK]
    first, second = rec.history
    assert first["algorithm"] == "ppo" and second["algorithm"] == "ppo+demos"
    assert second["extra_env_steps"] == DEMOS.episodes * 100 + DEMOS.critic_rollouts * CFG.batch_size
    assert 0.0 <= second["scripted_success"] <= 1.0
    passed = second["success_rate"] >= min(1.0, second["scripted_success"])
    assert rec.used == passed and rec.status == ("retrained-with-demos" if passed else "failed")
    if passed:
        assert rec.algorithm == "ppo+demos" and rec.env_steps == 256 + second["extra_env_steps"]
    saved = json.load(open(tmp_path / "teachers.json"))
    assert (
        saved["settings"]["on_fail"] == "demos" and saved["settings"]["demos"]["episodes"] == DEMOS.episodes
    )


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_normaliser_keeps_the_demonstrations_statistics(tmp_path, frozen):
    """freeze_obs_norm: after PPO updates the observation normaliser is still the clone's (fitted on the
    demonstrations); without it, every rollout moves it."""
    dcfg = DemoConfig(**{**DEMOS.to_dict(), "episodes": 4, "clone_goals": 0, "freeze_obs_norm": frozen})
    train_ppo_demos(TASK, CFG, tmp_path, demos=dcfg, tensorboard=False, stop_after_updates=2)
    obs, target = record_demos(TASK, tmp_path / "demos", dcfg, seed=CFG.seed, max_episode_steps=100)
    torch.manual_seed(CFG.seed)
    clone = ActorCritic(CFG)
    clone_expert(clone, obs, target, dcfg, seed=CFG.seed)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    same = all(
        torch.equal(state[f"obs_norm.{k}"], getattr(clone.obs_norm, k)) for k in ("mean", "var", "count")
    )
    assert same == frozen
    assert "clone_success" not in json.load(open(tmp_path / "clone.json"))  # clone_goals=0: not measured
