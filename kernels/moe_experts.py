"""The routed experts as one ``torch.autograd.Function`` over the Triton grouped kernels.

Forward: ``Z, H = act(x[tok] @ w1[e]ᵀ + b1[e])`` (gather fused), then ``p · (H @ w2[e]ᵀ + b2[e])``
scattered to (token, slot) rows and summed over slots. Backward: one grouped GEMM gives dH and, from
the same tile, the gate-weight gradient ``dp = dY·(H w2ᵀ + b2)``; a second gives dX; the weight
gradients are per-expert reductions that skip frozen experts. The gate itself stays in autograd.
"""

from __future__ import annotations

import torch

from .moe_grouped import BWD_H, BWD_X, FWD1, FWD2, grouped_rows
from .moe_wgrad import grouped_wgrad


class TritonExperts(torch.autograd.Function):
    """``out[n] = Σ_j topk_p[n, j] · expert_{e(n, j)}(x[n])``.

    Args (forward): x ``[N, d]``; w1 ``[E, h, d]``; b1 ``[E, h]`` or None; w2 ``[E, d, h]``; b2
    ``[E, d]`` or None; topk_p ``[N, k]`` gate weights; order ``[N·k]`` (token, slot) ids sorted
    stably by expert; offs int32 ``[E+1]``; frozen bool ``[E]``; activation name.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, topk_p, order, offs, frozen, activation):
        N, k = topk_p.shape
        M = N * k
        tok = (order // k).to(torch.int32)
        order32 = order.to(torch.int32)
        p_sorted = topk_p.reshape(-1)[order].contiguous()
        z, h = grouped_rows(
            FWD1, x, w1, offs, n_rows=M, b_transposed=True, a_idx=tok, bias=b1, activation=activation
        )
        y = grouped_rows(
            FWD2, h, w2, offs, n_rows=M, b_transposed=True, bias=b2, p=p_sorted, out_row=order32, out_rows=M
        )
        ctx.save_for_backward(x, w1, w2, b2, z, h, p_sorted, order, tok, order32, offs, frozen)
        ctx.activation = activation
        ctx.shape = (N, k)
        return y.view(N, k, -1).sum(1)

    @staticmethod
    def backward(ctx, dout):
        x, w1, w2, b2, z, h, p_sorted, order, tok, order32, offs, frozen = ctx.saved_tensors
        N, k = ctx.shape
        M = N * k
        dout = dout.contiguous()
        need_x, need_w1, need_b1, need_w2, need_b2, need_p = ctx.needs_input_grad[:6]
        dx = dw1 = db1 = dw2 = db2 = dp_tok = None

        dz, dp = grouped_rows(
            BWD_H, dout, w2, offs, n_rows=M, b_transposed=False, a_idx=tok, p=p_sorted, z=z, h=h,
            activation=ctx.activation,
        )  # fmt: skip
        if need_p:
            if b2 is not None:  # the b2 part of dY·(H w2ᵀ + b2): an [N, E] product, then a gather
                expert = torch.searchsorted(offs[1:].long(), torch.arange(M, device=x.device), right=True)
                dp = dp + (dout.float() @ b2.float().T)[tok.long(), expert]
            dp_tok = torch.empty_like(dp).index_copy_(0, order, dp).view(N, k).to(p_sorted.dtype)
        if need_x:
            dxk = grouped_rows(BWD_X, dz, w1, offs, n_rows=M, b_transposed=False, out_row=order32, out_rows=M)
            dx = dxk.view(N, k, -1).sum(1)
        if need_w2 or need_b2:
            dw2, db2 = grouped_wgrad(dout, h, offs, frozen, a_idx=tok, scale=p_sorted, with_bias=need_b2)
        if need_w1 or need_b1:
            dw1, db1 = grouped_wgrad(dz, x, offs, frozen, b_idx=tok, with_bias=need_b1)
        return dx, dw1, db1, dw2, db2, dp_tok, None, None, None, None
