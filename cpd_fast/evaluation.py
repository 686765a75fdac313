"""Measuring a policy's success rate on one Meta-World task.

Two protocols, deliberately kept apart:

* :func:`evaluate_official` — Meta-World's official protocol, the number to report: the task's 50
  fixed goals (``metaworld.MT1(task, seed=goal_seed).train_tasks``, the same goal set Meta-World's
  ``gym.make("Meta-World/MT1", seed=goal_seed)`` samples from), one episode per goal, an episode
  counts as a success if ``info["success"]`` is 1 at any step, and it stops at the first success
  (Meta-World's evaluation switches ``terminate_on_success`` on). Runs Meta-World's own Python envs
  (:func:`cpd_fast.envs.official_env`), ``num_envs`` episodes at a time, so the policy sees batches.
* :func:`evaluate_monitoring` — a cheap *non-official* estimate for training curves: random goals
  (envpool draws them from the continuous range), a fixed number of episodes, any backend.

``policy_fn`` is a batched deterministic policy: ``[B, 39]`` float32 observations -> ``[B, 4]`` actions.
B varies between calls (only episodes still running are passed), so policies with memory must not
rely on row positions; wrap them per episode instead (``episode_info=True``; the student's wrapper is
:class:`cpd_fast.evalpool.StudentPolicy`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import metaworld
import numpy as np

from cpd_fast.envs import ACT_DIM, MAX_EPISODE_STEPS, OBS_DIM, EnvCache, make_vec_env, official_env
from cpd_fast.tasks import validate_task

__all__ = [
    "NUM_OFFICIAL_GOALS",
    "EvalResult",
    "evaluate_monitoring",
    "evaluate_official",
    "official_goals",
]

NUM_OFFICIAL_GOALS = 50  # Meta-World's _N_GOALS

PolicyFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class EvalResult:
    """Success of one policy on one task.

    Attributes:
        task: Meta-World task name.
        success_rate: fraction of episodes with ``success`` at any step, in [0, 1].
        successes: ``[E]`` bool, one flag per episode (for the official protocol: per goal, in goal order).
        episode_lengths: ``[E]`` int, env steps run (up to the first success when stopping on success).
        protocol: ``"official"`` (all 50 fixed goals), ``"official-subset"`` (fewer goals: not a
            reportable number) or ``"monitoring"`` (random goals, not official).
        backend: env implementation used.
    """

    task: str
    success_rate: float
    successes: np.ndarray
    episode_lengths: np.ndarray
    protocol: str
    backend: str
    meta: dict = field(default_factory=dict)

    @property
    def official(self) -> bool:
        return self.protocol == "official"

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "success_rate": self.success_rate,
            "successes": self.successes.astype(int).tolist(),
            "episode_lengths": self.episode_lengths.tolist(),
            "protocol": self.protocol,
            "backend": self.backend,
            **self.meta,
        }


def official_goals(task: str, goal_seed: int = 0) -> list:
    """Meta-World's 50 fixed goals for ``task``: ``metaworld.MT1(task, seed=goal_seed).train_tasks``.

    Each element is a ``metaworld.types.Task`` holding the env's ``rand_vec`` (initial object and goal
    positions) with ``partially_observable=False``. Deterministic given ``goal_seed``. ``task`` must be a
    valid name (:func:`cpd_fast.tasks.validate_task`; :func:`evaluate_official` checks it).
    """
    return list(metaworld.MT1(task, seed=goal_seed).train_tasks)


def _actions(policy_fn: PolicyFn, obs: np.ndarray) -> np.ndarray:
    actions = np.asarray(policy_fn(obs))
    if actions.shape != (obs.shape[0], ACT_DIM):
        raise ValueError(
            f"policy_fn returned shape {actions.shape} for obs {obs.shape}; expected [B, {ACT_DIM}]"
        )
    if not np.all(np.isfinite(actions)):
        raise ValueError("policy_fn returned non-finite actions")
    return np.clip(actions.astype(np.float32), -1.0, 1.0)


def evaluate_official(
    policy_fn: PolicyFn,
    task: str,
    *,
    num_envs: int = 10,
    num_goals: int = NUM_OFFICIAL_GOALS,
    goal_seed: int = 0,
    max_episode_steps: int = MAX_EPISODE_STEPS,
    stop_on_success: bool = True,
    episode_info: bool = False,
    env_cache: EnvCache | None = None,
) -> EvalResult:
    """Meta-World's official success rate of ``policy_fn`` on ``task``.

    Args:
        policy_fn: ``[B, 39]`` float32 -> ``[B, 4]`` actions (clipped to [-1, 1]).
        task: Meta-World v3 task name.
        num_envs: episodes run side by side (each a Meta-World env instance in this process).
        num_goals: goals to use, the first ``num_goals`` of the 50; anything but 50 is labelled
            ``"official-subset"`` (for tests and quick checks only).
        goal_seed: seed of the 50-goal set (keep it fixed across a study so numbers are comparable).
        max_episode_steps: episode length, 500 in the official protocol.
        stop_on_success: end an episode at its first success (official; the flag cannot change after).
        episode_info: call ``policy_fn(obs, slots, fresh)`` instead, with ``slots [B]`` int (the env slot of
            each row, in ``range(num_envs)``) and ``fresh [B]`` bool (the row is its episode's first
            observation): what a policy with per-episode memory (an observation history) needs.
        env_cache: reuse the envs of an :class:`EnvCache` (same results, less MuJoCo compilation).

    Returns:
        :class:`EvalResult` with one success flag per goal, in goal order.
    """
    task = validate_task(task)
    if num_envs <= 0:
        raise ValueError(f"num_envs must be positive, got {num_envs}")
    if not 1 <= num_goals <= NUM_OFFICIAL_GOALS:
        raise ValueError(f"num_goals must be in 1..{NUM_OFFICIAL_GOALS}, got {num_goals}")
    if not 1 <= max_episode_steps <= MAX_EPISODE_STEPS:
        raise ValueError(f"max_episode_steps must be in 1..{MAX_EPISODE_STEPS}, got {max_episode_steps}")
    goals = official_goals(task, goal_seed)[:num_goals]
    n_envs = min(num_envs, num_goals)
    if env_cache is not None:
        envs, temporary = env_cache.take(task, n_envs)
    else:
        envs = temporary = [official_env(task) for _ in range(n_envs)]
    try:
        successes, lengths = _episode_per_goal(
            policy_fn, envs, goals, max_episode_steps, stop_on_success, episode_info
        )
    finally:
        for env in temporary:  # a cache's own envs stay open for its next caller
            env.close()

    return EvalResult(
        task=task,
        success_rate=float(successes.mean()),
        successes=successes,
        episode_lengths=lengths,
        protocol="official" if num_goals == NUM_OFFICIAL_GOALS else "official-subset",
        backend="metaworld",
        meta={"goal_seed": goal_seed, "max_episode_steps": max_episode_steps},
    )


def _episode_per_goal(
    policy_fn: Any,
    envs: list[Any],
    goals: list,
    max_episode_steps: int,
    stop_on_success: bool,
    episode_info: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """One episode per goal, in goal order, ``len(envs)`` side by side (a slot takes the next goal when its
    episode ends). Returns ``successes [G]`` bool and ``lengths [G]`` int64 (see :func:`evaluate_official`).
    """
    num_goals = len(goals)
    successes = np.zeros(num_goals, dtype=bool)
    lengths = np.zeros(num_goals, dtype=np.int64)
    # slot -> goal index it is running (-1: idle), its current observation
    slot_goal = [-1] * len(envs)
    slot_obs = np.zeros((len(envs), OBS_DIM), dtype=np.float32)
    slot_fresh = np.zeros(len(envs), dtype=bool)  # slot's next policy call starts an episode
    next_goal = 0

    def start(slot: int) -> None:
        nonlocal next_goal
        if next_goal >= num_goals:
            slot_goal[slot] = -1
            return
        env = envs[slot]
        env.set_task(goals[next_goal])  # freezes the goal: reset() restores exactly this rand_vec
        obs, _ = env.reset()
        slot_goal[slot], slot_obs[slot], slot_fresh[slot] = next_goal, obs, True
        next_goal += 1

    for slot in range(len(envs)):
        start(slot)
    while True:
        active = [s for s, g in enumerate(slot_goal) if g >= 0]
        if not active:
            break
        if episode_info:
            rows = np.asarray(active)
            fresh = slot_fresh[rows].copy()
            actions = _actions(lambda o, r=rows, f=fresh: policy_fn(o, r, f), slot_obs[rows])
            slot_fresh[rows] = False
        else:
            actions = _actions(policy_fn, slot_obs[active])
        for row, slot in enumerate(active):
            goal = slot_goal[slot]
            obs, _, _, _, info = envs[slot].step(actions[row])
            slot_obs[slot] = obs
            lengths[goal] += 1
            successes[goal] |= bool(info["success"] > 0.5)
            if (successes[goal] and stop_on_success) or lengths[goal] >= max_episode_steps:
                start(slot)
    return successes, lengths


def evaluate_monitoring(
    policy_fn: PolicyFn,
    task: str,
    *,
    num_episodes: int = 16,
    num_envs: int = 8,
    backend: str = "envpool",
    seed: int = 0,
    max_episode_steps: int = MAX_EPISODE_STEPS,
) -> EvalResult:
    """Fast, NOT official, success estimate on random goals (for training curves and the fidelity gate).

    Runs rounds of ``num_envs`` episodes that all start together; a round ends when every episode has
    succeeded or ``max_episode_steps`` have passed, so episodes are never selected by their length.
    The task name is checked where its envs are built (:func:`cpd_fast.envs.make_vec_env`).

    Returns:
        :class:`EvalResult` with ``protocol="monitoring"``.
    """
    if num_episodes <= 0:
        raise ValueError(f"num_episodes must be positive, got {num_episodes}")
    successes: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    n = min(num_envs, num_episodes)
    with make_vec_env(task, n, backend=backend, seed=seed, max_episode_steps=max_episode_steps) as env:
        remaining = num_episodes
        while remaining > 0:
            obs = env.reset()  # fresh random goals for every sub-env
            ever = np.zeros(n, dtype=bool)
            alive = np.ones(n, dtype=bool)
            length = np.zeros(n, dtype=np.int64)
            first_success = np.full(n, -1, dtype=np.int64)
            while alive.any() and not ever.all():
                obs, _, terminated, truncated, info = env.step(_actions(policy_fn, obs))
                length += alive
                newly = alive & (info["success"] > 0.5) & ~ever
                first_success[newly] = length[newly]
                ever |= newly
                alive &= ~(terminated | truncated)
            take = min(remaining, n)
            successes.append(ever[:take])
            lengths.append(np.where(ever, first_success, length)[:take])
            remaining -= take
    flags = np.concatenate(successes)
    return EvalResult(
        task=task,
        success_rate=float(flags.mean()),
        successes=flags,
        episode_lengths=np.concatenate(lengths),
        protocol="monitoring",
        backend=backend,
        meta={"seed": seed, "max_episode_steps": max_episode_steps},
    )
