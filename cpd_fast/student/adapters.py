"""Per-task low-rank adapters (LoRA) on the student's shared Transformer blocks.

After stage 1 the paper freezes the shared layers, so every later task is fitted by its new expert on
features that were learned for the first stage's tasks. An adapter gives a new task its own capacity in
the trunk without moving any old task's features: each adapted linear map ``y = W x + b`` of a block
becomes ``y = W x + b + B_t A_t x`` for the window's task ``t``, with ``A_t [r, in]`` and ``B_t [out, r]``
(Hu et al. 2021, LoRA; per task as in TAIL, Liu et al., ICLR 2024). ``B_t`` starts at zero, so a new
adapter changes nothing until it trains, and a frozen task's ``A_t, B_t`` (and the frozen ``W``) keep its
features bit for bit whatever the later tasks train.

Each task's matrices are their own parameters (freezing is per task: ``requires_grad``). Three ways to
apply them:

* training (autograd on), with few tasks in the batch (``MASKED_MAX_TASKS``; a task-routed stage trains
  only its new tasks' windows): two dense matmuls over the tasks present, ``x @ [A_t1; …; A_tT]ᵀ``, each
  token's rank-r blocks but its own task's zeroed, then ``@ [B_t1 … B_tT]ᵀ``; its ``T·2·r·(in + out)``
  flops per token come in large matmuls with matmul backwards;
* training with more tasks: each row's matrices gathered by a one-hot matmul over the tasks present and
  applied with two batched matmuls (``2·r·(in + out)`` flops per token, in many small products);
* inference: the tokens are grouped by task (:class:`TaskRows`, found once per forward for every adapted
  map) and each present task's matrices are applied to its tokens with two matmuls, so a batch of one task
  (the task id given) is two plain matmuls (faster than the gather for an evaluation forward, slower under
  autograd: bench/README.md, "Adapters without autograd").

A window's tokens share one task (training, or the task id given), or each token has its own (its
inferred task).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cpd_fast.errors import require_int

__all__ = ["MASKED_MAX_TASKS", "BlockAdapters", "TaskLoRA", "TaskRows"]

# under autograd, up to this many tasks in a batch take the masked dense matmuls, more the gathered ones
# (the masked matmuls win at few tasks and lose at many: bench/README.md, "Adapters under autograd")
MASKED_MAX_TASKS = 6


class TaskLoRA(nn.Module):
    """Per-task low-rank updates ``ΔW_t = B_t A_t`` of one linear map ``in_features → out_features``."""

    def __init__(self, in_features: int, out_features: int, rank: int, num_tasks: int = 0):
        super().__init__()
        self.in_features = require_int("in_features", in_features)
        self.out_features = require_int("out_features", out_features)
        self.rank = require_int("adapter rank", rank)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for _ in range(require_int("num_tasks", num_tasks, 0)):
            self.add_task()

    @property
    def num_tasks(self) -> int:
        return len(self.A)

    @torch.no_grad()
    def add_task(self) -> None:
        """One more task: ``A`` random (variance 1/in, as a fresh linear layer), ``B`` zero (no change)."""
        like = self.A[0] if self.num_tasks else None
        kw = {} if like is None else {"device": like.device, "dtype": like.dtype}
        a = torch.randn(self.rank, self.in_features, **kw) / math.sqrt(self.in_features)
        self.A.append(nn.Parameter(a))
        self.B.append(nn.Parameter(torch.zeros(self.out_features, self.rank, **kw)))

    def forward(self, x: torch.Tensor, ids: torch.Tensor | TaskRows) -> torch.Tensor:
        """The update ``B_t A_t x`` of each token of ``x [B, L, in]`` → ``[B, L, out]``: ``ids`` (LongTensor)
        is each row's task ``[B]`` or each token's ``[B, L]``, or their :class:`TaskRows`; an id < 0 gives
        no update."""
        rows = ids if isinstance(ids, TaskRows) else TaskRows(ids, x.shape)
        if rows.shape != tuple(x.shape[:2]):
            raise ValueError(f"TaskRows of shape {rows.shape} for x of shape {tuple(x.shape)}")
        if rows.max_task >= self.num_tasks:
            raise ValueError(f"task {rows.max_task} has no adapter (tasks 0..{self.num_tasks - 1})")
        if torch.is_grad_enabled():
            masked = len(rows.tasks) <= MASKED_MAX_TASKS
            return self._masked(x, rows) if masked else self._gathered(x, rows)
        flat = x.reshape(-1, x.shape[-1])
        parts = [
            (flat if r is None else flat.index_select(0, r)) @ self.A[t].T @ self.B[t].T
            for t, r in zip(rows.tasks, rows.rows, strict=True)
        ]
        if len(parts) == 1 and rows.rows[0] is None:  # one task owns every token
            y = parts[0]
        elif parts:
            y = parts[0].new_zeros(flat.shape[0], self.out_features)
            y = y.index_copy(0, torch.cat(rows.rows), torch.cat(parts))
        else:
            y = flat.new_zeros(flat.shape[0], self.out_features)
        return y.view(*x.shape[:-1], self.out_features)

    def _masked(self, x: torch.Tensor, rows: TaskRows) -> torch.Tensor:
        tasks, (B, L) = rows.tasks, rows.shape
        if not tasks:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        T, r = len(tasks), self.rank
        # every present task's A stacked: one dense matmul gives each token all T rank-r projections
        h = x @ torch.cat([self.A[t] for t in tasks]).T  # [B, L, T·r]
        if rows.rows[0] is not None:  # more than one task (or ids < 0): keep each token's own task's block
            lid = rows.local if rows.ids.dim() == 2 else rows.local[:, None]  # [B, L] or [B, 1]
            keep = (lid[..., None] == torch.arange(T, device=x.device)).to(h.dtype)  # [B, L|1, T]
            h = (h.view(B, L, T, r) * keep[..., None]).view(B, L, T * r)
        return h @ torch.cat([self.B[t] for t in tasks], dim=1).T

    def _gathered(self, x: torch.Tensor, rows: TaskRows) -> torch.Tensor:
        shape, local, tasks = x.shape, rows.local, rows.tasks
        if not tasks:
            return x.new_zeros(*shape[:-1], self.out_features)
        if local.dim() == 2:  # one row per token
            x, local = x.reshape(-1, 1, shape[-1]), local.reshape(-1)
        # each row's matrices by a one-hot matmul over the tasks present (its backward is a matmul too, not
        # a scatter); an id < 0 selects nothing, so its matrices are zero
        select = F.one_hot(local.clamp(min=0), len(tasks)).to(x.dtype) * (local >= 0).to(x.dtype)[:, None]
        r, n_in, n_out = self.rank, self.in_features, self.out_features
        A = (select @ torch.stack([self.A[t] for t in tasks]).flatten(1)).view(-1, r, n_in)
        B = (select @ torch.stack([self.B[t] for t in tasks]).flatten(1)).view(-1, n_out, r)
        y = torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))
        return y.reshape(*shape[:-1], self.out_features)


class TaskRows:
    """The tasks of a batch ``x [B, L, ·]``, shared by every adapted map of a forward pass: ``ids`` is each
    window's task ``[B]`` or each token's ``[B, L]`` (LongTensor; < 0: no task). ``tasks``: the tasks
    present, ascending; ``rows``: each one's token indices into the flattened ``[B·L]`` tokens (None: all
    of them); both found on first use, as is ``local`` (each id's index into ``tasks``)."""

    def __init__(self, ids: torch.Tensor, x_shape: torch.Size | tuple[int, ...]):
        B, L = x_shape[0], x_shape[1]
        ok = isinstance(ids, torch.Tensor) and ids.dtype == torch.long and tuple(ids.shape) in ((B,), (B, L))
        if not ok:
            raise ValueError(f"ids must be a LongTensor {(B,)} or {(B, L)}")
        self.ids, self.shape = ids, (B, L)
        self.max_task = int(ids.max()) if ids.numel() else -1
        self._groups: tuple[list[int], list[torch.Tensor | None]] | None = None
        self._local: torch.Tensor | None = None

    def _group(self) -> tuple[list[int], list[torch.Tensor | None]]:
        if self._groups is None:
            B, L = self.shape
            tok = (self.ids[:, None].expand(B, L) if self.ids.dim() == 1 else self.ids).reshape(-1)
            tasks = [t for t in tok.unique().tolist() if t >= 0]
            if len(tasks) == 1 and bool((tok == tasks[0]).all()):
                self._groups = tasks, [None]
            else:
                self._groups = tasks, [(tok == t).nonzero().squeeze(1) for t in tasks]
        return self._groups

    @property
    def local(self) -> torch.Tensor:
        """Each id's index into :attr:`tasks` (−1: no task), shaped as ``ids``; found once, on first use."""
        if self._local is None:
            tasks, dev = self.tasks, self.ids.device
            index = torch.full((max(self.max_task, 0) + 1,), -1, dtype=torch.long, device=dev)
            index[tasks] = torch.arange(len(tasks), device=dev)
            self._local = torch.where(self.ids >= 0, index[self.ids.clamp(min=0)], -1)
        return self._local

    def last(self) -> TaskRows:
        """The same tasks for the last position of each window only (``x [B, 1, ·]``)."""
        return TaskRows(self.ids if self.ids.dim() == 1 else self.ids[:, -1:], (self.shape[0], 1))

    @property
    def tasks(self) -> list[int]:
        return self._group()[0]

    @property
    def rows(self) -> list[torch.Tensor | None]:
        return self._group()[1]


class BlockAdapters(nn.Module):
    """The adapters of one :class:`cpd_fast.student.model.CausalBlock`: its attention input (``qkv``) and
    output (``proj``) maps and both FFN maps (``ff1``, ``ff2``)."""

    def __init__(self, d_model: int, d_ff: int, rank: int, num_tasks: int = 0):
        super().__init__()
        self.qkv = TaskLoRA(d_model, 3 * d_model, rank, num_tasks)
        self.proj = TaskLoRA(d_model, d_model, rank, num_tasks)
        self.ff1 = TaskLoRA(d_model, d_ff, rank, num_tasks)
        self.ff2 = TaskLoRA(d_ff, d_model, rank, num_tasks)

    def maps(self) -> tuple[TaskLoRA, ...]:
        return (self.qkv, self.proj, self.ff1, self.ff2)

    def add_task(self) -> None:
        for m in self.maps():
            m.add_task()

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        """Task ``task``'s adapter matrices in this block."""
        return [p for m in self.maps() for p in (m.A[task], m.B[task])]
