"""Greedy MAP selection for determinantal point processes: the diverse replay-set selector.

Given items with features x_i and a PSD similarity kernel L, greedy MAP adds, one at a time, the
item that most increases log det(L_S) (Chen, Zhang & Zhou, NeurIPS 2018: incremental Cholesky,
O(N k) memory, O(N k^2) time). The N x N kernel is never built: each pick computes one row.

Compiled implementations live in csrc/ (CPU: dpp_cpu.cpp, CUDA: dpp_cuda.cu) and are reached
through ``torch.ops.cpd_fast``; :func:`greedy_map_reference` is the plain-PyTorch version of the
same algorithm, used as the test oracle and as a readable specification.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from cpd_fast import _ext

Kernel = Literal["linear", "cosine", "rbf"]
Method = Literal["auto", "greedy", "lazy"]

KERNELS = ("linear", "cosine", "rbf")
METHODS = ("auto", "greedy", "lazy")
_OP_KERNEL = {"linear": 0, "rbf": 1, "cosine": 2}  # cosine: linear on normalised rows, unit diagonal

# Gains below this many unit roundoffs of the largest diagonal entry are rounding noise, not
# diversity: without the floor a rank-D kernel in float32 keeps "selecting" noise after D picks.
_NOISE_ULPS = 64


# ----------------------------------------------------------------------------- public API


def greedy_map(
    features: torch.Tensor | np.ndarray,
    k: int,
    *,
    kernel: Kernel = "linear",
    gamma: float | None = None,
    quality: torch.Tensor | np.ndarray | None = None,
    eps: float = 1e-10,
    method: Method = "auto",
    return_gains: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pick up to ``k`` diverse rows of ``features`` by greedy DPP MAP.

    Args:
        features: ``[N, D]`` float32/float64, CPU or CUDA (a numpy array is accepted).
        k: number of items wanted, ``1 <= k <= N``.
        kernel: ``"linear"`` (L = X Xᵀ), ``"cosine"`` (rows L2-normalised first) or ``"rbf"``
            (L_ij = exp(-gamma ‖x_i - x_j‖²)). Linear/cosine kernels have rank <= D, so at most
            D items are returned; use ``"rbf"`` for a full-rank kernel.
        gamma: rbf bandwidth, default ``1 / D``.
        quality: optional ``[N]`` positive per-item weights q (quality-diversity DPP,
            L_ij = q_i q_j K_ij): favours high-quality items while keeping the set diverse.
        eps: stop when the best marginal gain d² falls below ``max(eps, noise floor)``, where the
            noise floor is 64 unit roundoffs of the dtype times the largest diagonal entry of L.
        method: ``"greedy"`` (parallel plain greedy), ``"lazy"`` (lazy greedy with a priority
            queue of stale bounds, CPU only; the same picks up to rounding-level ties) or
            ``"auto"`` (on CPU: lazy once the N x k factor exceeds 64 MiB, where it measured
            faster; greedy otherwise).
        return_gains: also return the log-det gain log d² of each pick (non-increasing; their
            sum is log det L_S).

    Returns:
        Indices ``[m]`` int64 (m <= k) on the input's device, in selection order; ties go to
        the lowest index. With ``return_gains``, ``(indices, gains)``.
    """
    x = _as_float_matrix(features, "features")
    n, d = x.shape
    _check_k(k, n)
    _check_choice(kernel, KERNELS, "kernel")
    _check_finite(x, "features")
    if gamma is None:
        gamma = 1.0 / d
    _check_positive(gamma, "gamma")
    q = None if quality is None else _check_quality(quality, x)
    if kernel == "cosine":
        x = _unit_rows(x)
    if q is not None and kernel == "linear":
        x, q = x * q[:, None], None  # (q_i x_i)·(q_j x_j) = q_i q_j x_i·x_j
    max_diag = _max_diag(x, kernel, q)
    if not math.isfinite(max_diag):  # finite inputs whose kernel overflows: every gain would be inf/NaN
        what = "features" if quality is None else "features and quality"
        raise ValueError(
            f"{what} are too large: the {kernel} kernel's diagonal overflows {x.dtype}; "
            "rescale them (or pass float64)"
        )
    threshold = _threshold(eps, max_diag, x.dtype)
    idx, gains = torch.ops.cpd_fast.dpp_greedy(
        x, q, k, _OP_KERNEL[kernel], float(gamma), threshold, _use_lazy(method, x, k)
    )
    return _trim(idx, gains, return_gains)


def greedy_map_from_kernel(
    L: torch.Tensor | np.ndarray,
    k: int,
    *,
    eps: float = 1e-10,
    method: Method = "auto",
    return_gains: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Greedy DPP MAP over an explicit symmetric PSD kernel ``L [N, N]``; see :func:`greedy_map`."""
    m = _as_float_matrix(L, "L")
    _check_kernel_matrix(m)
    _check_k(k, m.shape[0])
    threshold = _threshold(eps, float(m.diagonal().max()), m.dtype)
    idx, gains = torch.ops.cpd_fast.dpp_greedy_from_kernel(m, k, threshold, _use_lazy(method, m, k))
    return _trim(idx, gains, return_gains)


def log_det(L: torch.Tensor, indices: torch.Tensor) -> float:
    """log det(L_S) of a selection, in float64 (-inf when L_S is singular)."""
    sub = L[indices][:, indices].double()
    sign, value = torch.linalg.slogdet(sub)
    return float(value) if sign > 0 else -math.inf


def kernel_matrix(
    features: torch.Tensor, *, kernel: Kernel = "linear", gamma: float | None = None
) -> torch.Tensor:
    """The dense kernel L [N, N] that :func:`greedy_map` uses implicitly (for checks and small N)."""
    x = features
    if kernel == "cosine":
        x = _unit_rows(x)
    if kernel == "rbf":
        g = 1.0 / x.shape[1] if gamma is None else gamma
        return torch.exp(-g * torch.cdist(x, x).square())
    return x @ x.T


# ----------------------------------------------------------------------------- reference


def greedy_map_reference(
    features: torch.Tensor,
    k: int,
    *,
    kernel: Kernel = "linear",
    gamma: float | None = None,
    eps: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch greedy MAP (the oracle): same algorithm and threshold, eager tensor ops.

    Returns ``(indices, log_gains)`` like ``greedy_map(..., return_gains=True)``.
    """
    x = features
    if kernel == "cosine":
        x = _unit_rows(x)
    if kernel == "rbf":
        g = 1.0 / x.shape[1] if gamma is None else gamma
        diag = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)

        def row(j: int) -> torch.Tensor:
            return torch.exp(-g * (x - x[j]).square().sum(1))
    else:
        diag = x.square().sum(1)
        if kernel == "cosine":
            diag = (diag > 0).to(x.dtype)

        def row(j: int) -> torch.Tensor:
            return x @ x[j]

    return _reference_loop(diag, row, k, _threshold(eps, float(diag.max()), diag.dtype))


def greedy_map_from_kernel_reference(
    L: torch.Tensor, k: int, *, eps: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch greedy MAP over an explicit kernel matrix (the oracle)."""
    diag = L.diagonal().clone()
    return _reference_loop(diag, lambda j: L[j], k, _threshold(eps, float(diag.max()), L.dtype))


def _reference_loop(
    diag: torch.Tensor, row: Callable[[int], torch.Tensor], k: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    n = diag.shape[0]
    dead = -math.inf
    d2 = torch.where(diag < eps, dead, diag)
    C = torch.empty(k, n, dtype=diag.dtype, device=diag.device)  # C[t] = Cholesky column of pick t
    picks: list[int] = []
    gains: list[float] = []
    for t in range(k):
        j = int(torch.argmax(d2))  # first maximum on ties
        best = float(d2[j])
        if best == dead:
            break
        picks.append(j)
        gains.append(math.log(best))
        if t + 1 == k:
            break
        d2[j] = dead
        e = (row(j) - C[:t, j] @ C[:t]) / math.sqrt(best)
        C[t] = e
        r = d2 - e * e
        d2 = torch.where((d2 == dead) | (r < eps), dead, r)
    return (
        torch.tensor(picks, dtype=torch.long, device=diag.device),
        torch.tensor(gains, dtype=diag.dtype, device=diag.device),
    )


# ----------------------------------------------------------------------------- helpers


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero), without overflow or underflow in the norm:
    each row is first divided by its largest magnitude (a huge or tiny row's squares would not fit)."""
    peak = x.abs().amax(1, keepdim=True)
    return torch.nn.functional.normalize(x / torch.where(peak > 0, peak, 1), dim=1)


def _is_real(value) -> bool:
    """A real number (Python or numpy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _threshold(eps: float, max_diag: float, dtype: torch.dtype) -> float:
    if not _is_real(eps) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    unit_roundoff = torch.finfo(dtype).eps / 2
    return max(float(eps), _NOISE_ULPS * unit_roundoff * max(max_diag, 0.0))


def _max_diag(x: torch.Tensor, kernel: str, q: torch.Tensor | None) -> float:
    base = x.square().sum(1) if kernel == "linear" else x.new_ones(1)
    if q is not None:
        base = base * q.square()
    return float(base.max())


# Plain greedy streams the whole N x k Cholesky factor at every pick; while that factor stays near
# the cache it beats lazy greedy's heap, beyond it lazy greedy's fewer reads win (measured in
# bench/README.md, bench/bench_dpp.py).
_LAZY_FROM_FACTOR_BYTES = 64 << 20


def _use_lazy(method: str, x: torch.Tensor, k: int) -> bool:
    _check_choice(method, METHODS, "method")
    if method == "lazy" and x.device.type != "cpu":
        raise ValueError("method='lazy' runs on CPU only; use method='greedy' (or 'auto') on CUDA")
    if method == "auto":
        return x.device.type == "cpu" and _uses_lazy_by_default(x.shape[0], k, x.element_size())
    return method == "lazy"


def _uses_lazy_by_default(n: int, k: int, itemsize: int) -> bool:
    return n * k * itemsize >= _LAZY_FROM_FACTOR_BYTES


def _trim(idx: torch.Tensor, gains: torch.Tensor, return_gains: bool):
    m = int((idx >= 0).sum())  # the one host synchronisation of a CUDA selection
    idx, gains = idx[:m], gains[:m]
    return (idx, gains) if return_gains else idx


def _from_numpy(a: np.ndarray, name: str) -> torch.Tensor:
    if a.dtype.kind != "f":  # object/str/int arrays: name the argument, not torch's converter
        raise TypeError(f"{name} must be a float32 or float64 array, got numpy {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("=")))  # native byte order


def _as_float_matrix(a, name: str) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        a = _from_numpy(a, name)
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(a).__name__}")
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if a.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(a.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(a.shape)})")
    _check_device(a, name)
    return a.detach().contiguous()  # selection is not differentiable


def _check_device(a: torch.Tensor, name: str) -> None:
    if a.device.type == "cpu":
        return
    if a.device.type != "cuda":
        raise ValueError(f"{name} is on {a.device}; greedy_map runs on CPU or CUDA tensors")
    if not _ext.has_cuda_kernels():
        raise RuntimeError(
            f"{name} is on {a.device} but cpd_fast._C was built without CUDA kernels.\n{_ext.REBUILD_HINT}"
        )


def _check_k(k, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")


def _check_choice(value, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


def _check_positive(value, name: str) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_finite(a: torch.Tensor, name: str) -> None:
    # A finite sum proves every entry finite (NaN and Inf propagate) and costs one cheap reduction;
    # only an overflowing sum needs the elementwise check.
    if not bool(torch.isfinite(a.sum())) and not bool(torch.isfinite(a).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_quality(quality, x: torch.Tensor) -> torch.Tensor:
    q = _from_numpy(quality, "quality") if isinstance(quality, np.ndarray) else quality
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"quality must be a torch.Tensor or numpy array, got {type(quality).__name__}")
    if q.shape != (x.shape[0],):
        raise ValueError(f"quality must have shape [N={x.shape[0]}], got {tuple(q.shape)}")
    if q.device != x.device:
        raise ValueError(f"quality is on {q.device} but features is on {x.device}")
    if not q.is_floating_point():
        raise TypeError(f"quality must be a floating-point tensor, got {q.dtype}")
    _check_finite(q, "quality")
    if bool((q <= 0).any()):
        raise ValueError("quality must be > 0 for every item")
    return q.detach().to(x.dtype).contiguous()


def _check_kernel_matrix(m: torch.Tensor) -> None:
    n, n2 = m.shape
    if n != n2:
        raise ValueError(f"L must be square, got shape {(n, n2)}")
    _check_finite(m, "L")
    scale = float(m.abs().max())
    if not torch.allclose(m, m.T, rtol=1e-5, atol=1e-6 * scale):
        raise ValueError("L must be symmetric (L != L.T beyond rounding)")
