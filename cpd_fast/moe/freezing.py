"""Frozen experts and a frozen gate stay bit-identical under every ``torch.optim`` optimizer.

Freezing sets two things. Gradients: a frozen expert's rows of ``w1/b1/w2/b2`` get exactly zero gradient
(the experts' backward skips them) and a frozen gate none (``requires_grad=False``). Steps: zero gradient
alone does not keep a row still, since weight decay and momentum carried from before the freeze move it.
So each optimizer step that holds a frozen layer's parameters saves the frozen rows before the step and
writes them back after it:

* an optimizer attached with ``layer.attach(opt)`` (:class:`~cpd_fast.moe.optim.OptimizerLink`) does it
  with its own step hooks;
* any other optimizer (a plain AdamW a user builds, an EMA or target network's optimizer) is covered by
  one pair of global step hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook``/``_post_hook``),
  registered the first time a layer has something frozen. They act only for an optimizer that holds a
  parameter of a live layer with frozen rows or a frozen gate and is not attached to that layer; every
  other step costs them a loop over those layers (none until something freezes).

What they cannot see: updates that do not go through ``torch.optim.Optimizer.step`` (a hand-written
``p -= lr * p.grad`` loop). Such an update leaves frozen rows still only if it has no weight decay or
momentum of its own (the gradient rows are zero).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

__all__ = ["FreezesExperts", "Saved", "expert_indices", "restore_rows"]

# (parameter, rows (None: all of it), their values before the step)
Saved = list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]

_LAYERS: weakref.WeakSet = weakref.WeakSet()  # layers that had something frozen (checked at each step)
_SAVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> what its step must restore
_HOOKS: list = []  # the two global hooks' handles, once registered


def expert_indices(indices: Any, num_experts: int) -> list[int]:
    """``indices`` (an int or ints, negative from the end) as indices in ``[0, num_experts)``."""
    idx = [indices] if isinstance(indices, int) else list(indices)
    for i in idx:
        if not isinstance(i, int) or not -num_experts <= i < num_experts:
            raise IndexError(f"expert index {i!r} out of range for {num_experts} experts")
    return [i % num_experts for i in idx]


@torch.no_grad()
def restore_rows(saved: Saved) -> None:
    """Write back what :meth:`FreezesExperts._frozen_values` saved."""
    for param, idx, values in saved:
        if idx is None:
            param.copy_(values)
        else:
            param.index_copy_(0, idx, values)


def _before_any_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    layers = [m for m in list(_LAYERS) if m._has_frozen() and optimizer not in m._links]
    if not layers:
        return
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    saved = [v for m in layers if any(id(p) in held for p in m.parameters()) for v in m._frozen_values(held)]
    if saved:
        _SAVED[optimizer] = saved


def _after_any_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    restore_rows(_SAVED.pop(optimizer, []))


def _guard(layer: Any) -> None:
    """Keep ``layer``'s frozen rows still under optimizers not attached to it (module docstring)."""
    _LAYERS.add(layer)
    if not _HOOKS:
        _HOOKS.append(register_optimizer_step_pre_hook(_before_any_step))
        _HOOKS.append(register_optimizer_step_post_hook(_after_any_step))


class FreezesExperts:
    """The MoE layer's freezing (module docstring). The layer provides ``w1, b1, w2, b2``, ``gate``, the
    bool buffer ``frozen_mask [E]``, ``num_experts`` and ``_links`` (its attached optimizers)."""

    _frozen_idx: torch.Tensor | None

    @property
    def gate_frozen(self) -> bool:
        return not self.gate.weight.requires_grad

    def _has_frozen(self) -> bool:
        return self._frozen_idx is not None or self.gate_frozen

    def _refresh_frozen(self) -> None:
        """``_frozen_idx`` from ``frozen_mask`` (None when nothing is frozen or on the meta device)."""
        mask = self.frozen_mask
        ids = [] if mask.is_meta else mask.nonzero().squeeze(1).tolist()
        self._frozen_idx = torch.tensor(ids, dtype=torch.long, device=mask.device) if ids else None
        if self._has_frozen():
            _guard(self)

    def _frozen_values(self, held: set[int]) -> Saved:
        """(param, rows or None for all, saved values) of the frozen parts of the parameters in ``held``."""
        out = []
        if self._frozen_idx is not None:
            for p in (self.w1, self.b1, self.w2, self.b2):
                if p is not None and id(p) in held:
                    out.append((p, self._frozen_idx, p.detach().index_select(0, self._frozen_idx)))
        if self.gate_frozen:
            out += [(p, None, p.detach().clone()) for p in self.gate.parameters() if id(p) in held]
        return out

    def freeze_experts(self, indices) -> None:
        """Freeze experts: exactly zero gradient rows, and no optimizer step moves their rows."""
        self.frozen_mask[expert_indices(indices, self.num_experts)] = True
        self._refresh_frozen()

    def unfreeze_experts(self, indices) -> None:
        self.frozen_mask[expert_indices(indices, self.num_experts)] = False
        self._refresh_frozen()

    def freeze_gate(self) -> None:
        """The gate stops receiving gradient (``requires_grad=False``) and no optimizer step moves it."""
        for p in self.gate.parameters():
            p.requires_grad_(False)
            p.grad = None
        _guard(self)

    def unfreeze_gate(self) -> None:
        for p in self.gate.parameters():
            p.requires_grad_(True)
