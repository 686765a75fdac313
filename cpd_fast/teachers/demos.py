"""Demonstration-augmented PPO from Meta-World's scripted expert, for tasks where plain PPO stalls.

The teacher is still trained by RL and ends as a smooth Gaussian PPO policy; the scripted expert only
gives it a starting point and a fading pull towards its actions (DAPG: Rajeswaran et al., "Learning
Complex Dexterous Manipulation with Deep Reinforcement Learning and Demonstrations", RSS 2018):

1. :func:`record_demos` — the scripted expert's episodes, stored as a Minari dataset in ``RUN/demos``
   (executed actions carry ``noise_std`` Gaussian noise so the states cover the expert's neighbourhood;
   the labels are always the expert's own action);
2. :func:`clone_expert` — behaviour cloning: the observation normaliser is set from the demonstrations'
   states, the actor's mean fits the expert's actions (mean-squared error), the exploration std is set to
   ``init_log_std``; the report gives the error on held-out demonstration states;
3. :func:`warm_up_critic` — the critic (and the reward scaler) fit the cloned policy's returns over
   ``critic_rollouts`` rollouts before the actor moves; the actor and normaliser are untouched (bit for bit);
4. :func:`train_ppo_demos` — :func:`~cpd_fast.teachers.ppo.train_ppo` from there, with a behaviour-cloning
   term on expert states added to every minibatch, weighted ``bc_coef * max(bc_decay**update, bc_floor)``.

Where this differs from DAPG: the demonstration term is a mean-squared error on the actor's mean, not
DAPG's advantage-weighted log-likelihood, so it does not shrink the exploration std; its weight decays
geometrically per update as DAPG's does (λ0·λ1^k), optionally down to a floor (``bc_floor``) that keeps
the policy near the expert where PPO alone drifts away from it. The demonstrations, the clone's report
and the settings live in the run directory, so a killed run resumes from its PPO checkpoint without
re-cloning.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from cpd_fast.config import (
    Bool,
    Float,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_class,
    from_mapping,
)
from cpd_fast.data import collect_dataset, load_teacher_data
from cpd_fast.runio import check_same_config, read_json, write_json_atomic
from cpd_fast.teachers.ppo import (
    ActorCritic,
    PPOConfig,
    PPOPolicy,
    RewardScaler,
    RolloutCollector,
    _device,
    compute_gae,
    train_ppo,
)
from cpd_fast.teachers.records import evaluate_teacher
from cpd_fast.teachers.scripted import ScriptedExpert

__all__ = [
    "ALGORITHM",
    "DemoConfig",
    "clone_expert",
    "record_clone_states",
    "record_demos",
    "train_ppo_demos",
    "warm_up_critic",
]

ALGORITHM = "ppo+demos"  # the name teachers.json records
_WARMUP_STREAM = 10_007  # env-seed stream of the critic warm-up (RolloutCollector's ``update`` shift)


@config_class
class DemoConfig:
    """Hyper-parameters of demonstration-augmented PPO (the PPO ones stay in ``PPOConfig``)."""

    episodes: PositiveInt = 50  # scripted-expert episodes recorded (25,000 states at 500 steps each)
    noise_std: NonNegativeFloat = 0.1  # Gaussian noise on the executed expert actions while recording
    bc_epochs: PositiveInt = 30  # behaviour-cloning passes over the demonstrations
    bc_batch_size: PositiveInt = 512
    bc_lr: PositiveFloat = 1e-3
    holdout: Fraction = 0.1  # share of demonstration states kept out of cloning to measure its error
    init_log_std: Float = -1.5  # exploration std after cloning (e^-1.5 = 0.22; the clone is already good)
    critic_rollouts: PositiveInt = 8  # rollouts of the clone fitted by the critic before the actor moves
    critic_epochs: PositiveInt = 8  # passes over each warm-up rollout
    bc_coef: NonNegativeFloat = 1.0  # weight of the behaviour-cloning term at update 0
    bc_decay: Fraction = 0.98  # its weight at update k: bc_coef * max(bc_decay**k, bc_floor); 0.98**100=0.13
    bc_floor: Fraction = 0.0  # the share of bc_coef the term keeps for good (0: it fades out, as in DAPG)
    # DAgger rounds before RL: roll the clone out for `episodes` episodes (with noise_std), label the states
    # it visits with the expert's action, and clone again on everything so far (0: the expert's states only)
    clone_rounds: NonNegativeInt = 0
    # official goals the final clone is measured on before RL (clone.json "clone_success"): what PPO
    # started from, beside what it ends at (0: not measured)
    clone_goals: NonNegativeInt = 50
    # keep the observation normaliser at the demonstrations' statistics during RL. Refreshed with every
    # rollout (False, the behaviour before the field existed), it moves the clone's inputs away from the
    # states it was fitted on, and the clone's success falls with it (lever-pull-v3: bench/teachers.md)
    freeze_obs_norm: Bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DemoConfig:
        return from_mapping(cls, d, "demos config")


def record_demos(
    task: str,
    root: str | os.PathLike,
    dcfg: DemoConfig,
    *,
    backend: str = "envpool",
    seed: int = 0,
    max_episode_steps: int = 500,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scripted expert's demonstrations of ``task`` as ``(obs [M, 39], expert action [M, 4])``.

    Recorded once into ``root`` (a Minari dataset, :func:`cpd_fast.data.collect_dataset`), read back after.
    """
    collect_dataset(ScriptedExpert(task), task, root, episodes=dcfg.episodes, noise_std=dcfg.noise_std,
                    backend=backend, seed=seed, max_episode_steps=max_episode_steps,
                    teacher_name=f"scripted:{task}")  # fmt: skip
    return _arrays(task, root)


def _arrays(task: str, root: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """A recorded demonstration dataset as ``(obs [M, 39], expert action [M, 4])`` float32 tensors."""
    data = load_teacher_data([task], root)
    return data.obs.float(), data.action_mean.float()


def record_clone_states(
    task: str,
    root: str | os.PathLike,
    model: Any,
    config: Any,
    dcfg: DemoConfig,
    *,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DAgger round: the clone's own episodes (its action mean plus ``noise_std`` noise), every visited
    state labelled with the scripted expert's action; a Minari dataset in ``root`` (recorded once)."""
    clone = PPOPolicy(copy.deepcopy(model), config, task)  # a float64 copy: the model stays as it is
    rng = np.random.default_rng(seed)

    def actor(obs: np.ndarray, fresh: np.ndarray, mean: np.ndarray) -> np.ndarray:
        act = clone.action_mean(obs)
        return np.clip(act + rng.normal(0.0, dcfg.noise_std, act.shape).astype(np.float32), -1.0, 1.0)

    collect_dataset(ScriptedExpert(task), task, root, episodes=dcfg.episodes, backend=config.backend,
                    seed=seed, max_episode_steps=config.max_episode_steps, teacher_name=f"scripted:{task}",
                    actor=actor, description=f"{task}: the clone's states, expert-labelled")  # fmt: skip
    return _arrays(task, root)


def _actor_parameters(model: Any) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if not name.startswith("critic.")]


def holdout_split(n: int, holdout: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(held-out indices, cloning indices)`` of ``n`` demonstration states, drawn from ``g``."""
    perm = torch.randperm(n, generator=g)
    n_hold = round(holdout * n)
    return perm[:n_hold], perm[n_hold:]


def clone_expert(
    model: Any, obs: torch.Tensor, target: torch.Tensor, dcfg: DemoConfig, seed: int = 0
) -> dict[str, float]:
    """Behaviour-clone ``(obs, target)`` into ``model``'s actor in place; returns the cloning report.

    ``{"bc_mse_train", "bc_mse_holdout", "bc_max_abs_holdout", "states"}``: errors of the clipped action
    mean against the expert's action, on the cloning states and on the held-out ones.
    """
    g = torch.Generator().manual_seed(seed)
    hold, train = holdout_split(obs.shape[0], dcfg.holdout, g)
    if model.obs_norm.enabled:
        model.obs_norm.update(obs[train])
    params = _actor_parameters(model)
    opt = torch.optim.Adam(params, lr=dcfg.bc_lr)
    model.train()
    for _epoch in range(dcfg.bc_epochs):
        order = train[torch.randperm(train.shape[0], generator=g)]
        for start in range(0, order.shape[0], dcfg.bc_batch_size):
            idx = order[start : start + dcfg.bc_batch_size]
            mean, _ = model.mean_and_logstd(obs[idx])
            loss = ((mean - target[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        if model.state_dependent_std:
            model.actor_logstd_head.bias.fill_(dcfg.init_log_std)
        else:
            model.actor_logstd.fill_(dcfg.init_log_std)
    model.eval()

    def errors(idx: torch.Tensor) -> tuple[float, float]:
        if idx.numel() == 0:
            return float("nan"), float("nan")
        with torch.no_grad():
            diff = model.mean_and_logstd(obs[idx])[0].clamp(-1.0, 1.0) - target[idx]
        return float((diff**2).mean()), float(diff.abs().max())

    mse_train, _ = errors(train)
    mse_hold, max_hold = errors(hold)
    return {"bc_mse_train": mse_train, "bc_mse_holdout": mse_hold, "bc_max_abs_holdout": max_hold,
            "states": int(obs.shape[0])}  # fmt: skip


def clone_success(model: Any, task: str, cfg: Any, goals: int) -> dict[str, Any]:
    """The official success of ``model``'s actor on the first ``goals`` of the 50 goals, measured as a
    learning-curve point is (a float64 copy, :func:`~cpd_fast.teachers.records.evaluate_teacher`):
    ``{"success_rate", "protocol", "successes", "goals"}``."""
    return {
        **evaluate_teacher(PPOPolicy(copy.deepcopy(model), cfg, task), task, num_goals=goals),
        "goals": goals,
    }


def warm_up_critic(model: Any, task: str, cfg: Any, dcfg: DemoConfig) -> dict[str, Any]:
    """Fit ``model``'s critic to the returns of its (cloned) actor; the actor and normaliser do not change.

    Returns ``{"reward_scaler": state, "value_loss": [per rollout], "env_steps": n}``; the reward scaler's
    state carries over into PPO so that the value targets keep their scale.
    """
    device = next(model.parameters()).device
    scaler = RewardScaler(cfg.num_envs, cfg.gamma, cfg.clip_reward, enabled=cfg.norm_reward)
    opt = torch.optim.Adam(model.critic.parameters(), lr=cfg.learning_rate, eps=1e-5)
    losses = []
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    with RolloutCollector(task, cfg, device, update=_WARMUP_STREAM) as envs:
        for _ in range(dcfg.critic_rollouts):
            rollout = envs.collect(model, scaler)
            with torch.no_grad():
                last = model.value(torch.as_tensor(rollout.next_obs, device=device)).cpu().numpy()
            adv, ret = compute_gae(rollout.rewards, rollout.values.cpu().numpy(), last, rollout.terminated,
                                   rollout.dones, cfg.gamma, cfg.gae_lambda)  # fmt: skip
            batch = rollout.ppo_batch(adv, ret)
            mb = max(1, len(batch) // cfg.num_minibatches)
            model.train()
            for _epoch in range(dcfg.critic_epochs):
                perm = torch.randperm(len(batch), device=device, generator=g)
                for start in range(0, len(batch) - mb + 1, mb):
                    b = batch[perm[start : start + mb]]
                    loss = 0.5 * ((model.value(b.obs) - b.returns) ** 2).mean()
                    opt.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(model.critic.parameters(), cfg.max_grad_norm)
                    opt.step()
            losses.append(float(loss.detach()))
    model.eval()
    return {"reward_scaler": scaler.state(), "value_loss": losses,
            "env_steps": dcfg.critic_rollouts * cfg.batch_size}  # fmt: skip


def _bc_term(obs: torch.Tensor, target: torch.Tensor, dcfg: DemoConfig, seed: int):
    """``aux_loss(update)`` for :func:`~cpd_fast.teachers.ppo.train_ppo`: the decaying cloning term."""

    def for_update(update: int):
        weight = dcfg.bc_coef * max(dcfg.bc_decay**update, dcfg.bc_floor)
        if weight < 1e-6:
            return None
        g = torch.Generator().manual_seed(seed * 1_000_003 + update)  # resumes exactly: depends on update

        def term(model: Any, mb_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            idx = torch.randint(obs.shape[0], (mb_size,), generator=g)
            mean, _ = model.mean_and_logstd(obs[idx].to(model.obs_norm.mean.device))
            bc = ((mean - target[idx].to(mean.device)) ** 2).mean()
            return weight * bc, {"bc_loss": bc.detach(), "bc_weight": torch.tensor(weight)}

        return term

    return for_update


def train_ppo_demos(
    task: str,
    config: Any = None,
    run_dir: str | os.PathLike | None = None,
    *,
    demos: DemoConfig | None = None,
    resume: bool = True,
    progress: bool = False,
    tensorboard: bool = True,
    stop_after_updates: int | None = None,
) -> Any:
    """Demonstration-augmented PPO on ``task``: record, clone, warm up the critic, then PPO with the
    decaying cloning term. Same arguments and result as :func:`~cpd_fast.teachers.ppo.train_ppo` (which
    checks the task name), plus ``demos``; ``run_dir`` also gets ``demos/`` (the Minari dataset),
    ``demos.json`` (the settings, checked on resume) and ``clone.json`` (the cloning and warm-up report, with
    their env steps and the clone's own official success)."""
    cfg = config if config is not None else PPOConfig()
    dcfg = demos if demos is not None else DemoConfig()
    run_dir = os.fspath(run_dir) if run_dir is not None else tempfile.mkdtemp(prefix=f"dapg-{task}-")
    os.makedirs(run_dir, exist_ok=True)
    settings = os.path.join(run_dir, "demos.json")
    if os.path.isfile(settings):
        saved = DemoConfig.from_dict(read_json(settings)).to_dict()  # fields added since: their defaults
        check_same_config(saved, dcfg.to_dict(), (), settings, "use a new run directory")
    write_json_atomic(settings, dcfg.to_dict())
    obs, target = record_demos(
        task,
        os.path.join(run_dir, "demos"),
        dcfg,
        backend=cfg.backend,
        seed=cfg.seed,
        max_episode_steps=cfg.max_episode_steps,
    )

    init = None
    if not (resume and os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))):
        init, obs, target = _clone_and_warm_up(task, cfg, dcfg, run_dir, obs, target)
    else:  # resumed: the cloning term reads every round's states, as in the run that cloned
        for r in range(1, dcfg.clone_rounds + 1):
            more = _arrays(task, os.path.join(run_dir, f"demos-round{r}"))
            obs, target = torch.cat([obs, more[0]]), torch.cat([target, more[1]])
    return train_ppo(task, cfg, run_dir, resume=resume, progress=progress, tensorboard=tensorboard,
                     stop_after_updates=stop_after_updates, init=init,
                     aux_loss=_bc_term(obs, target, dcfg, cfg.seed),
                     obs_norm_frozen=dcfg.freeze_obs_norm)  # fmt: skip


def _clone_and_warm_up(
    task: str, cfg: PPOConfig, dcfg: DemoConfig, run_dir: str, obs: torch.Tensor, target: torch.Tensor
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """A fresh run's starting point: the clone of the demonstrations ``(obs, target)`` (after
    ``clone_rounds`` DAgger rounds, each recorded in ``run_dir/demos-round<r>``), its official success and
    a warmed-up critic; the report goes to ``run_dir/clone.json``. Returns ``(train_ppo's init, every
    demonstration state so far, its expert actions)``."""
    device = _device(cfg.device)

    def clone() -> tuple[Any, dict[str, Any]]:  # a fresh actor cloned on every state so far
        torch.manual_seed(cfg.seed)
        m = ActorCritic(cfg).to(device)
        return m, clone_expert(m, obs.to(device), target.to(device), dcfg, seed=cfg.seed)

    model, report = clone()
    rounds = [report]
    for r in range(1, dcfg.clone_rounds + 1):  # DAgger: the states the last clone visits, relabelled
        more = record_clone_states(task, os.path.join(run_dir, f"demos-round{r}"), model, cfg, dcfg,
                                   seed=cfg.seed + r)  # fmt: skip
        obs, target = torch.cat([obs, more[0]]), torch.cat([target, more[1]])
        model, report = clone()
        rounds.append(report)
    if dcfg.clone_rounds:
        report = {**report, "rounds": rounds}
    if dcfg.clone_goals:
        report["clone_success"] = clone_success(model, task, cfg, dcfg.clone_goals)
    warm = warm_up_critic(model, task, cfg, dcfg)
    report.update(critic_value_loss=warm["value_loss"], warmup_env_steps=warm["env_steps"],
                  demo_env_steps=int(obs.shape[0]))  # fmt: skip
    write_json_atomic(os.path.join(run_dir, "clone.json"), report)
    init = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "reward_scaler": warm["reward_scaler"]}  # fmt: skip
    return init, obs, target
