"""One training phase: AdamW on task-balanced windows with the distillation loss and the LR schedule.

The loss is an object (:class:`DistillLoss`) so that data-parallel training can wrap it in DDP and give it
collectives (:class:`cpd_fast.ddp.Collectives`); the model itself only maps tensors to tensors.

**Data-parallel losses** (``collectives`` given): every rank draws the *same* global batch and trains on
its slice (:func:`cpd_fast.ddp.rank_rows`). What is not a per-window average is computed over the global
batch, so W ranks reproduce one process with the same ``batch_size`` (to float32 reduction order):

* *MSE* is a masked mean: each rank divides its squared-error sum by the *global* count of real positions.
* *Supervised-contrastive loss* compares every pair of the batch: the last-position embeddings are
  all-gathered (every rank computes the same global loss; the gather's backward keeps the rank's rows).
* *MoE load-balancing loss*: :func:`cpd_fast.moe.load_balancing_loss` with the routed-row counts summed
  over ranks and this rank's share of the mean gate probability (the shares sum to the global loss).
* *Prototype EMA* (a buffer): updated on every rank from the gathered embeddings and task ids.

Each rank back-propagates ``W ×`` its share of the global loss; DDP averages the gradients over the W
ranks, which gives the single-process gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["DistillLoss", "lr_factor", "train_phase"]

FUSED_ADAM = ("cpu", "cuda")  # devices with a fused AdamW kernel


class DistillLoss(nn.Module):
    """``Student.losses`` as a module: single-process it *is* ``student.losses``; with ``collectives`` the
    losses are the global batch's (module docstring) and ``backward`` is this rank's share × W."""

    def __init__(self, student: nn.Module, collectives: Any = None) -> None:
        super().__init__()
        self.student = student
        self.collectives = collectives

    def forward(
        self,
        obs: torch.Tensor,
        target: torch.Tensor,
        task_ids: torch.Tensor,
        mask: torch.Tensor,
        use_prototype: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if self.collectives is None:
            out = self.student.losses(obs, target, task_ids, mask, use_prototype=use_prototype)
            return {**out, "backward": out["total"]}
        return self._global_batch(obs, target, task_ids, mask, use_prototype)

    def _global_batch(self, obs, target, task_ids, mask, use_prototype) -> dict[str, torch.Tensor]:
        from cpd_fast.moe import load_balancing_loss
        from cpd_fast.student import supcon_loss

        s, c = self.student, self.collectives
        cfg = s.config
        mask, per_position = s.check_loss_inputs(obs, target, task_ids, mask, use_prototype)
        update = s.training
        z = s.task_encoder(obs, mask)
        if use_prototype is not None and update:
            s.update_prototypes(c.gather(z[:, -1].detach()), c.gather(task_ids))
            update = False
        sq, n_trained, n_all = s.squared_error(obs, target, task_ids, mask, use_prototype, per_position, z)
        z_last = z[:, -1]
        mse_share = sq / c.sum(n_all)
        stats = s.moe.router_stats
        n = stats.probs.shape[0] * c.world_size  # tokens of the global batch
        counts = c.sum(stats.counts)
        aux_share = load_balancing_loss(counts, stats.probs.sum(0) / n, n, s.moe.top_k, s.moe.aux_loss_weight)
        z_all, ids_all = c.gather(z_last), c.gather(task_ids)
        # the same on every rank; its gradient reaches this rank's own embeddings only
        contrastive = supcon_loss(z_all, ids_all, cfg.contrastive_temperature)
        if update:
            s.update_prototypes(z_all.detach(), ids_all)
        backward = c.world_size * (mse_share + aux_share + cfg.contrastive_weight * contrastive)
        # DDP all-reduces every trainable parameter's gradient (find_unused_parameters is off), but this
        # rank's windows may not reach all of them: an absent task's adapters, or nothing at all when every
        # window is idle (Student.frozen_rows). A zero term puts each in the graph with a zero gradient.
        backward = backward + s.zero_on_trainable()
        # reported: the MSE of the windows that train (all of them unless Student.frozen_rows)
        mse = c.sum(sq.detach()) / c.sum(n_trained).clamp(min=1)
        aux, contrastive = c.sum(aux_share), contrastive.detach()
        total = mse + aux + cfg.contrastive_weight * contrastive
        return {"mse": mse, "contrastive": contrastive, "aux": aux, "total": total, "backward": backward}


def lr_factor(cfg: Any, it: int, steps: int) -> float:
    """Learning-rate multiplier at step ``it`` of a ``steps``-step phase (the schedule restarts per phase:
    each phase trains a different parameter set, from a fresh optimizer)."""
    if cfg.lr_schedule == "constant":
        return 1.0
    warm = min(cfg.warmup_steps, max(1, steps // 10))
    if it < warm:
        return (it + 1) / warm
    t = (it - warm) / max(1, steps - warm)
    return cfg.lr_min_ratio + (1.0 - cfg.lr_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def train_phase(
    student: nn.Module,
    data: Any,
    sampler: Any,
    steps: int,
    cfg: Any,
    gen: torch.Generator,
    hook: Any = None,
    log: Callable[[int, dict[str, float]], None] | None = None,
    desc: str = "train",
    dist: Any = None,
    rounds: Any = None,
) -> dict[str, float]:
    """``steps`` AdamW steps on task-balanced windows; returns the mean of the last 10% of losses.

    ``hook``: the method's hook (:class:`~cpd_fast.distill.methods.EWCHook`): its ``loss(student)`` is added.
    ``log(it, record)`` is called every 50 steps and at the last. ``dist``: data-parallel
    (:mod:`cpd_fast.ddp`): every rank draws the same global batch from ``gen`` and trains on its slice.
    ``rounds``: DAgger rounds (:class:`cpd_fast.distill.dagger.Rounds`): at each of its ``boundaries`` the
    training state is saved, ``rounds.begin(r)`` adds round ``r``'s data and gives the new sampler; an
    interrupted phase resumes from the last boundary it reached (one optimizer and LR schedule throughout).
    """
    from tqdm import tqdm

    from cpd_fast import ddp

    device = torch.device(cfg.device)
    params = [p for p in student.parameters() if p.requires_grad]
    # fused: one kernel for every parameter's update (CPU and CUDA), not a Python loop over tensors
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type in FUSED_ADAM)
    guard = student.moe.attach(opt)  # frozen expert rows stay bit-identical through AdamW's steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(cfg, it, steps))
    p_proto = student.config.prototype_conditioning
    student.train()
    # rebuilt per phase: growth and freezing change the parameters DDP synchronises
    loss_fn: nn.Module = DistillLoss(student, None if dist is None else ddp.Collectives(dist))
    if dist is not None:
        loss_fn = ddp.wrap(loss_fn, dist)
    rows = ddp.rank_rows(cfg.batch_size, dist)
    tail: list[dict[str, float]] = []
    first_it, pending = 0, []
    if rounds is not None:
        pending = list(enumerate(rounds.boundaries, 1))
        resumed = rounds.resume()
        if resumed is not None:
            r0, st = resumed
            student.load_state_dict(st["student"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            gen.set_state(st["generator"])
            first_it, tail = rounds.boundaries[r0 - 1], st["tail"]
            sampler = rounds.begin(r0)
            pending = pending[r0:]
    quiet = not cfg.progress or (dist is not None and not dist.is_main)
    bar = tqdm(range(first_it, steps), desc=desc, disable=quiet, leave=False, mininterval=2.0)
    try:
        for it in bar:
            while pending and it == pending[0][1]:  # a DAgger round: save, collect with this student, go on
                r = pending.pop(0)[0]
                state = {"student": student.state_dict(), "optimizer": opt.state_dict(), "tail": tail,
                         "scheduler": sched.state_dict(), "generator": gen.get_state()}  # fmt: skip
                rounds.save(r, state)
                sampler = rounds.begin(r)
                student.train()
            idx, start = sampler.sample(cfg.batch_size, gen)
            use_proto = torch.rand(len(idx), generator=gen) < p_proto
            idx, start, use_proto = idx[rows], start[rows], use_proto[rows]  # this rank's slice
            obs, target, mask = data.windows(idx, start)
            if cfg.loss_positions == "last":
                target = target[:, -1]  # one target per window: Student.losses supervises the last position
            tid = data.task[idx]
            obs, target, mask, tid, use_proto = (x.to(device) for x in (obs, target, mask, tid, use_proto))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                out = loss_fn(obs, target, tid, mask, use_proto if p_proto > 0 else None)
            loss = out.pop("backward")
            extra = hook.loss(student) if hook is not None else None
            if extra is not None:
                out["ewc"] = extra
                loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            rec = {k: float(v.detach()) for k, v in out.items()}
            if it >= steps - max(1, steps // 10):
                tail.append(rec)
            if log is not None and (it % 50 == 0 or it == steps - 1):
                log(it, rec)
            if it % 50 == 0:
                bar.set_postfix(mse=f"{rec['mse']:.4f}")
    finally:
        guard.remove()
    return {k: float(np.mean([r[k] for r in tail])) for k in tail[0]}
