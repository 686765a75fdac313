"""Top-k routing: the gate (:class:`Router`), a batch's expert-sorted :class:`Routing`, and the Switch
load-balancing loss computed from :class:`RouterStats`.

Probabilities are computed in ``promote_types(logits.dtype, float32)``: float32 for bf16/fp16/fp32
logits, float64 for float64 logits (so a ``.double()`` layer is a true float64 computation).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Routing(NamedTuple):
    """Routing of N tokens to k of E experts. M = N·k routed (token, slot) rows."""

    probs: torch.Tensor  # [N, E] softmax of the gate logits, at least float32
    topk_p: torch.Tensor  # [N, k] gate weights of the kept experts (the logits' dtype)
    topk_e: torch.Tensor  # [N, k] int64 expert ids
    order: torch.Tensor  # [M] int64 flat (token, slot) ids sorted stably by expert
    counts: torch.Tensor  # [E] int64 routed rows per expert
    offs: torch.Tensor  # [E+1] int32 segment offsets into `order`


class RouterStats(NamedTuple):
    """What the load-balancing loss needs from one forward.

    ``counts`` ``[E]`` int64: routed rows per expert of the free top-k choice (always-routed experts'
    counts are zero). ``probs`` ``[N, E]``: this forward's softmax probabilities (differentiable).
    """

    counts: torch.Tensor
    probs: torch.Tensor


def probs_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype routing probabilities are computed in: at least float32, float64 kept."""
    return torch.promote_types(dtype, torch.float32)


def route(
    logits: torch.Tensor, k: int, normalize_topk: bool = False, always: torch.Tensor | None = None
) -> Routing:
    """Top-k routing with expert-sorted order and offsets, entirely on device (no host sync).

    logits: ``[N, E]``. The sort is stable, so rows of one expert stay in token order.
    always: optional ``[F]`` int64 expert ids routed for every token in addition to the top-k of the
    other experts (rows ``[N, k + F]``), each weighted by its own gate probability.
    """
    E = logits.shape[1]
    probs = torch.softmax(logits.to(probs_dtype(logits.dtype)), dim=-1)
    if always is None or always.numel() == 0:
        topk_p, topk_e = torch.topk(probs, k, dim=-1)
    else:
        others = probs.index_fill(1, always, -1.0)  # the top-k is chosen among the other experts
        topk_e = torch.topk(others, k, dim=-1).indices
        topk_e = torch.cat([topk_e, always.expand(probs.shape[0], -1)], dim=1)
        topk_p = probs.gather(1, topk_e)
    if normalize_topk:
        topk_p = topk_p / topk_p.sum(-1, keepdim=True)
    flat_e = topk_e.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    # scatter_add instead of bincount: bincount syncs on CUDA to size its output
    counts = torch.zeros(E, dtype=torch.int64, device=logits.device).scatter_add_(
        0, flat_e, torch.ones_like(flat_e)
    )
    offs = F.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)
    return Routing(probs, topk_p.to(logits.dtype), topk_e, order, counts, offs)


def fixed_route(experts: torch.Tensor, num_experts: int, dtype: torch.dtype) -> Routing:
    """Routing of N tokens to experts chosen by the caller, not by a gate: ``experts [N, k]`` int64 ids, each
    row's k experts weighted 1/k; an id < 0 is an empty slot (weight 0; its row runs on expert 0).

    ``probs`` is all zero (no gate took part), so the load-balancing loss of such a routing is zero.
    """
    if experts.dtype != torch.int64 or experts.dim() != 2:
        raise ValueError(f"experts must be an int64 tensor [N, k], got {experts.dtype} {list(experts.shape)}")
    if experts.numel() and int(experts.max()) >= num_experts:
        raise ValueError(f"expert id {int(experts.max())} out of range for {num_experts} experts")
    n, k = experts.shape
    live = experts >= 0
    topk_p = live.to(dtype) / k
    topk_e = experts.clamp(min=0)
    flat_e = topk_e.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    zeros = torch.zeros(num_experts, dtype=torch.int64, device=experts.device)
    rows = zeros.scatter_add(0, flat_e, torch.ones_like(flat_e))  # segment sizes, empty slots included
    counts = zeros.scatter_add(0, flat_e, live.reshape(-1).to(torch.int64))  # real routed rows
    offs = F.pad(torch.cumsum(rows, 0), (1, 0)).to(torch.int32)
    probs = torch.zeros(n, num_experts, dtype=probs_dtype(dtype), device=experts.device)
    return Routing(probs, topk_p, topk_e, order, counts, offs)


def router_stats(r: Routing, always: torch.Tensor | None = None) -> RouterStats:
    """:class:`RouterStats` of a routing; ``always``: the always-routed experts (their counts zeroed)."""
    counts = r.counts if always is None else r.counts.index_fill(0, always, 0)
    return RouterStats(counts, r.probs)


def load_balancing_loss(
    counts: torch.Tensor, prob_mean: torch.Tensor, num_tokens: int | torch.Tensor, top_k: int, weight: float
) -> torch.Tensor:
    """weight · E · Σ_e f_e · P_e with f_e = counts_e / (num_tokens · top_k) and P_e = prob_mean_e.

    The Switch Transformer load-balancing loss. Single process: ``counts`` and ``probs.mean(0)`` of
    :class:`RouterStats`, ``num_tokens = N``. Data parallel: the all-reduced counts, the global token
    count and this rank's share ``probs.sum(0) / N_global`` (the ranks' losses then sum to the
    global one). ``num_tokens`` must be positive.
    """
    if isinstance(num_tokens, numbers.Integral) and num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    frac = counts.to(prob_mean.dtype) / (num_tokens * top_k)
    return weight * counts.shape[0] * (frac * prob_mean).sum()


class Router(nn.Linear):
    """The gate: ``nn.Linear(d_model, E)`` whose logits route each token.

    A subclass of ``nn.Linear`` so that a layer's ``gate.weight`` / ``gate.bias`` state-dict keys
    and forward hooks on the gate (which see the logits) are those of a plain linear gate.
    """

    def route(
        self, x: torch.Tensor, top_k: int, normalize_topk: bool = False, always: torch.Tensor | None = None
    ) -> Routing:
        """Route ``x`` ``[N, d_model]``: logits ``self(x)``, then :func:`route`."""
        return route(self(x), top_k, normalize_topk, always)
