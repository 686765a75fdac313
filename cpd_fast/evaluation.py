"""Measuring a policy's success rate on one Meta-World task.

Two protocols, deliberately kept apart:

* :func:`evaluate_official` — Meta-World's official protocol, the number to report: the task's 50
  fixed goals (``metaworld.MT1(task, seed=goal_seed).train_tasks``, the same goal set Meta-World's
  ``gym.make("Meta-World/MT1", seed=goal_seed)`` samples from), one episode per goal, an episode
  counts as a success if ``info["success"]`` is 1 at any step, and it stops at the first success
  (Meta-World's evaluation switches ``terminate_on_success`` on). Runs Meta-World's own Python envs,
  ``num_envs`` episodes at a time, so the policy sees batches.
* :func:`evaluate_student` — the official protocol for the distilled student (:class:`StudentPolicy`
  keeps one observation history per env slot), with or without the task id.
* :func:`evaluate_monitoring` — a cheap *non-official* estimate for training curves: random goals
  (envpool draws them from the continuous range), a fixed number of episodes, any backend.

``policy_fn`` is a batched deterministic policy: ``[B, 39]`` float32 observations -> ``[B, 4]`` actions.
B varies between calls (only episodes still running are passed), so policies with memory must not
rely on row positions; wrap them per episode instead.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cpd_fast.envs import ACT_DIM, MAX_EPISODE_STEPS, OBS_DIM, make_vec_env
from cpd_fast.tasks import validate_task

__all__ = [
    "NUM_OFFICIAL_GOALS",
    "EnvCache",
    "EvalResult",
    "StudentPolicy",
    "evaluate_monitoring",
    "evaluate_official",
    "evaluate_student",
    "official_env",
    "official_goals",
    "student_result",
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


@functools.lru_cache(maxsize=32)
def _compiled_model(xml_path: str) -> Any:
    """The MuJoCo model of ``xml_path`` compiled once per process (never simulated: copies are handed out)."""
    import mujoco

    return mujoco.MjModel.from_xml_path(xml_path)


def _touching_object(self: Any, object_geom_id: int) -> bool:
    """Meta-World's ``SawyerXYZEnv.touching_object`` without its Python loops over every contact: both
    gripper pads press on the object (contact force > 0). The contacts are matched on the geom-id arrays;
    the matched forces are summed as Meta-World sums them (in contact order, from 0), so the answer is
    Meta-World's bit for bit (tested). Its loops were ~18% of a grasping task's evaluation."""
    pads = self.__dict__.get("_cpd_pad_geoms")
    if pads is None:
        pads = self._cpd_pad_geoms = (self.data.geom("leftpad_geom").id, self.data.geom("rightpad_geom").id)
    contact, force = self.data.contact, self.data.efc_force
    g1, g2 = contact.geom1, contact.geom2
    on_object = (g1 == object_geom_id) | (g2 == object_geom_id)
    for pad in pads:
        hit = np.flatnonzero(on_object & ((g1 == pad) | (g2 == pad)))
        if not 0 < sum(force[a] for a in contact.efc_address[hit].tolist()):
            return False
    return True


@functools.cache
def _official_class(cls: type) -> type:
    """``cls`` (a Meta-World env class) as it steps, built faster: its env gets a copy of its compiled
    model instead of compiling the XML again (gymnasium's ``MujocoEnv._initialize_simulation`` with
    ``from_xml_path`` memoised), and :func:`_touching_object` replaces Meta-World's contact loops."""

    def _initialize_simulation(self: Any) -> tuple[Any, Any]:
        import mujoco

        model = copy.copy(_compiled_model(self.fullpath))
        # as gymnasium's MujocoEnv: only grow the offscreen framebuffer
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        return model, mujoco.MjData(model)

    attrs = {
        "_initialize_simulation": _initialize_simulation,
        "touching_object": _touching_object,
        "__module__": cls.__module__,
    }
    return type(cls.__name__, (cls,), attrs)  # the same name: Meta-World's task_name is the class name


def official_env(task: str) -> Any:
    """A Meta-World v3 env of ``task`` as Meta-World builds it, but with its MuJoCo model copied from one
    compiled per process (a copy takes ~9 ms, compiling the XML ~80-100 ms; a model is ~22 MB, mostly
    meshes) and the gripper-contact test without Python loops (:func:`_touching_object`). A copy of a
    compiled model is that model byte for byte, so the episodes are the same (tested)."""
    import metaworld

    return _official_class(metaworld.env_dict.ALL_V3_ENVIRONMENTS[validate_task(task)])()


class EnvCache:
    """Meta-World env instances kept alive between :func:`evaluate_official` calls.

    Building an env copies its MuJoCo model (:func:`official_env`, ~23 MB resident), and a run evaluates
    every task seen so far after every stage, in two modes. An env's episode depends only on the task
    set and the actions (``set_task`` freezes the goal, ``reset`` restores it exactly), so a reused env
    gives the same success flags bit for bit (tested). At most ``max_envs`` instances are kept, first
    come first kept (a run evaluates tasks in the same order every stage, where LRU would always miss);
    envs beyond the budget are built and closed per call, as without a cache. Close it when done
    (a context manager).
    """

    def __init__(self, max_envs: int = 100) -> None:
        from cpd_fast.errors import require_int

        require_int("max_envs", max_envs, minimum=0)
        self.max_envs = max_envs
        self._envs: dict[str, list[Any]] = {}
        self.built = self.reused = 0

    def holds(self, task: str, n: int) -> bool:
        """Whether :meth:`take` ``(task, n)`` keeps all ``n`` envs (cached already, or room for them)."""
        have = len(self._envs.get(task, []))
        return have >= n or self.max_envs - sum(len(v) for v in self._envs.values()) >= n - have

    def take(self, task: str, n: int) -> tuple[list[Any], list[Any]]:
        """``n`` envs of ``task``: ``(envs, temporary)``, the second being those the caller must close."""
        cached = self._envs.setdefault(task, [])
        room = self.max_envs - sum(len(v) for v in self._envs.values())
        while len(cached) < n and room > 0:
            cached.append(official_env(task))
            self.built, room = self.built + 1, room - 1
        self.reused += min(n, len(cached))
        extra = [official_env(task) for _ in range(n - min(n, len(cached)))]
        self.built += len(extra)
        return cached[:n] + extra, extra

    def close(self) -> None:
        for envs in self._envs.values():
            for env in envs:
                env.close()
        self._envs.clear()

    def __enter__(self) -> EnvCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def official_goals(task: str, goal_seed: int = 0) -> list:
    """Meta-World's 50 fixed goals for ``task``: ``metaworld.MT1(task, seed=goal_seed).train_tasks``.

    Each element is a ``metaworld.types.Task`` holding the env's ``rand_vec`` (initial object and goal
    positions) with ``partially_observable=False``. Deterministic given ``goal_seed``.
    """
    import metaworld

    return list(metaworld.MT1(validate_task(task), seed=goal_seed).train_tasks)


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

    try:
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


class StudentPolicy:
    """Adapts a :class:`~cpd_fast.student.Student` to ``evaluate_official(..., episode_info=True)``: one
    observation history per env slot, restarted at each episode's first observation. The student runs on
    the active slots only (an evaluation's last episodes leave most slots idle)."""

    def __init__(self, student: Any, num_envs: int, task_id: int | None = None) -> None:
        import torch

        from cpd_fast.student import HistoryBuffer

        self.student = student
        self.history = HistoryBuffer.for_student(student, num_envs)
        self.last = np.zeros((num_envs, student.config.obs_dim), np.float32)
        device = next(student.parameters()).device
        self.task_ids = None if task_id is None else torch.full((num_envs,), task_id, device=device)

    def __call__(self, obs: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        import torch

        self.last[slots] = obs
        reset = np.zeros(len(self.last), bool)
        reset[slots] = fresh
        # idle slots push their stale observation: harmless, they restart before they act again
        obs_t, reset_t, rows = torch.from_numpy(self.last), torch.from_numpy(reset), torch.from_numpy(slots)
        task_ids = None if self.task_ids is None else self.task_ids[: len(slots)]
        return self.student.act(obs_t, self.history, reset_t, task_ids, rows=rows).cpu().numpy()


def evaluate_student(
    student: Any,
    task: str,
    *,
    num_goals: int = NUM_OFFICIAL_GOALS,
    num_envs: int = 25,
    max_episode_steps: int = MAX_EPISODE_STEPS,
    task_id: int | None = None,
    env_cache: EnvCache | None = None,
) -> float:
    """Official-protocol success of the student on ``task``: with ``task_id=None`` the task embedding is
    inferred from the history (no task id); otherwise the task's prototype conditions the policy."""
    return student_result(
        student, task, num_goals=num_goals, num_envs=num_envs, max_episode_steps=max_episode_steps,
        task_id=task_id, env_cache=env_cache,
    ).success_rate  # fmt: skip


def student_result(
    student: Any,
    task: str,
    *,
    num_goals: int,
    num_envs: int,
    max_episode_steps: int,
    task_id: int | None,
    env_cache: EnvCache | None = None,
) -> EvalResult:
    """:func:`evaluate_student` with the whole :class:`EvalResult` (per-goal flags and lengths)."""
    import torch

    n_envs = min(num_envs, num_goals)
    was_training = student.training
    student.eval()  # once here, not in each step's act
    try:
        with torch.inference_mode():
            return evaluate_official(
                StudentPolicy(student, n_envs, task_id), task, num_envs=n_envs, num_goals=num_goals,
                max_episode_steps=max_episode_steps, episode_info=True, env_cache=env_cache,
            )  # fmt: skip
    finally:
        student.train(was_training)


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

    Returns:
        :class:`EvalResult` with ``protocol="monitoring"``.
    """
    task = validate_task(task)
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
