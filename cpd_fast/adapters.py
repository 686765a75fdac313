"""Per-task low-rank adapters (LoRA) on the student's shared Transformer blocks.

After stage 1 the paper freezes the shared layers, so every later task is fitted by its new expert on
features that were learned for the first stage's tasks. An adapter gives a new task its own capacity in
the trunk without moving any old task's features: each adapted linear map ``y = W x + b`` of a block
becomes ``y = W x + b + B_t A_t x`` for the window's task ``t``, with ``A_t [r, in]`` and ``B_t [out, r]``
(Hu et al. 2021, LoRA; per task as in TAIL, Liu et al., ICLR 2024). ``B_t`` starts at zero, so a new
adapter changes nothing until it trains, and a frozen task's ``A_t, B_t`` (and the frozen ``W``) keep its
features bit for bit whatever the later tasks train.

Each task's matrices are their own parameters (freezing is per task: ``requires_grad``). The forward
pass gathers each row's task matrices and applies them with two batched matmuls, so the adapters cost
about ``2·r·(in + out)`` flops per token and map whatever the number of tasks (a mask over every task's
update would cost ``T`` times more). A row is a window whose tokens share one task (training, or the task
id given) or a single token (each token's inferred task).

Which task a token belongs to is the caller's business (:class:`cpd_fast.student.Student`): the task id
when one is given, else the task whose prototype embedding is nearest to the token's inferred embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cpd_fast.errors import require_int

__all__ = ["BlockAdapters", "TaskLoRA"]


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

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The update ``B_t A_t x`` of each token of ``x [B, L, in]`` → ``[B, L, out]``: ``ids`` (LongTensor)
        is each row's task ``[B]`` or each token's ``[B, L]``; an id < 0 gives no update."""
        if ids.dtype != torch.long or ids.shape not in (x.shape[:1], x.shape[:2]):
            raise ValueError(f"ids must be a LongTensor {tuple(x.shape[:1])} or {tuple(x.shape[:2])}")
        if ids.numel() and int(ids.max()) >= self.num_tasks:
            raise ValueError(f"task {int(ids.max())} has no adapter (tasks 0..{self.num_tasks - 1})")
        shape = x.shape
        if ids.dim() == 2:  # one row per token
            x, ids = x.reshape(-1, 1, shape[-1]), ids.reshape(-1)
        # each row's matrices by a one-hot matmul (its backward is a matmul too, not a scatter); an id < 0
        # selects nothing, so its matrices are zero
        select = F.one_hot(ids.clamp(min=0), self.num_tasks).to(x.dtype) * (ids >= 0).to(x.dtype)[:, None]
        A = (select @ torch.stack(tuple(self.A)).flatten(1)).view(-1, self.rank, self.in_features)
        B = (select @ torch.stack(tuple(self.B)).flatten(1)).view(-1, self.out_features, self.rank)
        y = torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))
        return y.reshape(*shape[:-1], self.out_features)


class BlockAdapters(nn.Module):
    """The adapters of one :class:`cpd_fast.student.CausalBlock`: its attention input (``qkv``) and output
    (``proj``) maps and both FFN maps (``ff1``, ``ff2``)."""

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
