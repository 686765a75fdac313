"""Teacher transitions as observation-history windows, and the task-balanced sampler over task pools.

**Sampling.** A batch draws tasks uniformly among those trained in the stage (the stage's tasks plus
replayed ones), then one window uniformly within the task's pool, so a replayed task weighs as much as
a new one however few transitions are stored for it. Each window gives a target per position (the
teacher's mean at every real observation of the window; see :mod:`cpd_fast.student.loss`).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TaskSampler", "WindowData", "full_pool"]


class WindowData:
    """All transitions of the run as tensors, served as observation-history windows.

    ``obs [M, obs_dim]``, ``target [M, act_dim]`` (teacher mean), ``task [M]`` (index into the run's
    task list), ``ep_start [M]`` (global index of the step's episode start), ``step``, ``episode [M]``.
    The teachers' datasets come first, each task contiguous; :meth:`append` adds more episodes of a task
    at the end (student-driven data relabelled by the teacher, :mod:`cpd_fast.distill.dagger`), so a task's
    rows are :meth:`task_rows`, not one slice.
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
        self._rows: dict[int, torch.Tensor] = {}

    def append(self, data: Any, task: int) -> torch.Tensor:
        """Add every transition of ``data`` (a :class:`~cpd_fast.data.TeacherData` of one task) as task
        ``task``'s; returns their global rows. Episodes keep their order and get fresh episode ids."""
        n0, n = self.obs.shape[0], data.obs.shape[0]
        rows = torch.arange(n0, n0 + n)
        first = int(self.episode.max()) + 1 if n0 else 0
        self.obs = torch.cat([self.obs, data.obs.float()])
        self.target = torch.cat([self.target, data.action_mean.float()])
        self.task = torch.cat([self.task, torch.full((n,), task, dtype=torch.int64)])
        self.step = torch.cat([self.step, data.step.long()])
        self.episode = torch.cat([self.episode, data.episode.long() - int(data.episode.min()) + first])
        self.ep_start = torch.cat([self.ep_start, rows - data.step.long()])
        self._rows.pop(task, None)
        return rows

    def task_rows(self, t: int) -> torch.Tensor:
        """Global rows of task ``t``, ascending (its teacher data, then anything appended)."""
        if t not in self._rows:
            idx = (self.task == t).nonzero().squeeze(1)
            if idx.numel() == 0:
                raise ValueError(f"no data for task {self.tasks[t]!r}")
            self._rows[t] = idx
        return self._rows[t]

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
    idx = data.task_rows(t)
    return idx, data.ep_start[idx]
