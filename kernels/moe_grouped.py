"""Grouped expert GEMM over routed rows, with the gather fused into the A loads and the MoE epilogues.

Routed rows are (token, slot) pairs sorted stably by expert; ``offs[e]:offs[e+1]`` is expert e's
segment. One kernel computes ``C[r] = A[a_row(r)] @ B[e(r)]`` for every routed row r, where
``B[e]`` is ``[K, N]`` seen through strides (so ``w[e].T`` costs nothing). Modes pick the epilogue:

- ``FWD1``: A = x gathered by token; ``Z = C + b1[e]`` and ``H = act(Z)`` stored in sorted order.
- ``FWD2``: A = H; ``(C + b2[e]) * p[r]`` stored scattered to row ``out_row[r]`` ((token, slot)
  order), so summing over slots gives the layer output without atomics.
- ``BWD_H``: A = dY gathered by token, B = w2[e]; ``dp[r] += sum(C * H[r])`` (gate gradient) and
  ``dZ = p[r] * C * act'(Z)``.
- ``BWD_X``: A = dZ, B = w1[e]; stored scattered to ``out_row[r]``.

The number of experts E is a runtime argument (never ``tl.constexpr``, never specialised): each
program finds its expert by scanning the E segment sizes, so growing the layer reuses the compiled
kernel. The grid is an upper bound on the tile count (``cdiv(M, BLOCK_M) + E``) known on the host
without reading device memory; surplus programs exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tuning import Tiles, dot_precision

FWD1, FWD2, BWD_H, BWD_X = 0, 1, 2, 3
ACTIVATIONS = {"gelu": 0, "relu": 1, "silu": 2}


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), bounded lists (no long first-call autotuning). 128x128 tiles
# reach tensor-core peak at LLM size, 64-row tiles waste less padding when an expert gets few tokens; the
# FMA path (IEEE fp32) holds its operands in registers and takes small tiles. BWD_H's epilogue holds the H
# and Z tiles next to the accumulator, where 128x128 tiles spill.
TILES = Tiles(
    names=("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    tensor_core=((128, 128, 64, 8, 3), (64, 128, 64, 8, 4), (128, 64, 64, 8, 4), (64, 64, 64, 4, 3)),
    ieee=((64, 64, 16, 8, 3), (64, 64, 16, 4, 3), (32, 64, 16, 4, 3)),
    interpret=(32, 32, 32),  # the interpreter is slow per program: one config, big-ish tiles
    skip={("MODE", BWD_H): ((128, 128, 64, 8, 3),)},
)


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 1:
        return tl.maximum(z, 0.0)
    else:
        return z * tl.sigmoid(z)


@triton.jit
def act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 1:
        return tl.where(z > 0.0, 1.0, 0.0)
    else:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))


@triton.jit
def find_tile(offs_ptr, E, pid_m, BLOCK_M: tl.constexpr):
    """Map program ``pid_m`` to (expert, first row, segment end); expert -1 when out of range."""
    expert = tl.zeros([], tl.int32) - 1
    row0 = tl.zeros([], tl.int32)
    row_end = tl.zeros([], tl.int32)
    tiles_before = tl.zeros([], tl.int32)
    lo = tl.load(offs_ptr)
    for e in range(0, E):
        hi = tl.load(offs_ptr + e + 1)
        n_tiles = tl.cdiv(hi - lo, BLOCK_M)
        hit = (pid_m >= tiles_before) & (pid_m < tiles_before + n_tiles)
        expert = tl.where(hit, e, expert)
        row0 = tl.where(hit, lo + (pid_m - tiles_before) * BLOCK_M, row0)
        row_end = tl.where(hit, hi, row_end)
        tiles_before += n_tiles
        lo = hi
    return expert, row0, row_end


@triton.autotune(
    configs=TILES.configs(),
    key=["K", "N", "MODE", "PREC"],
    prune_configs_by={"early_config_prune": TILES.prune},
    reset_to_zero=["dp_ptr"],
)
@triton.jit(do_not_specialize=["E", "M"])
def _grouped_rows_kernel(
    a_ptr, a_idx_ptr, b_ptr, bias_ptr, p_ptr, out_row_ptr, out_ptr, out2_ptr, z_ptr, h_ptr, dp_ptr,
    offs_ptr, E, M, K, N,
    stride_am, stride_be, stride_bk, stride_bn,
    MODE: tl.constexpr, ACT: tl.constexpr, GATHER_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, row0, row_end = find_tile(offs_ptr, E, pid_m, BLOCK_M)
    if expert < 0:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    if GATHER_A:  # fused gather: token rows are read in place, never copied to a sorted buffer
        a_rows = tl.load(a_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_base = a_ptr + a_rows[:, None] * stride_am
    b_base = b_ptr + expert.to(tl.int64) * stride_be + cols[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + ks) < K
        a = tl.load(a_base + (k0 + ks)[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_base + (k0 + ks)[:, None] * stride_bk, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)

    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * N + cols, mask=cmask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if MODE == 0:  # FWD1: keep Z for backward, H for the second projection
        tl.store(out_ptr + rows64[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
        h = act_fwd(acc, ACT)
        tl.store(out2_ptr + rows64[:, None] * N + cols[None, :], h.to(out2_ptr.dtype.element_ty), mask=mask)
    elif MODE == 1:  # FWD2: gate weighting + scatter to (token, slot) order
        p = tl.load(p_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        acc = acc * p[:, None]
        dst = tl.load(out_row_ptr + rows, mask=rmask, other=0).to(tl.int64)
        tl.store(out_ptr + dst[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif MODE == 2:  # BWD_H: acc = dY @ w2[e] (unweighted dH)
        offs2 = rows64[:, None] * N + cols[None, :]
        h = tl.load(h_ptr + offs2, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs2, mask=mask, other=0.0).to(tl.float32)
        # d out / d p[r] = dY . (H w2^T + b2): the H part is this tile's row sum; b2 part added outside
        tl.atomic_add(dp_ptr + rows64, tl.sum(acc * h, axis=1), mask=rmask)
        p = tl.load(p_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        dz = acc * p[:, None] * act_grad(z, ACT)
        tl.store(out_ptr + offs2, dz.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # BWD_X: dX per (token, slot), scattered
        dst = tl.load(out_row_ptr + rows, mask=rmask, other=0).to(tl.int64)
        tl.store(out_ptr + dst[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def grouped_rows(
    mode: int,
    a: torch.Tensor,
    b: torch.Tensor,
    offs: torch.Tensor,
    *,
    n_rows: int,
    b_transposed: bool,
    a_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    p: torch.Tensor | None = None,
    out_row: torch.Tensor | None = None,
    out_rows: int | None = None,
    z: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    activation: str = "gelu",
):
    """Launch one grouped GEMM over ``n_rows`` routed rows (see module docstring for the modes).

    a: ``[*, K]`` (row r reads ``a[a_idx[r]]`` when ``a_idx`` is given); b: ``[E, N, K]`` when
    ``b_transposed`` (an nn weight, computing ``a @ b[e].T``) else ``[E, K, N]``; offs: int32 ``[E+1]``.
    Returns ``(Z, H)`` for FWD1, the scattered ``[out_rows, N]`` for FWD2/BWD_X, ``(dZ, dp)`` for BWD_H.
    """
    E = b.shape[0]
    if b_transposed:
        N, K = b.shape[1], b.shape[2]
        s_be, s_bk, s_bn = b.stride(0), b.stride(2), b.stride(1)
    else:
        K, N = b.shape[1], b.shape[2]
        s_be, s_bk, s_bn = b.stride(0), b.stride(1), b.stride(2)
    assert a.shape[-1] == K and a.stride(-1) == 1, "a must be row-major with K columns"
    dev, dt = a.device, a.dtype
    dummy = offs  # never read: the constexpr flags disable the corresponding loads
    out2 = dp = None
    if mode == FWD1:
        out = torch.empty(n_rows, N, device=dev, dtype=dt)
        out2 = torch.empty(n_rows, N, device=dev, dtype=dt)
    elif mode == BWD_H:
        out = torch.empty(n_rows, N, device=dev, dtype=dt)
        dp = torch.zeros(n_rows, device=dev, dtype=torch.float32)
    else:
        out = torch.empty(out_rows, N, device=dev, dtype=dt)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]) + E, triton.cdiv(N, meta["BLOCK_N"]))
    if n_rows > 0:
        _grouped_rows_kernel[grid](
            a, a_idx if a_idx is not None else dummy, b, bias if bias is not None else dummy,
            p if p is not None else dummy, out_row if out_row is not None else dummy,
            out, out2 if out2 is not None else dummy, z if z is not None else dummy,
            h if h is not None else dummy, dp if dp is not None else dummy,
            offs, E, n_rows, K, N, a.stride(0), s_be, s_bk, s_bn,
            MODE=mode, ACT=ACTIVATIONS[activation], GATHER_A=a_idx is not None, HAS_BIAS=bias is not None,
            PREC=dot_precision(dt),
        )  # fmt: skip
    if mode == FWD1:
        return out, out2
    if mode == BWD_H:
        return out, dp
    return out


def grouped_rows_reference(a, b, offs, *, b_transposed, a_idx=None, bias=None):
    """Plain-PyTorch ``C[r] = a[a_idx[r]] @ B[e(r)] (+ bias[e(r)])``, the oracle of the main loop."""
    rows = a[a_idx] if a_idx is not None else a
    out = []
    bounds = offs.tolist()
    for e in range(b.shape[0]):
        w = b[e].T if b_transposed else b[e]
        seg = rows[bounds[e] : bounds[e + 1]].float() @ w.float()
        if bias is not None:
            seg = seg + bias[e].float()
        out.append(seg)
    return torch.cat(out).to(a.dtype)
