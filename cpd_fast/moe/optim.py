"""The link between an MoE layer and an optimizer that trains it.

:class:`OptimizerLink` is what :meth:`MoELayer.attach` returns: a step pre-hook saves the frozen
experts' rows (and a frozen gate) of the parameters this optimizer holds, and a step post-hook
writes them back, so weight decay and momentum from before the freeze cannot move them. Hooks are
registered on that optimizer only (``Optimizer.register_step_pre_hook``), never globally.
:func:`swap_parameters` moves an optimizer from old parameters to their grown replacements.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch


class OptimizerLink:
    """Handle of one attached optimizer; :meth:`remove` detaches it (hooks removed)."""

    def __init__(self, layer: Any, optimizer: torch.optim.Optimizer) -> None:
        self._layer = weakref.ref(layer)  # the optimizer's hooks must not keep the layer alive
        self._optimizer = weakref.ref(optimizer)
        self._saved: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer()

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        layer = self._layer()
        if layer is None:
            return
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self._saved = layer._frozen_values(held)

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        saved, self._saved = self._saved, []
        for param, idx, values in saved:
            if idx is None:
                param.copy_(values)
            else:
                param.index_copy_(0, idx, values)

    def remove(self) -> None:
        """Remove the hooks; the optimizer no longer protects frozen rows or follows growth."""
        for h in self._handles:
            h.remove()
        self._handles = []
        layer, opt = self._layer(), self._optimizer()
        if layer is not None and opt is not None and layer._links.get(opt) is self:
            del layer._links[opt]


def pad_state(v: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    """Optimizer state ``v`` of ``old``, resized along dim 0 to ``new``: kept rows, zeros elsewhere.

    Only tensors shaped like ``old`` (Adam's moments) are resized; scalars (``step``) are kept.
    """
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == old.shape:
        out = v.new_zeros(new.shape)
        rows = min(v.shape[0], new.shape[0])
        out[:rows] = v[:rows]
        return out
    return v


@torch.no_grad()
def swap_parameters(
    optimizer: torch.optim.Optimizer, successor: Callable[[torch.Tensor], torch.Tensor | None]
) -> int:
    """Replace every parameter ``p`` of ``optimizer`` with ``successor(p)`` where that is not None.

    The state of ``p`` moves to its successor, resized by :func:`pad_state`. A successor the
    optimizer already holds is left alone. Returns the number of parameters swapped.
    """
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    swapped = 0
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            new = successor(p)
            if new is None or new is p or id(new) in held:
                continue
            group["params"][i] = new
            held.add(id(new))
            state = optimizer.state.pop(p, None)
            if state is not None:
                optimizer.state[new] = {key: pad_state(v, p, new) for key, v in state.items()}
            swapped += 1
    return swapped
