"""A growable Mixture-of-Experts FFN: ``MoELayer``, its routing, and the pure-PyTorch backend.

Layout (relied on by other code): ``w1 [E, d_hidden, d_model]``, ``b1 [E, d_hidden]``,
``w2 [E, d_model, d_hidden]``, ``b2 [E, d_model]``, gate ``nn.Linear(d_model, E)``. Expert e is
``act(x @ w1[e].T + b1[e]) @ w2[e].T + b2[e]``; the output is ``Σ_{e in top-k} probs[e] · expert_e(x)``
with ``probs = softmax(gate(x))`` over all experts (not renormalised unless ``normalize_topk``), so
every gate logit, a dormant new expert's included, gets gradient.

Growth replaces the stacked parameters by bigger ones: call :meth:`MoELayer.update_optimizer` on
the optimizer (or rebuild it) after :meth:`MoELayer.add_experts`.

Freezing contract (see :meth:`MoELayer.freeze_experts`): frozen experts' rows of ``w1/b1/w2/b2``
get exactly zero gradient, and every ``torch.optim.Optimizer.step`` that holds the layer's
parameters leaves them bit-identical (a global step pre/post hook saves and restores the frozen rows,
which undoes weight decay and momentum carried from before the freeze). A frozen gate has
``requires_grad=False`` and is restored the same way.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

Activation = Literal["gelu", "relu", "silu"]
Backend = Literal["auto", "triton", "torch"]
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
BACKENDS = ("auto", "triton", "torch")


# ----------------------------------------------------------------------------- routing


class Routing(NamedTuple):
    """Routing of N tokens to k of E experts. M = N·k routed (token, slot) rows."""

    probs: torch.Tensor  # [N, E] float32 softmax of the gate logits
    topk_p: torch.Tensor  # [N, k] gate weights of the kept experts (x's dtype)
    topk_e: torch.Tensor  # [N, k] int64 expert ids
    order: torch.Tensor  # [M] int64 flat (token, slot) ids sorted stably by expert
    counts: torch.Tensor  # [E] int64 routed rows per expert
    offs: torch.Tensor  # [E+1] int32 segment offsets into `order`


def route(
    logits: torch.Tensor, k: int, normalize_topk: bool = False, always: torch.Tensor | None = None
) -> Routing:
    """Top-k routing with expert-sorted order and offsets, entirely on device (no host sync).

    logits: ``[N, E]``. The sort is stable, so rows of one expert stay in token order.
    always: optional ``[F]`` int64 expert ids routed for every token in addition to the top-k of the
    other experts (rows ``[N, k + F]``), each weighted by its own gate probability.
    """
    E = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=-1)
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


# ----------------------------------------------------------------------------- torch backend


class _ZeroFrozenRows(torch.autograd.Function):
    """Identity whose backward zeroes the gradient rows of frozen experts (exact zeros)."""

    @staticmethod
    def forward(ctx, w, frozen):
        ctx.save_for_backward(frozen)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        (frozen,) = ctx.saved_tensors
        return g.masked_fill(frozen.view(-1, *([1] * (g.dim() - 1))), 0), None


def _grouped_mm_ok(x: torch.Tensor, d_model: int, d_hidden: int) -> bool:
    # grouped_mm needs 16-byte aligned strides; on CUDA only bf16 on sm90+ (we leave CUDA to triton)
    fn = getattr(F, "grouped_mm", None)
    align = 16 // x.element_size()
    return fn is not None and x.device.type == "cpu" and d_model % align == 0 and d_hidden % align == 0


def experts_torch(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    r: Routing,
    activation: str,
    impl: Literal["auto", "segments", "grouped_mm"] = "auto",
) -> torch.Tensor:
    """Routed experts in plain PyTorch on expert-sorted rows. x ``[N, d]`` → ``[N, d]``.

    ``segments``: one GEMM per expert segment (reads the offsets on the host once);
    ``grouped_mm``: ``F.grouped_mm`` on the sorted rows (no host sync, so torch.compile keeps one
    graph; bf16 only under compile). ``auto`` uses grouped_mm under torch.compile where it
    applies, segments otherwise (faster on CPU in bench/moe_results.md).
    """
    d = x.shape[1]
    k = r.topk_e.shape[1]
    act = ACTIVATIONS[activation]
    tok = r.order // k
    xs = x.index_select(0, tok)  # index_select: its backward (index_add) is faster than x[tok]'s
    p = r.topk_p.reshape(-1)[r.order]
    # fp32 grouped_mm runs eagerly on CPU but its meta kernel (used by torch.compile) demands bf16
    use_gmm = impl == "grouped_mm" or (
        impl == "auto"
        and torch.compiler.is_compiling()
        and x.dtype == torch.bfloat16
        and _grouped_mm_ok(x, d, w1.shape[1])
    )
    if use_gmm:
        expert = r.topk_e.reshape(-1)[r.order]
        ends = r.offs[1:]
        zs = F.grouped_mm(xs, w1.transpose(1, 2), offs=ends)
        if b1 is not None:
            zs = zs + b1.index_select(0, expert)
        ys = F.grouped_mm(act(zs), w2.transpose(1, 2), offs=ends)
        if b2 is not None:
            ys = ys + b2.index_select(0, expert)
    else:
        bounds = r.offs.tolist()
        segs = []
        for e in range(w1.shape[0]):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                continue
            z = xs[lo:hi] @ w1[e].T if b1 is None else torch.addmm(b1[e], xs[lo:hi], w1[e].T)
            h = act(z)
            segs.append(h @ w2[e].T if b2 is None else torch.addmm(b2[e], h, w2[e].T))
        ys = torch.cat(segs) if segs else xs.new_zeros(0, d)
    return torch.zeros_like(x).index_add(0, tok, ys * p[:, None].to(ys.dtype))


def experts_loop_reference(x, w1, b1, w2, b2, topk_p, topk_e, activation: str) -> torch.Tensor:
    """The naive per-expert masked loop (boolean mask over all tokens): oracle and bench baseline."""
    act = ACTIVATIONS[activation]
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        hit = topk_e == e  # [N, k]
        rows = hit.any(-1)
        if not bool(rows.any()):
            continue
        h = act(x[rows] @ w1[e].T + (0 if b1 is None else b1[e]))
        y = h @ w2[e].T + (0 if b2 is None else b2[e])
        w = (topk_p * hit).sum(-1)[rows]
        out = out.index_add(0, rows.nonzero().squeeze(1), y * w[:, None])
    return out


# ----------------------------------------------------------------------------- freezing hooks

_LAYERS_WITH_FROZEN: weakref.WeakSet = weakref.WeakSet()
_SAVED: dict[int, list] = {}


def _before_step(optimizer, args, kwargs):
    if not _LAYERS_WITH_FROZEN:
        return
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    saved = [s for layer in list(_LAYERS_WITH_FROZEN) for s in layer._frozen_values(held)]
    if saved:
        _SAVED[id(optimizer)] = saved


@torch.no_grad()
def _after_step(optimizer, args, kwargs):
    for param, idx, values in _SAVED.pop(id(optimizer), ()):
        if idx is None:
            param.copy_(values)
        else:
            param.index_copy_(0, idx, values)


register_optimizer_step_pre_hook(_before_step)
register_optimizer_step_post_hook(_after_step)


# ----------------------------------------------------------------------------- the layer


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _positive_int(name: str, v: Any) -> int:
    if not _is_int(v) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


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


class MoELayer(nn.Module):
    """Top-k Mixture-of-Experts FFN whose experts can be added, frozen and unfrozen at run time.

    Input ``[..., d_model]`` → output ``[..., d_model]``. After each forward, ``aux_loss`` holds the
    Switch load-balancing loss ``aux_loss_weight · E · Σ_e f_e P_e`` (f_e: fraction of routed rows,
    P_e: mean gate probability) and ``tokens_per_expert`` the ``[E]`` routed-row counts.

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
        d_model, d_hidden, num_experts = (
            _positive_int(n, v)
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
        self._init_experts(slice(None))
        self.gate = nn.Linear(d_model, num_experts, **factory)
        self.register_buffer("frozen_mask", torch.zeros(num_experts, dtype=torch.bool, device=device), False)
        self.register_buffer(
            "tokens_per_expert", torch.zeros(num_experts, dtype=torch.int64, device=device), False
        )
        self.aux_loss: torch.Tensor | None = None
        self._always: torch.Tensor | None = None  # experts routed for every token (always_route)
        self._frozen_idx: torch.Tensor | None = None
        self._replaced: list[tuple[weakref.ref, weakref.ref]] = []

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @property
    def gate_frozen(self) -> bool:
        return not self.gate.weight.requires_grad

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, activation={self.activation!r}, backend={self.backend!r}"
        )

    @torch.no_grad()
    def _init_experts(self, rows: slice) -> None:
        # nn.Linear's default init, expert by expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[2])
            w[rows].uniform_(-bound, bound)
            if b is not None:
                b[rows].uniform_(-bound, bound)

    # -- forward -------------------------------------------------------------------------------

    def _resolve_backend(self, x: torch.Tensor) -> str:
        if self.backend == "auto":
            return "triton" if x.is_cuda else "torch"
        return self.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., d_model]`` → ``[..., d_model]``; sets ``aux_loss`` and ``tokens_per_expert``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [..., {self.d_model}], got {tuple(x.shape)}")
        if x.dtype != self.w1.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the layer's parameters are {self.w1.dtype}")
        if x.device != self.w1.device:
            raise ValueError(f"x is on {x.device} but the layer's parameters are on {self.w1.device}")
        if self.check_finite:
            _check_finite("x", x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)
        r = route(self.gate(x2), self.top_k, self.normalize_topk, self._always)
        E = self.num_experts
        if x2.shape[0] > 0:
            counts = r.counts
            if self._always is not None:  # balance the free top-k choice only
                counts = counts.index_fill(0, self._always, 0)
            frac = counts.to(r.probs.dtype) / (x2.shape[0] * self.top_k)
            self.aux_loss = self.aux_loss_weight * E * (frac * r.probs.mean(0)).sum()
        else:
            self.aux_loss = r.probs.sum() * 0.0
        self.tokens_per_expert = r.counts.detach()
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        if self._resolve_backend(x) == "triton":
            out = self._triton_experts(x2, r)
        else:
            if self._frozen_idx is not None:
                w1, w2 = (
                    _ZeroFrozenRows.apply(w1, self.frozen_mask),
                    _ZeroFrozenRows.apply(w2, self.frozen_mask),
                )
                if b1 is not None:
                    b1, b2 = (
                        _ZeroFrozenRows.apply(b1, self.frozen_mask),
                        _ZeroFrozenRows.apply(b2, self.frozen_mask),
                    )
            out = experts_torch(x2, w1, b1, w2, b2, r, self.activation)
        return out.reshape(*lead, self.d_model)

    def _triton_experts(self, x2: torch.Tensor, r: Routing) -> torch.Tensor:
        import os

        if not x2.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 set before importing the "
                "kernels, for CPU testing); use backend='torch' or 'auto' on CPU"
            )
        from cpd_fast.kernels.moe_experts import TritonExperts

        return TritonExperts.apply(
            x2.contiguous(), self.w1, self.b1, self.w2, self.b2, r.topk_p, r.order, r.offs,
            self.frozen_mask, self.activation,
        )  # fmt: skip

    # -- growth --------------------------------------------------------------------------------

    def _replace(self, owner: nn.Module, name: str, new: torch.Tensor) -> None:
        old = getattr(owner, name)
        param = nn.Parameter(new, requires_grad=old.requires_grad)
        # every older parameter that led to `old` now leads to `param`: chains stay one step long
        ref = weakref.ref(param)
        live = [(o, ref if n() is old else n) for o, n in self._replaced if o() is not None]
        self._replaced = [*live, (weakref.ref(old), ref)]
        setattr(owner, name, param)

    @torch.no_grad()
    def add_experts(self, n: int = 1, gate_bias: float | None = None) -> list[int]:
        """Append ``n`` fresh experts, dormant at birth; returns their indices.

        New experts are initialised like the originals; their gate rows get zero weight and bias
        ``gate_bias`` (default ``new_expert_gate_bias``), so their logit is exactly that bias for
        every input. Existing values are kept. The stacked parameters are replaced by bigger ones:
        call ``layer.update_optimizer(opt)`` (keeps Adam state) or rebuild the optimizer.
        """
        n = _positive_int("n", n)
        E = self.num_experts
        gb = self.new_expert_gate_bias if gate_bias is None else _finite("gate_bias", gate_bias)

        def grow(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t.detach(), t.new_empty(n, *t.shape[1:])])

        for name in ("w1", "b1", "w2", "b2"):
            if getattr(self, name) is not None:
                self._replace(self, name, grow(getattr(self, name)))
        self._init_experts(slice(E, None))
        gw = torch.cat([self.gate.weight.detach(), self.gate.weight.new_zeros(n, self.d_model)])
        gbias = torch.cat([self.gate.bias.detach(), self.gate.bias.new_full((n,), gb)])
        self._replace(self.gate, "weight", gw)
        self._replace(self.gate, "bias", gbias)
        self.gate.out_features = E + n
        self.frozen_mask = torch.cat([self.frozen_mask, self.frozen_mask.new_zeros(n)])
        self.tokens_per_expert = self.tokens_per_expert.new_zeros(E + n)
        self._refresh_frozen()
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
        self._always = torch.tensor(idx, dtype=torch.int64, device=self.w1.device) if idx else None

    @torch.no_grad()
    def update_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Swap the parameters replaced by :meth:`add_experts` for the grown ones in ``optimizer``.

        Per-parameter state shaped like the old parameter (Adam's moments) is zero-padded for the
        new rows, so existing experts keep their moments; scalar state (``step``) is kept. The
        one-liner alternative is to rebuild the optimizer over ``model.parameters()``.
        """
        live = [(o(), n()) for o, n in self._replaced]
        live = [(o, n) for o, n in live if o is not None and n is not None]
        succ = {id(o): (o, n) for o, n in live}
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if id(p) not in succ or succ[id(p)][0] is not p:
                    continue
                new = succ[id(p)][1]
                group["params"][i] = new
                state = optimizer.state.pop(p, None)
                if state is not None:
                    optimizer.state[new] = {key: self._pad_state(v, p, new) for key, v in state.items()}

    @staticmethod
    def _pad_state(v: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
        if isinstance(v, torch.Tensor) and v.shape == old.shape and v.dim() > 0:
            out = v.new_zeros(new.shape)
            out[: v.shape[0]] = v
            return out
        return v

    # -- freezing ------------------------------------------------------------------------------

    def _expert_indices(self, indices) -> list[int]:
        idx = [indices] if isinstance(indices, int) else list(indices)
        for i in idx:
            if not isinstance(i, int) or not -self.num_experts <= i < self.num_experts:
                raise IndexError(f"expert index {i!r} out of range for {self.num_experts} experts")
        return [i % self.num_experts for i in idx]

    def _refresh_frozen(self) -> None:
        ids = self.frozen_mask.nonzero().squeeze(1).tolist()
        self._frozen_idx = torch.tensor(ids, dtype=torch.long, device=self.w1.device) if ids else None
        if self._frozen_idx is not None or self.gate_frozen:
            _LAYERS_WITH_FROZEN.add(self)
        else:
            _LAYERS_WITH_FROZEN.discard(self)

    def _frozen_values(self, held: set[int]) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """(param, rows or None for all, saved values) for the step hooks, for params in ``held``."""
        out = []
        if self._frozen_idx is not None:
            for p in (self.w1, self.b1, self.w2, self.b2):
                if p is not None and id(p) in held:
                    out.append((p, self._frozen_idx, p.detach().index_select(0, self._frozen_idx)))
        if self.gate_frozen:
            out += [(p, None, p.detach().clone()) for p in self.gate.parameters() if id(p) in held]
        return out

    def freeze_experts(self, indices) -> None:
        """Freeze experts: exactly zero gradient rows, and optimizer steps leave their rows unchanged."""
        self.frozen_mask[self._expert_indices(indices)] = True
        self._refresh_frozen()

    def unfreeze_experts(self, indices) -> None:
        self.frozen_mask[self._expert_indices(indices)] = False
        self._refresh_frozen()

    def freeze_gate(self) -> None:
        """Gate parameters stop receiving gradient (``requires_grad=False``) and are kept by steps."""
        for p in self.gate.parameters():
            p.requires_grad_(False)
            p.grad = None
        self._refresh_frozen()

    def unfreeze_gate(self) -> None:
        for p in self.gate.parameters():
            p.requires_grad_(True)
        self._refresh_frozen()

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
        for owner, name in ((self, "w1"), (self, "b1"), (self, "w2"), (self, "b2"), (self.gate, "weight"),
                            (self.gate, "bias")):  # fmt: skip
            if getattr(owner, name) is not None:
                self._replace(owner, name, getattr(owner, name).detach()[:E].clone())
        self.gate.out_features = E
        self.frozen_mask = self.frozen_mask[:E].clone()
        self.tokens_per_expert = self.tokens_per_expert[:E].clone()
        self.top_k = min(self.top_k, E)
        self._refresh_frozen()

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
