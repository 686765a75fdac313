"""Elastic Weight Consolidation for a Gaussian (MSE) policy head: EWC and Online EWC baselines.

The student's policy is read as N(μθ(s), σ²I) with σ fixed (MSE distillation is its log-likelihood up
to scale). Its Fisher information is ``F = E_s[J(s)ᵀJ(s)] / σ²`` with ``J = ∂μ/∂θ``; the diagonal is
``F_p = E_s Σ_j (∂μ_j/∂θ_p)²`` (σ = 1: it is absorbed into λ). This is the *true* Fisher: it does not
depend on the targets, so a student that already matches its teacher still gets a non-zero Fisher
(the empirical Fisher, built from squared loss gradients, vanishes there).

Estimation without per-sample gradients: with Rademacher signs v_{ij} ∈ {±1},
``g = ∇θ Σ_{i,j} v_{ij} μ_j(s_i)`` has ``E_v[g_p²] = Σ_{i,j} (∂μ_j(s_i)/∂θ_p)²`` (the cross terms have
zero mean), so ``g² / B`` from one backward pass per batch is an unbiased estimate of the diagonal.

* **EWC** (Kirkpatrick et al. 2017): one (F_k, θ*_k) pair per finished stage,
  penalty ``λ Σ_k Σ_p F_k,p (θ_p − θ*_k,p)²``.
* **Online EWC** (Schwarz et al. 2018): ``F* ← γ F* + F_k``, ``θ* ← θ`` after stage k,
  penalty ``λ Σ_p F*_p (θ_p − θ*_p)²``.

Parameters that grew since consolidation (MoE experts added later) are compared on their old rows only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["EWCPenalty", "diagonal_fisher"]


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    mean_fn: Callable[..., torch.Tensor],
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher ``{name: [param shape]}`` of the Gaussian policy, averaged over all samples.

    Args:
        model: the policy; parameters with ``requires_grad`` get an estimate, the others zeros.
        batches: inputs for ``mean_fn``, one tuple per batch.
        mean_fn: ``mean_fn(*batch) -> [B, act_dim]`` action means.
        generator: RNG of the Rademacher signs.
    """
    params = {n: p for n, p in model.named_parameters()}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    n_samples = 0
    for batch in batches:
        mu = mean_fn(*batch)
        v = torch.randint(0, 2, mu.shape, generator=generator).to(mu) * 2 - 1
        trainable = [(n, p) for n, p in params.items() if p.requires_grad]
        grads = torch.autograd.grad((v * mu).sum(), [p for _, p in trainable], allow_unused=True)
        for (n, _), g in zip(trainable, grads, strict=True):
            if g is not None:
                fisher[n] += g.detach() ** 2
        n_samples += mu.shape[0]
    if n_samples == 0:
        raise ValueError("diagonal_fisher needs at least one sample")
    return {n: f / n_samples for n, f in fisher.items()}


def _rows(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``p`` cut to ``t``'s shape along dim 0 (a parameter that grew keeps its old rows first)."""
    if t.shape == p.shape:
        return p
    if t.dim() == p.dim() and t.shape[1:] == p.shape[1:] and t.shape[0] <= p.shape[0]:
        return p[: t.shape[0]]
    raise ValueError(f"parameter shape {tuple(p.shape)} is incompatible with its anchor {tuple(t.shape)}")


class EWCPenalty:
    """EWC (``online=False``) or Online EWC (``online=True``, decay ``gamma``) quadratic penalty.

    Call :meth:`consolidate` after each stage and add :meth:`penalty` to the loss during later stages.
    """

    def __init__(self, lam: float, online: bool = False, gamma: float = 1.0) -> None:
        if lam < 0:
            raise ValueError(f"EWC lambda must be >= 0, got {lam}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"online EWC gamma must be in (0, 1], got {gamma}")
        self.lam, self.online, self.gamma = float(lam), bool(online), float(gamma)
        # list of (fisher, anchor) dicts; online EWC keeps exactly one
        self.terms: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def consolidate(self, model: nn.Module, fisher: dict[str, torch.Tensor]) -> None:
        """Fold in the Fisher of the finished stage and anchor at the current parameters."""
        anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
        fisher = {n: f.detach().clone() for n, f in fisher.items()}
        if self.online and self.terms:
            old, _ = self.terms[0]
            for n, f in fisher.items():
                if n in old:
                    f[: old[n].shape[0]] += self.gamma * old[n]
            self.terms = [(fisher, anchor)]
        elif self.online:
            self.terms = [(fisher, anchor)]
        else:
            self.terms.append((fisher, anchor))

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``λ Σ_terms Σ_p F_p (θ_p − θ*_p)²`` (a zero scalar before the first consolidation)."""
        params = dict(model.named_parameters())
        total = next(iter(params.values())).new_zeros(())
        for fisher, anchor in self.terms:
            for n, f in fisher.items():
                p = params.get(n)
                if p is None or not p.requires_grad:
                    continue
                total = total + (f * (_rows(f, p) - anchor[n]) ** 2).sum()
        return self.lam * total

    def state_dict(self) -> dict:
        return {"lam": self.lam, "online": self.online, "gamma": self.gamma,
                "terms": [{"fisher": f, "anchor": a} for f, a in self.terms]}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.online, self.gamma = float(state["lam"]), bool(state["online"]), float(state["gamma"])
        self.terms = [(t["fisher"], t["anchor"]) for t in state["terms"]]
