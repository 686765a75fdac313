"""PPO: the pieces alone (GAE, running statistics, loss/update), then learning on reach-v3, determinism,
checkpoints/resume, bad input (CPU, CI-sized)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import tiny_ppo_config

from cpd_fast.teachers.ppo import (
    PPO_STATS,
    ActorCritic,
    PPOBatch,
    PPOConfig,
    PPOPolicy,
    RewardScaler,
    RolloutCollector,
    RunningMeanStd,
    compute_gae,
    load_policy,
    ppo_loss,
    ppo_update,
    train_ppo,
)

needs_envs = pytest.mark.skipif(
    importlib.util.find_spec("envpool") is None or importlib.util.find_spec("metaworld") is None,
    reason="needs envpool and metaworld",
)


def tiny(**kw) -> PPOConfig:
    base = dict(total_steps=512, num_steps=32, num_minibatches=4, update_epochs=2, hidden_sizes=(32, 32))
    return tiny_ppo_config(**{**base, **kw})


# ----------------------------------------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------------------------------------
def test_compute_gae_hand_example():
    # gamma = lam = 0.5 (gamma*lam = 0.25): every number below is exact in binary, worked out on paper.
    #   delta_t = r_t + 0.5 * V_next * (1 - terminated_t) - V_t      V_next = V_{t+1}, or last_value at t=4
    #   A_t     = delta_t + 0.25 * (1 - done_t) * A_{t+1}
    # env 0: terminal at t=2 (no bootstrap, chain cut)
    #   t4: 2 + 0.5*4 - 1 = 3                    A4 = 3
    #   t3: 0 + 0.5*1 - 2 = -1.5                 A3 = -1.5 + 0.25*3 = -0.75
    #   t2: 4 + 0     - 1 = 3 (terminal)         A2 = 3
    #   t1: 0 + 0.5*1 - 2 = -1.5                 A1 = -1.5 + 0.25*3 = -0.75
    #   t0: 2 + 0.5*2 - 1 = 2                    A0 = 2 + 0.25*(-0.75) = 1.8125
    # env 1: truncation at t=1 (bootstraps from V_2 = 2, but the chain is cut)
    #   t4: 1 + 0.5*(-2) - 2 = -2                A4 = -2
    #   t3: 1 + 0.5*2 - 0 = 2                    A3 = 2 + 0.25*(-2) = 1.5
    #   t2: 1 + 0.5*0 - 2 = -1                   A2 = -1 + 0.25*1.5 = -0.625
    #   t1: 1 + 0.5*2 - 4 = -2 (truncated)       A1 = -2
    #   t0: 1 + 0.5*4 - 2 = 1                    A0 = 1 + 0.25*(-2) = 0.5
    # env 2: terminal at the last step: last_value = 100 is ignored
    #   t4: 1 + 0 - 0 = 1, then A_t = 0.25 * A_{t+1}: 0.25, 0.0625, 0.015625, 0.00390625
    # env 3: truncation at the last step: bootstraps from last_value = 8
    #   t4: 0 + 0.5*8 - 0 = 4, then A_t = 0.25 * A_{t+1}: 1, 0.25, 0.0625, 0.015625
    cols = lambda *envs: np.array(envs, dtype=np.float32).T  # [T=5, N=4], one column per env
    rewards = cols([2, 0, 4, 0, 2], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0])
    values = cols([1, 2, 1, 2, 1], [2, 4, 2, 0, 2], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0])
    last_value = np.array([4, -2, 100, 8], dtype=np.float32)
    terminated = cols([0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]).astype(bool)
    done = cols([0, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1]).astype(bool)

    adv, ret = compute_gae(rewards, values, last_value, terminated, done, gamma=0.5, lam=0.5)

    expected_adv = cols(
        [1.8125, -0.75, 3, -0.75, 3],
        [0.5, -2, -0.625, 1.5, -2],
        [0.00390625, 0.015625, 0.0625, 0.25, 1],
        [0.015625, 0.0625, 0.25, 1, 4],
    )
    expected_ret = cols(
        [2.8125, 1.25, 4, 1.25, 4],
        [2.5, 2, 1.375, 1.5, 0],
        [0.00390625, 0.015625, 0.0625, 0.25, 1],
        [0.015625, 0.0625, 0.25, 1, 4],
    )
    assert adv.dtype == np.float32 and ret.dtype == np.float32 and adv.shape == (5, 4)
    np.testing.assert_array_equal(adv, expected_adv)
    np.testing.assert_array_equal(ret, expected_ret)


def test_compute_gae_lambda_one_no_dones_is_discounted_return():
    # lam = 1, no episode ends: A_t + V_t = sum_k gamma^k r_{t+k} + gamma^(T-t) V_last
    rng = np.random.default_rng(0)
    T, N, gamma = 7, 3, 0.9
    rewards = rng.normal(size=(T, N)).astype(np.float32)
    values = rng.normal(size=(T, N)).astype(np.float32)
    last_value = rng.normal(size=N).astype(np.float32)
    no = np.zeros((T, N), dtype=bool)
    _, ret = compute_gae(rewards, values, last_value, no, no, gamma, 1.0)
    expected = [
        sum(gamma**k * rewards[t + k].astype(np.float64) for k in range(T - t))
        + gamma ** (T - t) * last_value
        for t in range(T)
    ]
    np.testing.assert_allclose(ret, np.array(expected), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Running statistics: one helper for the observation normaliser and the reward scaler
# ----------------------------------------------------------------------------------------------------------
BATCH_SIZES = [1, 2, 3, 7, 64, 1, 100, 5]


def test_running_mean_std_scalar_stream_matches_numpy():
    rng = np.random.default_rng(0)
    rms = RunningMeanStd(epsilon=0.0)  # no prior: exactly the stream's statistics
    seen: list[np.ndarray] = []
    for b in BATCH_SIZES:
        batch = rng.normal(3.0, 2.0, size=b)
        rms.update(batch)
        seen.append(batch)
        data = np.concatenate(seen)
        assert isinstance(rms.mean, float) and rms.count == data.size
        np.testing.assert_allclose(rms.mean, data.mean(), rtol=1e-12)
        np.testing.assert_allclose(rms.var, data.var(), rtol=1e-12)
    rms.update(np.zeros(0))  # an empty batch changes nothing
    assert rms.count == sum(BATCH_SIZES)


def test_running_mean_std_per_feature_torch_stream_matches_numpy():
    from cpd_fast.teachers.ppo import RunningNorm

    rng = np.random.default_rng(1)
    norm = RunningNorm(5, clip=10.0)
    assert isinstance(norm, RunningMeanStd)
    norm.count.zero_()  # no prior
    seen: list[np.ndarray] = []
    for b in BATCH_SIZES:
        batch = rng.normal(-1.0, 0.5, size=(b, 5)) * np.arange(1, 6)
        norm.update(torch.as_tensor(batch))
        seen.append(batch)
        data = np.concatenate(seen)
        assert norm.mean.dtype == norm.var.dtype == norm.count.dtype == torch.float64
        assert norm.count.item() == len(data)
        np.testing.assert_allclose(norm.mean.numpy(), data.mean(0), rtol=1e-12)
        np.testing.assert_allclose(norm.var.numpy(), data.var(0), rtol=1e-12)


def test_running_mean_std_prior_is_a_pseudo_observation():
    # The default count 1e-4 at mean 0 / var 1 weighs like that many observations with those moments.
    x = np.random.default_rng(2).normal(4.0, 3.0, size=50)
    rms = RunningMeanStd()
    rms.update(x[:20])
    rms.update(x[20:])
    c, n = 1e-4, x.size
    mean = x.sum() / (n + c)
    var = (c * (1.0 + mean**2) + ((x - mean) ** 2).sum()) / (n + c)
    np.testing.assert_allclose([rms.mean, rms.var, rms.count], [mean, var, n + c], rtol=1e-12)


def test_obs_normaliser_is_the_helper_with_state_dict_buffers():
    cfg = PPOConfig(hidden_sizes=(8,))
    model = ActorCritic(cfg)
    assert isinstance(model.obs_norm, RunningMeanStd)
    # checkpoint format: the same buffer names and dtypes as ever
    norm_state = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items() if "obs_norm" in k}
    assert norm_state == {
        "obs_norm.mean": (torch.float64, (39,)),
        "obs_norm.var": (torch.float64, (39,)),
        "obs_norm.count": (torch.float64, ()),
    }
    x = torch.randn(100, 39, generator=torch.Generator().manual_seed(0)) * 3 + 1
    model.obs_norm.update(x[:30])
    model.obs_norm.update(x[30:])
    xd = x.double().numpy()
    c, n = 1e-4, 100
    mean = xd.sum(0) / (n + c)
    var = (c * (1.0 + mean**2) + ((xd - mean) ** 2).sum(0)) / (n + c)
    np.testing.assert_allclose(model.obs_norm.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(model.obs_norm.var.numpy(), var, rtol=1e-12)
    expected = np.clip((xd - mean) / np.sqrt(var + 1e-8), -cfg.clip_obs, cfg.clip_obs)
    np.testing.assert_allclose(model.obs_norm(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    other = ActorCritic(cfg)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.obs_norm.var, model.obs_norm.var) and other.obs_norm.count.item() == n + c


def test_reward_scaler_uses_the_helper_on_discounted_returns():
    rng = np.random.default_rng(3)
    N, gamma, clip = 4, 0.9, 10.0
    scaler = RewardScaler(N, gamma, clip)
    assert isinstance(scaler.stats, RunningMeanStd)
    scaler.stats.count = 0.0  # no prior: the stats are then exactly those of the tracked returns
    ret, tracked = np.zeros(N), []
    for _ in range(60):
        reward = rng.normal(size=N).astype(np.float32)
        done, valid = rng.random(N) < 0.2, rng.random(N) < 0.8
        out = scaler(reward, done, valid)
        ret = np.where(valid, ret * gamma + reward, ret)  # the discounted return, per env
        tracked.extend(ret[valid])
        ret[done] = 0.0
        np.testing.assert_allclose(scaler.stats.mean, np.mean(tracked), rtol=1e-12)
        np.testing.assert_allclose(scaler.stats.var, np.var(tracked), rtol=1e-12)
        assert out.dtype == np.float32
        np.testing.assert_allclose(
            out, np.clip(reward / math.sqrt(np.var(tracked) + 1e-8), -clip, clip), rtol=1e-6
        )
    # state()/load(): python floats under the same three keys; a loaded scaler scales identically
    state = scaler.state()
    assert set(state) == {"mean", "var", "count"} and all(type(v) is float for v in state.values())
    fresh = RewardScaler(N, gamma, clip)
    fresh.load(state)
    fresh.ret = scaler.ret.copy()
    r, d, v = np.ones(N, np.float32), np.zeros(N, bool), np.ones(N, bool)
    np.testing.assert_array_equal(fresh(r, d, v), scaler(r, d, v))
    off = RewardScaler(N, gamma, clip, enabled=False)
    assert off(r, d, v) is r


# ----------------------------------------------------------------------------------------------------------
# PPO loss and update
# ----------------------------------------------------------------------------------------------------------
def _model_and_minibatch(n: int = 64, **cfg_kw) -> tuple[ActorCritic, PPOBatch, PPOConfig]:
    cfg = PPOConfig(hidden_sizes=(16,), clip_coef=0.2, ent_coef=0.0, **cfg_kw)
    torch.manual_seed(0)
    model = ActorCritic(cfg)
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(n, 39, generator=g)
    actions = 0.3 * torch.randn(n, 4, generator=g)
    with torch.no_grad():
        _, logp, _, values = model.action_and_value(obs, actions)
    adv = torch.randn(n, generator=g) * 5 + 2
    mb = PPOBatch(obs, actions, logp, adv, values + torch.randn(n, generator=g), values)
    return model, mb, cfg


def _normalised(adv: torch.Tensor) -> torch.Tensor:
    return (adv - adv.mean()) / (adv.std() + 1e-8)


def test_ppo_loss_at_ratio_one_is_the_policy_gradient():
    model, mb, cfg = _model_and_minibatch(vf_coef=0.0)
    loss, stats = ppo_loss(model, mb, cfg)  # the minibatch's log-probs are the model's own: ratio = 1
    assert set(stats) == set(PPO_STATS)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    adv = _normalised(mb.advantages)
    torch.testing.assert_close(stats["pg_loss"], -adv.mean())
    # its gradient is the vanilla policy gradient -mean(A * grad log pi)
    grads = lambda: [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    loss.backward()
    got = grads()
    model.zero_grad()
    _, logp, _, _ = model.action_and_value(mb.obs, mb.actions)
    (-(adv * logp).mean()).backward()
    for a, b in zip(got, grads(), strict=True):
        torch.testing.assert_close(a, b)
    # advantages are normalised per minibatch: a positive affine change of them changes nothing
    mb.advantages = 3 * mb.advantages - 7
    torch.testing.assert_close(ppo_loss(model, mb, cfg)[0], loss.detach())


def test_ppo_loss_clips_outside_the_trust_region():
    model, mb, cfg = _model_and_minibatch(vf_coef=0.0)
    adv = _normalised(mb.advantages)
    # ratio 2 where A > 0 and 0.5 where A < 0: both leave [0.8, 1.2] in the direction the objective
    # rewards, so every sample takes the clipped (constant) term and the policy gets no gradient
    ratio = torch.where(adv > 0, 2.0, 0.5)
    mb.logprobs = mb.logprobs - torch.log(ratio)
    loss, stats = ppo_loss(model, mb, cfg)
    assert stats["clipfrac"].item() == 1.0
    torch.testing.assert_close(stats["pg_loss"], torch.where(adv > 0, -1.2 * adv, -0.8 * adv).mean())
    loss.backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())
    # the pessimistic side is not clipped: ratio 2 on a negative advantage keeps its gradient
    model.zero_grad()
    mb.logprobs = mb.logprobs + torch.log(ratio) - math.log(2.0)  # ratio 2 everywhere
    loss, stats = ppo_loss(model, mb, cfg)
    assert stats["clipfrac"].item() == 1.0
    torch.testing.assert_close(stats["pg_loss"], torch.maximum(-2.0 * adv, -1.2 * adv).mean())
    loss.backward()
    assert model.actor_logstd.grad.abs().sum() > 0
    # just inside the region: nothing clipped
    mb.logprobs = mb.logprobs + math.log(2.0) - math.log(1.1)
    assert ppo_loss(model, mb, cfg)[1]["clipfrac"].item() == 0.0


@pytest.mark.parametrize("clip_vloss, expected", [(True, 0.5 * 1.3**2), (False, 0.5 * 0.5**2)])
def test_ppo_loss_value_clipping(clip_vloss, expected):
    model, mb, cfg = _model_and_minibatch(clip_vloss=clip_vloss)
    with torch.no_grad():
        new_v = model.value(mb.obs)
    # old values 1 below the new ones, targets 0.5 above: the clipped value (old + 0.2 = new - 0.8) is
    # 1.3 from its target, the unclipped one 0.5; clipping takes the larger error
    mb.values, mb.returns = new_v - 1.0, new_v + 0.5
    _, stats = ppo_loss(model, mb, cfg)
    assert stats["v_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_ppo_update_epochs_kl_stop_and_grad_clip():
    model, batch, cfg = _model_and_minibatch(n=64, num_minibatches=4, update_epochs=3, max_grad_norm=1e-3)

    def run(**kw):
        torch.manual_seed(0)
        m = ActorCritic(cfg)
        m.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        steps = []
        opt.register_step_post_hook(lambda *_: steps.append(1))
        before = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
        stats = ppo_update(m, opt, batch, PPOConfig(**{**cfg.to_dict(), **kw}))
        after = torch.cat([p.detach().flatten() for p in m.parameters()])
        return stats, len(steps), before, after

    stats, n_steps, _, _ = run()
    assert set(stats) == set(PPO_STATS) and all(math.isfinite(v) for v in stats.values())
    assert n_steps == 3 * 4  # epochs x minibatches
    # the first epoch's SGD steps move the policy, so its approx-KL exceeds a tiny target: stop after it
    assert run(target_kl=1e-12)[1] == 4
    _, n_steps, before, after = run(update_epochs=1, num_minibatches=1)
    # one SGD step of lr 1 moves the parameters by exactly the clipped gradient norm
    assert n_steps == 1 and (after - before).norm().item() == pytest.approx(1e-3, rel=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Rollout and training (real envs)
# ----------------------------------------------------------------------------------------------------------
@needs_envs
@pytest.mark.parametrize("async_envs", [False, True])
def test_rollout_collector(async_envs):
    cfg = tiny_ppo_config(num_envs=4, num_steps=12, max_episode_steps=5, async_envs=async_envs)
    model = ActorCritic(cfg)
    scaler = RewardScaler(cfg.num_envs, cfg.gamma, cfg.clip_reward)
    with RolloutCollector("reach-v3", cfg, torch.device("cpu")) as envs:
        assert len(envs.envs) == (2 if async_envs else 1)
        ro = envs.collect(model, scaler)
    T, N = 12, 4
    assert ro.obs.shape == (T, N, 39) and ro.actions.shape == (T, N, 4) and ro.values.shape == (T, N)
    assert ro.rewards.dtype == np.float32 and ro.next_obs.shape == (N, 39)
    # 5-step episodes: truncated (never terminated) at t = 4 and 10, the auto-reset step after is invalid
    assert not ro.terminated.any()
    np.testing.assert_array_equal(np.flatnonzero(ro.dones[:, 0]), [4, 10])
    np.testing.assert_array_equal(np.flatnonzero(~ro.valid[:, 0]), [5, 11])
    assert len(ro.episode_returns) == len(ro.episode_successes) == 2 * N
    batch = ro.ppo_batch(np.zeros((T, N), np.float32), np.zeros((T, N), np.float32))
    assert len(batch) == ro.valid.sum() == (T - 2) * N


@needs_envs
def test_ppo_learns_reach(tmp_path):
    # 100-step episodes and lr 1e-3 make reach-v3 learnable in ~30k steps. Judged on episodic return
    # (first vs last eighth of the episodes; seeds 0-4 gave last/first = 1.8-3.7), which rises long before
    # 500-step success does.
    cfg = PPOConfig(
        total_steps=32_768,
        num_envs=16,
        num_steps=64,
        max_episode_steps=100,
        num_minibatches=4,
        update_epochs=4,
        hidden_sizes=(64, 64),
        learning_rate=1e-3,
        seed=1,
    )
    result = train_ppo("reach-v3", cfg, tmp_path, tensorboard=False)
    returns = np.asarray(result.episode_returns)
    k = len(returns) // 8
    first, last = returns[:k].mean(), returns[-k:].mean()
    assert last > 1.4 * first, (first, last)
    assert result.global_step >= cfg.total_steps


@needs_envs
@pytest.mark.parametrize("async_envs", [True, False])
def test_same_seed_same_first_update(tmp_path, async_envs):
    cfg = tiny(async_envs=async_envs)
    a = train_ppo("reach-v3", cfg, tmp_path / "a", stop_after_updates=1, tensorboard=False)
    b = train_ppo("reach-v3", cfg, tmp_path / "b", stop_after_updates=1, tensorboard=False)
    assert a.first_update == b.first_update
    c = train_ppo("reach-v3", tiny(async_envs=async_envs, seed=5), tmp_path / "c", stop_after_updates=1)
    assert c.first_update != a.first_update


@needs_envs
def test_checkpoint_resume_and_policy(tmp_path):
    cfg = tiny(total_steps=3 * 8 * 32)
    r1 = train_ppo("reach-v3", cfg, tmp_path, stop_after_updates=1, tensorboard=True)  # "killed" after 1
    assert r1.global_step == 256 and not os.path.exists(r1.policy_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 256 and "obs_norm.mean" in state["model"]
    r2 = train_ppo("reach-v3", cfg, tmp_path, tensorboard=False)
    assert r2.resumed_from == 256 and r2.global_step == 768
    # no temp files left by the atomic writers
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [256, 512, 768]
    assert {"pg_loss", "v_loss", "entropy", "approx_kl", "steps_per_s"} <= set(records[0])
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tb"))

    policy = load_policy(r2.policy_path)
    assert isinstance(policy, PPOPolicy) and policy.task == "reach-v3"
    obs = np.random.default_rng(0).normal(size=(5, 39)).astype(np.float32)
    act = policy.action_mean(obs)
    assert act.shape == (5, 4) and act.dtype == np.float32 and np.all(np.abs(act) <= 1)
    np.testing.assert_array_equal(act, policy.action_mean(obs))  # deterministic
    payload = torch.load(r2.policy_path, weights_only=True)
    assert "optimizer" not in payload and payload["config"]["hidden_sizes"] == [32, 32]
    assert os.path.getsize(r2.policy_path) < 1_000_000
    # finished run: a re-run is a no-op
    r3 = train_ppo("reach-v3", cfg, tmp_path, tensorboard=False)
    assert r3.global_step == 768 and r3.episode_returns == []


@needs_envs
def test_resume_with_other_config_is_refused(tmp_path):
    train_ppo("reach-v3", tiny(), tmp_path, stop_after_updates=1, tensorboard=False)
    with pytest.raises(ValueError, match="different config"):
        train_ppo("reach-v3", tiny(learning_rate=1e-3), tmp_path, tensorboard=False)


@needs_envs
def test_gymnasium_backend_and_state_dependent_std(tmp_path):
    cfg = tiny(num_envs=2, num_steps=16, backend="gymnasium", state_dependent_std=True, num_minibatches=2)
    r = train_ppo("reach-v3", cfg, tmp_path, stop_after_updates=1, tensorboard=False)
    assert r.global_step == 32 and np.isfinite(list(r.first_update.values())).all()


@needs_envs
def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="PPOConfig: total_steps: input should be greater than 0, got 0"):
        PPOConfig(total_steps=0)
    with pytest.raises(ValueError, match="total_steps: input should be greater than 0, got -5"):
        PPOConfig(total_steps=-5)
    with pytest.raises(ValueError, match="backend: input should be 'envpool' or 'gymnasium', got 'mujoco'"):
        PPOConfig(backend="mujoco")
    with pytest.raises(ValueError, match=r"unknown key\(s\) in PPO config: lr; known: total_steps"):
        PPOConfig.from_dict({"lr": 1e-3})
    with pytest.raises(ValueError, match="divisible"):
        PPOConfig(num_envs=3, num_steps=5, num_minibatches=4)
    with pytest.raises(ValueError, match="unknown Meta-World v3 task"):
        train_ppo("reech-v3", tiny(), tmp_path)
    with pytest.raises(FileNotFoundError, match="cpd teachers train"):
        load_policy(tmp_path / "missing.pt")


@needs_envs
def test_vecenv_step_async_matches_step():
    # the async env path PPO pipelines with: send now, recv later, same results as a plain step
    from cpd_fast.envs import make_vec_env

    actions = np.random.default_rng(0).uniform(-1, 1, (6, 4, 4)).astype(np.float32)
    with (
        make_vec_env("reach-v3", 4, seed=3, max_episode_steps=3) as a,
        make_vec_env("reach-v3", 4, seed=3, max_episode_steps=3) as b,
    ):
        np.testing.assert_array_equal(a.reset(), b.reset())
        for act in actions:  # crosses an episode end and its auto-reset step
            ra = a.step(act)
            b.step_async(act)
            rb = b.step_wait()
            for x, y in zip(ra[:4], rb[:4], strict=True):
                np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(ra[4]["autoreset"], rb[4]["autoreset"])
        b.step_async(actions[0])
        with pytest.raises(RuntimeError, match="twice"):
            b.step_async(actions[0])
        b.step_wait()
        with pytest.raises(RuntimeError, match="without step_async"):
            b.step_wait()


def test_recipes_are_valid_configs_and_unknown_is_refused():
    from cpd_fast.teachers.ppo import RECIPES, recipe_config

    assert recipe_config("cpd") == PPOConfig()
    mw = recipe_config("metaworld", total_steps=5)
    assert (mw.update_epochs, mw.num_minibatches, mw.gae_lambda, mw.ent_coef, mw.vf_coef) == (
        16,
        32,
        0.97,
        5e-3,
        1e-3,
    )
    assert not mw.clip_vloss and mw.batch_size == 10_240 and mw.total_steps == 5
    assert all(recipe_config(r).batch_size % recipe_config(r).num_minibatches == 0 for r in RECIPES)
    with pytest.raises(ValueError, match="unknown PPO recipe 'fast'; choose one of cpd, metaworld"):
        recipe_config("fast")
