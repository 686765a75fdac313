"""One training phase: AdamW on task-balanced windows with the distillation loss and the LR schedule.

The loss is :func:`cpd_fast.student.loss.distill_losses`, held by a module (:class:`DistillLoss`) so that
data-parallel training can wrap it in DDP and give it collectives (:class:`cpd_fast.ddp.Collectives`):
every rank draws the *same* global batch and trains on its slice (:func:`cpd_fast.ddp.rank_rows`), and the
loss is the global batch's (the loss module's docstring says how). Training leaves out the windows that
train nothing (:mod:`cpd_fast.distill.rows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cpd_fast import ddp
from cpd_fast.distill.rows import squared_error_of_trained_rows, zero_on_trainable
from cpd_fast.student.loss import distill_losses

__all__ = ["DistillLoss", "lr_factor", "train_phase"]

FUSED_ADAM = ("cpu", "cuda")  # devices with a fused AdamW kernel


class DistillLoss(nn.Module):
    """The distillation loss of a batch as a module: ``{mse, contrastive, aux, total, backward}``;
    ``backward`` is what to back-propagate (single-process: ``total``; with ``collectives``, this rank's
    share of the global batch's loss × W)."""

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
        out = distill_losses(
            self.student, obs, target, task_ids, mask, use_prototype=use_prototype,
            collectives=self.collectives, squared_error_fn=squared_error_of_trained_rows,
        )  # fmt: skip
        if self.collectives is None:
            return {**out, "backward": out["total"]}
        # DDP all-reduces every trainable parameter's gradient (find_unused_parameters is off), but this
        # rank's windows may not reach all of them: an absent task's adapters, or nothing at all when every
        # window is idle (cpd_fast.distill.rows). A zero term puts each in the graph with a zero gradient.
        out["backward"] = out["backward"] + zero_on_trainable(self.student)
        return out


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


class _Phase:
    """What one phase trains with: the trainable parameters, AdamW, its LR schedule and the loss module."""

    def __init__(self, student: nn.Module, steps: int, cfg: Any, dist: Any, hook: Any = None) -> None:
        self.device = torch.device(cfg.device)
        self.params = [p for p in student.parameters() if p.requires_grad]
        # fused: one kernel for every parameter's update (CPU and CUDA), not a Python loop over tensors
        fused = self.device.type in FUSED_ADAM
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        self.guard = student.moe.attach(self.opt)  # frozen expert rows stay bit-identical through AdamW
        # the method's own confinement of the steps (PackNet: the entries this stage owns)
        self.hook_guard = hook.attach(student, self.opt) if hook is not None else None
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda it: lr_factor(cfg, it, steps))
        student.train()
        # rebuilt per phase: growth and freezing change the parameters DDP synchronises
        loss_fn: nn.Module = DistillLoss(student, None if dist is None else ddp.Collectives(dist))
        self.loss_fn = loss_fn if dist is None else ddp.wrap(loss_fn, dist)
        self.rows = ddp.rank_rows(cfg.batch_size, dist)  # this rank's slice of each global batch

    def state(self, student: nn.Module, gen: torch.Generator, tail: list) -> dict:
        """The training state a DAgger round boundary saves (:meth:`restore` reads it)."""
        return {"student": student.state_dict(), "optimizer": self.opt.state_dict(), "tail": tail,
                "scheduler": self.sched.state_dict(), "generator": gen.get_state()}  # fmt: skip

    def restore(self, student: nn.Module, gen: torch.Generator, st: dict) -> list:
        student.load_state_dict(st["student"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        gen.set_state(st["generator"])
        return st["tail"]

    def step(
        self, student: nn.Module, data: Any, sampler: Any, cfg: Any, gen: torch.Generator, hook: Any
    ) -> dict[str, float]:
        """One optimizer step on a global batch drawn from ``gen`` (this rank's rows); returns its losses."""
        p_proto = student.config.prototype_conditioning
        idx, start = sampler.sample(cfg.batch_size, gen)
        use_proto = torch.rand(len(idx), generator=gen) < p_proto
        idx, start, use_proto = idx[self.rows], start[self.rows], use_proto[self.rows]  # this rank's slice
        obs, target, mask = data.windows(idx, start)
        if cfg.loss_positions == "last":
            target = target[:, -1]  # one target per window: the loss supervises the last position
        tid = data.task[idx]
        obs, target, mask, tid, use_proto = (x.to(self.device) for x in (obs, target, mask, tid, use_proto))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = self.loss_fn(obs, target, tid, mask, use_proto if p_proto > 0 else None)
        loss = out.pop("backward")
        extra = hook.loss(student) if hook is not None else None
        if extra is not None:
            out["ewc"] = extra
            loss = loss + extra
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        return {k: float(v.detach()) for k, v in out.items()}


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

    ``hook``: the method's hook (:class:`~cpd_fast.distill.methods.MethodHook`): its ``loss(student)`` is
    added and ``attach(student, optimizer)`` confines the steps.
    ``log(it, record)`` is called every 50 steps and at the last. ``dist``: data-parallel
    (:mod:`cpd_fast.ddp`): every rank draws the same global batch from ``gen`` and trains on its slice.
    ``rounds``: DAgger rounds (:class:`cpd_fast.distill.dagger.Rounds`): at each of its ``boundaries`` the
    training state is saved, ``rounds.begin(r)`` adds round ``r``'s data and gives the new sampler; an
    interrupted phase resumes from the last boundary it reached (one optimizer and LR schedule throughout).
    """
    phase = _Phase(student, steps, cfg, dist, hook)
    tail: list[dict[str, float]] = []
    first_it, pending = 0, []
    if rounds is not None:
        pending = list(enumerate(rounds.boundaries, 1))
        resumed = rounds.resume()
        if resumed is not None:
            r0, st = resumed
            tail = phase.restore(student, gen, st)
            first_it = rounds.boundaries[r0 - 1]
            sampler = rounds.begin(r0)
            pending = pending[r0:]
    quiet = not cfg.progress or (dist is not None and not dist.is_main)
    bar = tqdm(range(first_it, steps), desc=desc, disable=quiet, leave=False, mininterval=2.0)
    try:
        for it in bar:
            while pending and it == pending[0][1]:  # a DAgger round: save, collect with this student, go on
                r = pending.pop(0)[0]
                rounds.save(r, phase.state(student, gen, tail))
                sampler = rounds.begin(r)
                student.train()
            rec = phase.step(student, data, sampler, cfg, gen, hook)
            if it >= steps - max(1, steps // 10):
                tail.append(rec)
            if log is not None and (it % 50 == 0 or it == steps - 1):
                log(it, rec)
            if it % 50 == 0:
                bar.set_postfix(mse=f"{rec['mse']:.4f}")
    finally:
        phase.guard.remove()
        if phase.hook_guard is not None:
            phase.hook_guard.remove()
    return {k: float(np.mean([r[k] for r in tail])) for k in tail[0]}
