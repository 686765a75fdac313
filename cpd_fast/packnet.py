"""PackNet (Mallya & Lazebnik 2018): parameter isolation by iterative magnitude pruning, as Continual World
runs it, on any ``nn.Module`` (here: the student, one "task" of PackNet = one stage of the stream).

Every weight entry has an *owner*, the stage whose subnetwork it belongs to. Weights are the parameters
with two or more dimensions (linear maps, stacked expert weights, embeddings); the others (biases,
normalisation scales) train in stage 0 only and are then frozen, shared by every stage. At stage ``s``:

1. **train**: only the entries owned by ``s`` move (at the start of ``s``, every entry no earlier stage
   kept); the entries of stages ``< s`` keep their values bit for bit (gradient masked, and restored after
   each optimizer step, so weight decay or momentum cannot move them either);
2. **prune**: of each weight's entries owned by ``s``, the fraction ``(N - 1 - s) / (N - s)`` with the
   smallest magnitude is released to stage ``s + 1`` and set to zero, so that each of the ``N`` stages ends
   with an equal share of the entries (the last stage keeps all it has and skips 2-3);
3. **retrain**: the kept entries of ``s`` train again, the released ones stay zero.

Evaluation of a task of stage ``s`` uses :meth:`PackNet.view` ``(s)``: the entries owned by stages ``<= s``,
every later one zeroed. That is exactly the network stage ``s`` ended with, so nothing of ``s`` is ever
forgotten, **but only with the task id**: without it, nobody knows which view to use. PackNet therefore
has no task-free evaluation (the continual-learning literature runs it with the task id).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["PHASES", "PackNet"]

PHASES = ("train", "retrain")  # a stage's phases, the pruning between them


class PackNet:
    """Owners of a model's weight entries over ``num_stages`` stages (module docstring).

    Args:
        model: the network; its parameters with ``dim() >= 2`` are managed (owner tensors of their shape).
        num_stages: ``N``, the stages the stream has: it fixes how much each pruning releases.
    """

    def __init__(self, model: nn.Module, num_stages: int) -> None:
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
        self.num_stages = num_stages
        self.owner = {
            name: torch.zeros(p.shape, dtype=torch.int16, device=p.device)
            for name, p in model.named_parameters()
            if self.managed(p)
        }
        if not self.owner:
            raise ValueError("PackNet needs a model with at least one weight (a parameter with dim >= 2)")

    @staticmethod
    def managed(p: torch.Tensor) -> bool:
        """A weight (pruned and owned per stage), not a bias or a normalisation scale."""
        return p.dim() >= 2

    def _check_stage(self, stage: int) -> None:
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must be an int in [0, {self.num_stages}), got {stage!r}")

    def _weights(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
        params = dict(model.named_parameters())
        missing = sorted(set(self.owner) - set(params))
        if missing:
            raise ValueError(f"the model lacks the weights PackNet manages: {', '.join(missing)}")
        for name, owner in self.owner.items():
            p = params[name]
            if p.shape != owner.shape:
                raise ValueError(f"{name} has shape {tuple(p.shape)}, PackNet owns {tuple(owner.shape)}")
            yield name, p, owner

    def release_fraction(self, stage: int) -> float:
        """Share of stage ``stage``'s entries its pruning releases: ``(N - 1 - s) / (N - s)``."""
        self._check_stage(stage)
        left = self.num_stages - 1 - stage
        return left / (left + 1)

    # ---- training
    def set_trainable(self, model: nn.Module, stage: int) -> None:
        """Weights train (masked by :meth:`attach`); biases and normalisation scales in stage 0 only."""
        self._check_stage(stage)
        for p in model.parameters():
            p.requires_grad_(self.managed(p) or stage == 0)
            if not p.requires_grad:
                p.grad = None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, stage: int) -> _Guard:
        """Confine ``optimizer``'s steps to the entries stage ``stage`` owns: their gradients are masked
        and every other entry of a managed weight is put back after each step. ``.remove()`` it after."""
        self._check_stage(stage)
        return _Guard(list(self._weights(model)), optimizer, stage)

    @torch.no_grad()
    def prune(self, model: nn.Module, stage: int) -> dict[str, int]:
        """Release the smallest-magnitude share (:meth:`release_fraction`) of each weight's entries owned
        by ``stage`` to ``stage + 1`` and zero them. Returns ``{weight name: entries kept}``."""
        frac = self.release_fraction(stage)
        kept = {}
        for name, p, owner in self._weights(model):
            own = (owner == stage).flatten().nonzero().squeeze(1)
            n_release = int(own.numel() * frac)
            if n_release:
                # stable sort: ties release the lower flat index first, the same on every run
                order = torch.sort(p.detach().flatten()[own].abs(), stable=True).indices
                release = own[order[:n_release]]
                p.view(-1)[release] = 0.0
                owner.view(-1)[release] = stage + 1
            kept[name] = own.numel() - n_release
        return kept

    # ---- evaluation
    @torch.no_grad()
    def view(self, model: nn.Module, stage: int) -> dict[str, torch.Tensor]:
        """The state dict of stage ``stage``'s network: weights owned by later stages zeroed."""
        self._check_stage(stage)
        state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
        for name, _, owner in self._weights(model):
            state[name] = torch.where(owner <= stage, state[name], torch.zeros_like(state[name]))
        return state

    def shares(self) -> dict[str, list[float]]:
        """Each weight's share of entries per owner stage (0 … N − 1; entries released past the last
        pruning belong to stage N − 1 as soon as it trains)."""
        return {
            name: [round(float((o == s).float().mean()), 6) for s in range(self.num_stages)]
            for name, o in self.owner.items()
        }

    # ---- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"num_stages": self.num_stages, "owner": {k: v.clone() for k, v in self.owner.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_stages"]) != self.num_stages or set(state["owner"]) != set(self.owner):
            raise ValueError("this PackNet state belongs to another model or stage count")
        for name, owner in state["owner"].items():
            if owner.shape != self.owner[name].shape:
                raise ValueError(f"PackNet owner of {name} has shape {tuple(owner.shape)}, "
                                 f"expected {tuple(self.owner[name].shape)}")  # fmt: skip
            self.owner[name] = owner.to(device=self.owner[name].device, dtype=torch.int16)


class _Guard:
    """Gradient masks and a post-step restore of every entry a stage does not own (:meth:`PackNet.attach`)."""

    def __init__(self, weights: list, optimizer: torch.optim.Optimizer, stage: int) -> None:
        self._kept = []
        self._handles = []
        for _, p, owner in weights:
            mine = owner == stage
            self._kept.append((p, ~mine, p.detach().clone()))
            self._handles.append(p.register_hook(lambda g, m=mine: g * m.to(g.dtype)))
        self._handles.append(optimizer.register_step_post_hook(self._restore))

    @torch.no_grad()
    def _restore(self, *_: Any) -> None:
        for p, others, saved in self._kept:
            p.copy_(torch.where(others, saved, p))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
