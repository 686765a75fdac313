"""Per-expert weight gradients of the grouped expert GEMMs: ``dW[e] = A_eᵀ B_e`` and ``db[e] = Σ A_e``.

``A_e`` / ``B_e`` are the rows of expert e's segment (``offs[e]:offs[e+1]`` of the expert-sorted
routed rows), optionally gathered from token order and, for A, scaled per row by the gate weight:

- ``dW2[e] = (p · dY[tok])ᵀ H`` and ``db2[e] = Σ p · dY[tok]`` (A gathered and scaled, B = H)
- ``dW1[e] = dZᵀ x[tok]`` and ``db1[e] = Σ dZ`` (A = dZ, B gathered)

Grid ``(E, tiles)``: E is the grid size, not a compile-time constant. Frozen experts store zeros and
skip the reduction entirely; experts without tokens store zeros because their loop is empty.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tuning import Tiles, dot_precision

# (BLOCK_P, BLOCK_Q, BLOCK_R, warps, stages): the tensor-core paths' tiles and the FMA path's (IEEE fp32)
# smaller ones, which keep the transposed A slice and the accumulator in registers.
TILES = Tiles(
    names=("BLOCK_P", "BLOCK_Q", "BLOCK_R"),
    tensor_core=((128, 128, 64, 8, 3), (64, 128, 64, 8, 4), (128, 64, 32, 8, 4), (64, 64, 64, 4, 3)),
    ieee=((64, 64, 16, 4, 3), (32, 64, 32, 4, 3), (32, 32, 32, 4, 3)),
    interpret=(32, 32, 32),
)


@triton.autotune(
    configs=TILES.configs(), key=["P", "Q", "PREC"], prune_configs_by={"early_config_prune": TILES.prune}
)
@triton.jit(do_not_specialize=["E"])
def _wgrad_kernel(
    a_ptr, a_idx_ptr, scale_ptr, b_ptr, b_idx_ptr, frozen_ptr, offs_ptr, dw_ptr, db_ptr,
    E, P, Q, stride_a, stride_b,
    GATHER_A: tl.constexpr, SCALE_A: tl.constexpr, GATHER_B: tl.constexpr, HAS_BIAS: tl.constexpr,
    PREC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0)
    pid = tl.program_id(1)
    n_q = tl.cdiv(Q, BLOCK_Q)
    pid_p = pid // n_q
    pid_q = pid % n_q
    ps = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    pmask = ps < P
    qmask = qs < Q
    e64 = e.to(tl.int64)
    dw_tile = dw_ptr + e64 * P * Q + ps[:, None] * Q + qs[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_P], dtype=tl.float32)
    frozen = tl.load(frozen_ptr + e)
    if frozen == 0:
        lo = tl.load(offs_ptr + e)
        hi = tl.load(offs_ptr + e + 1)
        rs = tl.arange(0, BLOCK_R)
        for r0 in range(lo, hi, BLOCK_R):
            rows = r0 + rs
            rmask = rows < hi
            if GATHER_A:
                a_rows = tl.load(a_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
            else:
                a_rows = rows.to(tl.int64)
            if GATHER_B:
                b_rows = tl.load(b_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
            else:
                b_rows = rows.to(tl.int64)
            a = tl.load(
                a_ptr + a_rows[:, None] * stride_a + ps[None, :],
                mask=rmask[:, None] & pmask[None, :],
                other=0.0,
            )
            if SCALE_A:
                s = tl.load(scale_ptr + rows, mask=rmask, other=0.0)
                a = (a.to(tl.float32) * s.to(tl.float32)[:, None]).to(a_ptr.dtype.element_ty)
            b = tl.load(
                b_ptr + b_rows[:, None] * stride_b + qs[None, :],
                mask=rmask[:, None] & qmask[None, :],
                other=0.0,
            )
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC)
            if HAS_BIAS:
                acc_b += tl.sum(a.to(tl.float32), axis=0)
    tl.store(dw_tile, acc.to(dw_ptr.dtype.element_ty), mask=pmask[:, None] & qmask[None, :])
    if HAS_BIAS:
        if pid_q == 0:
            tl.store(db_ptr + e64 * P + ps, acc_b.to(db_ptr.dtype.element_ty), mask=pmask)


def grouped_wgrad(
    a: torch.Tensor,
    b: torch.Tensor,
    offs: torch.Tensor,
    frozen: torch.Tensor,
    *,
    a_idx: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    b_idx: torch.Tensor | None = None,
    with_bias: bool = True,
    out_dtype: torch.dtype | None = None,
):
    """``dW[e] = Σ_{r in e} (s_r a[ia(r)])ᵀ b[ib(r)]`` → ``[E, P, Q]`` and ``db[e]`` → ``[E, P]``.

    a: ``[*, P]``, b: ``[*, Q]`` row-major; offs: int32 ``[E+1]``; frozen: ``[E]`` bool (those
    experts get zeros without computing).
    """
    E = offs.shape[0] - 1
    P, Q = a.shape[1], b.shape[1]
    out_dtype = out_dtype or a.dtype
    dw = torch.empty(E, P, Q, device=a.device, dtype=out_dtype)
    db = torch.empty(E, P, device=a.device, dtype=out_dtype) if with_bias else None
    if E == 0:
        return dw, db
    frozen_u8 = frozen.to(torch.uint8)
    grid = lambda meta: (E, triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(Q, meta["BLOCK_Q"]))
    _wgrad_kernel[grid](
        a, a_idx if a_idx is not None else offs, scale if scale is not None else offs,
        b, b_idx if b_idx is not None else offs, frozen_u8, offs, dw, db if db is not None else dw,
        E, P, Q, a.stride(0), b.stride(0),
        GATHER_A=a_idx is not None, SCALE_A=scale is not None, GATHER_B=b_idx is not None,
        HAS_BIAS=with_bias, PREC=dot_precision(a.dtype),
    )  # fmt: skip
    return dw, db


def grouped_wgrad_reference(a, b, offs, frozen, *, a_idx=None, scale=None, b_idx=None):
    """Plain-PyTorch version of :func:`grouped_wgrad` (float32 result)."""
    A = (a[a_idx] if a_idx is not None else a).float()
    if scale is not None:
        A = A * scale.float()[:, None]
    B = (b[b_idx] if b_idx is not None else b).float()
    bounds = offs.tolist()
    dw = torch.stack(
        [A[bounds[e] : bounds[e + 1]].T @ B[bounds[e] : bounds[e + 1]] for e in range(len(bounds) - 1)]
    )
    db = torch.stack([A[bounds[e] : bounds[e + 1]].sum(0) for e in range(len(bounds) - 1)])
    keep = (~frozen.bool()).float()
    return dw * keep[:, None, None], db * keep[:, None]
