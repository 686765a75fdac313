"""A training speed-up: the windows whose prediction reads no trainable parameter are not run.

Under parameter isolation (task-routed experts, frozen shared layers and head:
:mod:`cpd_fast.distill.methods`) a replayed window of an old task reads only that task's frozen experts and
adapters besides other frozen tensors: its MSE gradient is exactly zero.
:func:`squared_error_of_trained_rows` leaves such windows out of the forward pass and gives
:func:`cpd_fast.student.loss.distill_losses` the same MSE gradient (the windows' error is fixed, so the loss
counts the others by their share of the batch). The rows that run are padded to whole buckets of
:data:`ROW_BUCKET` with copies of live rows (weight 0): a batch's shapes then take a few values, not one
per live count, and each new shape costs the CPU kernels a fresh setup (bench/README.md, "Idle windows").
"""

from __future__ import annotations

import torch
from torch import nn

from cpd_fast.student.loss import squared_error, target_count

__all__ = ["ROW_BUCKET", "frozen_rows", "squared_error_of_trained_rows", "zero_on_trainable"]

ROW_BUCKET = 16  # the windows that train run in multiples of this


def zero_on_trainable(student: nn.Module) -> torch.Tensor:
    """A zero scalar on every trainable parameter: each gets a (zero) gradient from its backward."""
    return sum((p.view(-1)[0] for p in student.parameters() if p.requires_grad), torch.zeros(())) * 0.0


def frozen_rows(student: nn.Module, task_ids: torch.Tensor) -> torch.Tensor | None:
    """Training windows whose prediction reads no trainable parameter: bool ``[B]``, or None when every
    window's may (the common case: a gate routes, or a shared layer or the head trains).

    With task-routed experts, frozen shared layers and head, and conditioning that carries no gradient, a
    window of task t reads only t's experts and adapters besides frozen tensors: it is idle when those are
    frozen too (an old task's replayed window under parameter isolation).
    """
    cfg = student.config
    if not torch.is_grad_enabled() or cfg.expert_routing != "task":
        return None
    group = student.parameter_group
    if any(p.requires_grad for p in (*group("shared"), *group("head"))):
        return None
    if cfg.task_conditioning == "embedding" and not cfg.detach_task_embedding:
        if any(p.requires_grad for p in group("task_encoder")):
            return None
    moe = student.moe
    experts_trainable = moe.w1.requires_grad and (moe.b1 is None or moe.b1.requires_grad)
    tasks = torch.arange(student.num_tasks, device=moe.frozen_mask.device)
    own = student.task_experts(tasks, "last")  # [T, k], -1: an empty slot
    trained = ~(moe.frozen_mask[own.clamp(min=0)] | (own < 0)).all(-1) if experts_trainable else (
        torch.zeros(student.num_tasks, dtype=torch.bool, device=tasks.device))  # fmt: skip
    if len(student.adapters):
        adapted = [any(p.requires_grad for p in group("adapters", [t])) for t in tasks.tolist()]
        trained = trained | torch.tensor(adapted, device=tasks.device)
    return ~trained.to(task_ids.device)[task_ids]


def squared_error_of_trained_rows(
    student: nn.Module,
    obs_window: torch.Tensor,
    teacher_action_mean: torch.Tensor,
    task_ids: torch.Tensor,
    mask: torch.Tensor,
    use_prototype: torch.Tensor | None,
    per_position: bool,
    z: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cpd_fast.student.loss.squared_error` over the windows that train (module docstring):
    ``(their sum of squared errors, their number of target entries, the batch's number)``, so that
    ``sum / batch's number`` is the batch's MSE as a loss and ``sum / their number`` their MSE."""
    idle = frozen_rows(student, task_ids)
    if idle is None or not bool(idle.any()):
        return squared_error(student, obs_window, teacher_action_mean, task_ids, mask, use_prototype,
                             per_position, z)  # fmt: skip
    n_all = target_count(mask, per_position, student.config.act_dim)
    live = (~idle).nonzero().squeeze(1)
    if live.numel() == 0:  # no window here trains: a zero loss on the trainable parameters
        zero = obs_window.new_zeros(())
        return zero_on_trainable(student), zero, n_all.to(zero.dtype)
    n = live.numel()
    m = -(-n // ROW_BUCKET) * ROW_BUCKET
    rows = live.repeat(-(-m // n))[:m]
    obs_window, teacher_action_mean, task_ids, mask, z = (
        t.index_select(0, rows) for t in (obs_window, teacher_action_mean, task_ids, mask, z)
    )
    use_prototype = None if use_prototype is None else use_prototype.index_select(0, rows)
    weight = (torch.arange(rows.numel(), device=rows.device) < n).to(z.dtype)
    sq, n_trained, _ = squared_error(student, obs_window, teacher_action_mean, task_ids, mask, use_prototype,
                                     per_position, z, row_weight=weight)  # fmt: skip
    return sq, n_trained, n_all.to(sq.dtype)
