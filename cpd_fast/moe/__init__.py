"""A growable Mixture-of-Experts FFN for continual learning.

* :mod:`.router`: the gate (:class:`Router`), top-k :func:`route`, :class:`RouterStats` and the
  :func:`load_balancing_loss`.
* :mod:`.experts`: the routed experts in plain PyTorch (:class:`SegmentExperts`,
  :func:`experts_torch`) and the naive :func:`experts_loop_reference` oracle.
* :mod:`.layer`: :class:`MoELayer` (growth, checkpoints, drop-in ``nn.Module`` behaviour); :mod:`.freezing`:
  frozen experts and gate, kept still under every ``torch.optim`` optimizer; :mod:`.optim`: attaching an
  optimizer (:class:`OptimizerLink`). The Triton backend lives in ``cpd_fast.kernels.moe_experts``.
"""

from .experts import ACTIVATIONS, IMPLS, SegmentExperts, experts_loop_reference, experts_torch, grouped_mm_ok
from .layer import BACKENDS, Activation, Backend, MoELayer
from .optim import OptimizerLink, pad_state, swap_parameters
from .router import (
    Router,
    RouterStats,
    Routing,
    fixed_route,
    load_balancing_loss,
    probs_dtype,
    route,
    router_stats,
)

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "IMPLS",
    "Activation",
    "Backend",
    "MoELayer",
    "OptimizerLink",
    "Router",
    "RouterStats",
    "Routing",
    "SegmentExperts",
    "experts_loop_reference",
    "experts_torch",
    "fixed_route",
    "grouped_mm_ok",
    "load_balancing_loss",
    "pad_state",
    "probs_dtype",
    "route",
    "router_stats",
    "swap_parameters",
]
