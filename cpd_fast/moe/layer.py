"""``MoELayer``: a top-k Mixture-of-Experts FFN whose experts can be added, frozen and unfrozen.

Layout (relied on by other code and by checkpoints): ``w1 [E, d_hidden, d_model]``, ``b1 [E, d_hidden]``,
``w2 [E, d_model, d_hidden]``, ``b2 [E, d_model]``, gate ``nn.Linear(d_model, E)`` (a :class:`Router`).
Expert e is ``act(x @ w1[e].T + b1[e]) @ w2[e].T + b2[e]``; the output is
``Σ_{e in top-k} probs[e] · expert_e(x)`` with ``probs = softmax(gate(x))`` over all experts (not
renormalised unless ``normalize_topk``), so every gate logit, a dormant new expert's included, gets
gradient.

Freezing contract (:meth:`MoELayer.freeze_experts`, :meth:`MoELayer.freeze_gate`;
:mod:`cpd_fast.moe.freezing`): frozen experts' rows of ``w1/b1/w2/b2`` always get exactly zero gradient,
a frozen gate gets none (``requires_grad=False``), and no ``torch.optim`` optimizer's ``step`` moves
them (weight decay and momentum from before the freeze included): an optimizer attached with
``layer.attach(opt)`` saves and restores them with its own step hooks, any other one through a pair of
global step hooks registered when something first freezes.

A drop-in FFN: ``copy.deepcopy`` and pickling work at any time (``aux_loss`` and ``router_stats``, the
last forward's outputs, are not copied: a copy starts as a layer that has not run forward); under
``torch.autocast`` the experts compute in, and the output comes out in, the autocast dtype, as with
``nn.Linear``; ``torch.compile(fullgraph=True)`` traces it (:func:`~cpd_fast.moe.experts.experts_torch`);
``to_empty`` after meta-device init gives a layer with nothing frozen (then ``load_state_dict`` or
:meth:`MoELayer.reset_parameters`).

Growth (:meth:`MoELayer.add_experts`) replaces the stacked parameters by bigger ones. Attached
optimizers are moved to the new parameters at once, their per-parameter state (Adam's moments)
kept for the existing rows and zero for the new ones. ``update_optimizer(opt)`` does the same for an
optimizer built before one or more growths (it finds the replaced parameters by a tag the layer
puts on them) and attaches it. Rebuilding the optimizer (then attaching it) also works.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Literal

import torch
from torch import nn

from cpd_fast.errors import require_int

from .experts import ACTIVATIONS, experts_torch
from .freezing import FreezesExperts
from .optim import REPLACED_TAG, AttachesOptimizers
from .router import Router, RouterStats, Routing, fixed_route, load_balancing_loss, router_stats

Activation = Literal["gelu", "relu", "silu"]
Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")
_SLOTS = ("w1", "b1", "w2", "b2", "gate.weight", "gate.bias")
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _finite(name: str, v: Any) -> float:
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _check_device(device: Any) -> None:
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"device must be a torch.device or a device string like 'cpu', got {device!r}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} but torch sees no CUDA device; use 'cpu'")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.compiler.is_compiling() and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_arguments(
    d_model: Any, d_hidden: Any, num_experts: Any, top_k: Any, activation: Any, backend: Any,
    new_expert_gate_bias: Any, aux_loss_weight: Any, device: Any, dtype: Any,
) -> tuple[int, int, int, int]:  # fmt: skip
    """:class:`MoELayer`'s arguments checked (``ValueError``/``TypeError`` naming the bad one); returns
    ``(d_model, d_hidden, num_experts, top_k)`` as ints."""
    d_model, d_hidden, num_experts = (
        require_int(n, v)
        for n, v in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts))
    )
    if not _is_int(top_k) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must satisfy 1 <= top_k <= num_experts={num_experts}, got {top_k!r}")
    top_k = int(top_k)
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _finite("new_expert_gate_bias", new_expert_gate_bias)
    if _finite("aux_loss_weight", aux_loss_weight) < 0:
        raise ValueError(f"aux_loss_weight must be >= 0, got {aux_loss_weight!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype (or None), got {dtype!r}")
    _check_device(device)
    return d_model, d_hidden, num_experts, top_k


def _autocast_dtype(x: torch.Tensor, param: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs ``nn.Linear(x)`` in on x's device, or None where it does not apply
    (autocast off, or float64 input or parameters, which autocast leaves alone)."""
    dev = x.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return None
    if x.dtype not in _AUTOCAST_ELIGIBLE or param.dtype not in _AUTOCAST_ELIGIBLE:
        return None
    return torch.get_autocast_dtype(dev)


def _check_input(x: Any, param: torch.Tensor) -> None:
    """``x`` fits the layer whose ``w1`` is ``param``: a tensor ``[..., d_model]`` on its device, of its dtype
    (any float16/bfloat16/float32 under ``torch.autocast``, as ``nn.Linear`` accepts)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != param.shape[2]:
        raise ValueError(f"x must have shape [..., {param.shape[2]}], got {tuple(x.shape)}")
    if x.dtype != param.dtype and _autocast_dtype(x, param) is None:
        raise TypeError(f"x has dtype {x.dtype} but the layer's parameters are {param.dtype}")
    if x.device != param.device:
        raise ValueError(f"x is on {x.device} but the layer's parameters are on {param.device}")


def _check_experts(experts: Any, x: torch.Tensor) -> None:
    """``experts`` of :meth:`MoELayer.forward`: a tensor ``[..., k]`` over the leading dims of ``x``."""
    lead = x.shape[:-1]
    ok = isinstance(experts, torch.Tensor) and experts.dim() == x.dim()
    if not ok or experts.shape[:-1] != lead:
        got = tuple(experts.shape) if isinstance(experts, torch.Tensor) else type(experts).__name__
        raise ValueError(
            f"experts must be an int64 tensor [{', '.join(map(str, lead))}, k] (the leading dims of "
            f"x), got {got}"
        )


@torch.no_grad()
def _init_experts(w1: Any, b1: Any, w2: Any, b2: Any, rows: slice) -> None:
    """nn.Linear's default init of the experts' ``rows``, expert by expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    (``b1``/``b2`` None: no biases)."""
    for w, b in ((w1, b1), (w2, b2)):
        bound = 1.0 / math.sqrt(w.shape[2])
        w[rows].uniform_(-bound, bound)
        if b is not None:
            b[rows].uniform_(-bound, bound)


class MoELayer(FreezesExperts, AttachesOptimizers, nn.Module):
    """Top-k Mixture-of-Experts FFN whose experts can be added, frozen and unfrozen at run time.

    Input ``[..., d_model]`` → output ``[..., d_model]``. After each forward: ``router_stats``
    (:class:`RouterStats`: free top-k counts and the softmax probabilities), ``aux_loss`` the Switch
    load-balancing loss ``aux_loss_weight · E · Σ_e f_e P_e`` (:func:`load_balancing_loss`; f_e:
    fraction of routed rows, P_e: mean gate probability) and ``tokens_per_expert`` the ``[E]``
    routed-row counts (always-routed experts included).

    Args:
        d_model, d_hidden, num_experts: sizes (E = num_experts ≥ 1).
        top_k: experts per token, ``1 ≤ top_k ≤ E``.
        activation: ``"gelu"`` (exact erf), ``"relu"`` or ``"silu"``.
        bias: expert biases b1/b2 (the gate always has a bias: it keeps new experts dormant).
        new_expert_gate_bias: gate bias of experts added by :meth:`add_experts`.
        aux_loss_weight: multiplies ``aux_loss``.
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"``, or
            ``"auto"`` (triton on CUDA, torch otherwise).
        normalize_topk: renormalise the kept probabilities to sum to 1.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        top_k: int = 2,
        activation: Activation = "gelu",
        bias: bool = True,
        new_expert_gate_bias: float = -5.0,
        aux_loss_weight: float = 0.01,
        backend: Backend = "auto",
        normalize_topk: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        d_model, d_hidden, num_experts, top_k = _check_arguments(
            d_model, d_hidden, num_experts, top_k, activation, backend, new_expert_gate_bias, aux_loss_weight,
            device, dtype,
        )  # fmt: skip
        self.d_model, self.d_hidden, self.top_k = d_model, d_hidden, top_k
        self.activation, self.backend, self.normalize_topk = activation, backend, normalize_topk
        self.new_expert_gate_bias = float(new_expert_gate_bias)
        self.aux_loss_weight = float(aux_loss_weight)
        self.check_finite = True  # NaN/Inf input check (one host sync per forward); off for benchmarks
        factory = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(num_experts, d_hidden, d_model, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, d_hidden, **factory))
        self.b1 = nn.Parameter(torch.empty(num_experts, d_hidden, **factory)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model, **factory)) if bias else None
        _init_experts(self.w1, self.b1, self.w2, self.b2, slice(None))
        self.gate = Router(d_model, num_experts, **factory)
        self.register_buffer("frozen_mask", torch.zeros(num_experts, dtype=torch.bool, device=device), False)
        self.register_buffer(
            "tokens_per_expert", torch.zeros(num_experts, dtype=torch.int64, device=device), False
        )
        self.aux_loss: torch.Tensor | None = None
        self.router_stats: RouterStats | None = None
        self._always_ids: tuple[int, ...] = ()  # experts routed for every token (always_route) ...
        self._always: torch.Tensor | None = None  # ... and as a tensor on the parameters' device
        self._frozen_idx: torch.Tensor | None = None
        self._init_links()

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @property
    def always_routed(self) -> list[int]:
        """The experts set by :meth:`always_route` (empty when none)."""
        return list(self._always_ids)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, activation={self.activation!r}, backend={self.backend!r}"
        )

    # -- forward -------------------------------------------------------------------------------

    def _resolve_backend(self, x: torch.Tensor) -> str:
        if self.backend == "auto":
            return "triton" if x.is_cuda else "torch"
        return self.backend

    def forward(self, x: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[..., d_model]`` → ``[..., d_model]``; sets router_stats, aux_loss and tokens_per_expert.

        ``experts`` (optional, int64 ``[..., k]``, the leading dims of ``x``): route each token to these
        experts instead of the gate's top-k, each weighted 1/k (an id < 0 is an empty slot: it adds
        nothing). The gate is not consulted, so ``aux_loss`` is zero and the gate gets no gradient.
        """
        _check_input(x, self.w1)
        if self.check_finite:
            _check_finite("x", x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)
        if experts is not None:
            _check_experts(experts, x)
            r = fixed_route(experts.reshape(x2.shape[0], -1).to(x.device), self.num_experts, x.dtype)
            stats = self.router_stats = router_stats(r)
        else:
            r = self.gate.route(x2, self.top_k, self.normalize_topk, self._always)
            stats = self.router_stats = router_stats(r, self._always)  # balance the free top-k choice only
        n = x2.shape[0]
        if n > 0:
            prob_mean = stats.probs.mean(0)
            self.aux_loss = load_balancing_loss(stats.counts, prob_mean, n, self.top_k, self.aux_loss_weight)
        else:
            self.aux_loss = stats.probs.sum() * 0.0
        self.tokens_per_expert = r.counts.detach()
        # under torch.autocast the experts compute in its dtype and so does the output, as with nn.Linear
        # (the casts' backward brings the gradients back to the parameters' dtype)
        dt = _autocast_dtype(x, self.w1) or x.dtype
        w = tuple(None if p is None else p.to(dt) for p in (self.w1, self.b1, self.w2, self.b2))
        x2, r = x2.to(dt), r._replace(topk_p=r.topk_p.to(dt))
        if self._resolve_backend(x) == "triton":
            out = self._triton_experts(x2, w, r)
        else:
            frozen = self.frozen_mask if self._frozen_idx is not None else None
            out = experts_torch(x2, *w, r, self.activation, frozen=frozen)
        # .to(dt): under CUDA autocast the Triton path's sum over slots comes out float32
        return out.to(dt).reshape(*lead, self.d_model)

    def _triton_experts(self, x2: torch.Tensor, w: tuple[torch.Tensor, ...], r: Routing) -> torch.Tensor:
        if not x2.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 set before importing the "
                "kernels, for CPU testing); use backend='torch' or 'auto' on CPU"
            )
        # lazy: the kernels import triton, absent on CPU-only and non-Linux installs; TRITON_INTERPRET is read
        # when they are first imported
        from cpd_fast.kernels.moe_experts import TritonExperts

        return TritonExperts.apply(
            x2.contiguous(), *w, r.topk_p, r.order, r.offs, self.frozen_mask, self.activation,
        )  # fmt: skip

    # -- parameter slots (replaced by bigger ones on growth; see AttachesOptimizers) -------------

    def _slot(self, slot: str) -> nn.Parameter | None:
        owner, name = (self.gate, slot[5:]) if slot.startswith("gate.") else (self, slot)
        return getattr(owner, name)

    def _replace(self, slot: str, new: torch.Tensor) -> None:
        owner, name = (self.gate, slot[5:]) if slot.startswith("gate.") else (self, slot)
        old = getattr(owner, name)
        setattr(old, REPLACED_TAG, (self._token, slot))  # lets update_optimizer find its successor
        setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad))

    # -- growth --------------------------------------------------------------------------------

    @torch.no_grad()
    def add_experts(self, n: int = 1, gate_bias: float | None = None) -> list[int]:
        """Append ``n`` fresh experts, dormant at birth; returns their indices.

        New experts are initialised like the originals; their gate rows get zero weight and bias
        ``gate_bias`` (default ``new_expert_gate_bias``), so their logit is exactly that bias for
        every input. Existing values are kept. The stacked parameters are replaced by bigger ones;
        attached optimizers follow at once (state kept), others need ``layer.update_optimizer(opt)``
        or rebuilding.
        """
        n = require_int("n", n)
        E = self.num_experts
        gb = self.new_expert_gate_bias if gate_bias is None else _finite("gate_bias", gate_bias)

        def grow(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t.detach(), t.new_empty(n, *t.shape[1:])])

        for slot in ("w1", "b1", "w2", "b2"):
            if self._slot(slot) is not None:
                self._replace(slot, grow(self._slot(slot)))
        _init_experts(self.w1, self.b1, self.w2, self.b2, slice(E, None))
        gw = torch.cat([self.gate.weight.detach(), self.gate.weight.new_zeros(n, self.d_model)])
        gbias = torch.cat([self.gate.bias.detach(), self.gate.bias.new_full((n,), gb)])
        self._replace("gate.weight", gw)
        self._replace("gate.bias", gbias)
        self.gate.out_features = E + n
        self.frozen_mask = torch.cat([self.frozen_mask, self.frozen_mask.new_zeros(n)])
        self.tokens_per_expert = self.tokens_per_expert.new_zeros(E + n)
        self._refresh_frozen()
        self._sync_attached()
        return list(range(E, E + n))

    def always_route(self, indices) -> None:
        """Route every token to experts ``indices`` in addition to its top-k among the others.

        Each such expert contributes ``probs[e] · expert_e(x)`` for every token. For a newborn
        expert (gate bias −5, probability ≈ e^-5 of the others') that moves the output by about 1%,
        yet its weights and its gate logit get gradient from the first step — a dormant expert
        that never enters anyone's top-k would otherwise never learn (the load-balancing loss has
        no pull on an expert with no routed rows). Use it while new experts train, then
        ``always_route([])``. The aux loss balances the free top-k choice only. Not saved in the
        state_dict.
        """
        idx = sorted({int(i) for i in indices})
        if any(not 0 <= i < self.num_experts for i in idx):
            raise ValueError(f"expert indices must be in [0, {self.num_experts}), got {idx}")
        if idx and self.num_experts - len(idx) < self.top_k:
            raise ValueError(
                f"always-routed experts leave {self.num_experts - len(idx)} experts for top_k={self.top_k}"
            )
        self._always_ids = tuple(idx)
        self._always = torch.tensor(idx, dtype=torch.int64, device=self.w1.device) if idx else None

    # -- copies, devices, init (a drop-in nn.Module) ---------------------------------------------

    def __getstate__(self) -> dict:
        # the last forward's outputs hold its autograd graph, which deepcopy and pickle refuse: a copy
        # starts as a layer that has not run forward
        return {**super().__getstate__(), "aux_loss": None, "router_stats": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._refresh_frozen()  # a frozen copy is guarded too

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), to_empty(), ...: the index tensors that are not buffers follow the parameters
        was_meta = self.w1.is_meta
        super()._apply(fn, recurse)
        if was_meta and not self.w1.is_meta:
            # to_empty from meta leaves the buffers uninitialised; a meta layer has nothing frozen, no counts
            self.frozen_mask.zero_()
            self.tokens_per_expert.zero_()
        dev = self.w1.device
        self._always = torch.tensor(self._always_ids, device=dev) if self._always_ids else None
        self._refresh_frozen()
        return self

    def reset_parameters(self) -> None:
        """Initialise every expert and the gate as in a new layer of this size (``nn.Linear``'s init)."""
        _init_experts(self.w1, self.b1, self.w2, self.b2, slice(None))
        self.gate.reset_parameters()

    # -- checkpoints ---------------------------------------------------------------------------

    def get_extra_state(self) -> dict:
        return {
            "top_k": self.top_k,
            "activation": self.activation,
            "normalize_topk": self.normalize_topk,
            "new_expert_gate_bias": self.new_expert_gate_bias,
            "aux_loss_weight": self.aux_loss_weight,
            "backend": self.backend,
        }

    def set_extra_state(self, state: Any) -> None:
        pass  # the constructor's configuration wins; from_state_dict reads these as defaults

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        w1 = state_dict.get(prefix + "w1")
        if isinstance(w1, torch.Tensor) and w1.dim() == 3 and w1.shape[0] != self.num_experts:
            self._resize(w1.shape[0])  # a checkpoint taken after growth: match its expert count
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _resize(self, E: int) -> None:
        if E > self.num_experts:
            self.add_experts(E - self.num_experts)
            return
        for slot in _SLOTS:
            if self._slot(slot) is not None:
                self._replace(slot, self._slot(slot).detach()[:E].clone())
        self.gate.out_features = E
        self.frozen_mask = self.frozen_mask[:E].clone()
        self.tokens_per_expert = self.tokens_per_expert[:E].clone()
        self.top_k = min(self.top_k, E)
        if self._always is not None:
            self.always_route([i for i in self.always_routed if i < E])
        self._refresh_frozen()
        self._sync_attached()

    @classmethod
    def from_state_dict(cls, state_dict: dict, prefix: str = "", **kwargs) -> MoELayer:
        """Build a layer sized from ``state_dict`` (as saved by ``state_dict()``) and load it.

        Sizes come from the tensors; top_k/activation/... from the saved extra state unless given.
        """
        w1 = state_dict[prefix + "w1"]
        config = dict(state_dict.get(prefix + "_extra_state") or {})
        config.update(kwargs)
        E, d_hidden, d_model = w1.shape
        config.setdefault("dtype", w1.dtype)
        layer = cls(d_model, d_hidden, E, bias=prefix + "b1" in state_dict, **config)
        layer.load_state_dict({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)})
        return layer
