"""Triton MoE kernels on CPU under TRITON_INTERPRET=1, against the torch backend and the naive loop.

TRITON_INTERPRET must be set before the kernels are imported and would leak into every later test
module of the same pytest process, so the parent process runs this file again in a subprocess with
the variable set; the real checks below only run in that child.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

IN_CHILD = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("_CPD_MOE_CHILD") == "1"
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the TRITON_INTERPRET=1 subprocess")
pytest.importorskip("triton")


@pytest.mark.skipif(IN_CHILD, reason="parent only")
def test_interpreter_suite_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1", "_CPD_MOE_CHILD": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.skipif(IN_CHILD, reason="parent only")
def test_expert_count_is_not_in_kernel_cache_key():
    """Adding experts must not recompile: the compiled kernels' cache key must not depend on E.

    Computed with Triton's own binder for a CUDA sm_90 target (no GPU needed), in a clean process.
    As a control, a specialised argument (K divisible by 16 or not) does change the key.
    """
    script = textwrap.dedent(
        """
        import torch
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import compute_cache_key, create_function_from_signature
        from cpd_fast.kernels import moe_grouped as mg, moe_wgrad as mw

        backend = make_backend(GPUTarget("cuda", 90, 32))

        def key(kernel, E, M, K=32):
            fn = kernel.fn
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            i32 = torch.zeros(max(M, E + 1), dtype=torch.int32)
            f = lambda *s: torch.zeros(*s)
            if kernel is mg._grouped_rows_kernel:
                args = (f(M, K), i32, f(E, 64, K), f(E, 64), i32, i32, f(M, 64), f(M, 64), i32, i32, i32,
                        i32, E, M, K, 64, K, 64 * K, 1, K)
                kw = dict(MODE=0, ACT=0, GATHER_A=True, HAS_BIAS=True, PREC="ieee",
                          BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
            else:
                args = (f(M, K), i32, i32, f(M, 64), i32, torch.zeros(E, dtype=torch.uint8), i32,
                        f(E, K, 64), f(E, K), E, K, 64, K, 64)
                kw = dict(GATHER_A=True, SCALE_A=False, GATHER_B=False, HAS_BIAS=True, PREC="ieee",
                          BLOCK_P=64, BLOCK_Q=64, BLOCK_R=32)
            _, spec, opts = binder(*args, **kw)
            return compute_cache_key({}, spec, opts)

        for kernel in (mg._grouped_rows_kernel, mw._wgrad_kernel):
            keys = {key(kernel, E, M) for E in (1, 2, 5, 16, 25, 32) for M in (37, 64, 4096, 4097)}
            assert len(keys) == 1, (kernel.fn.__name__, len(keys))
            assert key(kernel, 5, 64, K=32) != key(kernel, 5, 64, K=30)  # control: K is specialised
        print("ONE-KEY")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert "ONE-KEY" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


# ----------------------------------------------------------------------------- child-only checks


def _case(lead, d, h, E, k, act, bias, seed, empty=(), frozen=()):
    from cpd_fast.moe import MoELayer, experts_loop_reference, route

    torch.manual_seed(seed)
    layer = MoELayer(d, h, E, top_k=k, activation=act, bias=bias, backend="triton")
    with torch.no_grad():
        for e in empty:
            layer.gate.bias[e] = -40.0  # these experts receive zero tokens
    if frozen:
        layer.freeze_experts(list(frozen))
    x = torch.randn(*lead, d)
    g = torch.randn(*lead, d)
    results = {}
    for name in ("triton", "torch", "loop"):
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        if name == "loop":
            x2 = xi.reshape(-1, d)
            r = route(layer.gate(x2), k)
            y = experts_loop_reference(x2, layer.w1, layer.b1, layer.w2, layer.b2, r.topk_p, r.topk_e, act)
            y = y.reshape(x.shape)
        else:
            layer.backend = name
            y = layer(xi)
        (y * g).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        results[name] = (y.detach(), xi.grad, grads)
    if empty:
        assert int(layer.tokens_per_expert[list(empty)].sum()) == 0
    return layer, results


def _assert_match(results, frozen=()):
    y, dx, grads = results["triton"]
    for other in ("torch", "loop"):
        y2, dx2, grads2 = results[other]
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(dx, dx2, rtol=1e-5, atol=2e-6)
        for n in grads:
            g2 = grads2[n]
            if frozen and n in ("w1", "b1", "w2", "b2"):
                g2 = g2.clone()
                g2[list(frozen)] = 0  # the loop oracle has no freezing
            torch.testing.assert_close(grads[n], g2, rtol=1e-5, atol=2e-6, msg=n)
    for n in ("w1", "b1", "w2", "b2"):
        if frozen and n in grads:
            assert torch.count_nonzero(grads[n][list(frozen)]) == 0


CASES = [
    # lead dims, d, h, E, k, activation, bias, empty experts
    ((37,), 16, 32, 5, 2, "gelu", True, ()),
    ((100,), 32, 64, 3, 1, "silu", True, (1,)),
    ((257,), 16, 32, 8, 4, "relu", False, (0, 5)),
    ((2, 19, 16), 16, 48, 4, 2, "gelu", True, ()),
    ((3, 11), 24, 40, 1, 1, "gelu", True, ()),
    ((50,), 16, 32, 25, 2, "silu", True, (3, 7)),
]


@child_only
@pytest.mark.parametrize("lead,d,h,E,k,act,bias,empty", CASES)
def test_forward_and_all_gradients_match(lead, d, h, E, k, act, bias, empty):
    if len(lead) == 3:  # [B, T, d] given as lead=(B, T, d)
        lead, d = lead[:2], lead[2]
    _, results = _case(lead, d, h, E, k, act, bias, seed=len(lead) + E, empty=empty)
    _assert_match(results)


@child_only
def test_frozen_experts_get_exactly_zero_grad():
    _, results = _case((64,), 16, 32, 5, 2, "gelu", True, seed=3, frozen=(0, 3))
    _assert_match(results, frozen=(0, 3))


@child_only
def test_growth_1_to_25_reuses_kernels_and_matches():
    from cpd_fast.moe import MoELayer

    torch.manual_seed(11)
    layer = MoELayer(16, 32, 1, top_k=1, backend="triton")
    x = torch.randn(2, 37, 16)
    sizes = []
    while True:
        for be in ("triton", "torch"):
            layer.backend = be
            xi = x.clone().requires_grad_()
            layer.zero_grad()
            y = layer(xi)
            y.square().sum().backward()
            if be == "triton":
                ref = (y.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()])
        torch.testing.assert_close(ref[0], y.detach(), rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(ref[1], xi.grad, rtol=1e-5, atol=2e-6)
        for a, p in zip(ref[2], layer.parameters(), strict=True):
            torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=2e-6)
        sizes.append(layer.num_experts)
        if layer.num_experts >= 25:
            break
        layer.add_experts(12 if layer.num_experts > 1 else 1, gate_bias=0.0)
        layer.top_k = 2
    assert sizes == [1, 2, 14, 26]


@child_only
def test_kernels_against_their_references():
    from cpd_fast.kernels.moe_grouped import FWD1, grouped_rows, grouped_rows_reference
    from cpd_fast.kernels.moe_wgrad import grouped_wgrad, grouped_wgrad_reference

    torch.manual_seed(12)
    E, M, K, N = 4, 70, 24, 40
    counts = torch.tensor([30, 0, 33, 7])
    offs = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).int()
    a = torch.randn(50, K)
    idx = torch.randint(0, 50, (M,), dtype=torch.int32)
    w = torch.randn(E, N, K)
    b = torch.randn(E, N)
    z, h = grouped_rows(FWD1, a, w, offs, n_rows=M, b_transposed=True, a_idx=idx, bias=b, activation="relu")
    ref = grouped_rows_reference(a, w, offs, b_transposed=True, a_idx=idx.long(), bias=b)
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, ref.relu(), rtol=1e-5, atol=1e-5)
    frozen = torch.tensor([False, False, True, False])
    s = torch.rand(M)
    dw, db = grouped_wgrad(a, z, offs, frozen, a_idx=idx, scale=s)
    rdw, rdb = grouped_wgrad_reference(a, z, offs, frozen, a_idx=idx.long(), scale=s)
    torch.testing.assert_close(dw, rdw, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db, rdb, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(dw[2]) == 0 and torch.count_nonzero(dw[1]) == 0
