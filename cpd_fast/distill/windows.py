"""Teacher transitions as observation-history windows, and the task-balanced sampler over task pools.

**Sampling.** A batch draws tasks uniformly among those trained in the stage (the stage's tasks plus
replayed ones), then one window uniformly within the task's pool, so a replayed task weighs as much as
a new one however few transitions are stored for it. Each window gives a target per position (the
teacher's mean at every real observation of the window; see ``Student.losses``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TaskSampler", "WindowData", "full_pool"]


class WindowData:
    """All teacher transitions of the run as tensors, served as observation-history windows.

    ``obs [M, obs_dim]``, ``target [M, act_dim]`` (teacher mean), ``task [M]`` (index into the run's
    task list), ``ep_start [M]`` (global index of the step's episode start), ``step``, ``episode [M]``.
    """

    def __init__(self, data: Any, history: int) -> None:
        self.obs = data.obs.float().contiguous()
        self.target = data.action_mean.float().contiguous()
        self.task = data.task_id.long()
        self.step = data.step.long()
        self.episode = data.episode.long()
        self.ep_start = torch.arange(self.obs.shape[0]) - self.step
        self.history = history
        self.tasks = list(data.tasks)

    def task_slice(self, t: int) -> slice:
        idx = (self.task == t).nonzero().squeeze(1)
        if idx.numel() == 0:
            raise ValueError(f"no data for task {self.tasks[t]!r}")
        return slice(int(idx[0]), int(idx[-1]) + 1)  # load_teacher_data keeps each task contiguous

    def windows(self, index: torch.Tensor, hist_start: torch.Tensor):
        """Windows ending at ``index [B]``: ``(obs [B, H, obs_dim], target [B, H, act_dim], mask [B, H])``.

        Positions before ``hist_start`` are padding: they repeat the first real observation (the
        convention of :class:`~cpd_fast.student.HistoryBuffer`) and are masked out.
        """
        H = self.history
        pos = index[:, None] - (H - 1) + torch.arange(H)[None, :]
        real = pos >= hist_start[:, None]
        pos = torch.where(real, pos, hist_start[:, None])
        return self.obs[pos], self.target[pos], real


class TaskSampler:
    """Task-balanced window sampler over per-task pools ``(index [n], hist_start [n])``."""

    def __init__(self, pools: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        pools = {t: p for t, p in pools.items() if p[0].numel() > 0}
        if not pools:
            raise ValueError("nothing to train on: every task pool is empty")
        self.task_ids = torch.tensor(sorted(pools), dtype=torch.int64)
        self.index = torch.cat([pools[t][0] for t in sorted(pools)])
        self.hist_start = torch.cat([pools[t][1] for t in sorted(pools)])
        sizes = torch.tensor([pools[t][0].numel() for t in sorted(pools)])
        self.sizes, self.offsets = sizes, torch.cumsum(sizes, 0) - sizes

    def sample(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.randint(0, len(self.task_ids), (batch,), generator=gen)
        r = (torch.rand(batch, generator=gen, dtype=torch.float64) * self.sizes[k]).long()
        j = self.offsets[k] + r
        return self.index[j], self.hist_start[j]


def full_pool(data: WindowData, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every window of task ``t``: ``(index [n], hist_start [n])``."""
    sl = data.task_slice(t)
    idx = torch.arange(sl.start, sl.stop)
    return idx, data.ep_start[idx]
