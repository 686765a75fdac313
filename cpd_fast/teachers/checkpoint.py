"""A teacher loaded from a saved policy checkpoint (``policy.pt`` written by PPO training).

The file is a ``state_dict`` plus the config that shapes the network, read with
``torch.load(..., weights_only=True)`` — no pickled code runs on load. A file that cannot be a Meta-World
teacher (unreadable, or trained on observations that are not 39-dim / actions that are not 4-dim) is a
``ValueError`` naming the file and the dimensions, not a ``load_state_dict`` size-mismatch dump.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from cpd_fast.envs import ACT_DIM, OBS_DIM
from cpd_fast.teachers.ppo import load_policy

__all__ = ["CheckpointTeacher"]


class CheckpointTeacher:
    """``action_mean(obs [B, 39]) -> [B, 4]`` from a saved PPO policy.

    Args:
        path: a ``policy.pt`` (or a resume ``checkpoint.pt``) from :func:`cpd_fast.teachers.ppo.train_ppo`.
        task: if given (a validated name), must match the task the checkpoint was trained on.
        device: where the network runs (``"cpu"``, ``"cuda"``).
        remedy: what a load error tells the user to do (default: train one, or pass another file).
    """

    def __init__(
        self, path: str | os.PathLike, task: str | None = None, device: str = "cpu", remedy: str | None = None
    ) -> None:
        self.path = os.fspath(path)
        try:
            self._policy = load_policy(self.path, device=device)
        except FileNotFoundError:
            raise
        except Exception as err:  # unreadable file, or weights that do not fit the teacher network
            clear = _explain(self.path, err, remedy or _RETRAIN)
            if clear is err:
                raise
            raise clear from err
        saved = self._policy.task
        if task is not None and saved is not None and saved != task:
            raise ValueError(f"checkpoint {self.path!r} is a {saved!r} teacher, not {task!r}")
        self.task = task or saved
        self.trained_in = self._policy.config.backend  # the simulator its data is collected in

    def action_mean(self, obs: np.ndarray) -> np.ndarray:
        return self._policy.action_mean(obs)

    __call__ = action_mean

    def __repr__(self) -> str:
        return f"CheckpointTeacher({self.path!r}, task={self.task!r})"


_RETRAIN = "train one for this task with `cpd teachers train` (it resumes) or pass another policy.pt"


def _explain(path: str, err: Exception, retrain: str) -> Exception:
    """Why ``path`` failed to load as a teacher, as a ``ValueError`` naming the file (else ``err`` itself)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as load_err:
        return ValueError(
            f"cannot read teacher checkpoint {path!r} ({type(load_err).__name__}): the file is truncated, "
            f"corrupt or not a torch checkpoint; {retrain}"
        )
    state = payload.get("state_dict", payload.get("model")) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        return ValueError(f"{path!r} is not a cpd_fast PPO checkpoint (no network weights); {retrain}")
    obs_dim = _size(state.get("obs_norm.mean"), 0)
    act_dim = _size(state.get("actor_logstd"), -1)
    if obs_dim is not None and obs_dim != OBS_DIM:
        return ValueError(
            f"teacher checkpoint {path!r} takes {obs_dim}-dim observations but Meta-World v3 tasks and the "
            f"student use {OBS_DIM}: it was trained on another environment; {retrain}"
        )
    if act_dim is not None and act_dim != ACT_DIM:
        return ValueError(
            f"teacher checkpoint {path!r} outputs {act_dim}-dim actions but Meta-World v3 tasks use "
            f"{ACT_DIM}: it was trained on another environment; {retrain}"
        )
    if isinstance(err, (RuntimeError, KeyError, TypeError)):  # load_state_dict / PPOConfig mismatch
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
        return ValueError(
            f"teacher checkpoint {path!r} does not fit its saved PPO config ({detail[:200]}); {retrain}"
        )
    return err  # already a clear message (e.g. load_policy's "not a cpd_fast PPO checkpoint")


def _size(t: object, dim: int) -> int | None:
    return int(t.shape[dim]) if isinstance(t, torch.Tensor) and t.dim() > 0 else None
