"""The student's parameters in named groups, and freezing by group name.

==============  ==========================================================  ==================================
group           what                                                        indexed by
==============  ==========================================================  ==================================
shared          input projection, position embedding, task-embedding        —
                projection, the causal Transformer blocks, the MoE's input
                norm: the feature extractor the paper freezes after stage 1
task_encoder    the task encoder (not shared: it must keep learning to      —
                separate tasks that arrive later; a frozen encoder may map a
                new task onto an old task's cluster, and the gate would then
                route it to the old experts)
head            LayerNorm → Linear after the MoE                            —
gate            the MoE's router                                            —
experts         the MoE's experts (rows of its stacked weights)             expert
adapters        per-task low-rank adapters (none without ``adapter_rank``)  task
prototypes      the prototype bank's EMA prototypes (a buffer)              task
conditioning    the bank's conditioning vectors (a buffer)                  task
==============  ==========================================================  ==================================

:func:`set_frozen` (``student.set_frozen``) makes exactly the named groups frozen — all of a group, or
the listed tasks' or experts' part of it — and everything else trainable, so the method table
(:func:`cpd_fast.distill.methods.configure_phase`) states each phase's frozen set in one call. A frozen
parameter has ``requires_grad=False`` and ``grad=None`` (torch optimizers skip it: no weight decay or stale
momentum moves it); frozen experts and the gate use the MoE's own machinery (exactly zero gradient rows,
optimizers attached with ``moe.attach`` keep them bit for bit); frozen prototypes and conditioning vectors
are left as they are by :meth:`~cpd_fast.student.prototypes.PrototypeBank.update_prototypes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

__all__ = ["GROUPS", "parameter_group", "set_frozen"]

GROUPS = ("shared", "task_encoder", "head", "gate", "experts", "adapters", "prototypes", "conditioning")
INDEXED = ("experts", "adapters", "prototypes", "conditioning")  # by expert id (experts), else by task id


def parameter_group(student: nn.Module, name: str, index: Iterable[int] | None = None) -> list[nn.Parameter]:
    """The parameters of group ``name`` (module docstring), in creation order; ``index``: only these tasks'
    adapters. ``experts`` is the MoE's stacked expert weights (an expert is a row of each); ``prototypes``
    and ``conditioning`` are buffers, not parameters (an empty list)."""
    if name not in GROUPS:
        raise ValueError(f"unknown parameter group {name!r}; groups: {', '.join(GROUPS)}")
    if index is not None and name != "adapters":
        raise ValueError(f"parameter group {name!r} takes no index")
    if name == "shared":
        modules = [student.obs_proj, student.task_proj, *student.blocks, student.moe_norm]
        return [student.pos_emb, *(p for m in modules for p in m.parameters())]
    if name == "adapters":
        tasks = range(student.num_tasks) if index is None else index
        return [p for adapters in student.adapters for t in tasks for p in adapters.task_parameters(t)]
    if name == "experts":
        moe = student.moe
        return [p for p in (moe.w1, moe.b1, moe.w2, moe.b2) if p is not None]
    module = {"task_encoder": student.task_encoder, "head": student.head, "gate": student.moe.gate}.get(name)
    return [] if module is None else list(module.parameters())


def _set_trainable(params: Iterable[nn.Parameter], flag: bool) -> None:
    # requires_grad=False plus grad=None: torch optimizers skip parameters whose grad is None, so no
    # weight decay or stale momentum moves them (bit-identical across steps)
    for p in params:
        p.requires_grad_(flag)
        if not flag:
            p.grad = None


def set_frozen(student: nn.Module, frozen: Mapping[str, Iterable[int] | None]) -> None:
    """Freeze exactly ``frozen`` and let everything else train (idempotent).

    ``frozen`` maps a group name (:data:`GROUPS`) to None (the whole group) or, for an indexed group
    (``experts``: expert ids; ``adapters``, ``prototypes``, ``conditioning``: task ids), the part that
    freezes. Example: ``{"shared": None, "head": None, "experts": [0, 1], "adapters": [0]}``.
    """
    unknown = sorted(set(frozen) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown parameter groups {unknown}; groups: {', '.join(GROUPS)}")
    for name, index in frozen.items():
        if index is not None and name not in INDEXED:
            raise ValueError(f"parameter group {name!r} takes no index")
    moe = student.moe
    # everything trains ...
    for name in ("shared", "head", "task_encoder"):
        _set_trainable(parameter_group(student, name), True)
    moe.unfreeze_experts(list(range(moe.num_experts)))
    moe.unfreeze_gate()
    _set_trainable(parameter_group(student, "adapters"), True)
    student.frozen_prototypes, student.frozen_conditioning = set(), set()
    # ... but the frozen groups
    for name, index in frozen.items():
        part = None if index is None else [int(i) for i in index]
        if name == "experts":
            moe.freeze_experts(list(range(moe.num_experts)) if part is None else part)
        elif name == "gate":
            moe.freeze_gate()
        elif name == "prototypes":
            student.frozen_prototypes = set(range(student.num_tasks)) if part is None else set(part)
        elif name == "conditioning":
            student.frozen_conditioning = set(range(student.num_tasks)) if part is None else set(part)
        else:
            _set_trainable(parameter_group(student, name, part), False)
