"""Continuous-action PPO for one Meta-World task, on vectorised envs (envpool by default).

Reads top to bottom: the hyper-parameters (:class:`PPOConfig`), the networks (:class:`ActorCritic`, whose
observation normaliser lives in its ``state_dict``), the reward scaler, then :func:`train_ppo` — rollout,
GAE, clipped-objective update, logging and checkpoints.

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

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cpd_fast.envs import ACT_DIM, MAX_EPISODE_STEPS, OBS_DIM, make_vec_env
from cpd_fast.runio import append_jsonl, load_torch_checked, save_torch_atomic, write_json_atomic
from cpd_fast.tasks import validate_task

__all__ = [
    "POLICY_FORMAT",
    "ActorCritic",
    "PPOConfig",
    "PPOPolicy",
    "RewardScaler",
    "TrainResult",
    "load_policy",
    "train_ppo",
]

POLICY_FORMAT = "cpd_fast.ppo_policy/1"


# ----------------------------------------------------------------------------------------------------------
# Hyper-parameters
# ----------------------------------------------------------------------------------------------------------
@dataclass
class PPOConfig:
    """Every knob of a PPO run. Defaults are tuned for Meta-World v3 on a few CPU cores.

    Compared with CleanRL's MuJoCo defaults (2048 steps x 1 env, 32 minibatches of 64, 10 epochs): more
    envs and a larger batch (Meta-World episodes are 500 steps and goals vary per episode, so a batch
    must span many episodes), fewer/larger minibatches (CPU throughput), a smaller initial std (actions
    are deltas in [-1, 1]; std 1 mostly hits the clip bounds).
    """

    total_steps: int = 1_000_000  # env steps (all envs together), auto-reset steps included
    num_envs: int = 16
    num_steps: int = 256  # steps per env per rollout; batch = num_envs * num_steps
    learning_rate: float = 3e-4
    anneal_lr: bool = True  # linearly to 0 over total_steps
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 8
    update_epochs: int = 8
    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = None  # stop the epochs of an update early past this approx-KL
    hidden_sizes: tuple[int, ...] = (256, 256)
    state_dependent_std: bool = False  # log-std from a head on the actor's features instead of a parameter
    init_log_std: float = -0.5
    norm_obs: bool = True
    norm_reward: bool = True  # divide rewards by a running std of the discounted return
    clip_obs: float = 10.0
    clip_reward: float = 10.0
    backend: str = "envpool"  # or "gymnasium" (tasks where envpool is unfaithful, e.g. dial-turn-v3)
    # Pipeline two env groups (envpool only; even num_envs). None = on when the networks run on a GPU:
    # on a 2-core CPU the two groups' smaller batches and the extra threads cost more than the overlap gains.
    async_envs: bool | None = None
    max_episode_steps: int = MAX_EPISODE_STEPS
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available
    torch_threads: int = 0  # >0: torch.set_num_threads (the local pool sets it per worker)
    checkpoint_every: int = 10  # updates between resume checkpoints
    log_every: int = 1  # updates between log records

    def __post_init__(self) -> None:
        self.hidden_sizes = tuple(int(h) for h in self.hidden_sizes)
        if isinstance(self.total_steps, bool) or int(self.total_steps) != self.total_steps:
            raise ValueError(f"total_steps must be an int, got {self.total_steps!r}")
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            raise ValueError(
                f"num_envs*num_steps ({self.num_envs * self.num_steps}) must be divisible by "
                f"num_minibatches ({self.num_minibatches})"
            )
        if self.backend not in ("envpool", "gymnasium"):
            raise ValueError(f"unknown backend {self.backend!r}; choose envpool or gymnasium")
        if not 1 <= self.max_episode_steps <= MAX_EPISODE_STEPS:
            raise ValueError(f"max_episode_steps must be in 1..{MAX_EPISODE_STEPS}")

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
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------
class RunningNorm(nn.Module):
    """Per-feature running mean/variance (parallel Welford merge); stats are buffers, so they checkpoint."""

    def __init__(self, dim: int, clip: float, enabled: bool = True) -> None:
        super().__init__()
        self.clip = clip
        self.enabled = enabled
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch ``[B, dim]`` into the stats."""
        x = x.to(self.mean.device, torch.float64).reshape(-1, self.mean.numel())
        b_mean, b_var, b = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        total = self.count + b
        delta = b_mean - self.mean
        self.mean += delta * b / total
        self.var.copy_((self.var * self.count + b_var * b + delta**2 * self.count * b / total) / total)
        self.count.copy_(total)

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
        dist = torch.distributions.Normal(mean, logstd.exp(), validate_args=False)  # checks cost ~10% here
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action).sum(-1), dist.entropy().sum(-1), self.value(obs)


class RewardScaler:
    """Divides rewards by the running std of the discounted return (reward *scaling*: no mean shift).

    Keeps one discounted return per env; ``state()``/``load()`` round-trip it through a checkpoint.
    """

    def __init__(self, num_envs: int, gamma: float, clip: float, enabled: bool = True) -> None:
        self.gamma, self.clip, self.enabled = gamma, clip, enabled
        self.ret = np.zeros(num_envs, dtype=np.float64)
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def __call__(self, reward: np.ndarray, done: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Scale ``reward [N]``; ``done`` ends the tracked returns; only ``valid`` envs update the stats."""
        if not self.enabled:
            return reward
        self.ret = np.where(valid, self.ret * self.gamma + reward, self.ret)
        x = self.ret[valid]
        if x.size:
            b_mean, b_var, b = float(x.mean()), float(x.var()), x.size
            total = self.count + b
            delta = b_mean - self.mean
            self.mean += delta * b / total
            self.var = (self.var * self.count + b_var * b + delta**2 * self.count * b / total) / total
            self.count = total
        self.ret[done] = 0.0
        return np.clip(reward / math.sqrt(self.var + 1e-8), -self.clip, self.clip).astype(np.float32)

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


# ----------------------------------------------------------------------------------------------------------
# The trained teacher
# ----------------------------------------------------------------------------------------------------------
class PPOPolicy:
    """A trained PPO actor as a teacher: ``action_mean(obs [B, 39]) -> [B, 4]`` (deterministic, clipped)."""

    def __init__(self, model: ActorCritic, config: PPOConfig, task: str | None = None) -> None:
        self.model = model.eval()
        self.config = config
        self.task = task
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def action_mean(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        if obs.ndim != 2 or obs.shape[1] != OBS_DIM:
            raise ValueError(f"obs must have shape [B, {OBS_DIM}], got {obs.shape}")
        mean, _ = self.model.mean_and_logstd(torch.as_tensor(obs, device=self.device))
        return mean.clamp(-1.0, 1.0).cpu().numpy()

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


def load_policy(path: str | os.PathLike, device: str = "cpu") -> PPOPolicy:
    """Load a ``policy.pt`` (or a resume ``checkpoint.pt``) written by :func:`train_ppo` as a teacher."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no PPO policy checkpoint at {path!r}; train one with `cpd teachers train`")
    redo = f"delete {os.path.dirname(path) or '.'} and re-run to train this teacher again"
    payload = load_torch_checked(path, redo, map_location=device)
    if not isinstance(payload, dict) or "config" not in payload:
        raise ValueError(f"{path!r} is not a cpd_fast PPO checkpoint (no config)")
    cfg = PPOConfig.from_dict(payload["config"])
    model = ActorCritic(cfg).to(device)
    model.load_state_dict(payload["state_dict"] if "state_dict" in payload else payload["model"])
    return PPOPolicy(model, cfg, task=payload.get("task"))


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


class _Logger:
    """metrics.jsonl always; TensorBoard when installed (lazy import)."""

    def __init__(self, run_dir: str, tensorboard: bool) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:  # tensorboard not installed: the JSONL log is complete on its own
                self.writer = None

    def log(self, step: int, record: dict[str, float]) -> None:
        append_jsonl(self.path, {"step": step, **record})
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_ppo(
    task: str,
    config: PPOConfig | None = None,
    run_dir: str | os.PathLike | None = None,
    *,
    resume: bool = True,
    progress: bool = False,
    tensorboard: bool = True,
    stop_after_updates: int | None = None,
) -> TrainResult:
    """Train a PPO teacher for ``task``; write checkpoints and logs into ``run_dir``.

    Args:
        task: Meta-World v3 task name.
        config: hyper-parameters (default :class:`PPOConfig`).
        run_dir: output directory (created); ``None`` = a fresh temporary directory.
        resume: continue from ``run_dir/checkpoint.pt`` when it exists (the config must then match).
        progress: show a tqdm bar.
        tensorboard: also write TensorBoard events.
        stop_after_updates: stop (checkpointed) after this many updates in this call — simulates a kill.

    Returns:
        :class:`TrainResult`; ``policy_path`` is ``run_dir/policy.pt`` once ``total_steps`` are done.
    """
    import tempfile

    task = validate_task(task)
    cfg = config if config is not None else PPOConfig()
    run_dir = os.fspath(run_dir) if run_dir is not None else tempfile.mkdtemp(prefix=f"ppo-{task}-")
    os.makedirs(run_dir, exist_ok=True)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    policy_path = os.path.join(run_dir, "policy.pt")

    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)

    model = ActorCritic(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, eps=1e-5)
    reward_scaler = RewardScaler(cfg.num_envs, cfg.gamma, cfg.clip_reward, enabled=cfg.norm_reward)
    global_step, update = 0, 0

    if resume and os.path.isfile(ckpt_path):
        redo = "delete it and re-run: this teacher's training restarts from scratch"
        state = load_torch_checked(ckpt_path, redo, map_location=device)
        saved = PPOConfig.from_dict(state["config"])
        if {**saved.to_dict(), "total_steps": 0} != {**cfg.to_dict(), "total_steps": 0}:
            raise ValueError(
                f"{ckpt_path} was written with a different config; use a new run directory or resume=False"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        reward_scaler.load(state["reward_scaler"])
        torch.set_rng_state(state["torch_rng"])
        global_step, update = int(state["global_step"]), int(state["update"])
    resumed_from = global_step
    if global_step == 0 and os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        os.remove(os.path.join(run_dir, "metrics.jsonl"))  # a fresh start: drop an older run's log
    write_json_atomic(os.path.join(run_dir, "config.json"), {"task": task, **cfg.to_dict()})

    def save_checkpoint() -> None:
        save_torch_atomic(
            {
                "config": cfg.to_dict(),
                "task": task,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "reward_scaler": reward_scaler.state(),
                "torch_rng": torch.get_rng_state(),
                "global_step": global_step,
                "update": update,
            },
            ckpt_path,
        )

    # Env groups: two pipelined envpool groups (async) or one group.
    want_async = device.type == "cuda" if cfg.async_envs is None else cfg.async_envs
    use_async = want_async and cfg.backend == "envpool" and cfg.num_envs >= 2 and cfg.num_envs % 2 == 0
    n_groups = 2 if use_async else 1
    per_group = cfg.num_envs // n_groups
    envs = [
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
    slices = [slice(g * per_group, (g + 1) * per_group) for g in range(n_groups)]

    T, N = cfg.num_steps, cfg.num_envs
    obs_buf = torch.zeros((T, N, OBS_DIM), device=device)
    act_buf = torch.zeros((T, N, ACT_DIM), device=device)
    logp_buf = torch.zeros((T, N), device=device)
    val_buf = torch.zeros((T, N), device=device)
    rew_buf = np.zeros((T, N), dtype=np.float32)
    term_buf = np.zeros((T, N), dtype=bool)  # true termination: no bootstrap
    done_buf = np.zeros((T, N), dtype=bool)  # terminated | truncated: cuts the GAE chain
    valid_buf = np.zeros((T, N), dtype=bool)  # False for auto-reset transitions (action ignored)

    next_obs = np.concatenate([env.reset() for env in envs])
    ep_ret = np.zeros(N, dtype=np.float64)
    ep_success = np.zeros(N, dtype=bool)
    returns_log: list[float] = []
    success_log: list[float] = []
    first_update: dict[str, float] = {}
    logger = _Logger(run_dir, tensorboard)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.total_steps, initial=min(global_step, cfg.total_steps), unit="step", desc=task)

    def finish_step(g: int, t: int) -> None:
        """Collect group g's step in flight (its action was taken at time t) into the buffers."""
        sl = slices[g]
        obs, reward, terminated, truncated, info = envs[g].step_wait()
        valid = ~info["autoreset"]
        done = terminated | truncated
        rew_buf[t, sl] = reward  # scaled below, for the whole row at once
        term_buf[t, sl], done_buf[t, sl], valid_buf[t, sl] = terminated, done, valid
        ep_ret[sl] += reward
        ep_success[sl] |= info["success"] > 0.5
        for i in np.flatnonzero(done):
            j = sl.start + i
            returns_log.append(float(ep_ret[j]))
            success_log.append(float(ep_success[j]))
            ep_ret[j], ep_success[j] = 0.0, False
        next_obs[sl] = obs

    t_start = time.perf_counter()
    updates_this_call = 0
    try:
        while global_step < cfg.total_steps:
            if stop_after_updates is not None and updates_this_call >= stop_after_updates:
                break
            if cfg.anneal_lr:
                frac = 1.0 - update / cfg.num_updates
                optimizer.param_groups[0]["lr"] = frac * cfg.learning_rate
            n_logged = len(returns_log)

            # ---- rollout: T steps of every env; group g's inference overlaps the other group's stepping
            t_rollout = time.perf_counter()
            model.eval()
            for t in range(T):
                for g, sl in enumerate(slices):
                    if t > 0:
                        finish_step(g, t - 1)
                    obs_t = torch.as_tensor(next_obs[sl], device=device)
                    with torch.no_grad():
                        action, logp, _, value = model.action_and_value(obs_t)
                    obs_buf[t, sl], act_buf[t, sl], logp_buf[t, sl], val_buf[t, sl] = (
                        obs_t,
                        action,
                        logp,
                        value,
                    )
                    envs[g].step_async(action.cpu().numpy())
                if t > 0:
                    rew_buf[t - 1] = reward_scaler(rew_buf[t - 1], done_buf[t - 1], valid_buf[t - 1])
            for g in range(n_groups):
                finish_step(g, T - 1)
            rew_buf[T - 1] = reward_scaler(rew_buf[T - 1], done_buf[T - 1], valid_buf[T - 1])
            global_step += T * N

            # ---- GAE (truncation bootstraps: Meta-World's time limit is not a terminal state)
            with torch.no_grad():
                last_value = model.value(torch.as_tensor(next_obs, device=device)).cpu().numpy()
            values = val_buf.cpu().numpy()
            adv = np.zeros((T, N), dtype=np.float32)
            last_gae = np.zeros(N, dtype=np.float32)
            for t in reversed(range(T)):
                next_v = last_value if t == T - 1 else values[t + 1]
                delta = rew_buf[t] + cfg.gamma * next_v * (~term_buf[t]) - values[t]
                last_gae = delta + cfg.gamma * cfg.gae_lambda * (~done_buf[t]) * last_gae
                adv[t] = last_gae
            returns = adv + values

            # ---- PPO update over the valid (non-auto-reset) transitions
            t_update = time.perf_counter()
            model.train()
            mask = torch.as_tensor(valid_buf.reshape(-1), device=device)
            b_obs = obs_buf.reshape(-1, OBS_DIM)[mask]
            b_act = act_buf.reshape(-1, ACT_DIM)[mask]
            b_logp = logp_buf.reshape(-1)[mask]
            b_adv = torch.as_tensor(adv.reshape(-1), device=device)[mask]
            b_ret = torch.as_tensor(returns.reshape(-1), device=device)[mask]
            b_val = val_buf.reshape(-1)[mask]
            n = b_obs.shape[0]
            mb_size = max(1, n // cfg.num_minibatches)
            stats: dict[str, list[float]] = {
                k: [] for k in ("pg_loss", "v_loss", "entropy", "approx_kl", "clipfrac")
            }
            for _epoch in range(cfg.update_epochs):
                perm = torch.randperm(n, device=device)
                for start in range(0, n - mb_size + 1, mb_size):
                    idx = perm[start : start + mb_size]
                    _, new_logp, entropy, new_v = model.action_and_value(b_obs[idx], b_act[idx])
                    log_ratio = new_logp - b_logp[idx]
                    ratio = log_ratio.exp()
                    with torch.no_grad():
                        approx_kl = ((ratio - 1) - log_ratio).mean()
                        stats["approx_kl"].append(approx_kl.item())
                        stats["clipfrac"].append(((ratio - 1).abs() > cfg.clip_coef).float().mean().item())
                    mb_adv = b_adv[idx]
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                    pg_loss = torch.max(
                        -mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef)
                    ).mean()
                    if cfg.clip_vloss:
                        v_clipped = b_val[idx] + torch.clamp(
                            new_v - b_val[idx], -cfg.clip_coef, cfg.clip_coef
                        )
                        v_loss = (
                            0.5 * torch.max((new_v - b_ret[idx]) ** 2, (v_clipped - b_ret[idx]) ** 2).mean()
                        )
                    else:
                        v_loss = 0.5 * ((new_v - b_ret[idx]) ** 2).mean()
                    ent = entropy.mean()
                    loss = pg_loss - cfg.ent_coef * ent + cfg.vf_coef * v_loss
                    optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    stats["pg_loss"].append(pg_loss.item())
                    stats["v_loss"].append(v_loss.item())
                    stats["entropy"].append(ent.item())
                if cfg.target_kl is not None and stats["approx_kl"][-1] > cfg.target_kl:
                    break
            # refresh the observation normaliser with this rollout's observations (frozen until now)
            if cfg.norm_obs:
                model.obs_norm.update(obs_buf.reshape(-1, OBS_DIM))
            update += 1
            updates_this_call += 1

            # ---- logs and checkpoints
            record = {k: float(np.mean(v)) for k, v in stats.items()}
            if not first_update:
                first_update = dict(record)
            elapsed = time.perf_counter() - t_start
            record["steps_per_s"] = (global_step - resumed_from) / max(elapsed, 1e-9)
            record["learning_rate"] = optimizer.param_groups[0]["lr"]
            record["rollout_s"] = t_update - t_rollout  # rollout + GAE
            record["update_s"] = time.perf_counter() - t_update
            new_returns, new_success = returns_log[n_logged:], success_log[n_logged:]
            if new_returns:
                record["episodic_return"] = float(np.mean(new_returns))
                record["success_rate"] = float(np.mean(new_success))
            if update % cfg.log_every == 0:
                logger.log(global_step, record)
            if bar is not None:
                bar.update(T * N)
                if new_returns:
                    bar.set_postfix(
                        ret=f"{record['episodic_return']:.0f}", succ=f"{record['success_rate']:.2f}"
                    )
            if update % cfg.checkpoint_every == 0 or global_step >= cfg.total_steps:
                save_checkpoint()
    finally:
        for env in envs:
            env.close()
        logger.close()
        if bar is not None:
            bar.close()

    elapsed = time.perf_counter() - t_start
    if global_step >= cfg.total_steps:
        save_checkpoint()
        save_torch_atomic(policy_payload(model, cfg, task, {"global_step": global_step}), policy_path)
    elif updates_this_call:
        save_checkpoint()
    return TrainResult(
        task=task,
        run_dir=run_dir,
        global_step=global_step,
        wall_time_s=elapsed,
        steps_per_s=(global_step - resumed_from) / max(elapsed, 1e-9),
        policy_path=policy_path,
        first_update=first_update,
        episode_returns=returns_log,
        episode_successes=success_log,
        resumed_from=resumed_from,
    )
