"""Data-parallel distillation with ``torchrun``: process group, rank helpers, and the sharded loss.

Launch (one process per GPU, or per CPU slot with gloo)::

    torchrun --nproc-per-node N -m cpd_fast.cli distill --suite mt25 --device cuda --out runs/x --ddp

``--device cuda`` uses NCCL with ``cuda:LOCAL_RANK``; ``--device cpu`` uses gloo. Under ``torchrun``
(``WORLD_SIZE > 1`` in the environment) :func:`~cpd_fast.distill.run.run_distill` goes data-parallel even
without ``--ddp``, so that N copies never write one run directory side by side.

**How a step is split.** Every rank holds the same sampler and draws the *same* global batch of
``batch_size`` window indices (and the same prototype-conditioning mask) from the phase's generator;
rank r trains on rows ``[r·B/W, (r+1)·B/W)`` (:func:`rank_rows`). This is the deterministic equivalent of
a ``DistributedSampler`` over an infinite, task-balanced stream: the ranks partition each global batch
without communicating, and the global batch is exactly the one a single process draws, so a run with W
processes reproduces the single-process run with the same ``batch_size`` (to float32 reduction order),
and resume stays exact. ``batch_size`` must be divisible by W. How the losses that are not per-window
averages are computed over the global batch is the loss's business
(:func:`cpd_fast.student.loss.distill_losses`); this module supplies the process group, the
:class:`Collectives` it uses, and the DDP wrapper.

**Rank 0 alone** collects data, evaluates, selects replay, and writes checkpoints, ``progress.json``,
``metrics.jsonl``, TensorBoard and ``results.json``; the other ranks wait at barriers and read its files
(a resumed run's ranks all load rank 0's checkpoints). The DDP wrapper is rebuilt for every phase:
growth replaces the MoE's parameters and freezing changes which parameters train.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["Collectives", "DistContext", "barrier", "rank_rows", "requested", "setup", "teardown", "wrap"]

# Rank 0 collects data and evaluates while the others wait at a barrier: that can take a long time.
DEFAULT_TIMEOUT_S = 6 * 3600


@dataclass(frozen=True)
class DistContext:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "nccl" (CUDA) or "gloo" (CPU)
    owns_group: bool  # setup() created the process group (teardown() destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def requested(ddp: bool | None) -> bool:
    """Whether to run data-parallel: ``ddp=None`` means "when launched by torchrun" (``WORLD_SIZE > 1``)."""
    if ddp is None:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    return bool(ddp)


def setup(device: str = "cpu", timeout_s: float | None = None) -> DistContext:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ...).

    ``device`` "cuda…" → NCCL on ``cuda:LOCAL_RANK``; "cpu" → gloo. A process group that is already
    initialised is used as is (and left alone by :func:`teardown`). ``timeout_s`` (default
    ``$CPD_DDP_TIMEOUT_S`` or 6 h) bounds every collective, barriers included.
    """
    if not dist.is_available():
        raise ValueError("--ddp: this torch build has no torch.distributed")
    cuda = str(device).startswith("cuda")
    if not dist.is_initialized() and not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        raise ValueError(
            "--ddp needs the process-group environment that torchrun sets: "
            "torchrun --nproc-per-node N -m cpd_fast.cli distill ... --ddp"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError("--ddp --device cuda but torch sees no CUDA device")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        timeout = timeout_s or float(os.environ.get("CPD_DDP_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
    return DistContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
        backend=str(dist.get_backend()), owns_group=owns,
    )  # fmt: skip


def teardown(ctx: DistContext | None) -> None:
    if ctx is not None and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext | None) -> None:
    """Wait for every rank (no-op single-process)."""
    if ctx is not None:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def rank_rows(batch_size: int, ctx: DistContext | None) -> slice:
    """This rank's rows of a global batch (all rows single-process)."""
    if ctx is None:
        return slice(None)
    if batch_size % ctx.world_size:
        raise ValueError(f"batch_size {batch_size} must be divisible by the {ctx.world_size} DDP processes")
    n = batch_size // ctx.world_size
    return slice(ctx.rank * n, (ctx.rank + 1) * n)


# ----------------------------------------------------------------------------- collectives


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 (rank order); backward keeps this rank's rows of the gradient.

    Right for a loss that every rank computes identically from the gathered tensor: this rank's rows'
    gradient is then already the global loss's (no reduction needed, so no collective in backward).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return _all_gather(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


class Collectives:
    """The two collectives a global-batch loss needs: a differentiable all-gather and a sum over ranks."""

    def __init__(self, ctx: DistContext) -> None:
        self.world_size = ctx.world_size

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated along dim 0 in rank order (differentiable, see _GatherRows)."""
        return _GatherRows.apply(x) if x.requires_grad else _all_gather(x)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (no gradient)."""
        x = x.detach().clone()
        dist.all_reduce(x)
        return x


# ----------------------------------------------------------------------------- the DDP wrapper


def wrap(module: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel`` over ``module`` (e.g. the loss module holding the student) for one phase
    (its trainable parameters).

    ``find_unused_parameters`` stays off: every trainable parameter gets a gradient at every step (the
    stacked expert weights even when an expert receives no token; frozen ones have
    ``requires_grad=False`` and are not DDP's); turning it on slows every step (docs/scale.md). Keep the
    returned wrapper alive until after ``backward``: its reducer does the gradient all-reduce.
    """
    # no buffer broadcast before each forward (the prototypes are kept equal by the gathered update)
    no_sync = {"broadcast_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:  # newer torch
        no_sync = {"forward_sync_buffers": False}
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, **no_sync)
