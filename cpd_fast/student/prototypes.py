"""The prototype bank: one unit vector per task in the task encoder's embedding space.

* **Prototypes** (``prototypes [num_tasks, task_embed_dim]``, with ``prototype_count [num_tasks]``): an EMA
  of the normalised last-position embeddings of each task's training windows (:meth:`update_prototypes`).
  ``student(obs, task_ids)`` conditions on the given tasks' prototypes, and without a task id a token's
  task is the one whose prototype is nearest to its inferred embedding (:mod:`cpd_fast.student.routing`).
* **Conditioning vectors** (``conditioning``, same shape; ``task_conditioning="task"``): what conditions
  the trunk for a task. A task's vector follows its prototype until the task freezes its conditioning;
  it then keeps the task's actions bit for bit while the prototype goes on following the encoder.
* **Freeze sets** (``frozen_prototypes``, ``frozen_conditioning``): the tasks whose prototype, or
  conditioning vector, training leaves as it is; set by group name
  (:func:`cpd_fast.student.groups.set_frozen`).

The bank is a base class of the student rather than a submodule, so that its buffers are the student's own
(state-dict keys ``prototypes``, ``prototype_count``, ``conditioning``: every checkpoint keeps loading).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PrototypeBank"]


class PrototypeBank(nn.Module):
    """Per-task prototypes and conditioning vectors (module docstring); buffers of the module itself."""

    def init_bank(self, num_tasks: int, dim: int, momentum: float) -> None:
        """Register the bank's buffers (zero: no task seen yet) and empty freeze sets."""
        self.prototype_momentum = momentum  # EMA: proto ← m·proto + (1 − m)·mean batch embedding
        # count 0 = no window of the task seen yet
        self.register_buffer("prototypes", torch.zeros(num_tasks, dim))
        self.register_buffer("prototype_count", torch.zeros(num_tasks, dtype=torch.int64))
        self.frozen_prototypes: set[int] = set()  # tasks whose prototype training leaves as it is
        # task_conditioning="task": each task's conditioning vector, its prototype until the task freezes
        self.register_buffer("conditioning", torch.zeros(num_tasks, dim))
        self.frozen_conditioning: set[int] = set()

    @property
    def num_tasks(self) -> int:
        return self.prototypes.shape[0]

    def prototype(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Unit prototype embeddings ``[B, task_embed_dim]``; raises if a task has no prototype yet."""
        if bool((self.prototype_count[task_ids] == 0).any()):
            missing = sorted(set(task_ids[self.prototype_count[task_ids] == 0].tolist()))
            raise ValueError(f"no prototype yet for task ids {missing}: train on their windows first")
        return F.normalize(self.prototypes[task_ids], dim=-1)

    def nearest_prototype(self, z: torch.Tensor) -> torch.Tensor | None:
        """The task whose prototype is nearest (cosine) to each unit embedding ``z [..., D]``: LongTensor
        ``[...]``; None before any prototype exists."""
        seen = (self.prototype_count > 0).nonzero().squeeze(1)
        if seen.numel() == 0:
            return None
        return seen[(z @ F.normalize(self.prototypes[seen], dim=-1).T).argmax(-1)]

    def task_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Unit conditioning vectors of tasks ``ids`` (any shape; < 0, no task yet: zero) → ``[*ids, D]``."""
        v = F.normalize(self.conditioning, dim=-1)[ids.clamp(min=0)]
        return torch.where(ids[..., None] >= 0, v, 0.0)

    @torch.no_grad()
    def update_prototypes(self, z: torch.Tensor, task_ids: torch.Tensor) -> None:
        """EMA update: for each task in the batch, proto ← m·proto + (1−m)·mean(z of its windows).

        A task's first update sets its prototype to the batch mean (no bias towards zero). Tasks in
        ``frozen_prototypes`` keep theirs; a task's conditioning vector follows its prototype unless the
        task is in ``frozen_conditioning``.
        """
        m = self.prototype_momentum
        for t in task_ids.unique().tolist():
            if t in self.frozen_prototypes:
                continue
            mean = z[task_ids == t].mean(0)
            if int(self.prototype_count[t]) == 0:
                self.prototypes[t] = mean
            else:
                self.prototypes[t].mul_(m).add_(mean, alpha=1.0 - m)
            self.prototype_count[t] += int((task_ids == t).sum())
            if t not in self.frozen_conditioning:
                self.conditioning[t] = self.prototypes[t]

    @torch.no_grad()
    def add_bank_task(self) -> None:
        """One more task: a zero prototype (count 0) and conditioning row."""
        self.prototypes = torch.cat([self.prototypes, self.prototypes.new_zeros(1, self.prototypes.shape[1])])
        self.prototype_count = torch.cat([self.prototype_count, self.prototype_count.new_zeros(1)])
        self.conditioning = torch.cat(
            [self.conditioning, self.conditioning.new_zeros(1, self.conditioning.shape[1])]
        )

    def resize_bank(self, state_dict: dict, prefix: str) -> None:
        """Before loading ``state_dict``: match its task count (a checkpoint taken after growth), and give a
        checkpoint from before task conditioning its conditioning vectors (each was its prototype)."""
        protos = state_dict.get(prefix + "prototypes")
        if not isinstance(protos, torch.Tensor):
            return
        if protos.shape[0] != self.num_tasks:
            self.prototypes = self.prototypes.new_zeros(protos.shape)
            self.prototype_count = self.prototype_count.new_zeros(protos.shape[0])
            self.conditioning = self.conditioning.new_zeros(protos.shape)
        if prefix + "conditioning" not in state_dict:
            state_dict[prefix + "conditioning"] = protos.clone()
