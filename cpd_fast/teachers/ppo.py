"""Continuous-action PPO for one Meta-World task, on vectorised envs (envpool by default).

Reads top to bottom, CleanRL-style: the hyper-parameters (:class:`PPOConfig`), the running statistics
(:class:`RunningMeanStd`, shared by the observation normaliser and the reward scaler), the networks
(:class:`ActorCritic`, whose observation normaliser lives in its ``state_dict``), the reward scaler, the
trained teacher, then the pieces of training, each testable alone — :func:`compute_gae`,
:func:`ppo_loss` / :func:`ppo_update`, :class:`RolloutCollector` — and :func:`train_ppo`, which strings
them together: setup, resume, loop { anneal lr, rollout, GAE, update, normaliser refresh, log, checkpoint }.

Conventions worth knowing:

* Meta-World never terminates an episode; it is *truncated* after ``max_episode_steps``. Truncation is not
  death, so the value target at the last step bootstraps from ``V(last observation)``. The env's next-step
  auto-reset hands us exactly that observation one step later (the step whose action is ignored), and
  that auto-reset transition itself is masked out of the loss.
* The observation normaliser is frozen during a rollout and its update, and refreshed from the rollout's
  raw observations afterwards, so the log-probabilities of the update match the ones sampled.
* ``async_envs`` splits the envs into two envpool groups and pipelines them: while group A steps on
  envpool's threads (``send``), the policy runs for group B, then the roles swap (``recv``). On a GPU the
  networks stay on the device and stepping overlaps inference. It is on by default only with a GPU: on
  2 CPU cores inference and env threads compete for the same cores and the halved inference batches cost
  more than the overlap gains (bench/teachers.md); ``async_envs=True`` forces it (the tests exercise it).
* Run directory: ``checkpoint.pt`` (resume state: networks, optimizer, scaler, RNG, step counter),
  ``policy.pt`` (the final teacher: network ``state_dict`` + config, no optimizer), ``metrics.jsonl``,
  ``config.json`` and TensorBoard events under ``tb/``. All checkpoint writes are atomic and load with
  ``torch.load(..., weights_only=True)``. A killed run restarted with the same arguments continues from
  ``checkpoint.pt`` (envs restart with fresh episodes; the learner state is restored exactly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import Field, Strict
from torch import nn
from tqdm import tqdm

from cpd_fast.config import (
    Bool,
    Float,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Seed,
    Str,
    config_class,
    from_mapping,
)
from cpd_fast.envs import ACT_DIM, MAX_EPISODE_STEPS, OBS_DIM, make_vec_env
from cpd_fast.runio import (
    RunLogger,
    check_same_config,
    load_torch_checked,
    save_torch_atomic,
    write_json_atomic,
)
from cpd_fast.tasks import validate_task

__all__ = [
    "ACTOR_FORMAT",
    "POLICY_FORMAT",
    "PPO_STATS",
    "RECIPES",
    "ActorCritic",
    "PPOBatch",
    "PPOConfig",
    "PPOPolicy",
    "RewardScaler",
    "Rollout",
    "RolloutCollector",
    "RunningMeanStd",
    "TrainResult",
    "compute_gae",
    "export_policy",
    "load_policy",
    "merge_moments",
    "policy_payload",
    "ppo_loss",
    "ppo_update",
    "recipe_config",
    "train_ppo",
]

POLICY_FORMAT = "cpd_fast.ppo_policy/1"
ACTOR_FORMAT = "cpd_fast.ppo_actor/1"  # export_policy(actor_only=True): no critic (the shipped zoo)
_CRITIC = "critic."


# ----------------------------------------------------------------------------------------------------------
# Hyper-parameters
# ----------------------------------------------------------------------------------------------------------
@config_class
class PPOConfig:
    """Every knob of a PPO run. Defaults are tuned for Meta-World v3 on a few CPU cores.

    Compared with CleanRL's MuJoCo defaults (2048 steps x 1 env, 32 minibatches of 64, 10 epochs): more
    envs and a larger batch (Meta-World episodes are 500 steps and goals vary per episode, so a batch
    must span many episodes), fewer/larger minibatches (CPU throughput), a smaller initial std (actions
    are deltas in [-1, 1]; std 1 mostly hits the clip bounds).
    """

    total_steps: PositiveInt = 1_000_000  # env steps (all envs together), auto-reset steps included
    num_envs: PositiveInt = 16
    num_steps: PositiveInt = 256  # steps per env per rollout; batch = num_envs * num_steps
    learning_rate: PositiveFloat = 3e-4
    anneal_lr: Bool = True  # linearly to 0 over total_steps
    gamma: Fraction = 0.99
    gae_lambda: Fraction = 0.95
    num_minibatches: PositiveInt = 8
    update_epochs: PositiveInt = 8
    clip_coef: PositiveFloat = 0.2
    clip_vloss: Bool = True
    ent_coef: NonNegativeFloat = 0.0
    vf_coef: NonNegativeFloat = 0.5
    max_grad_norm: PositiveFloat = 0.5
    target_kl: PositiveFloat | None = None  # stop the epochs of an update early past this approx-KL
    hidden_sizes: tuple[PositiveInt, ...] = (256, 256)
    state_dependent_std: Bool = False  # log-std from a head on the actor's features instead of a parameter
    init_log_std: Float = -0.5
    norm_obs: Bool = True
    norm_reward: Bool = True  # divide rewards by a running std of the discounted return
    clip_obs: PositiveFloat = 10.0
    clip_reward: PositiveFloat = 10.0
    backend: Literal["envpool", "gymnasium"] = "envpool"  # gymnasium: tasks where envpool is unfaithful
    # Pipeline two env groups (envpool only; even num_envs). None = on when the networks run on a GPU:
    # on a 2-core CPU the two groups' smaller batches and the extra threads cost more than the overlap gains.
    async_envs: Bool | None = None
    max_episode_steps: Annotated[int, Strict(), Field(ge=1, le=MAX_EPISODE_STEPS)] = MAX_EPISODE_STEPS
    seed: Seed = 0
    device: Str = "auto"  # "auto" = cuda when available
    torch_threads: NonNegativeInt = 0  # >0: torch.set_num_threads (the local pool sets it per worker)
    checkpoint_every: PositiveInt = 10  # updates between resume checkpoints
    log_every: PositiveInt = 1  # updates between log records

    def __post_init__(self) -> None:
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            raise ValueError(
                f"num_envs*num_steps ({self.num_envs * self.num_steps}) must be divisible by "
                f"num_minibatches ({self.num_minibatches})"
            )

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return math.ceil(self.total_steps / self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden_sizes"] = list(self.hidden_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PPOConfig:
        """From a saved config (``config.json``, a checkpoint's ``config``); an unknown key is refused."""
        return from_mapping(cls, d, "PPO config")


# ----------------------------------------------------------------------------------------------------------
# Running statistics (observation normaliser and reward scaler)
# ----------------------------------------------------------------------------------------------------------
def merge_moments(mean: Any, var: Any, count: Any, b_mean: Any, b_var: Any, b_count: Any) -> tuple:
    """Chan et al.'s parallel merge of running ``(mean, var, count)`` with a batch's moments.

    ``var`` is the population variance. Plain arithmetic, so it runs unchanged on python floats and torch
    tensors, each with its own rounding (a python float's ``**2`` is libm's ``pow``, a tensor's is ``x*x``).
    """
    total = count + b_count
    delta = b_mean - mean
    mean = mean + delta * b_count / total
    var = (var * count + b_var * b_count + delta**2 * count * b_count / total) / total
    return mean, var, total


class RunningMeanStd:
    """Running mean and population variance of a stream of batches, in float64.

    One update rule, two storages: a scalar stream keeps python floats (``RunningMeanStd()``; batches are
    numpy arrays or anything ``np.asarray`` takes — the reward scaler), a per-feature stream keeps torch
    float64 tensors (:class:`RunningNorm` registers them as module buffers; batches are ``[B, *shape]``
    tensors, moments taken by torch on the buffers' device). ``count`` starts at ``epsilon``: the prior
    (mean 0, var 1) is a pseudo-observation of that weight, as in Stable-Baselines3 and CleanRL.
    """

    def __init__(self, epsilon: float = 1e-4) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, epsilon

    def update(self, batch: Any) -> None:
        """Merge ``batch`` into the stats (an empty batch changes nothing)."""
        if isinstance(self.mean, torch.Tensor):
            with torch.no_grad():
                x = torch.as_tensor(batch).to(self.mean.device, torch.float64).reshape(-1, *self.mean.shape)
                if x.shape[0]:
                    self.update_from_moments(x.mean(0), x.var(0, unbiased=False), x.shape[0])
        else:
            x = np.asarray(batch, dtype=np.float64).reshape(-1)
            if x.size:
                self.update_from_moments(float(x.mean()), float(x.var()), x.size)

    def update_from_moments(self, b_mean: Any, b_var: Any, b_count: int) -> None:
        """Merge a batch given by its mean, population variance and size."""
        mean, var, count = merge_moments(self.mean, self.var, self.count, b_mean, b_var, b_count)
        if isinstance(self.mean, torch.Tensor):  # in place: they may be a module's registered buffers
            self.mean.copy_(mean)
            self.var.copy_(var)
            self.count.copy_(count)
        else:
            self.mean, self.var, self.count = mean, var, count


# Named PPO recipes: field overrides of PPOConfig's defaults ("cpd").
# "metaworld": the Meta-World+ authors' PPO (rainx0r/metaworld-algorithms: PPOConfig and
# examples/multi_task/ppo_mt10.py): 10,000-step rollouts (here 20 envs x 512 steps = 10,240, divisible by 32),
# 16 epochs x 32 minibatches, GAE lambda 0.97, entropy 5e-3, value coefficient 1e-3, grad-norm 1.0,
# no value clipping, gamma 0.99, clip 0.2, Adam 3e-4 (eps 1e-5), advantages normalised.
RECIPES: dict[str, dict[str, Any]] = {
    "cpd": {},
    "metaworld": {
        "num_envs": 20, "num_steps": 512, "update_epochs": 16, "num_minibatches": 32, "gae_lambda": 0.97,
        "ent_coef": 5e-3, "vf_coef": 1e-3, "max_grad_norm": 1.0, "clip_vloss": False,
    },
}  # fmt: skip


def recipe_config(recipe: str, **overrides: Any) -> PPOConfig:
    """``PPOConfig`` of a named recipe (:data:`RECIPES`) with ``overrides`` on top."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown PPO recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return PPOConfig(**{**RECIPES[recipe], **overrides})


# ----------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------
class RunningNorm(nn.Module, RunningMeanStd):
    """Per-feature observation normaliser: a :class:`RunningMeanStd` whose stats are buffers (checkpointed).

    The buffers are ``mean``, ``var`` (float64 ``[dim]``) and ``count`` (float64 scalar).
    """

    def __init__(self, dim: int, clip: float, enabled: bool = True) -> None:
        nn.Module.__init__(self)
        self.clip = clip
        self.enabled = enabled
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        std = torch.sqrt(self.var + 1e-8).to(x.dtype)
        return torch.clamp((x - self.mean.to(x.dtype)) / std, -self.clip, self.clip)


def _mlp(sizes: list[int], out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        last = i == len(sizes) - 2
        # Orthogonal init (sqrt 2 for hidden layers; small gains for the heads so the initial policy
        # is near-zero-mean and the initial value near 0) — the standard PPO recipe.
        nn.init.orthogonal_(linear.weight, out_gain if last else math.sqrt(2))
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if not last:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """Gaussian actor and value critic (separate tanh MLPs) behind a shared observation normaliser.

    Shapes: observations ``[B, 39]`` (raw, normalised inside), actions ``[B, 4]``, values ``[B]``.
    """

    def __init__(self, cfg: PPOConfig) -> None:
        super().__init__()
        hidden = list(cfg.hidden_sizes)
        self.obs_norm = RunningNorm(OBS_DIM, cfg.clip_obs, enabled=cfg.norm_obs)
        self.critic = _mlp([OBS_DIM, *hidden, 1], out_gain=1.0)
        self.state_dependent_std = cfg.state_dependent_std
        if cfg.state_dependent_std:
            self.actor_body = _mlp([OBS_DIM, *hidden], out_gain=math.sqrt(2))
            self.actor_body.append(nn.Tanh())
            self.actor_mean = nn.Linear(hidden[-1], ACT_DIM)
            self.actor_logstd_head = nn.Linear(hidden[-1], ACT_DIM)
            nn.init.orthogonal_(self.actor_mean.weight, 0.01)
            nn.init.zeros_(self.actor_mean.bias)
            nn.init.orthogonal_(self.actor_logstd_head.weight, 0.01)
            nn.init.constant_(self.actor_logstd_head.bias, cfg.init_log_std)
        else:
            self.actor = _mlp([OBS_DIM, *hidden, ACT_DIM], out_gain=0.01)
            self.actor_logstd = nn.Parameter(torch.full((ACT_DIM,), float(cfg.init_log_std)))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.obs_norm(obs)).squeeze(-1)

    def mean_and_logstd(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.obs_norm(obs)
        if self.state_dependent_std:
            h = self.actor_body(x)
            return self.actor_mean(h), torch.clamp(self.actor_logstd_head(h), -5.0, 2.0)
        mean = self.actor(x)
        return mean, self.actor_logstd.expand_as(mean)

    def action_and_value(
        self, obs: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample (or score) ``action``; returns action, log-prob ``[B]``, entropy ``[B]``, value ``[B]``."""
        mean, logstd = self.mean_and_logstd(obs)
        # no argument checks: they would run on every step
        dist = torch.distributions.Normal(mean, logstd.exp(), validate_args=False)
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action).sum(-1), dist.entropy().sum(-1), self.value(obs)


class RewardScaler:
    """Divides rewards by the running std of the discounted return (reward *scaling*: no mean shift).

    Keeps one discounted return per env, and the returns' :class:`RunningMeanStd` in ``stats``;
    ``state()``/``load()`` round-trip the stats through a checkpoint (``{"mean", "var", "count"}`` floats).
    """

    def __init__(self, num_envs: int, gamma: float, clip: float, enabled: bool = True) -> None:
        self.gamma, self.clip, self.enabled = gamma, clip, enabled
        self.ret = np.zeros(num_envs, dtype=np.float64)
        self.stats = RunningMeanStd()

    def __call__(self, reward: np.ndarray, done: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Scale ``reward [N]``; ``done`` ends the tracked returns; only ``valid`` envs update the stats."""
        if not self.enabled:
            return reward
        self.ret = np.where(valid, self.ret * self.gamma + reward, self.ret)
        self.stats.update(self.ret[valid])
        self.ret[done] = 0.0
        return np.clip(reward / math.sqrt(self.stats.var + 1e-8), -self.clip, self.clip).astype(np.float32)

    def state(self) -> dict[str, Any]:
        return {"mean": self.stats.mean, "var": self.stats.var, "count": self.stats.count}

    def load(self, state: dict[str, Any]) -> None:
        self.stats.mean, self.stats.var = float(state["mean"]), float(state["var"])
        self.stats.count = float(state["count"])


# ----------------------------------------------------------------------------------------------------------
# The trained teacher
# ----------------------------------------------------------------------------------------------------------
class PPOPolicy:
    """A trained PPO actor as a teacher: ``action_mean(obs [B, 39]) -> [B, 4]`` (deterministic, clipped).

    The actor runs in float64 and its output is rounded to float32 once: float32 matmul kernels differ in
    the last bits between CPUs (AVX2 / AVX-512, AMD / Intel), float64 ones by far less than a float32 ulp,
    so a teacher's actions — and the datasets and evaluations built on them — are the same bits on every
    machine. ``model`` is converted in place.
    """

    def __init__(self, model: ActorCritic, config: PPOConfig, task: str | None = None) -> None:
        self.model = model.eval().double()
        self.config = config
        self.task = task
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def action_mean(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        if obs.ndim != 2 or obs.shape[1] != OBS_DIM:
            raise ValueError(f"obs must have shape [B, {OBS_DIM}], got {obs.shape}")
        x = torch.as_tensor(obs, device=self.device).double()
        mean, _ = self.model.mean_and_logstd(x)
        return mean.clamp(-1.0, 1.0).float().cpu().numpy()

    __call__ = action_mean

    def __repr__(self) -> str:
        return f"PPOPolicy(task={self.task!r}, hidden={list(self.config.hidden_sizes)})"


def policy_payload(model: ActorCritic, cfg: PPOConfig, task: str, extra: dict | None = None) -> dict:
    """What ``policy.pt`` holds: format tag, task, config, the network's ``state_dict`` (normaliser incl.)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {
        "format": POLICY_FORMAT,
        "task": task,
        "config": cfg.to_dict(),
        "state_dict": state,
        **(extra or {}),
    }


def export_policy(
    src: str | os.PathLike, dst: str | os.PathLike, *, actor_only: bool = False, extra: dict | None = None
) -> dict:
    """Write the teacher held by ``src`` (a ``checkpoint.pt`` or ``policy.pt``) as a policy file ``dst``.

    ``actor_only`` leaves the critic out (:data:`ACTOR_FORMAT`: what a shipped zoo holds, about half the
    bytes); no optimizer state either way. Returns the payload written (checksum sidecar included).
    """
    src = os.fspath(src)
    payload = load_torch_checked(src, "re-run the training that wrote it", map_location="cpu")
    if not isinstance(payload, dict) or "config" not in payload:
        raise ValueError(f"{src!r} is not a cpd_fast PPO checkpoint (no config)")
    state = payload["state_dict"] if "state_dict" in payload else payload["model"]
    out = {
        "format": ACTOR_FORMAT if actor_only else POLICY_FORMAT,
        "task": payload.get("task"),
        "config": PPOConfig.from_dict(payload["config"]).to_dict(),
        "state_dict": {k: v for k, v in state.items() if not (actor_only and k.startswith(_CRITIC))},
        "global_step": int(payload.get("global_step", 0)),
        **(extra or {}),
    }
    save_torch_atomic(out, dst)
    return out


def _load_weights(model: ActorCritic, state: dict, actor_only: bool) -> None:
    """``model.load_state_dict(state)``; an actor-only state must hold exactly the non-critic keys."""
    if not actor_only:
        model.load_state_dict(state)
        return
    want = {k for k in model.state_dict() if not k.startswith(_CRITIC)}
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise RuntimeError(
            f"Error(s) in loading the actor: missing keys {missing[:4]}, unexpected keys {unexpected[:4]}"
        )
    model.load_state_dict(state, strict=False)


def load_policy(path: str | os.PathLike, device: str = "cpu") -> PPOPolicy:
    """Load a ``policy.pt`` (or a resume ``checkpoint.pt``, or an actor-only export) as a teacher."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no PPO policy checkpoint at {path!r}; train one with `cpd teachers train`")
    redo = f"delete {os.path.dirname(path) or '.'} and re-run to train this teacher again"
    payload = load_torch_checked(path, redo, map_location=device)
    if not isinstance(payload, dict) or "config" not in payload:
        raise ValueError(f"{path!r} is not a cpd_fast PPO checkpoint (no config)")
    cfg = PPOConfig.from_dict(payload["config"])
    model = ActorCritic(cfg).to(device)
    state = payload["state_dict"] if "state_dict" in payload else payload["model"]
    _load_weights(model, state, actor_only=payload.get("format") == ACTOR_FORMAT)
    return PPOPolicy(model, cfg, task=payload.get("task"))


# ----------------------------------------------------------------------------------------------------------
# Training pieces: GAE, the PPO loss and update, the rollout
# ----------------------------------------------------------------------------------------------------------
def compute_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    last_value: np.ndarray,
    terminated: np.ndarray,
    done: np.ndarray,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over a time-major rollout; returns ``(advantages, returns)``.

    Args:
        rewards, values: float32 ``[T, N]`` (``values[t]`` = V(obs at t)).
        last_value: float32 ``[N]``, V(obs after the last step).
        terminated: bool ``[T, N]``, a true termination at t: no bootstrap from the next value.
        done: bool ``[T, N]``, terminated or truncated at t: cuts the GAE chain. A truncation (``done`` but
            not ``terminated``) still bootstraps from the next value: a time limit is not a terminal state.
        gamma, lam: discount and GAE λ.

    Returns:
        float32 ``[T, N]`` advantages and returns (= advantages + values, the value targets). The λ-chain
        is carried in float64 (a python float times a bool mask is float64) and stored as float32.
    """
    rewards, values = np.asarray(rewards, np.float32), np.asarray(values, np.float32)
    last_value = np.asarray(last_value, np.float32)
    terminated, done = np.asarray(terminated, bool), np.asarray(done, bool)
    gamma, lam = float(gamma), float(lam)
    T, N = rewards.shape
    adv = np.zeros((T, N), dtype=np.float32)
    last_gae = np.zeros(N, dtype=np.float32)
    for t in reversed(range(T)):
        next_v = last_value if t == T - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_v * (~terminated[t]) - values[t]
        last_gae = delta + gamma * lam * (~done[t]) * last_gae
        adv[t] = last_gae
    return adv, adv + values


@dataclass
class PPOBatch:
    """Flat transitions for the PPO update (rows = transitions); ``batch[idx]`` selects a minibatch."""

    obs: torch.Tensor  # [B, 39] raw observations
    actions: torch.Tensor  # [B, 4] as sampled
    logprobs: torch.Tensor  # [B] log-prob of the actions under the rollout policy
    advantages: torch.Tensor  # [B] GAE advantages (normalised per minibatch by ppo_loss)
    returns: torch.Tensor  # [B] value targets
    values: torch.Tensor  # [B] the rollout's value estimates (for value clipping)

    def __len__(self) -> int:
        return self.obs.shape[0]

    def __getitem__(self, idx: torch.Tensor | slice) -> PPOBatch:
        return PPOBatch(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))


PPO_STATS = ("pg_loss", "v_loss", "entropy", "approx_kl", "clipfrac")
# An extra loss term per minibatch: (model, minibatch size) -> (loss, detached scalar stats)
AuxLoss = Callable[[ActorCritic, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def ppo_loss(
    model: ActorCritic, mb: PPOBatch, cfg: PPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO objective on one minibatch: clipped surrogate + (optionally clipped) value loss − entropy.

    Advantages are normalised within the minibatch. Returns the loss to minimise and detached scalar
    stats (:data:`PPO_STATS`): ``approx_kl`` is the ``(r - 1) - log r`` estimator, ``clipfrac`` the share of
    ratios outside ``[1 - clip_coef, 1 + clip_coef]``.
    """
    _, new_logp, entropy, new_v = model.action_and_value(mb.obs, mb.actions)
    log_ratio = new_logp - mb.logprobs
    ratio = log_ratio.exp()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clipfrac = ((ratio - 1).abs() > cfg.clip_coef).float().mean()
    adv = (mb.advantages - mb.advantages.mean()) / (mb.advantages.std() + 1e-8)
    pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
    if cfg.clip_vloss:
        v_clipped = mb.values + torch.clamp(new_v - mb.values, -cfg.clip_coef, cfg.clip_coef)
        v_loss = 0.5 * torch.max((new_v - mb.returns) ** 2, (v_clipped - mb.returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((new_v - mb.returns) ** 2).mean()
    ent = entropy.mean()
    loss = pg_loss - cfg.ent_coef * ent + cfg.vf_coef * v_loss
    stats = {
        "pg_loss": pg_loss,
        "v_loss": v_loss,
        "entropy": ent,
        "approx_kl": approx_kl,
        "clipfrac": clipfrac,
    }
    return loss, {k: v.detach() for k, v in stats.items()}


def ppo_update(
    model: ActorCritic,
    optimizer: torch.optim.Optimizer,
    batch: PPOBatch,
    cfg: PPOConfig,
    generator: torch.Generator | None = None,
    aux_loss: AuxLoss | None = None,
) -> dict[str, float]:
    """``update_epochs`` epochs of minibatch SGD on :func:`ppo_loss`; returns the mean of each stat.

    Each epoch shuffles with ``torch.randperm`` (``generator``; None = torch's global RNG) into
    ``num_minibatches`` minibatches (a remainder is dropped); gradients are clipped to ``max_grad_norm``.
    With ``target_kl`` set, the epochs stop early once an epoch's last minibatch exceeds it.
    ``aux_loss(model, mb_size)`` adds a term to every minibatch's loss (its stats are averaged too), e.g.
    the decaying behaviour-cloning term of :mod:`cpd_fast.teachers.demos`.
    """
    model.train()
    n = len(batch)
    mb_size = max(1, n // cfg.num_minibatches)
    stats: dict[str, list[float]] = {k: [] for k in PPO_STATS}
    for _epoch in range(cfg.update_epochs):
        perm = torch.randperm(n, device=batch.obs.device, generator=generator)
        for start in range(0, n - mb_size + 1, mb_size):
            loss, mb_stats = ppo_loss(model, batch[perm[start : start + mb_size]], cfg)
            if aux_loss is not None:
                extra, extra_stats = aux_loss(model, mb_size)
                loss = loss + extra
                mb_stats = {**mb_stats, **extra_stats}
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            for k, v in mb_stats.items():
                stats.setdefault(k, []).append(v.item())
        if cfg.target_kl is not None and stats["approx_kl"][-1] > cfg.target_kl:
            break
    return {k: float(np.mean(v)) for k, v in stats.items()}


@dataclass
class Rollout:
    """One rollout, time-major ``[T, N, ...]``: tensors on the networks' device, env outputs in numpy.

    The arrays are the collector's buffers, overwritten by its next :meth:`RolloutCollector.collect`.
    """

    obs: torch.Tensor  # [T, N, 39] raw observations the actions were taken in
    actions: torch.Tensor  # [T, N, 4]
    logprobs: torch.Tensor  # [T, N]
    values: torch.Tensor  # [T, N]
    rewards: np.ndarray  # [T, N] float32, scaled by the reward scaler
    terminated: np.ndarray  # [T, N] bool, true termination: no bootstrap
    dones: np.ndarray  # [T, N] bool, terminated | truncated: cuts the GAE chain
    valid: np.ndarray  # [T, N] bool, False for auto-reset transitions (action ignored)
    next_obs: np.ndarray  # [N, 39] the observations after the last step (for the bootstrap value)
    episode_returns: list[float]  # episodes finished during this rollout (raw, unscaled returns)
    episode_successes: list[float]

    def ppo_batch(self, advantages: np.ndarray, returns: np.ndarray) -> PPOBatch:
        """The valid (non-auto-reset) transitions, flattened, with their advantages and value targets."""
        device = self.obs.device
        mask = torch.as_tensor(self.valid.reshape(-1), device=device)
        return PPOBatch(
            obs=self.obs.reshape(-1, OBS_DIM)[mask],
            actions=self.actions.reshape(-1, ACT_DIM)[mask],
            logprobs=self.logprobs.reshape(-1)[mask],
            advantages=torch.as_tensor(advantages.reshape(-1), device=device)[mask],
            returns=torch.as_tensor(returns.reshape(-1), device=device)[mask],
            values=self.values.reshape(-1)[mask],
        )


class RolloutCollector:
    """The envs of a run (one group, or two pipelined envpool groups), the rollout buffers and episode stats.

    ``update`` (the number of updates done, on resume) shifts the env seeds so a resumed run sees new
    episodes. ``episode_returns`` / ``episode_successes`` accumulate over the collector's life.
    """

    def __init__(self, task: str, cfg: PPOConfig, device: torch.device, update: int = 0) -> None:
        want_async = device.type == "cuda" if cfg.async_envs is None else cfg.async_envs
        use_async = want_async and cfg.backend == "envpool" and cfg.num_envs >= 2 and cfg.num_envs % 2 == 0
        n_groups = 2 if use_async else 1
        per_group = cfg.num_envs // n_groups
        self.envs = [
            make_vec_env(
                task,
                per_group,
                backend=cfg.backend,
                # a different seed stream per group and per resume, so a resumed run sees new episodes
                seed=cfg.seed * 1000 + g * per_group + update * 7919,
                max_episode_steps=cfg.max_episode_steps,
            )
            for g in range(n_groups)
        ]
        self.slices = [slice(g * per_group, (g + 1) * per_group) for g in range(n_groups)]
        self.device = device
        T, N = self.T, self.N = cfg.num_steps, cfg.num_envs
        self.obs = torch.zeros((T, N, OBS_DIM), device=device)
        self.actions = torch.zeros((T, N, ACT_DIM), device=device)
        self.logprobs = torch.zeros((T, N), device=device)
        self.values = torch.zeros((T, N), device=device)
        self.rewards = np.zeros((T, N), dtype=np.float32)
        self.terminated = np.zeros((T, N), dtype=bool)
        self.dones = np.zeros((T, N), dtype=bool)
        self.valid = np.zeros((T, N), dtype=bool)
        self.next_obs = np.concatenate([env.reset() for env in self.envs])
        self.ep_ret = np.zeros(N, dtype=np.float64)
        self.ep_success = np.zeros(N, dtype=bool)
        self.episode_returns: list[float] = []
        self.episode_successes: list[float] = []

    def collect(self, model: ActorCritic, reward_scaler: RewardScaler) -> Rollout:
        """Step every env ``T`` times with ``model``'s sampled actions; group g's inference overlaps the
        other group's stepping. Row t's rewards are scaled once every group has sent step t+1."""
        model.eval()
        n_logged = len(self.episode_returns)
        for t in range(self.T):
            for g, sl in enumerate(self.slices):
                if t > 0:
                    self._finish_step(g, t - 1)
                obs_t = torch.as_tensor(self.next_obs[sl], device=self.device)
                with torch.no_grad():
                    action, logp, _, value = model.action_and_value(obs_t)
                self.obs[t, sl], self.actions[t, sl], self.logprobs[t, sl], self.values[t, sl] = (
                    obs_t,
                    action,
                    logp,
                    value,
                )
                self.envs[g].step_async(action.cpu().numpy())
            if t > 0:
                self._scale_rewards(reward_scaler, t - 1)
        for g in range(len(self.envs)):
            self._finish_step(g, self.T - 1)
        self._scale_rewards(reward_scaler, self.T - 1)
        return Rollout(
            self.obs,
            self.actions,
            self.logprobs,
            self.values,
            self.rewards,
            self.terminated,
            self.dones,
            self.valid,
            self.next_obs,
            self.episode_returns[n_logged:],
            self.episode_successes[n_logged:],
        )

    def _scale_rewards(self, reward_scaler: RewardScaler, t: int) -> None:
        self.rewards[t] = reward_scaler(self.rewards[t], self.dones[t], self.valid[t])

    def _finish_step(self, g: int, t: int) -> None:
        """Collect group g's step in flight (its action was taken at time t) into the buffers."""
        sl = self.slices[g]
        obs, reward, terminated, truncated, info = self.envs[g].step_wait()
        done = terminated | truncated
        self.rewards[t, sl] = reward  # raw here; scaled for the whole row at once
        self.terminated[t, sl], self.dones[t, sl], self.valid[t, sl] = terminated, done, ~info["autoreset"]
        self.ep_ret[sl] += reward
        self.ep_success[sl] |= info["success"] > 0.5
        for i in np.flatnonzero(done):
            j = sl.start + i
            self.episode_returns.append(float(self.ep_ret[j]))
            self.episode_successes.append(float(self.ep_success[j]))
            self.ep_ret[j], self.ep_success[j] = 0.0, False
        self.next_obs[sl] = obs

    def close(self) -> None:
        for env in self.envs:
            env.close()

    def __enter__(self) -> RolloutCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """Outcome of :func:`train_ppo`. ``first_update`` holds the first update's losses (determinism checks)."""

    task: str
    run_dir: str
    global_step: int
    wall_time_s: float
    steps_per_s: float
    policy_path: str
    first_update: dict[str, float] = field(default_factory=dict)
    episode_returns: list[float] = field(default_factory=list)  # in completion order (this session)
    episode_successes: list[float] = field(default_factory=list)
    resumed_from: int = 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _save_checkpoint(
    path: str,
    task: str,
    cfg: PPOConfig,
    model: ActorCritic,
    optimizer: torch.optim.Optimizer,
    reward_scaler: RewardScaler,
    global_step: int,
    update: int,
) -> None:
    """Write the resume state (``checkpoint.pt``) atomically."""
    state = {
        "config": cfg.to_dict(),
        "task": task,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "reward_scaler": reward_scaler.state(),
        "torch_rng": torch.get_rng_state(),
        "global_step": global_step,
        "update": update,
    }
    save_torch_atomic(state, path)


def _load_checkpoint(
    path: str,
    cfg: PPOConfig,
    model: ActorCritic,
    optimizer: torch.optim.Optimizer,
    reward_scaler: RewardScaler,
    device: torch.device,
) -> tuple[int, int]:
    """Restore a :func:`_save_checkpoint` into the learner (its config must match ``cfg`` but for
    ``total_steps``); returns ``(global_step, update)``."""
    redo = "delete it and re-run: this teacher's training restarts from scratch"
    state = load_torch_checked(path, redo, map_location=device)
    # total_steps may grow: a finished teacher trained further continues from its checkpoint
    saved = PPOConfig.from_dict(state["config"]).to_dict()  # defaults filled for fields added since
    check_same_config(saved, cfg.to_dict(), ("total_steps",), path, "use a new run directory or resume=False")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    reward_scaler.load(state["reward_scaler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["global_step"]), int(state["update"])


def _update_record(
    stats: dict[str, float],
    rollout: Rollout,
    *,
    steps_per_s: float,
    lr: float,
    rollout_s: float,
    update_s: float,
) -> dict[str, float]:
    """One update's log record: losses, throughput, learning rate, timings, and this rollout's episodes."""
    record = {
        **stats,
        "steps_per_s": steps_per_s,
        "learning_rate": lr,
        "rollout_s": rollout_s,
        "update_s": update_s,
    }
    if rollout.episode_returns:
        record["episodic_return"] = float(np.mean(rollout.episode_returns))
        record["success_rate"] = float(np.mean(rollout.episode_successes))
    return record


def train_ppo(
    task: str,
    config: PPOConfig | None = None,
    run_dir: str | os.PathLike | None = None,
    *,
    resume: bool = True,
    progress: bool = False,
    tensorboard: bool = True,
    stop_after_updates: int | None = None,
    init: dict[str, Any] | None = None,
    aux_loss: Callable[[int], AuxLoss | None] | None = None,
    obs_norm_frozen: bool = False,
) -> TrainResult:
    """Train a PPO teacher for ``task``; write checkpoints and logs into ``run_dir``.

    Args:
        task: Meta-World v3 task name.
        config: hyper-parameters (default :class:`PPOConfig`).
        run_dir: output directory (created); ``None`` = a fresh temporary directory.
        resume: continue from ``run_dir/checkpoint.pt`` when it exists (the config must then match).
        progress / tensorboard: show a tqdm bar / also write TensorBoard events.
        stop_after_updates: stop (checkpointed) after this many updates in this call — simulates a kill.
        init: the learner's starting point when there is no checkpoint to resume: ``{"model": state_dict,
            "reward_scaler": state}`` (either optional), e.g. a cloned actor and a warmed-up critic.
        aux_loss: ``aux_loss(update)`` gives the extra loss term of that update (or None), passed to
            :func:`ppo_update`; resume restores ``update``, so a schedule over updates resumes exactly.
        obs_norm_frozen: keep the observation normaliser's statistics as they start (``init``'s: e.g. those
            of the demonstrations a clone was fitted on) instead of refreshing them with every rollout.

    Returns:
        :class:`TrainResult`; ``policy_path`` is ``run_dir/policy.pt`` once ``total_steps`` are done.
    """
    # ---- setup (seeds torch, then draws the networks' initial weights)
    task = validate_task(task)
    cfg = config if config is not None else PPOConfig()
    run_dir = os.fspath(run_dir) if run_dir is not None else tempfile.mkdtemp(prefix=f"ppo-{task}-")
    ckpt_path, policy_path = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "policy.pt")
    learner = model, optimizer, reward_scaler, device = _learner(cfg)
    global_step, update = _start(run_dir, task, cfg, learner, resume, init)  # ---- resume (or init)
    resumed_from = global_step

    def save_checkpoint() -> None:
        _save_checkpoint(ckpt_path, task, cfg, model, optimizer, reward_scaler, global_step, update)

    first_update: dict[str, float] = {}
    updates_this_call, max_updates = 0, math.inf if stop_after_updates is None else stop_after_updates
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        envs = stack.enter_context(RolloutCollector(task, cfg, device, update))
        logger = stack.enter_context(RunLogger(run_dir, tensorboard))
        bar = stack.enter_context(_progress_bar(task, cfg, global_step)) if progress else None
        while global_step < cfg.total_steps and updates_this_call < max_updates:
            rollout, stats, t_rollout, t_update = _iteration(
                envs, learner, cfg, update, aux_loss, obs_norm_frozen
            )
            global_step += cfg.batch_size
            update += 1
            updates_this_call += 1
            first_update = first_update or dict(stats)
            record = _update_record(
                stats, rollout, lr=optimizer.param_groups[0]["lr"],
                steps_per_s=(global_step - resumed_from) / max(time.perf_counter() - t_start, 1e-9),
                rollout_s=t_update - t_rollout, update_s=time.perf_counter() - t_update,  # rollout: + GAE
            )  # fmt: skip
            _log_update(logger, bar, cfg, global_step, update, record)
            if update % cfg.checkpoint_every == 0 or global_step >= cfg.total_steps:
                save_checkpoint()

    # ---- finish: the resume state, and the teacher itself once the budget is done
    elapsed = time.perf_counter() - t_start
    if global_step >= cfg.total_steps or updates_this_call:
        save_checkpoint()
    if global_step >= cfg.total_steps:
        save_torch_atomic(policy_payload(model, cfg, task, {"global_step": global_step}), policy_path)
    return TrainResult(
        task=task, run_dir=run_dir, global_step=global_step, wall_time_s=elapsed,
        steps_per_s=(global_step - resumed_from) / max(elapsed, 1e-9), policy_path=policy_path,
        first_update=first_update, episode_returns=envs.episode_returns,
        episode_successes=envs.episode_successes, resumed_from=resumed_from,
    )  # fmt: skip


class _Learner(NamedTuple):
    """What PPO trains and checkpoints, and where it runs."""

    model: ActorCritic
    optimizer: torch.optim.Optimizer
    reward_scaler: RewardScaler
    device: torch.device


def _learner(cfg: PPOConfig) -> _Learner:
    """A fresh learner: ``torch.manual_seed(cfg.seed)``, then the networks (their initial weights are the
    first draws), Adam and the reward scaler, on ``cfg.device``."""
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = ActorCritic(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, eps=1e-5)
    reward_scaler = RewardScaler(cfg.num_envs, cfg.gamma, cfg.clip_reward, enabled=cfg.norm_reward)
    return _Learner(model, optimizer, reward_scaler, device)


def _start(
    run_dir: str, task: str, cfg: PPOConfig, learner: _Learner, resume: bool, init: dict[str, Any] | None
) -> tuple[int, int]:
    """Where training starts: ``run_dir``'s checkpoint when resuming (learner state and torch's RNG
    restored), else ``init`` (a fresh start also drops an older run's log); creates ``run_dir`` and writes
    its ``config.json``. Returns ``(global_step, update)``."""
    os.makedirs(run_dir, exist_ok=True)
    model, optimizer, reward_scaler, device = learner
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    global_step, update = 0, 0
    if resume and os.path.isfile(ckpt_path):
        global_step, update = _load_checkpoint(ckpt_path, cfg, model, optimizer, reward_scaler, device)
    elif init is not None:
        if "model" in init:
            model.load_state_dict(init["model"])
        if "reward_scaler" in init:
            reward_scaler.load(init["reward_scaler"])
    if global_step == 0 and os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        os.remove(os.path.join(run_dir, "metrics.jsonl"))  # a fresh start: drop an older run's log
    write_json_atomic(os.path.join(run_dir, "config.json"), {"task": task, **cfg.to_dict()})
    return global_step, update


def _iteration(
    envs: RolloutCollector,
    learner: _Learner,
    cfg: PPOConfig,
    update: int,
    aux_loss: Callable[[int], AuxLoss | None] | None,
    obs_norm_frozen: bool,
) -> tuple[Rollout, dict[str, float], float, float]:
    """Update number ``update`` (0-based): anneal the learning rate, collect a rollout, GAE, the PPO
    update (plus ``aux_loss(update)``), then refresh the observation normaliser with the rollout's
    observations (unless ``obs_norm_frozen``).
    Returns ``(rollout, update stats, rollout start time, update start time)`` (``time.perf_counter``)."""
    model, optimizer, reward_scaler, device = learner
    if cfg.anneal_lr:
        optimizer.param_groups[0]["lr"] = (1.0 - update / cfg.num_updates) * cfg.learning_rate

    t_rollout = time.perf_counter()
    rollout = envs.collect(model, reward_scaler)

    # GAE; truncation bootstraps: Meta-World's time limit is not a terminal state
    with torch.no_grad():
        last_value = model.value(torch.as_tensor(rollout.next_obs, device=device)).cpu().numpy()
    values, gamma, lam = rollout.values.cpu().numpy(), cfg.gamma, cfg.gae_lambda
    advantages, returns = compute_gae(
        rollout.rewards, values, last_value, rollout.terminated, rollout.dones, gamma, lam
    )

    t_update = time.perf_counter()
    aux = aux_loss(update) if aux_loss is not None else None
    stats = ppo_update(model, optimizer, rollout.ppo_batch(advantages, returns), cfg, aux_loss=aux)
    if cfg.norm_obs and not obs_norm_frozen:  # refresh it with this rollout's observations
        model.obs_norm.update(rollout.obs.reshape(-1, OBS_DIM))
    return rollout, stats, t_rollout, t_update


def _log_update(
    logger: RunLogger, bar: Any, cfg: PPOConfig, global_step: int, update: int, record: dict[str, float]
) -> None:
    """An update's record to the log (every ``cfg.log_every`` updates) and the progress bar (if any)."""
    if update % cfg.log_every == 0:
        logger.log(global_step, record)
    if bar is not None:
        _show_progress(bar, record, cfg.batch_size)


def _progress_bar(task: str, cfg: PPOConfig, global_step: int) -> Any:
    return tqdm(total=cfg.total_steps, initial=min(global_step, cfg.total_steps), unit="step", desc=task)


def _show_progress(bar: Any, record: dict[str, float], steps: int) -> None:
    bar.update(steps)
    if "episodic_return" in record:
        bar.set_postfix(ret=f"{record['episodic_return']:.0f}", succ=f"{record['success_rate']:.2f}")
