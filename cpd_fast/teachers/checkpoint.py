"""A teacher loaded from a saved policy checkpoint (``policy.pt`` written by PPO training).

The file is a ``state_dict`` plus the config that shapes the network, read with
``torch.load(..., weights_only=True)`` — no pickled code runs on load.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["CheckpointTeacher"]


class CheckpointTeacher:
    """``action_mean(obs [B, 39]) -> [B, 4]`` from a saved PPO policy.

    Args:
        path: a ``policy.pt`` (or a resume ``checkpoint.pt``) from :func:`cpd_fast.teachers.ppo.train_ppo`.
        task: if given, must match the task the checkpoint was trained on.
        device: where the network runs (``"cpu"``, ``"cuda"``).
    """

    def __init__(self, path: str | os.PathLike, task: str | None = None, device: str = "cpu") -> None:
        from cpd_fast.tasks import validate_task
        from cpd_fast.teachers.ppo import load_policy

        self.path = os.fspath(path)
        self._policy = load_policy(self.path, device=device)
        saved = self._policy.task
        if task is not None:
            task = validate_task(task)
            if saved is not None and saved != task:
                raise ValueError(f"checkpoint {self.path!r} is a {saved!r} teacher, not {task!r}")
        self.task = task or saved

    def action_mean(self, obs: np.ndarray) -> np.ndarray:
        return self._policy.action_mean(obs)

    __call__ = action_mean

    def __repr__(self) -> str:
        return f"CheckpointTeacher({self.path!r}, task={self.task!r})"
