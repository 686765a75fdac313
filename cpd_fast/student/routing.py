"""Task routing: which task a token belongs to, and what that picks — its adapters, its experts and the
vector that conditions the trunk.

* **A token's task** (:func:`token_tasks`): the given task id (one per window), in training the window's
  true task, and without a task id the task whose prototype is nearest (cosine) to the token's inferred
  embedding (:class:`~cpd_fast.student.prototypes.PrototypeBank`). That task's adapters apply to the token
  (:mod:`cpd_fast.student.adapters`), so a frozen trunk stays plastic for new tasks while an old task's
  features stay bit for bit what they were.
* **Experts** (``expert_routing``): ``"gate"`` is the paper's learned top-k router. The paper's gate routes
  an old task's tokens through every expert whose logit wins, so any expert that trains later (Phase 1's
  gate, Phase 2's fine-tuning) moves old tasks too. ``"task"``: a token goes to its own task's experts
  (:func:`task_experts`), each weighted 1/``experts_per_task``, and the gate is not consulted; an old
  task's experts serve it alone and can stay frozen (:mod:`cpd_fast.distill.methods` then freezes
  everything an old task's output depends on: its experts, adapters and prototype, and the task encoder
  with the shared layers). Without a task id the routing is as good as the nearest-prototype inference.
* **Conditioning** (:func:`conditioning_input`). The task embedding is projected to ``d_model`` and *added
  to every position* rather than prepended as an extra token: the MoE gate routes each token on its own, so
  the task identity must sit in the residual stream of the token the gate sees (an extra token would reach
  it only through attention, which is frozen after stage 1), and adding keeps the sequence length H.
  With ``task_conditioning="embedding"`` (default) the trunk sees the inferred embedding, or with a task id
  the task's prototype; training conditions a share ``prototype_conditioning`` of the windows on their
  task's prototype and the rest on the inferred embedding, so both evaluation modes are trained (on MT25
  the inferred mode cannot tell reach from pick-place in the first steps: same initial state
  distribution; the prototype mode can). By default (``detach_task_embedding``) the policy sees the
  embedding through a stop-gradient: the encoder is shaped by the contrastive loss alone, so its space
  (and the prototypes kept in it) means "which task". With ``task_conditioning="task"`` (needs task-routed
  experts) the trunk is conditioned on a task's own vector, never on the inferred embedding itself: the
  policy is then a function of (window, task), and the task encoder only *classifies*, so it can keep
  learning on every task's (replayed) windows while each old task's frozen conditioning vector keeps its
  actions bit for bit.
"""

from __future__ import annotations

import torch

from cpd_fast.student.config import StudentConfig
from cpd_fast.student.prototypes import PrototypeBank

__all__ = ["conditioning_input", "task_experts", "token_tasks"]


def token_tasks(bank: PrototypeBank, z: torch.Tensor, tasks: torch.Tensor | None) -> torch.Tensor:
    """The task whose adapters (and, with ``expert_routing="task"``, experts) a token uses: ``tasks [B]``
    (one per window) when given, else each token's, LongTensor ``[B, H]``: the task whose prototype is
    nearest (cosine) to the token's inferred embedding ``z [B, H, D]`` (−1, none, before any prototype
    exists)."""
    if tasks is not None:
        return tasks
    ids = bank.nearest_prototype(z)
    return torch.full(z.shape[:2], -1, dtype=torch.long, device=z.device) if ids is None else ids


def conditioning_input(
    bank: PrototypeBank,
    cfg: StudentConfig,
    z: torch.Tensor,
    ids: torch.Tensor | None,
    task_ids: torch.Tensor | None,
    use_prototype: torch.Tensor | None,
) -> torch.Tensor:
    """What conditions the trunk at each position, ``[B, H, D]`` (module docstring). ``z``: the inferred
    embeddings ``[B, H, D]``; ``ids``: each window's or token's routed task (:func:`token_tasks`; needed by
    ``task_conditioning="task"``); ``task_ids [B]``: condition on these tasks' prototypes, on every row or
    on the rows where ``use_prototype [B]`` is set."""
    if cfg.task_conditioning == "task":  # the routed task's own vector, per window or token
        cond = bank.task_vectors(ids)
        return cond[:, None, :].expand_as(z) if cond.dim() == 2 else cond
    cond = z
    if task_ids is not None:
        proto = bank.prototype(task_ids)[:, None, :].expand_as(z)
        cond = proto if use_prototype is None else torch.where(use_prototype[:, None, None], proto, z)
    if cfg.detach_task_embedding:
        cond = cond.detach()
    return cond


def task_experts(
    ids: torch.Tensor, positions: str, num_experts: int, num_tasks: int, cfg: StudentConfig
) -> torch.Tensor:
    """Expert ids of each token under task routing. The tasks own the last ``num_tasks · k`` experts in
    task order, k each (k = ``experts_per_task``; growth appends a task's k experts with it; experts
    before them, such as the ``top_k`` minimum of a one-task student, are nobody's): task t owns
    ``o + t·k … o + t·k + k − 1`` with ``o = num_experts − num_tasks · k``. ``ids`` ``[B]`` or ``[B, H]`` →
    ``[B, k]`` (``positions="last"``) or ``[B, H, k]``; a task id < 0 gives empty slots (−1)."""
    k = cfg.experts_per_task
    first = num_experts - num_tasks * k
    if ids.dim() == 2 and positions == "last":
        ids = ids[:, -1]
    elif ids.dim() == 1 and positions == "all":
        ids = ids[:, None].expand(-1, cfg.history)
    slots = first + ids[..., None] * k + torch.arange(k, device=ids.device)
    return torch.where(ids[..., None] >= 0, slots, -1)
