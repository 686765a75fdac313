"""Property tests (Hypothesis) for greedy DPP MAP: invariants, agreement with the reference,
and clean errors for bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cpd_fast.dpp import greedy_map, greedy_map_reference, kernel_matrix, log_det

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
finite = st.floats(-8, 8, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 40))
    d = draw(st.integers(1, 6))
    x = draw(hnp.arrays(np.float64, (n, d), elements=finite))
    k = draw(st.integers(1, n))
    kernel = draw(st.sampled_from(["linear", "cosine", "rbf"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return torch.from_numpy(x).to(dtype), k, kernel


@PROPERTY
@given(problems())
def test_selection_invariants_and_agreement(problem):
    x, k, kernel = problem
    idx, gains = greedy_map(x, k, kernel=kernel, return_gains=True)
    assert idx.dtype == torch.long and len(idx) <= k and len(gains) == len(idx)
    assert len(set(idx.tolist())) == len(idx)
    assert bool(((idx >= 0) & (idx < x.shape[0])).all())
    assert bool(torch.isfinite(gains).all())
    slack = 1e-4 if x.dtype == torch.float32 else 1e-9
    assert bool((gains[1:] <= gains[:-1] + slack * gains[:-1].abs().clamp(min=1)).all())

    ref_idx, _ = greedy_map_reference(x, k, kernel=kernel)
    lazy_idx = greedy_map(x, k, kernel=kernel, method="lazy")
    for other in (ref_idx, lazy_idx):
        if not torch.equal(idx, other):  # a near-tie decided differently by rounding
            L = kernel_matrix(x.double(), kernel=kernel)
            a, b = log_det(L, idx), log_det(L, other)
            if math.isfinite(a) and math.isfinite(b):
                assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3)
            assert abs(len(idx) - len(other)) <= 1


@PROPERTY
@given(st.integers(1, 30), st.integers(1, 5), st.integers(-5, 60))
def test_k_outside_range_is_a_value_error(n, d, k):
    x = torch.randn(n, d)
    if 1 <= k <= n:
        assert 1 <= len(greedy_map(x, k, kernel="rbf")) <= k
    else:
        with pytest.raises(ValueError, match="k must be in"):
            greedy_map(x, k)


@PROPERTY
@given(
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=12), elements=finite),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.data(),
)
def test_non_finite_features_are_rejected(x, bad, data):
    i = data.draw(st.integers(0, x.shape[0] - 1))
    j = data.draw(st.integers(0, x.shape[1] - 1))
    x[i, j] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        greedy_map(torch.from_numpy(x), 1)


@PROPERTY
@given(
    st.sampled_from([torch.int32, torch.int64, torch.uint8, torch.bool, torch.float16, torch.bfloat16]),
    st.integers(1, 3),
)
def test_wrong_dtype_or_rank_is_a_clear_error(dtype, rank):
    shape = (4,) * rank
    x = torch.zeros(shape, dtype=dtype)
    with pytest.raises(TypeError, match="float32 or float64"):
        greedy_map(x, 1)
    if rank != 2:
        with pytest.raises(ValueError, match="2-D"):
            greedy_map(torch.zeros(shape), 1)
