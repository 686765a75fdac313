"""The distillation loss, for one process or for the global batch of data-parallel ranks.

``total = MSE(actions, teacher means clipped to [-1, 1]) + aux + contrastive_weight · supcon``:

* *MSE*: the student's action means against the teachers' (PPO teachers' Gaussian means are unbounded but
  the env clips actions to [-1, 1], and the tanh head cannot reach beyond it anyway), at the last position
  or at every real position of the window (a masked mean).
* *aux*: the MoE's load-balancing loss (it carries its own weight, ``aux_loss_weight``).
* *supcon*: the supervised contrastive loss of the windows' last-position task embeddings
  (:func:`supcon_loss`), which shapes the task encoder; the batch then updates the prototype bank.

:func:`distill_losses` is the one place this sum is written. Data-parallel training
(:class:`cpd_fast.distill.train.DistillLoss`) passes ``collectives``: every rank draws the same global batch
and trains on its slice, and what is not a per-window average is computed over the global batch, so W
ranks reproduce one process with the same batch (to float32 reduction order):

* the MSE divides each rank's squared-error sum by the *global* count of targets;
* the contrastive loss compares every pair of the batch: the last-position embeddings are all-gathered
  (every rank computes the same global loss; the gather's backward keeps the rank's rows);
* the load-balancing loss uses the routed-row counts summed over ranks and this rank's share of the mean
  gate probability (the shares sum to the global loss);
* the prototype EMA (a buffer) is updated on every rank from the gathered embeddings and task ids.

Each rank back-propagates ``W ×`` its share of the global loss; DDP averages the gradients over the W
ranks, which gives the single-process gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from cpd_fast.moe import load_balancing_loss

__all__ = ["Collectives", "check_batch", "distill_losses", "squared_error", "supcon_loss"]


class Collectives(Protocol):
    """What a global-batch loss needs from the process group (:class:`cpd_fast.ddp.Collectives`)."""

    world_size: int

    def gather(self, x: torch.Tensor) -> torch.Tensor: ...  # every rank's x along dim 0, differentiable

    def sum(self, x: torch.Tensor) -> torch.Tensor: ...  # sum over ranks, no gradient


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "L_out") on unit embeddings.

    z ``[B, D]`` (L2-normalised), labels ``[B]`` int. For each anchor i with at least one other window
    of its task: ``−mean_{p: y_p = y_i, p ≠ i} log softmax_{a ≠ i}(z_i·z_a / τ)[p]``, averaged over such
    anchors. Returns 0 (with a graph) when no anchor has a positive, e.g. a batch of one task-window each.
    """
    B = z.shape[0]
    sim = (z @ z.T) / temperature
    self_mask = torch.eye(B, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return z.sum() * 0.0
    # masked_fill, not multiply: the diagonal of log_prob is -inf and -inf * 0 is NaN
    per_anchor = log_prob.masked_fill(~pos, 0.0).sum(1) / n_pos.clamp(min=1)
    return -(per_anchor[has]).mean()


def check_batch(
    student: nn.Module,
    obs_window: torch.Tensor,
    teacher_action_mean: torch.Tensor,
    task_ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    use_prototype: torch.Tensor | None,
) -> tuple[torch.Tensor, bool]:
    """Validate a training batch (see :func:`distill_losses`); returns ``(mask, per_position)``."""
    cfg = student.config
    if task_ids is None:
        raise ValueError("losses() needs task_ids (contrastive labels)")
    mask = student.check_inputs(obs_window, mask, task_ids)
    if not isinstance(teacher_action_mean, torch.Tensor):
        raise TypeError("teacher_action_mean must be a torch.Tensor")
    B, H = obs_window.shape[:2]
    if teacher_action_mean.shape not in ((B, cfg.act_dim), (B, H, cfg.act_dim)):
        raise ValueError(
            f"teacher_action_mean must have shape [{B}, {cfg.act_dim}] or [{B}, {H}, {cfg.act_dim}], "
            f"got {tuple(teacher_action_mean.shape)}"
        )
    if use_prototype is not None and (
        not isinstance(use_prototype, torch.Tensor) or use_prototype.shape != (B,)
    ):
        raise ValueError(f"use_prototype must be a bool tensor of shape [{B}]")
    return mask, teacher_action_mean.dim() == 3


def target_count(mask: torch.Tensor, per_position: bool, act_dim: int) -> torch.Tensor:
    """The batch's number of target entries (integer tensor): real positions, or windows, × ``act_dim``."""
    return (mask.sum() if per_position else torch.tensor(mask.shape[0])) * act_dim


def squared_error(
    student: nn.Module,
    obs_window: torch.Tensor,
    teacher_action_mean: torch.Tensor,
    task_ids: torch.Tensor,
    mask: torch.Tensor,
    use_prototype: torch.Tensor | None,
    per_position: bool,
    z: torch.Tensor,
    row_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MSE's parts on checked inputs: ``(sum of squared errors, its number of target entries, the
    batch's number)``. ``z``: the task encoder's output ``[B, H, D]`` on the batch. ``row_weight [B]``
    (optional): each window's weight (0 for the filler rows of a training batch cut down to the windows
    that train, :mod:`cpd_fast.distill.rows`)."""
    n_all = target_count(mask, per_position, student.config.act_dim)
    pred, _ = student.predict(obs_window, mask, task_ids, use_prototype, per_position, z)
    err = (pred - teacher_action_mean.to(pred.dtype).clamp(-1.0, 1.0)) ** 2  # [B, (H,) act_dim]
    # each prediction's weight: its position is real (per position), its row is no filler
    w = mask.to(pred.dtype) if per_position else pred.new_ones(pred.shape[0])
    if row_weight is not None:
        w = w * (row_weight[:, None] if per_position else row_weight).to(pred.dtype)
    return (err * w.unsqueeze(-1)).sum(), w.sum() * student.config.act_dim, n_all.to(pred.dtype)


SquaredError = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def distill_losses(
    student: nn.Module,
    obs_window: torch.Tensor,
    teacher_action_mean: torch.Tensor,
    task_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    update_prototypes: bool | None = None,
    use_prototype: torch.Tensor | None = None,
    *,
    collectives: Collectives | None = None,
    squared_error_fn: SquaredError = squared_error,
) -> dict[str, torch.Tensor]:
    """Distillation losses on a batch of windows (module docstring); also ``student.losses(...)``.

    Args:
        obs_window: ``[B, H, obs_dim]``.
        teacher_action_mean: ``[B, act_dim]`` (target for the last position) or ``[B, H, act_dim]``
            (a target per position; padded positions are ignored). Clipped to [-1, 1].
        task_ids: LongTensor ``[B]``: labels for the contrastive loss and the prototype update. The
            policy is conditioned on the *inferred* embedding, as at evaluation without task ids.
        update_prototypes: EMA-update the prototypes from this batch (default: ``student.training``).
        use_prototype: bool ``[B]``: windows conditioned on their task's prototype (the others on the
            inferred embedding); default none. The prototypes are updated from this batch first.
        collectives: this rank's process group (data parallel, the batch is this rank's slice); None:
            one process.
        squared_error_fn: computes the MSE's parts (:func:`squared_error`, the default); training passes one
            that leaves out the windows that train nothing (:mod:`cpd_fast.distill.rows`).

    Returns ``dict(mse, contrastive, aux, total)`` of scalars with
    ``total = mse + aux + contrastive_weight · contrastive`` (aux already carries its weight). ``mse`` is
    that of the windows ``squared_error_fn`` counts; single-process ``total`` is the loss to back-propagate
    and counts the MSE by those windows' share of the batch. With ``collectives`` the values are the global
    batch's and ``backward`` is this rank's share × W.
    """
    cfg = student.config
    mask, per_position = check_batch(student, obs_window, teacher_action_mean, task_ids, mask, use_prototype)
    update = update_prototypes if update_prototypes is not None else student.training
    gather = (lambda x: x) if collectives is None else collectives.gather
    z = student.task_encoder(obs_window, mask)
    if use_prototype is not None and update:  # every task of the batch has a prototype before it is used
        student.update_prototypes(gather(z[:, -1].detach()), gather(task_ids))
        update = False
    sq, n_trained, n_all = squared_error_fn(
        student, obs_window, teacher_action_mean, task_ids, mask, use_prototype, per_position, z
    )
    z_last, labels = gather(z[:, -1]), gather(task_ids)  # the global batch's
    contrastive = supcon_loss(z_last, labels, cfg.contrastive_temperature)
    if update:
        student.update_prototypes(z_last.detach(), labels)
    if collectives is None:
        aux = student.moe.aux_loss
        total = sq / n_all + aux + cfg.contrastive_weight * contrastive
        mse = sq.detach() / n_trained.clamp(min=1)
        return {"mse": mse, "contrastive": contrastive, "aux": aux, "total": total}
    return _global_batch_losses(student, collectives, sq, n_trained, n_all, contrastive)


def _global_batch_losses(
    student: Any, c: Collectives, sq: torch.Tensor, n_trained: torch.Tensor, n_all: torch.Tensor,
    contrastive: torch.Tensor,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The data-parallel sum (module docstring): the global batch's losses and this rank's ``backward``."""
    w = student.config.contrastive_weight
    mse_share = sq / c.sum(n_all)
    moe = student.moe
    stats = moe.router_stats
    n = stats.probs.shape[0] * c.world_size  # tokens of the global batch
    aux_share = load_balancing_loss(
        c.sum(stats.counts), stats.probs.sum(0) / n, n, moe.top_k, moe.aux_loss_weight
    )
    backward = c.world_size * (mse_share + aux_share + w * contrastive)
    # reported: the MSE of the windows that train
    mse = c.sum(sq.detach()) / c.sum(n_trained).clamp(min=1)
    aux, contrastive = c.sum(aux_share), contrastive.detach()
    total = mse + aux + w * contrastive
    return {"mse": mse, "contrastive": contrastive, "aux": aux, "total": total, "backward": backward}
