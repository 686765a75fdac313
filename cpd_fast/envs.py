"""Every Meta-World environment the package builds: vectorised envs for training and monitoring, and
Meta-World's own envs, built faster, for the official evaluation protocol (:mod:`cpd_fast.evaluation`).

Vectorised envs
---------------

``make_vec_env(task, num_envs, backend=...)`` returns a :class:`VecEnv` over ``num_envs`` copies of one
Meta-World v3 task, each with its own goal:

* ``backend="envpool"`` — envpool's native C++ Meta-World v3 (``MetaWorld/<CamelName>-v3``), built with
  ``partially_observable=False`` so the goal is in the observation (envpool's default hides it).
  Goals are drawn from the task's continuous range on every reset. Fast (``bench/env_steps.py``), but
  not bit-identical to Meta-World: see :mod:`cpd_fast.fidelity`.
* ``backend="gymnasium"`` — Meta-World's own Python envs (``gym.make("Meta-World/MT1", ...)``), one per
  sub-env, each seeded differently (``seed + i``) so that each draws its own 50-goal set and its own
  goal sequence. ``gym.make_vec("Meta-World/MT1")`` would give every sub-env the same goal.

Both backends expose exactly the same conventions:

* ``reset() -> obs``: ``[N, 39]`` float32 (hand xyz+gripper, object poses, previous frame, goal xyz).
* ``step(actions)`` with actions ``[N, 4]`` (clipped to ``[-1, 1]``) returns
  ``obs [N, 39] float32, reward [N] float32, terminated [N] bool, truncated [N] bool, info`` where
  ``info["success"]`` is ``[N]`` float32 in {0, 1} and ``info["autoreset"]`` is ``[N]`` bool.
* Episodes end by truncation after ``max_episode_steps`` steps (Meta-World never terminates; success
  does not end an episode during training).
* Auto-reset is *next-step* (envpool's native semantics; gymnasium ``AutoresetMode.NEXT_STEP``): the
  step that returns ``terminated | truncated`` for env i carries the episode's real last observation;
  the *following* ``step`` ignores env i's action, resets it, and returns the new episode's first
  observation with ``reward = 0``, ``terminated = truncated = False``, ``success = 0`` and
  ``info["autoreset"][i] = True``. Rollout code must drop those transitions.

Which backend a task's data comes from: :func:`collection_backends` (envpool, except where a fidelity
report of :mod:`cpd_fast.fidelity`, the known mismatches or a teacher's own simulator say otherwise).

Official envs
-------------

:func:`official_env` builds one Meta-World v3 env of a task as Meta-World builds it (same class name,
same episodes bit for bit), with two speed-ups: its MuJoCo model is a copy of one compiled once per
process, and the gripper-contact test runs without Python loops over every contact. :class:`EnvCache`
keeps such envs alive between evaluations.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import metaworld  # also registers the "Meta-World/*" gymnasium ids
import mujoco
import numpy as np

from cpd_fast.errors import require_int
from cpd_fast.tasks import validate_task

try:
    import envpool
except ImportError:  # envpool has wheels for Linux x86_64 only; the gymnasium backend works without it
    envpool = None

__all__ = [
    "ACT_DIM",
    "BACKENDS",
    "KNOWN_BAD_ENVPOOL",
    "MAX_EPISODE_STEPS",
    "OBS_DIM",
    "EnvCache",
    "VecEnv",
    "collection_backends",
    "envpool_task_id",
    "load_backend_choices",
    "make_vec_env",
    "official_env",
]

OBS_DIM = 39
ACT_DIM = 4
MAX_EPISODE_STEPS = 500  # Meta-World's max_path_length; its envs refuse to step past it
BACKENDS = ("envpool", "gymnasium")
# Tasks whose scripted expert fails under envpool 1.2.5 (DESIGN.md §3): collect them with gymnasium when no
# fidelity report (cpd_fast.fidelity) was made.
KNOWN_BAD_ENVPOOL = {"dial-turn-v3": "gymnasium"}


def envpool_task_id(task: str) -> str:
    """envpool's id for a Meta-World v3 task.

    ``"button-press-topdown-v3"`` -> ``"MetaWorld/ButtonPressTopdown-v3"`` (CamelCase words, same version).
    """
    return _envpool_id(validate_task(task))


def _envpool_id(task: str) -> str:
    """:func:`envpool_task_id` of a validated task name."""
    name, version = task.rsplit("-", 1)
    return "MetaWorld/" + "".join(word.capitalize() for word in name.split("-")) + "-" + version


class VecEnv:
    """``num_envs`` sub-environments of one task; see the module docstring for the exact semantics.

    Build it with :func:`make_vec_env`. Usable as a context manager (closes on exit).
    """

    def __init__(self, task: str, num_envs: int, backend: str, max_episode_steps: int, impl: Any) -> None:
        self.task = task
        self.num_envs = num_envs
        self.backend = backend
        self.max_episode_steps = max_episode_steps
        self.obs_dim = OBS_DIM
        self.act_dim = ACT_DIM
        self._impl = impl
        # True where the previous step ended the episode, so this step is the backend's auto-reset.
        self._pending_reset = np.zeros(num_envs, dtype=bool)
        self._closed = False
        self._waiting = False  # a step_async is in flight
        self._actions: np.ndarray | None = None

    def reset(self) -> np.ndarray:
        """Reset every sub-env (each gets a new goal). Returns ``[N, 39]`` float32 observations."""
        self._check_open()
        if self._waiting:
            self.step_wait()  # drain the step in flight before resetting
        obs, _ = self._impl.reset()
        self._pending_reset[:] = False
        return self._obs(obs)

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Step every sub-env with ``actions`` ``[N, 4]``.

        Returns ``obs [N, 39], reward [N], terminated [N], truncated [N], info`` (see module docstring).
        """
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: np.ndarray) -> None:
        """Start a step with ``actions`` ``[N, 4]`` and return at once; :meth:`step_wait` collects it.

        With envpool the sub-envs step on envpool's own threads meanwhile (``send``), so the caller can
        run inference for *another* VecEnv in between; gymnasium steps inside :meth:`step_wait`.
        """
        self._check_open()
        if self._waiting:
            raise RuntimeError("step_async called twice without step_wait")
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs, ACT_DIM):
            raise ValueError(f"actions must have shape ({self.num_envs}, {ACT_DIM}), got {actions.shape}")
        if not np.issubdtype(actions.dtype, np.number) or not np.all(np.isfinite(actions)):
            raise ValueError("actions must be finite numbers")
        actions = np.clip(actions.astype(np.float32), -1.0, 1.0)
        if self.backend == "envpool":
            self._impl.send(actions)
        else:
            self._actions = actions
        self._waiting = True

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Finish the step started by :meth:`step_async`; same return values as :meth:`step`."""
        self._check_open()
        if not self._waiting:
            raise RuntimeError("step_wait called without step_async")
        self._waiting = False
        if self.backend == "envpool":
            obs, reward, terminated, truncated, info = self._impl.recv()
            order = np.argsort(info["env_id"]) if "env_id" in info else None
            if order is not None and not np.array_equal(order, np.arange(self.num_envs)):
                obs, reward, terminated, truncated = (
                    obs[order],
                    reward[order],
                    terminated[order],
                    truncated[order],
                )
                info = {"success": np.asarray(info.get("success", np.zeros(self.num_envs)))[order]}
        else:
            obs, reward, terminated, truncated, info = self._impl.step(self._actions)
        autoreset = self._pending_reset.copy()
        reward = np.asarray(reward, dtype=np.float32).copy()
        terminated = np.asarray(terminated, dtype=bool).copy()
        truncated = np.asarray(truncated, dtype=bool).copy()
        success = np.asarray(info.get("success", np.zeros(self.num_envs)), dtype=np.float32).copy()
        # envpool reports the reset state's reward/success on its auto-reset step, gymnasium reports 0:
        # force the gymnasium convention so both backends agree.
        reward[autoreset] = 0.0
        success[autoreset] = 0.0
        terminated[autoreset] = False
        truncated[autoreset] = False
        success = (success > 0.5).astype(np.float32)
        self._pending_reset = terminated | truncated
        return self._obs(obs), reward, terminated, truncated, {"success": success, "autoreset": autoreset}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            close = getattr(self._impl, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> VecEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VecEnv(task={self.task!r}, num_envs={self.num_envs}, backend={self.backend!r})"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this VecEnv is closed")

    def _obs(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        if obs.shape != (self.num_envs, OBS_DIM):  # would mean a backend changed its layout
            raise RuntimeError(f"{self.backend} returned observations of shape {obs.shape}")
        return obs


def make_vec_env(
    task: str,
    num_envs: int,
    *,
    backend: str = "envpool",
    seed: int = 0,
    max_episode_steps: int = MAX_EPISODE_STEPS,
) -> VecEnv:
    """Build ``num_envs`` sub-environments of Meta-World v3 ``task``.

    Args:
        task: a Meta-World v3 task name, e.g. ``"reach-v3"`` (see :data:`cpd_fast.tasks.MT50`).
        num_envs: number of sub-environments N (> 0).
        backend: ``"envpool"`` (fast, C++) or ``"gymnasium"`` (Meta-World's reference Python envs).
        seed: base seed; sub-env i is seeded ``seed + i`` (envpool does the same internally).
        max_episode_steps: episode length in env steps, 1..500 (500 = Meta-World's standard).

    Returns:
        a :class:`VecEnv`; call ``reset()`` before ``step()``.
    """
    task = validate_task(task)
    require_int("num_envs", num_envs)
    if not 1 <= max_episode_steps <= MAX_EPISODE_STEPS:
        raise ValueError(f"max_episode_steps must be in 1..{MAX_EPISODE_STEPS}, got {max_episode_steps}")
    num_envs = int(num_envs)
    if backend == "envpool":
        impl = _make_envpool(task, num_envs, seed, max_episode_steps)
    elif backend == "gymnasium":
        impl = _make_gymnasium(task, num_envs, seed, max_episode_steps)
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return VecEnv(task, num_envs, backend, max_episode_steps, impl)


def _make_envpool(task: str, num_envs: int, seed: int, max_episode_steps: int) -> Any:
    if envpool is None:
        raise ImportError(
            "the envpool backend needs `pip install envpool>=1.2.5`; or use backend='gymnasium'"
        )
    return envpool.make(
        _envpool_id(task),
        env_type="gymnasium",
        num_envs=num_envs,
        seed=seed,
        max_episode_steps=max_episode_steps,
        # envpool's default hides the goal (Meta-World's ML setting); the MT setting shows it.
        partially_observable=False,
    )


def _make_gymnasium(task: str, num_envs: int, seed: int, max_episode_steps: int) -> Any:
    def make_one(i: int) -> Any:
        # A different seed per sub-env: Meta-World derives both the 50-goal set (MT1(seed)) and the
        # per-reset goal choice from it, so sub-envs see different goals.
        kwargs: dict[str, Any] = {"env_name": task, "seed": seed + i, "disable_env_checker": True}
        if max_episode_steps < MAX_EPISODE_STEPS:  # Meta-World already limits episodes to 500 steps
            kwargs["max_episode_steps"] = max_episode_steps
        return gym.make("Meta-World/MT1", **kwargs)

    return gym.vector.SyncVectorEnv(
        [lambda i=i: make_one(i) for i in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP,
    )


def load_backend_choices(path: str) -> dict[str, str]:
    """Read ``{task: backend}`` back from a report written by :func:`cpd_fast.fidelity.save_report`
    (``cpd envs check --out``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no fidelity report at {path!r}; write one with `cpd envs check --out FILE`")
    with open(path) as f:
        try:
            payload = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path!r} is not JSON ({err}); re-run `cpd envs check --out {path}`") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("backend"), dict):
        raise ValueError(f"{path!r} is not a `cpd envs check` report (no 'backend' table)")
    return dict(payload["backend"])


def collection_backends(report: str | None, teachers: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``{task: backend}`` for collection and training: from a fidelity report, else the known mismatches
    (:data:`KNOWN_BAD_ENVPOOL`); tasks not listed use envpool.

    A trained teacher in ``teachers`` (``{task: teacher}``) collects in the simulator it was trained in (its
    ``trained_in``), whatever the report says: a policy can lean on details of a simulator that the scripted
    expert the report runs does not (a lever-pull-v3 policy trained under envpool fails under Meta-World's
    envs, where the scripted expert passes both: bench/teachers.md).
    """
    backends = load_backend_choices(report) if report else dict(KNOWN_BAD_ENVPOOL)
    for task, teacher in (teachers or {}).items():
        trained_in = getattr(teacher, "trained_in", None)
        if trained_in is not None:
            backends[task] = trained_in
    return backends


# ----------------------------------------------------------------------------- official envs


@functools.lru_cache(maxsize=32)
def _compiled_model(xml_path: str) -> Any:
    """The MuJoCo model of ``xml_path`` compiled once per process (never simulated: copies are handed out)."""
    return mujoco.MjModel.from_xml_path(xml_path)


def _touching_object(self: Any, object_geom_id: int) -> bool:
    """Meta-World's ``SawyerXYZEnv.touching_object`` without its Python loops over every contact: both
    gripper pads press on the object (contact force > 0). The contacts are matched on the geom-id arrays;
    the matched forces are summed as Meta-World sums them (in contact order, from 0), so the answer is
    Meta-World's bit for bit (tested). Its loops were a large share of a grasping task's evaluation
    (``bench/bench_eval.py``)."""
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
    """A Meta-World v3 env of ``task`` (a validated name: :func:`cpd_fast.tasks.validate_task`) as
    Meta-World builds it, but with its MuJoCo model copied from one compiled per process (copying is much
    cheaper than compiling the XML: ``bench/bench_eval_cache.py``) and the gripper-contact test without
    Python loops (:func:`_touching_object`). A copy of a compiled model is that model byte for byte, so
    the episodes are the same (tested)."""
    return _official_class(metaworld.env_dict.ALL_V3_ENVIRONMENTS[task])()


class EnvCache:
    """Meta-World env instances kept alive between :func:`cpd_fast.evaluation.evaluate_official` calls.

    Building an env copies its MuJoCo model (:func:`official_env`, mostly meshes), and a run evaluates
    every task seen so far after every stage, in two modes. An env's episode depends only on the task
    set and the actions (``set_task`` freezes the goal, ``reset`` restores it exactly), so a reused env
    gives the same success flags bit for bit (tested). At most ``max_envs`` instances are kept, first
    come first kept (a run evaluates tasks in the same order every stage, where LRU would always miss);
    envs beyond the budget are built and closed per call, as without a cache. Close it when done
    (a context manager).
    """

    def __init__(self, max_envs: int = 100) -> None:
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
