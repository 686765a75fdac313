"""Greedy DPP MAP: the compiled op against the plain-PyTorch reference, and its error surface."""

import math

import numpy as np
import pytest
import torch

import cpd_fast
from cpd_fast.dpp import (
    greedy_map,
    greedy_map_from_kernel,
    greedy_map_from_kernel_reference,
    greedy_map_reference,
    kernel_matrix,
    log_det,
)

KERNELS = ["linear", "cosine", "rbf"]
DTYPES = [torch.float32, torch.float64]
# In float32 a near-tie may flip a pick; then the selections' log-dets must agree this closely
# (relative to the size of the log-det).
FLOAT32_LOGDET_RTOL = 1e-3


def features(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)


def assert_same_selection(got, want, L):
    """Identical picks, or (float32 only) a selection of the same log-det within tolerance."""
    (idx, gains), (ref_idx, ref_gains) = got, want
    if torch.equal(idx, ref_idx):
        tol = 1e-4 if gains.dtype == torch.float32 else 1e-9
        torch.testing.assert_close(gains, ref_gains, rtol=tol, atol=tol)
        return
    assert gains.dtype == torch.float32, f"float64 selections differ:\n{idx}\n{ref_idx}"
    assert abs(len(idx) - len(ref_idx)) <= 1
    a, b = log_det(L, idx), log_det(L, ref_idx)
    assert math.isclose(a, b, rel_tol=FLOAT32_LOGDET_RTOL, abs_tol=FLOAT32_LOGDET_RTOL), (a, b)


def test_op_is_registered():
    assert hasattr(torch.ops.cpd_fast, "dpp_greedy")
    assert hasattr(torch.ops.cpd_fast, "dpp_greedy_from_kernel")
    assert cpd_fast.greedy_map is greedy_map


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("n", "d", "k"), [(1, 3, 1), (2, 2, 2), (7, 3, 7), (100, 16, 40), (1000, 8, 60)])
def test_matches_reference(n, d, k, kernel, dtype):
    x = features(n, d, dtype, seed=n + d)
    got = greedy_map(x, k, kernel=kernel, return_gains=True)
    want = greedy_map_reference(x, k, kernel=kernel)
    assert_same_selection(got, want, kernel_matrix(x.double(), kernel=kernel))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_reference_n5000(kernel, dtype):
    x = features(5000, 32, dtype, seed=5)
    got = greedy_map(x, 100, kernel=kernel, return_gains=True)
    want = greedy_map_reference(x, 100, kernel=kernel)
    assert_same_selection(got, want, kernel_matrix(x.double(), kernel=kernel))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_lazy_greedy_picks_what_plain_greedy_picks(kernel, dtype):
    x = features(3000, 12, dtype, seed=3)
    plain = greedy_map(x, 200, kernel=kernel, method="greedy", return_gains=True)
    lazy = greedy_map(x, 200, kernel=kernel, method="lazy", return_gains=True)
    assert_same_selection(lazy, plain, kernel_matrix(x.double(), kernel=kernel))


def test_thread_count_does_not_change_selection():
    x = features(20_000, 16, torch.float32, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = greedy_map(x, 300, kernel="rbf", return_gains=True)
        torch.set_num_threads(2)
        two = greedy_map(x, 300, kernel="rbf", return_gains=True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_from_kernel_matches_reference_and_features_path(dtype):
    x = features(400, 10, dtype, seed=6)
    L = kernel_matrix(x, kernel="rbf")
    got = greedy_map_from_kernel(L, 80, return_gains=True)
    assert_same_selection(got, greedy_map_from_kernel_reference(L, 80), L.double())
    lazy = greedy_map_from_kernel(L, 80, method="lazy", return_gains=True)
    assert_same_selection(lazy, got, L.double())
    # The implicit rbf kernel of greedy_map is the same matrix.
    assert_same_selection(greedy_map(x, 80, kernel="rbf", return_gains=True), got, L.double())


def test_quality_weighting_equals_scaled_kernel():
    x = features(300, 6, torch.float64, seed=7)
    q = torch.rand(300, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.1
    for kernel in KERNELS:
        L = q[:, None] * kernel_matrix(x, kernel=kernel) * q[None, :]
        if kernel == "cosine":  # the op's cosine diagonal is exactly q_i^2
            L.diagonal().copy_(q.square())
        got = greedy_map(x, 40, kernel=kernel, quality=q, return_gains=True)
        want = greedy_map_from_kernel_reference(L, 40)
        assert_same_selection(got, want, L)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_rank_kernel_stops_at_its_rank(dtype):
    x = features(500, 5, dtype, seed=8)
    idx, gains = greedy_map(x, 50, kernel="linear", return_gains=True)
    assert len(idx) == 5  # rank of X Xᵀ; picks past it would be rounding noise
    assert len(set(idx.tolist())) == 5
    assert torch.isfinite(gains).all()


def test_eps_stops_when_the_best_gain_falls_below_it():
    x = features(200, 8, torch.float64, seed=9)
    d2 = greedy_map(x, 100, kernel="rbf", return_gains=True)[1].exp()
    assert d2[49] > d2[50]
    eps = float((d2[49] * d2[50]).sqrt())  # between the 50th and the 51st gain
    idx, gains = greedy_map(x, 100, kernel="rbf", eps=eps, return_gains=True)
    assert len(idx) == 50
    torch.testing.assert_close(gains.exp(), d2[:50])
    assert len(greedy_map_reference(x, 100, kernel="rbf", eps=eps)[0]) == 50


@pytest.mark.parametrize("kernel", KERNELS)
def test_beats_random_subsets_and_gains_are_non_increasing(kernel):
    x = features(600, 8, torch.float64, seed=10)
    k = 8 if kernel != "rbf" else 60
    idx, gains = greedy_map(x, k, kernel=kernel, return_gains=True)
    L = kernel_matrix(x, kernel=kernel)
    chosen = log_det(L, idx)
    assert math.isclose(chosen, float(gains.sum()), rel_tol=1e-8, abs_tol=1e-8)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        random = torch.randperm(600, generator=g)[: len(idx)]
        assert chosen >= log_det(L, random)
    assert bool((gains[1:] <= gains[:-1] + 1e-12).all())


def test_numpy_input_and_output_types():
    x = np.random.default_rng(0).normal(size=(50, 4))
    idx = greedy_map(x, 10, kernel="rbf")
    assert idx.dtype == torch.long and idx.device.type == "cpu"
    assert len(set(idx.tolist())) == 10


def test_fake_tensor_and_schema():
    x = features(64, 4, torch.float32)
    torch.library.opcheck(torch.ops.cpd_fast.dpp_greedy.default, (x, None, 8, 1, 0.25, 1e-10, False))
    L = kernel_matrix(x, kernel="rbf")
    torch.library.opcheck(torch.ops.cpd_fast.dpp_greedy_from_kernel.default, (L, 8, 1e-10, True))


# ----------------------------------------------------------------------------- bad input

BAD_CALLS = [
    (lambda x: greedy_map(x, 0), ValueError, "k must be in"),
    (lambda x: greedy_map(x, 11), ValueError, "k must be in"),
    (lambda x: greedy_map(x, 2.0), TypeError, "k must be an int"),
    (lambda x: greedy_map(x, True), TypeError, "k must be an int"),
    (lambda x: greedy_map(x[0], 1), ValueError, "must be 2-D"),
    (lambda x: greedy_map(x[:0], 1), ValueError, "empty"),
    (lambda x: greedy_map(x[:, :0], 1), ValueError, "empty"),
    (lambda x: greedy_map(x.long(), 1), TypeError, "float32 or float64"),
    (lambda x: greedy_map(x.half(), 1), TypeError, "float32 or float64"),
    (lambda x: greedy_map(x.tolist(), 1), TypeError, "torch.Tensor"),
    (lambda x: greedy_map(x, 2, kernel="poly"), ValueError, "unknown kernel"),
    (lambda x: greedy_map(x, 2, method="fast"), ValueError, "unknown method"),
    (lambda x: greedy_map(x, 2, kernel="rbf", gamma=0.0), ValueError, "gamma"),
    (lambda x: greedy_map(x, 2, kernel="rbf", gamma=math.nan), ValueError, "gamma"),
    (lambda x: greedy_map(x, 2, eps=-1.0), ValueError, "eps"),
    (lambda x: greedy_map(x, 2, eps=math.inf), ValueError, "eps"),
    (lambda x: greedy_map(torch.where(x > 1, math.nan, x), 2), ValueError, "NaN or Inf"),
    (lambda x: greedy_map(torch.where(x > 1, math.inf, x), 2), ValueError, "NaN or Inf"),
    (lambda x: greedy_map(x, 2, quality=torch.ones(3)), ValueError, "quality must have shape"),
    (lambda x: greedy_map(x, 2, quality=-torch.ones(10)), ValueError, "quality must be > 0"),
    (lambda x: greedy_map(x, 2, quality=torch.ones(10, dtype=torch.long)), TypeError, "quality"),
    (lambda x: greedy_map(x, 2, quality=torch.ones(10, device="meta")), ValueError, "quality is on meta"),
    (lambda x: greedy_map(x.to("meta"), 2), ValueError, "CPU or CUDA"),
    (lambda x: greedy_map_from_kernel(x, 2), ValueError, "square"),
    (
        lambda x: greedy_map_from_kernel(x @ x.T + torch.triu(torch.ones(10, 10), 1), 2),
        ValueError,
        "symmetric",
    ),
    (lambda x: greedy_map_from_kernel(x @ x.T, 11), ValueError, "k must be in"),
    (lambda x: greedy_map_from_kernel(torch.full((3, 3), math.nan), 1), ValueError, "NaN"),
]


@pytest.mark.parametrize(("call", "error", "message"), BAD_CALLS)
def test_bad_input_raises_clear_error(call, error, message):
    x = features(10, 3, torch.float32)
    with pytest.raises(error, match=message):
        call(x)


def test_direct_op_call_with_bad_arguments_raises_not_crashes():
    x = features(10, 3, torch.float32)
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.cpd_fast.dpp_greedy(x, None, 100, 0, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="unknown kernel kind"):
        torch.ops.cpd_fast.dpp_greedy(x, None, 2, 7, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="square"):
        torch.ops.cpd_fast.dpp_greedy_from_kernel(x, 2, 0.0, False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.cpd_fast.dpp_greedy(x.int(), None, 2, 0, 1.0, 0.0, False)


# ----------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("n", "d", "k"), [(1, 3, 1), (300, 7, 50), (5000, 32, 200), (70_000, 16, 64)])
def test_cuda_matches_reference(n, d, k, kernel, dtype):
    x = features(n, d, dtype, seed=n).cuda()
    got = greedy_map(x, k, kernel=kernel, return_gains=True)
    assert got[0].device.type == "cuda"
    want = greedy_map_reference(x, k, kernel=kernel)
    L = kernel_matrix(x.double(), kernel=kernel)
    assert_same_selection((got[0].cpu(), got[1].cpu()), (want[0].cpu(), want[1].cpu()), L.cpu())


@cuda
@pytest.mark.gpu
def test_cuda_from_kernel_quality_and_lazy_refusal():
    x = features(2000, 8, torch.float64, seed=11).cuda()
    L = kernel_matrix(x, kernel="rbf")
    got = greedy_map_from_kernel(L, 100, return_gains=True)
    want = greedy_map_from_kernel_reference(L, 100)
    assert_same_selection((got[0].cpu(), got[1].cpu()), (want[0].cpu(), want[1].cpu()), L.cpu())
    q = torch.rand(2000, dtype=torch.float64, device="cuda") + 0.5
    cpu = greedy_map(x.cpu(), 100, kernel="rbf", quality=q.cpu())
    assert torch.equal(greedy_map(x, 100, kernel="rbf", quality=q).cpu(), cpu)
    with pytest.raises(ValueError, match="CPU only"):
        greedy_map(x, 10, method="lazy")
    with pytest.raises(ValueError, match="quality is on cpu"):
        greedy_map(x, 10, quality=q.cpu())
