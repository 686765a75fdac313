"""The routed experts in plain PyTorch: :class:`SegmentExperts` (one autograd.Function, the reference
twin of the Triton kernels), :func:`experts_torch` (picks a formulation) and the naive
:func:`experts_loop_reference` oracle.

Expert e is ``act(x @ w1[e]ᵀ + b1[e]) @ w2[e]ᵀ + b2[e]``; rows are (token, slot) pairs sorted by
expert, so expert e owns the segment ``offs[e]:offs[e+1]``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
Impl = Literal["auto", "segments", "segments_loop", "grouped_mm", "dense", "autograd"]
IMPLS = ("auto", "segments", "segments_loop", "grouped_mm", "dense", "autograd")
# Rows per segment are padded to a multiple of this for bf16/fp16 F.grouped_mm on CPU. There each segment
# is a oneDNN matmul whose kernel is generated for its exact shape and cached (1,024 shapes by default);
# segment sizes follow the routing, so nearly every step brought new ones, and MT25 training spent a large
# share of its steps creating kernels (commit 460c62b, bench/mt25_speed3). Padded, a segment has at most
# N/64 + 1 sizes.
SEGMENT_QUANTUM = 64


def _act_backward(activation: str, grad: torch.Tensor, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    # the kernels autograd itself uses for F.gelu / F.silu / F.relu, so results match autograd's
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, z)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    return torch.ops.aten.threshold_backward(grad, h, 0)


def grouped_mm_ok(x: torch.Tensor, d_model: int, d_hidden: int) -> bool:
    """Whether ``F.grouped_mm`` runs here: CPU (CUDA is Triton's), no float64, 16-byte aligned strides."""
    align = 16 // x.element_size()
    return (
        hasattr(F, "grouped_mm")
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and d_model % align == 0
        and d_hidden % align == 0
    )


class _Engine:
    """The per-expert GEMMs of one routed batch: ``F.grouped_mm`` over all segments, or a Python loop
    of one ``torch.mm`` per non-empty segment (float64, unaligned sizes, CUDA).

    ``quantum > 1`` (``F.grouped_mm`` only) lays the rows out with each segment padded to a multiple of
    ``quantum`` rows: :meth:`spread` puts a per-row tensor there (padding rows get ``fill``), :meth:`gather`
    takes the real rows back, :attr:`expert` is the padded rows' experts. Callers give padding rows weight
    0, so they add nothing to outputs and gradients (see :data:`SEGMENT_QUANTUM` for why).
    """

    def __init__(self, offs: torch.Tensor, grouped: bool, expert: torch.Tensor, quantum: int = 1) -> None:
        self.grouped, self.expert, self.pos = grouped, expert, None
        self.ends = offs[1:].to(torch.int32)
        if grouped:
            self.segs = None
            if quantum > 1:
                counts = torch.diff(offs.long())
                padded = (counts + quantum - 1) // quantum * quantum
                shift = torch.cumsum(padded, 0) - padded - offs[:-1].long()  # padded start - start
                dev = offs.device
                self.pos = torch.arange(expert.numel(), device=dev) + shift.index_select(0, expert)
                self.ends = torch.cumsum(padded, 0).to(torch.int32)
                self.expert = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), padded)
        else:
            b = offs.tolist()
            self.segs = [(e, b[e], b[e + 1]) for e in range(len(b) - 1) if b[e + 1] > b[e]]

    def spread(self, t: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """A per-row tensor ``[M, …]`` in the padded row layout (itself without padding)."""
        if self.pos is None:
            return t
        out = t.new_full((self.expert.numel(), *t.shape[1:]), fill)
        return out.index_copy_(0, self.pos, t)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The real rows of a tensor in the padded row layout (the inverse of :meth:`spread`)."""
        return t if self.pos is None else t.index_select(0, self.pos)

    def linear(self, a, w, bias):
        """``a_e @ w[e]ᵀ + bias[e]`` per segment: ``[M, p] × [E, q, p] → [M, q]``."""
        if self.grouped:
            y = F.grouped_mm(a, w.transpose(1, 2), offs=self.ends)
            return y if bias is None else y.add_(bias.index_select(0, self.expert))
        parts = [
            torch.mm(a[lo:hi], w[e].T) if bias is None else torch.addmm(bias[e], a[lo:hi], w[e].T)
            for e, lo, hi in self.segs
        ]
        return torch.cat(parts) if parts else a.new_empty(0, w.shape[1])

    def times(self, a, w):
        """``a_e @ w[e]`` per segment (no transpose): ``[M, p] × [E, p, q] → [M, q]``."""
        if self.grouped:
            return F.grouped_mm(a, w, offs=self.ends)
        parts = [torch.mm(a[lo:hi], w[e]) for e, lo, hi in self.segs]
        return torch.cat(parts) if parts else a.new_empty(0, w.shape[2])

    def wgrad(self, a, b):
        """``a_eᵀ @ b_e`` per expert into one ``[E, p, q]`` buffer; zero for experts without rows."""
        if self.grouped:
            return F.grouped_mm(a.T, b, offs=self.ends)
        E = self.ends.shape[0]
        out = a.new_empty(E, a.shape[1], b.shape[1])
        for e, lo, hi in self.segs:
            torch.mm(a[lo:hi].T, b[lo:hi], out=out[e])
        idle = sorted(set(range(E)) - {e for e, _, _ in self.segs})
        if idle:
            out.index_fill_(0, torch.tensor(idle, device=out.device), 0)
        return out

    def trained(self, frozen: torch.Tensor) -> tuple[torch.Tensor, _Engine]:
        """The rows of experts that are not ``frozen`` (bool ``[E]``) and the engine of those rows alone
        (frozen experts' segments empty: their weight gradients are zeros, not computed)."""
        rows = (~frozen).index_select(0, self.expert).nonzero().squeeze(1)
        counts = torch.diff(self.ends.long(), prepend=self.ends.new_zeros(1).long()).masked_fill(frozen, 0)
        offs = F.pad(torch.cumsum(counts, 0), (1, 0))
        return rows, _Engine(offs, self.grouped, self.expert.index_select(0, rows))


def _bias_grad(g, expert, E, frozen):
    db = g.new_zeros(E, g.shape[1]).index_add_(0, expert, g)
    return db if frozen is None else db.masked_fill_(frozen[:, None], 0)


class SegmentExperts(torch.autograd.Function):
    """``out[n] = Σ_j topk_p[n, j] · expert_{e(n, j)}(x[n])`` on expert-sorted rows.

    The plain-PyTorch twin of the Triton backend: forward and backward run one GEMM per expert
    segment (``F.grouped_mm`` over all of them with ``grouped=True``, else a loop over the
    non-empty ones). Each weight gradient is one ``[E, …]`` tensor written once: rows of experts
    without routed rows are zero and frozen experts' rows are exactly zero (their products are not
    computed). Gradients flow to x, the weights, the biases and ``topk_p`` (so the gate trains);
    not twice differentiable.

    Args (forward): x ``[N, d]``; w1 ``[E, h, d]``; b1 ``[E, h]`` or None; w2 ``[E, d, h]``; b2
    ``[E, d]`` or None; topk_p ``[N, k]``; order ``[N·k]`` (token, slot) ids sorted stably by expert;
    offs ``[E+1]`` segment offsets; expert ``[N·k]`` the expert of each sorted row; frozen bool ``[E]``
    or None; activation name; grouped: use ``F.grouped_mm`` (only where :func:`grouped_mm_ok`); quantum:
    with ``grouped``, pad each segment to a multiple of this many rows (:data:`SEGMENT_QUANTUM`).
    """

    @staticmethod
    def forward(
        ctx, x, w1, b1, w2, b2, topk_p, order, offs, expert, frozen, activation, grouped=False, quantum=1
    ):
        k = topk_p.shape[1]
        if frozen is not None and not bool(frozen.any()):
            frozen = None
        eng = _Engine(offs, grouped, expert, quantum)
        # rows in the engine's layout; a padding row reads token 0 with weight 0 (it adds nothing)
        tok = eng.spread(order // k)
        p = eng.spread(topk_p.reshape(-1).index_select(0, order))
        expert = eng.expert
        xs = x.index_select(0, tok)
        z = eng.linear(xs, w1, b1)
        h = ACTIVATIONS[activation](z)
        ys = eng.linear(h, w2, b2)
        out = torch.zeros_like(x).index_add_(0, tok, ys * p[:, None])
        ctx.save_for_backward(x, w1, w2, z, h, ys, p, tok, order, expert, frozen)
        ctx.eng, ctx.activation, ctx.shape = eng, activation, topk_p.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, w1, w2, z, h, ys, p, tok, order, expert, frozen = ctx.saved_tensors
        eng = ctx.eng
        E = w1.shape[0]
        need_x, need_w1, need_b1, need_w2, need_b2, need_p = ctx.needs_input_grad[:6]
        dx = dw1 = db1 = dw2 = db2 = dp_tok = None
        dout_tok = dout.index_select(0, tok)  # [M, d]
        if need_p:
            dp = eng.gather((dout_tok * ys).sum(-1))
            dp_tok = torch.zeros_like(dp).index_copy_(0, order, dp).view(ctx.shape)
        dys = dout_tok.mul_(p[:, None])  # gradient of the unweighted expert outputs
        # weight gradients come from the rows of experts that train (`learn` of them, on engine `weng`)
        weng, learn = eng, None
        if frozen is not None:
            learn, weng = eng.trained(frozen)
            if not need_x:  # a frozen expert's rows serve dx alone: drop them before any GEMM
                dys, z, h, tok, expert = (t.index_select(0, learn) for t in (dys, z, h, tok, expert))
                eng, learn = weng, None

        def learning(t):
            return t if learn is None else t.index_select(0, learn)

        if need_w2:
            dw2 = weng.wgrad(learning(dys), learning(h))
        if need_b2:
            db2 = _bias_grad(dys, expert, E, frozen)
        dz = _act_backward(ctx.activation, eng.times(dys, w2), z, h)
        del dys
        if need_w1:
            dw1 = weng.wgrad(learning(dz), x.index_select(0, learning(tok)))
        if need_b1:
            db1 = _bias_grad(dz, expert, E, frozen)
        if need_x:
            dx = torch.zeros_like(x).index_add_(0, tok, eng.times(dz, w1))
        return dx, dw1, db1, dw2, db2, dp_tok, None, None, None, None, None, None, None


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


@torch.compiler.disable  # eager kernels (a host sync for the loop): a graph break under torch.compile
def _segment_experts(x, w1, b1, w2, b2, r, activation, frozen, grouped):
    expert = r.topk_e.reshape(-1).index_select(0, r.order)
    quantum = SEGMENT_QUANTUM if grouped and x.dtype in (torch.bfloat16, torch.float16) else 1
    args = (r.topk_p, r.order, r.offs, expert, frozen, activation, grouped, quantum)
    return SegmentExperts.apply(x, w1, b1, w2, b2, *args)


def experts_torch(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    r,
    activation: str,
    impl: Impl = "auto",
    frozen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts in plain PyTorch on expert-sorted rows. x ``[N, d]`` → ``[N, d]``.

    r: the :class:`~cpd_fast.moe.router.Routing` of x. frozen: optional bool ``[E]``; those experts'
    weight and bias gradient rows are exactly zero. ``impl``:

    * ``segments``: :class:`SegmentExperts`, one autograd.Function whose backward writes each weight
      gradient once into an ``[E, …]`` tensor (cost linear in E). Its GEMMs use ``F.grouped_mm``
      where :func:`grouped_mm_ok` (faster on CPU: ``bench/bench_moe.py --growth``), else
      ``segments_loop``: the same Function with one ``torch.mm`` per non-empty segment.
    * ``grouped_mm``: ``F.grouped_mm`` on the sorted rows under plain autograd (no host sync, so
      torch.compile keeps one graph; bf16 only under compile).
    * ``dense``: every expert on every token, weighted by its gate weight (zero off the top-k) under
      plain autograd: E/k times the arithmetic, but no host sync and no data-dependent shape, so
      torch.compile traces it in one graph in any dtype.
    * ``autograd``: per-segment GEMMs under plain autograd (the former formulation: every slice
      ``w1[e]`` gets a full-size zero gradient, so backward is quadratic in E). Baseline only.
    * ``auto``: under torch.compile grouped_mm for bf16 where it applies, else dense (``segments``
      syncs with the host, a graph break that ``fullgraph=True`` refuses); segments in eager mode.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    d = x.shape[1]
    gmm_ok = grouped_mm_ok(x, d, w1.shape[1])
    if impl == "auto":
        if torch.compiler.is_compiling():
            impl = "grouped_mm" if x.dtype == torch.bfloat16 and gmm_ok else "dense"
        else:
            impl = "segments"
    if impl in ("segments", "segments_loop"):
        grouped = impl == "segments" and gmm_ok and x.shape[0] > 0
        return _segment_experts(x, w1, b1, w2, b2, r, activation, frozen, grouped)
    if frozen is not None:
        w1, w2 = _ZeroFrozenRows.apply(w1, frozen), _ZeroFrozenRows.apply(w2, frozen)
        if b1 is not None:
            b1 = _ZeroFrozenRows.apply(b1, frozen)
        if b2 is not None:
            b2 = _ZeroFrozenRows.apply(b2, frozen)
    act = ACTIVATIONS[activation]
    if impl == "dense":
        return _dense_experts(x, w1, b1, w2, b2, r, act)
    k = r.topk_e.shape[1]
    tok = r.order // k
    xs = x.index_select(0, tok)  # index_select: its backward (index_add) is faster than x[tok]'s
    p = r.topk_p.reshape(-1)[r.order]
    if impl == "grouped_mm":
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


def _dense_experts(x, w1, b1, w2, b2, r, act) -> torch.Tensor:
    """``impl="dense"`` of :func:`experts_torch`: ``[E, N, ·]`` expert outputs mixed by the ``[N, E]`` gate
    weights (an expert off a token's top-k weighs zero, so it adds nothing to outputs or gradients)."""
    gates = torch.zeros(x.shape[0], w1.shape[0], dtype=x.dtype, device=x.device)
    gates = gates.scatter_add(1, r.topk_e, r.topk_p.to(x.dtype))
    z = torch.einsum("nd,ehd->enh", x, w1)
    if b1 is not None:
        z = z + b1[:, None]
    y = torch.einsum("enh,edh->end", act(z), w2)
    if b2 is not None:
        y = y + b2[:, None]
    return torch.einsum("end,ne->nd", y, gates)


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
