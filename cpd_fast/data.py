"""Teacher trajectory datasets: vectorised rollouts -> Minari (HDF5) -> contiguous torch tensors.

One dataset per task, id ``<namespace>/<task>-v0`` (e.g. ``cpd/reach-v3-v0``), stored under
``<root>`` (``MINARI_DATASETS_PATH`` is pointed there while writing and reading, so datasets live inside
the run directory, by default ``<run_dir>/datasets``). Each Minari episode holds, with T = episode length:

* ``observations`` ``[T+1, 39]`` float32 (the last one is the observation after the final step);
* ``actions`` ``[T, 4]`` the *executed* action (teacher mean + exploration noise, clipped);
* ``rewards`` ``[T]``, ``terminations`` / ``truncations`` ``[T]`` (Meta-World only truncates);
* ``infos["action_mean"]`` ``[T+1, 4]`` the teacher's action mean at every observation (the distillation
  target; Minari's convention that infos have one entry per observation), ``infos["success"]`` ``[T+1]``
  (0 at the reset observation) and ``infos["task_id"]`` ``[T+1]`` the task's index in MT50.

The dataset's metadata names the task (``description``) and the teacher (``algorithm_name``).
Auto-reset transitions of the vectorised env are never stored (their action is ignored by the env).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import minari
import numpy as np
import torch
from minari.data_collector import EpisodeBuffer

from cpd_fast.envs import ACT_DIM, MAX_EPISODE_STEPS, OBS_DIM, make_vec_env
from cpd_fast.errors import require_int
from cpd_fast.runio import CorruptFileError, file_sha256, read_json, write_json_atomic
from cpd_fast.tasks import MT50, validate_task

__all__ = [
    "TeacherData",
    "collect_dataset",
    "dataset_files",
    "dataset_id",
    "dataset_summary",
    "load_teacher_data",
    "record_dataset",
    "verify_dataset_files",
]

DEFAULT_NAMESPACE = "cpd"


def dataset_id(task: str, namespace: str = DEFAULT_NAMESPACE, version: int = 0) -> str:
    """Minari id of ``task``'s dataset: ``"cpd/reach-v3-v0"`` (``ValueError`` for an unknown task)."""
    return f"{namespace}/{validate_task(task)}-v{version}"


@contextlib.contextmanager
def _datasets_root(root: str | os.PathLike) -> Iterator[None]:
    """Point Minari at ``root`` (it reads ``MINARI_DATASETS_PATH`` on every call) for the duration."""
    saved = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(os.fspath(root))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = saved


def collect_dataset(
    teacher: Any,
    task: str,
    root: str | os.PathLike,
    *,
    episodes: int = 50,
    num_envs: int = 10,
    noise_std: float = 0.1,
    backend: str = "envpool",
    seed: int = 0,
    max_episode_steps: int = MAX_EPISODE_STEPS,
    namespace: str = DEFAULT_NAMESPACE,
    teacher_name: str | None = None,
    overwrite: bool = False,
    actor: Any = None,
    description: str | None = None,
) -> str:
    """Roll out ``teacher`` on ``task`` and store ``episodes`` whole episodes as a Minari dataset.

    Args:
        teacher: anything with ``action_mean(obs [B, 39]) -> [B, 4]``.
        task: Meta-World v3 task name.
        root: directory holding the datasets (``MINARI_DATASETS_PATH``).
        episodes: number of complete episodes to store (> 0).
        num_envs: envs stepped side by side (batched teacher inference).
        noise_std: std of the Gaussian noise added to the executed action (0 = on-policy). Visiting states
            off the teacher's own path teaches the student to recover from its mistakes; the stored
            target is always the teacher's mean, not the noisy action.
        backend: env backend (use ``"gymnasium"`` where envpool is unfaithful, e.g. dial-turn-v3).
        seed: env and noise seed.
        max_episode_steps: episode length.
        overwrite: replace an existing dataset with the same id; otherwise an existing one is kept (a
            re-run is a no-op, so a killed collection resumes at the next task).
        actor: who acts, if not the teacher: ``actor(obs [n, 39], fresh [n] bool, mean [n, 4]) -> [n, 4]``
            executed actions (``fresh``: the row's observation starts an episode; ``mean``: the teacher's
            action there). The stored target is still the teacher's mean at every visited state — a
            student-driven dataset relabelled by the teacher (DAgger). ``noise_std`` is then not used.
        description: the dataset's Minari description (default: teacher rollouts with ``noise_std``).

    Returns:
        the dataset id (load it with :func:`load_teacher_data`, or ``minari.load_dataset`` with
        ``MINARI_DATASETS_PATH=root``).
    """
    ds_id = dataset_id(task, namespace)  # checks the task name
    require_int("episodes", episodes)
    require_int("num_envs", num_envs)
    if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, int):
        raise ValueError(f"max_episode_steps must be an int, got {max_episode_steps!r}")
    if not 1 <= max_episode_steps <= MAX_EPISODE_STEPS:  # checked before the episode buffers are allocated
        raise ValueError(f"max_episode_steps must be in 1..{MAX_EPISODE_STEPS}, got {max_episode_steps}")
    if not isinstance(noise_std, int | float) or not noise_std >= 0 or not np.isfinite(noise_std):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    rng = np.random.default_rng(seed)

    with _datasets_root(root):
        if ds_id in minari.list_local_datasets():
            if not overwrite:
                return ds_id
            minari.delete_dataset(ds_id)

        rollout_settings = dict(backend=backend, seed=seed, max_episode_steps=max_episode_steps)
        buffers = _rollout_episodes(teacher, task, min(num_envs, episodes), episodes, noise_std, rng,
                                    actor=actor, **rollout_settings)  # fmt: skip
        box_obs = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float64)
        box_act = gym.spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32)
        with warnings.catch_warnings():  # Minari nags about author/permalink/env spec metadata
            warnings.simplefilter("ignore", UserWarning)
            minari.create_dataset_from_buffers(
                ds_id,
                buffers,
                observation_space=box_obs,
                action_space=box_act,
                algorithm_name=teacher_name or type(teacher).__name__,
                description=description
                or f"Meta-World {task} teacher rollouts (cpd_fast), noise_std={noise_std}",
                data_format="hdf5",
            )
    return ds_id


def _rollout_episodes(
    teacher: Any, task: str, n: int, episodes: int, noise_std: float, rng: np.random.Generator, *,
    backend: str, seed: int, max_episode_steps: int, actor: Any = None,
) -> list[Any]:  # fmt: skip
    """``episodes`` whole episodes of ``teacher`` (noisy actions, mean targets) on ``n`` envs side by side,
    as Minari ``EpisodeBuffer``s in completion order."""
    task_id = MT50.index(task)
    L = max_episode_steps
    # Per-env episode buffers, filled one time step at a time (vectorised over envs).
    obs_b = np.zeros((n, L + 1, OBS_DIM), np.float32)
    mean_b = np.zeros((n, L + 1, ACT_DIM), np.float32)
    act_b = np.zeros((n, L, ACT_DIM), np.float32)
    rew_b = np.zeros((n, L), np.float32)
    succ_b = np.zeros((n, L + 1), np.float32)
    term_b = np.zeros((n, L), bool)
    trunc_b = np.zeros((n, L), bool)
    length = np.zeros(n, np.int64)
    rows = np.arange(n)
    buffers: list[Any] = []

    with make_vec_env(task, n, backend=backend, seed=seed, max_episode_steps=max_episode_steps) as env:
        obs = env.reset()
        mean = _checked_mean(teacher, obs)
        obs_b[:, 0], mean_b[:, 0] = obs, mean
        fresh = np.ones(n, dtype=bool)  # the row's observation is its episode's first
        while len(buffers) < episodes:
            if actor is not None:
                action = np.asarray(actor(obs, fresh, mean), dtype=np.float32)
            else:
                action = mean + noise_std * rng.standard_normal(mean.shape).astype(np.float32)
            action = np.clip(action, -1.0, 1.0)
            obs, reward, terminated, truncated, info = env.step(action)
            mean = _checked_mean(teacher, obs)
            live = ~info["autoreset"]  # auto-reset rows: the env ignored the action; nothing to store
            r, k = rows[live], length[live]
            act_b[r, k], rew_b[r, k] = action[live], reward[live]
            term_b[r, k], trunc_b[r, k] = terminated[live], truncated[live]
            obs_b[r, k + 1], mean_b[r, k + 1], succ_b[r, k + 1] = (
                obs[live],
                mean[live],
                info["success"][live],
            )
            length[live] += 1
            for i in np.flatnonzero(live & (terminated | truncated)):
                T = int(length[i])
                if len(buffers) < episodes:
                    buffers.append(
                        EpisodeBuffer(
                            id=len(buffers),
                            observations=obs_b[i, : T + 1].copy(),
                            actions=act_b[i, :T].copy(),
                            rewards=rew_b[i, :T].copy(),
                            terminations=term_b[i, :T].copy(),
                            truncations=trunc_b[i, :T].copy(),
                            infos={
                                "action_mean": mean_b[i, : T + 1].copy(),
                                "success": succ_b[i, : T + 1].copy(),
                                "task_id": np.full(T + 1, task_id, np.int64),
                            },
                        )
                    )
                length[i] = 0
            # rows that were just auto-reset start their next episode with this observation
            fresh = np.asarray(info["autoreset"], dtype=bool)
            obs_b[fresh, 0], mean_b[fresh, 0], succ_b[fresh, 0] = obs[fresh], mean[fresh], 0.0
    return buffers


def _checked_mean(teacher: Any, obs: np.ndarray) -> np.ndarray:
    mean = np.asarray(teacher.action_mean(obs), dtype=np.float32)
    if mean.shape != (obs.shape[0], ACT_DIM):
        raise ValueError(f"teacher returned shape {mean.shape} for obs {obs.shape}; expected [B, {ACT_DIM}]")
    return mean


@dataclass
class TeacherData:
    """All transitions of some teacher datasets as contiguous tensors (M = total steps).

    Attributes:
        obs: ``[M, 39]`` float32 observation at each step.
        action_mean: ``[M, 4]`` the teacher's action mean at ``obs`` (the distillation target).
        action: ``[M, 4]`` the executed action.
        reward: ``[M]`` float32. success: ``[M]`` float32, success reported after the step.
        done: ``[M]`` bool, the episode ended after this step (terminated or truncated).
        task_id: ``[M]`` int64 index into ``tasks``. episode: ``[M]`` int64 global episode index.
        step: ``[M]`` int64 step index within its episode (for observation-history windows).
        tasks: task names, ``tasks[task_id]``.
    """

    obs: Any
    action_mean: Any
    action: Any
    reward: Any
    success: Any
    done: Any
    task_id: Any
    episode: Any
    step: Any
    tasks: list[str]

    def __len__(self) -> int:
        return int(self.obs.shape[0])


def load_teacher_data(
    ids_or_tasks: Sequence[str], root: str | os.PathLike, *, namespace: str = DEFAULT_NAMESPACE
) -> TeacherData:
    """Load datasets (Minari ids, or task names via :func:`dataset_id`) into one :class:`TeacherData`.

    Each episode's arrays are read whole and concatenated once — no per-step Python loop.
    """
    if isinstance(ids_or_tasks, str):
        raise TypeError(
            f"ids_or_tasks must be a list of task names or dataset ids, not a str: [{ids_or_tasks!r}]"
        )
    if not isinstance(ids_or_tasks, Iterable):
        raise TypeError(f"ids_or_tasks must be a list of task names or dataset ids, got {ids_or_tasks!r}")
    ids_or_tasks = list(ids_or_tasks)
    bad = [i for i in ids_or_tasks if not isinstance(i, str)]
    if bad:
        raise TypeError(f"ids_or_tasks must hold str task names or dataset ids, got {bad[0]!r}")
    if not isinstance(root, str | os.PathLike):
        raise TypeError(f"root must be a directory path (str or os.PathLike), got {type(root).__name__}")
    if not os.path.isdir(root):  # checked here: Minari would create a missing root
        raise FileNotFoundError(
            f"datasets root {os.fspath(root)!r} is not a directory; pass the datasets directory of a run "
            "(RUN_DIR/datasets) or collect data with `cpd teachers collect`"
        )
    ids = [i if "/" in i else dataset_id(i, namespace) for i in ids_or_tasks]
    if not ids:
        raise ValueError("ids_or_tasks is empty: no datasets to load")
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("obs", "mean", "act", "rew", "succ", "done", "tid", "ep", "step")
    }
    tasks: list[str] = []
    n_episodes = 0
    with _datasets_root(root):
        local = set(minari.list_local_datasets())
        for ds_id in ids:
            if ds_id not in local:
                raise FileNotFoundError(
                    f"no Minari dataset {ds_id!r} under {os.fspath(root)!r}; run `cpd teachers collect` first"
                )
            task = ds_id.split("/")[-1].rsplit("-v", 1)[0]
            tasks.append(task)
            for ep in minari.load_dataset(ds_id).iterate_episodes():
                T = len(ep.rewards)
                parts["obs"].append(np.asarray(ep.observations[:T], np.float32))
                parts["mean"].append(np.asarray(ep.infos["action_mean"][:T], np.float32))
                parts["act"].append(np.asarray(ep.actions, np.float32))
                parts["rew"].append(np.asarray(ep.rewards, np.float32))
                parts["succ"].append(np.asarray(ep.infos["success"][1 : T + 1], np.float32))
                parts["done"].append(np.asarray(ep.terminations, bool) | np.asarray(ep.truncations, bool))
                parts["tid"].append(np.full(T, len(tasks) - 1, np.int64))
                parts["ep"].append(np.full(T, n_episodes, np.int64))
                parts["step"].append(np.arange(T, dtype=np.int64))
                n_episodes += 1
    cat = {k: torch.from_numpy(np.concatenate(v)) for k, v in parts.items()}
    return TeacherData(
        obs=cat["obs"],
        action_mean=cat["mean"],
        action=cat["act"],
        reward=cat["rew"],
        success=cat["succ"],
        done=cat["done"],
        task_id=cat["tid"],
        episode=cat["ep"],
        step=cat["step"],
        tasks=tasks,
    )


def dataset_files(root: str | os.PathLike, task: str, namespace: str = DEFAULT_NAMESPACE) -> dict[str, str]:
    """``{path relative to root: sha256}`` of the files of ``task``'s Minari dataset under ``root``."""
    root = os.fspath(root)
    top = os.path.join(root, dataset_id(task, namespace))
    paths = sorted(p for p in glob.glob(os.path.join(top, "**", "*"), recursive=True) if os.path.isfile(p))
    return {os.path.relpath(p, root): file_sha256(p) for p in paths}


def dataset_summary(root: str | os.PathLike, task: str, namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any]:
    """What ``task``'s dataset under ``root`` holds: ``{"id", "episodes", "steps", "bytes", "success",
    "content_sha256"}`` (``success``: the share of episodes in which the task succeeded).

    ``content_sha256`` digests every episode's arrays in order (observations, actions, rewards,
    terminations, truncations and the infos ``action_mean``, ``success``, ``task_id``, each with its dtype
    and shape): two collections of the same data have the same digest whatever the files' metadata (HDF5
    creation times, Minari's version), and any changed value changes it.
    """
    ds_id = dataset_id(task, namespace)
    h, episodes, steps, succeeded = hashlib.sha256(), 0, 0, 0
    with _datasets_root(root):
        if ds_id not in minari.list_local_datasets():
            raise FileNotFoundError(f"no Minari dataset {ds_id!r} under {os.fspath(root)!r}")
        for ep in minari.load_dataset(ds_id).iterate_episodes():
            arrays = [ep.observations, ep.actions, ep.rewards, ep.terminations, ep.truncations,
                      ep.infos["action_mean"], ep.infos["success"], ep.infos["task_id"]]  # fmt: skip
            for a in map(np.ascontiguousarray, arrays):
                h.update(f"{a.dtype.str}{a.shape}".encode())
                h.update(a.tobytes())
            episodes, steps = episodes + 1, steps + len(ep.rewards)
            succeeded += bool(np.asarray(ep.infos["success"]).any())
    size = sum(
        os.path.getsize(os.path.join(os.fspath(root), p)) for p in dataset_files(root, task, namespace)
    )
    return {"id": ds_id, "episodes": episodes, "steps": steps, "bytes": size,
            "success": round(succeeded / max(episodes, 1), 4), "content_sha256": h.hexdigest()}  # fmt: skip


def record_dataset(
    manifest_path: str | os.PathLike, task: str, made_by: dict[str, Any], summary: dict
) -> str:
    """Enter ``task``'s dataset in a datasets manifest (``{"datasets": {task: {**made_by, **summary}}}``, a
    file meant to be committed while the datasets are not) or verify it against its entry.

    ``made_by``: what makes the data (teacher and its file's sha256, episodes, noise, seed, episode length,
    env backend). An entry made the same way must hold the same ``content_sha256`` (:func:`dataset_summary`):
    a regenerated dataset is identical or this raises ``ValueError`` naming both digests. Returns
    ``"verified"``, ``"added"`` or ``"replaced"`` (made another way: the entry is rewritten).
    """
    manifest_path = os.fspath(manifest_path)
    doc = read_json(manifest_path, {"datasets": {}})
    old = doc["datasets"].get(task)
    if old is not None and {k: old.get(k) for k in made_by} == made_by:
        if old["content_sha256"] != summary["content_sha256"]:
            raise ValueError(
                f"{task}: the regenerated dataset differs from {manifest_path} (content sha256 "
                f"{summary['content_sha256'][:12]}… against {old['content_sha256'][:12]}…) although it was "
                "made the same way; float results can differ in the last bits on another CPU type"
            )
        return "verified"
    doc["datasets"][task] = {**made_by, **summary}
    doc["datasets"] = dict(sorted(doc["datasets"].items()))
    write_json_atomic(manifest_path, doc)
    return "added" if old is None else "replaced"


def verify_dataset_files(manifest_path: str | os.PathLike) -> int:
    """Check the files listed in a ``<task>.collected.json`` manifest against their sha256; returns how many.

    Raises:
        CorruptFileError: naming the missing or damaged file, or the manifest itself, and how to recover.
    """
    manifest_path = os.fspath(manifest_path)
    root = os.path.dirname(manifest_path)
    try:
        with open(manifest_path) as f:
            files = json.load(f).get("files", {})
    except json.JSONDecodeError:
        raise CorruptFileError(f"{manifest_path} is corrupt; delete it and re-run to collect again") from None
    for rel, digest in files.items():
        path = os.path.join(root, rel)
        if not os.path.isfile(path) or file_sha256(path) != digest:
            raise CorruptFileError(
                f"{path} is {'missing' if not os.path.isfile(path) else 'corrupt (sha256 mismatch)'}; delete "
                f"{manifest_path} and re-run the same command to collect that task again"
            )
    return len(files)


def ensure_dataset(
    task: str,
    root: str,
    make_teacher: Any,
    teacher_name: str,
    *,
    episodes: int,
    noise_std: float,
    seed: int,
    max_episode_steps: int,
    num_envs: int,
    backend: str,
    eval_goals: int,
) -> dict[str, Any]:
    """Collect ``task``'s teacher dataset under ``root`` unless one made with the same settings is there.

    What makes the data is recorded in ``root/<task>.collected.json`` (``spec``: teacher, episodes, noise,
    seed, episode length, env backend, evaluation goals; ``files``: sha256 of each dataset file), written
    after the dataset is complete; runs (and every method of a ``cpd run``) sharing ``root`` reuse it.
    ``make_teacher()`` builds the teacher (called only when the data must be collected).
    Returns the manifest (the teacher's success is added by :func:`cpd_fast.teachers.gate.record_success`).
    """
    spec = {"teacher": teacher_name, "episodes": episodes, "noise_std": noise_std, "seed": seed,
            "max_episode_steps": max_episode_steps, "backend": backend, "eval_goals": eval_goals}  # fmt: skip
    manifest_path = os.path.join(root, f"{task}.collected.json")
    manifest: dict[str, Any] = read_json(manifest_path, {})
    if manifest.get("spec") != spec:
        collect_dataset(
            make_teacher(), task, root, episodes=episodes, num_envs=num_envs, noise_std=noise_std,
            backend=backend, seed=seed, max_episode_steps=max_episode_steps, overwrite=True,
            teacher_name=teacher_name,
        )  # fmt: skip
        manifest = {"spec": spec, "files": dataset_files(root, task)}
        write_json_atomic(manifest_path, manifest)
    return manifest
