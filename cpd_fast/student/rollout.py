"""Rollouts: the per-env observation history (:class:`HistoryBuffer`) and one batched action step
(:func:`act`, also ``student.act``).

**Padding at episode start.** With fewer than H observations the window is left-padded and ``mask``
(``[B, H]`` bool, True = real observation, the last position always real) marks the real ones; padded
positions are ignored by attention and by the task encoder, so their values do not matter.
:class:`HistoryBuffer` left-pads by repeating the first observation (Meta-World's own convention at reset:
the observation's "previous frame" half equals the current one) and returns the mask too, so a window is
sensible even for a caller that drops the mask.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["HistoryBuffer", "act"]


class HistoryBuffer:
    """Per-env history of the last H observations for batched rollouts.

    :meth:`push` appends one observation per env and returns ``(window [N, H, obs_dim], mask [N, H])``.
    An env whose episode (re)starts has its history cleared: the window is left-padded by repeating its
    first observation and the mask marks only the real observations.
    """

    def __init__(self, num_envs: int, history: int, obs_dim: int, device: torch.device | str = "cpu"):
        if num_envs < 1 or history < 1 or obs_dim < 1:
            raise ValueError("num_envs, history and obs_dim must be positive")
        self.num_envs, self.history, self.obs_dim = num_envs, history, obs_dim
        self.obs = torch.zeros(num_envs, history, obs_dim, device=device)
        self.mask = torch.zeros(num_envs, history, dtype=torch.bool, device=device)
        self.started = torch.zeros(num_envs, dtype=torch.bool, device=device)

    @classmethod
    def for_student(cls, student: nn.Module, num_envs: int) -> HistoryBuffer:
        cfg = student.config
        return cls(num_envs, cfg.history, cfg.obs_dim, device=student.prototypes.device)

    def reset(self, env_ids=None) -> None:
        """Forget the history of ``env_ids`` (all envs if None); their next push starts an episode."""
        idx = slice(None) if env_ids is None else torch.as_tensor(env_ids, device=self.obs.device)
        self.started[idx] = False
        self.mask[idx] = False

    def push(self, obs, reset_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``obs [N, obs_dim]``; envs with ``reset_mask`` True (or never pushed) start an episode."""
        obs = torch.as_tensor(obs, dtype=self.obs.dtype, device=self.obs.device)
        if obs.shape != (self.num_envs, self.obs_dim):
            raise ValueError(f"obs must have shape [{self.num_envs}, {self.obs_dim}], got {tuple(obs.shape)}")
        fresh = ~self.started
        if reset_mask is not None:
            fresh = fresh | torch.as_tensor(reset_mask, dtype=torch.bool, device=self.obs.device)
        self.obs = torch.roll(self.obs, -1, dims=1)
        self.mask = torch.roll(self.mask, -1, dims=1)
        self.obs[:, -1] = obs
        self.mask[:, -1] = True
        if bool(fresh.any()):
            self.obs[fresh] = obs[fresh, None, :].expand(-1, self.history, -1)
            self.mask[fresh] = False
            self.mask[fresh, -1] = True
        self.started[:] = True
        return self.obs.clone(), self.mask.clone()


@torch.no_grad()
def act(
    student: nn.Module,
    obs: torch.Tensor | np.ndarray,
    history: HistoryBuffer,
    reset_mask: torch.Tensor | np.ndarray | None = None,
    task_ids: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """One batched rollout step: push ``obs [N, obs_dim]`` into ``history`` and return ``[N, act_dim]``.

    ``reset_mask [N]`` (bool) marks envs whose ``obs`` starts a new episode (their history restarts).
    ``rows`` (LongTensor ``[n]``): the actions of these envs only, ``[n, act_dim]`` (every history still
    advances; ``task_ids``, if given, is then ``[n]``): a rollout whose other envs are idle skips them.
    Runs in eval mode (restores the previous mode) and on the parameters' device.
    """
    window, mask = history.push(obs, reset_mask)
    if rows is not None:
        window, mask = window[rows], mask[rows]
    if not student.training:  # switching modes walks every submodule: not on each step of an evaluation
        return student(window, task_ids=task_ids, mask=mask)
    student.eval()
    try:
        return student(window, task_ids=task_ids, mask=mask)
    finally:
        student.train()
