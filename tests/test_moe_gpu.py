"""MoELayer's Triton kernels on a real CUDA device (skipped without one).

Kernels are imported inside the tests, never at module level: importing them here under a CPU-only
run, or before the interpreter tests, must not fix Triton's mode for other modules.
"""

import pytest
import torch

from cpd_fast.moe import MoELayer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _read(getter):
    try:
        return getter()
    except RuntimeError:  # torch >= 2.9 refuses to answer after a mix of its legacy and new TF32 APIs
        return None


@pytest.fixture
def ieee_fp32_matmul():
    """fp32 matmuls without TF32 (the fp32 oracle needs full precision); every setting restored after.

    The kernels read the legacy flag (``kernels/moe_grouped._precision``), so that is the one set. On
    torch >= 2.9 assigning it also changes ``fp32_precision`` (``"none"`` -> ``"ieee"``) and can leave
    ``torch.get_float32_matmul_precision()`` raising: each of the three is put back as it was.
    """
    matmul = torch.backends.cuda.matmul
    allow = _read(lambda: matmul.allow_tf32)
    precision = getattr(matmul, "fp32_precision", None)
    legacy = _read(torch.get_float32_matmul_precision)
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        if allow is not None:
            matmul.allow_tf32 = allow
        if precision is not None and matmul.fp32_precision != precision:
            matmul.fp32_precision = precision
        if legacy is not None and _read(torch.get_float32_matmul_precision) != legacy:
            torch.set_float32_matmul_precision(legacy)


def _run(layer, x, g):
    layer.zero_grad()
    xi = x.clone().requires_grad_()
    y = layer(xi)
    (y * g).sum().backward()
    return y.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("N,E,k", [(257, 5, 2), (4099, 25, 2), (1000, 8, 4), (333, 1, 1)])
def test_triton_matches_torch_backend(dtype, tol, N, E, k, ieee_fp32_matmul):
    assert not torch.backends.cuda.matmul.allow_tf32
    torch.manual_seed(0)
    layer = MoELayer(128, 256, E, top_k=k, backend="triton").cuda()
    ref_layer = MoELayer(128, 256, E, top_k=k, backend="torch").cuda()
    ref_layer.load_state_dict(layer.state_dict())
    layer.to(dtype)
    layer.check_finite = False
    x = torch.randn(N, 128, device="cuda")
    g = torch.randn(N, 128, device="cuda")
    y, dx, grads = _run(layer, x.to(dtype), g.to(dtype))
    y2, dx2, grads2 = _run(ref_layer, x, g)  # fp32 oracle
    scale = lambda t: t.float().abs().max().clamp_min(1e-6)
    assert ((y.float() - y2).abs().max() / scale(y2)) < tol
    assert ((dx.float() - dx2).abs().max() / scale(dx2)) < tol
    for a, b in zip(grads, grads2, strict=True):
        assert ((a.float() - b).abs().max() / scale(b)) < tol


def _compiled_kernel_count():
    from cpd_fast.kernels.moe_grouped import _grouped_rows_kernel
    from cpd_fast.kernels.moe_wgrad import _wgrad_kernel

    n = 0
    for k in (_grouped_rows_kernel, _wgrad_kernel):
        caches = getattr(k.fn, "device_caches", None) or {}
        n += sum(len(c[0]) for c in caches.values())
    return n


def test_adding_experts_does_not_recompile():
    torch.manual_seed(1)
    layer = MoELayer(64, 128, 3, top_k=2, backend="triton").cuda()
    x = torch.randn(513, 64, device="cuda", requires_grad=True)
    layer(x).sum().backward()
    before = _compiled_kernel_count()
    assert before > 0
    for _ in range(20):
        layer.add_experts(1, gate_bias=0.0)
        layer(x).sum().backward()
    assert _compiled_kernel_count() == before


def test_frozen_experts_zero_grad_on_gpu():
    torch.manual_seed(2)
    layer = MoELayer(64, 128, 6, top_k=2, backend="triton").cuda()
    layer.freeze_experts([1, 4])
    x = torch.randn(300, 64, device="cuda")
    layer(x).square().sum().backward()
    for p in (layer.w1, layer.b1, layer.w2, layer.b2):
        assert torch.count_nonzero(p.grad[[1, 4]]) == 0
        assert torch.count_nonzero(p.grad[[0, 2, 3, 5]]) > 0
