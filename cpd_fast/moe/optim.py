"""The link between an MoE layer and an optimizer that trains it.

:class:`OptimizerLink` is what :meth:`MoELayer.attach` returns: a step pre-hook saves the frozen
experts' rows (and a frozen gate) of the parameters this optimizer holds, and a step post-hook
writes them back, so weight decay and momentum from before the freeze cannot move them; and the
optimizer follows the layer's growth. Its hooks are registered on that optimizer only
(``Optimizer.register_step_pre_hook``); optimizers that are not attached keep frozen rows still through
the global hooks of :mod:`cpd_fast.moe.freezing`, but do not follow growth.
:func:`swap_parameters` moves an optimizer from old parameters to their grown replacements, and
:class:`AttachesOptimizers` is the layer's side of both.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from .freezing import Saved, restore_rows

__all__ = ["REPLACED_TAG", "AttachesOptimizers", "OptimizerLink", "pad_state", "swap_parameters"]

REPLACED_TAG = "_cpd_moe_replaced"  # set on a parameter when growth replaces it: (layer token, slot)


class OptimizerLink:
    """Handle of one attached optimizer; :meth:`remove` detaches it (hooks removed)."""

    def __init__(self, layer: Any, optimizer: torch.optim.Optimizer) -> None:
        self._layer = weakref.ref(layer)  # the optimizer's hooks must not keep the layer alive
        self._optimizer = weakref.ref(optimizer)
        self._saved: Saved = []
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

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        saved, self._saved = self._saved, []
        restore_rows(saved)

    def remove(self) -> None:
        """Remove the hooks: the optimizer stops following growth (the global guard of
        :mod:`cpd_fast.moe.freezing` still keeps frozen rows still)."""
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


class AttachesOptimizers:
    """The optimizers of a module whose parameters growth replaces by bigger ones (the MoE layer):
    :meth:`attach` links an optimizer (an :class:`OptimizerLink`, held weakly), :meth:`update_optimizer`
    and :meth:`_sync_attached` move optimizers onto the successors of the parameters they hold.

    The module provides ``_slot(slot)`` (its current parameter of a slot), tags each parameter it replaces
    with :data:`REPLACED_TAG` ``= (self._token, slot)``, provides ``_frozen_values(held)`` for the links,
    and calls :meth:`_init_links` in its constructor.
    """

    def _init_links(self) -> None:
        # token: identifies this layer in the tags of parameters it replaced; links: attached optimizers
        self._token = object()
        self._links: weakref.WeakKeyDictionary[torch.optim.Optimizer, OptimizerLink] = (
            weakref.WeakKeyDictionary()
        )

    def __getstate__(self) -> dict:  # copies and pickles start unattached, with their own token
        state = self.__dict__.copy()
        del state["_token"], state["_links"]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._init_links()

    def attach(self, optimizer: torch.optim.Optimizer) -> OptimizerLink:
        """Make ``optimizer`` keep frozen rows bit-identical and follow growth; returns the handle.

        Registers a step pre-hook and post-hook on this optimizer only. Idempotent: attaching the
        same optimizer again returns the same :class:`OptimizerLink`; ``link.remove()`` detaches.
        The layer holds attached optimizers weakly (a discarded optimizer is not kept alive).
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        link = self._links.get(optimizer)
        if link is None:
            link = self._links[optimizer] = OptimizerLink(self, optimizer)
        return link

    @property
    def attached_optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self._links.keys())

    def update_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Move ``optimizer`` onto the current parameters and :meth:`attach` it.

        Parameters of earlier generations (replaced by the layer's growth, one or more growths ago)
        are swapped for the current ones. Per-parameter state shaped like the old parameter (Adam's
        moments) is zero-padded for the new rows, so existing experts keep their moments exactly;
        scalar state (``step``) is kept. The alternative is to rebuild the optimizer over
        ``model.parameters()`` and attach that one.
        """
        self.attach(optimizer)
        swap_parameters(optimizer, self._successor)

    def _successor(self, p: torch.Tensor) -> torch.Tensor | None:
        tag = getattr(p, REPLACED_TAG, None)
        if tag is None or tag[0] is not self._token:
            return None
        return self._slot(tag[1])

    def _sync_attached(self) -> None:
        for opt in list(self._links.keys()):
            swap_parameters(opt, self._successor)
