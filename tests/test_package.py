"""Package surface: the extension loads (or explains how to rebuild), the CLI answers."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cpd_fast
from cpd_fast import _ext
from cpd_fast.cli import main

OPS = ("dpp_greedy", "dpp_greedy_from_kernel")  # defined in csrc/ops.cpp


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"cpd_fast::{op}", key)


def test_version_and_ops_are_exposed():
    assert cpd_fast.__version__
    for op in OPS:
        assert getattr(torch.ops.cpd_fast, op).default is not None
        # the C++ kernels and the shape functions are compiled into every build
        assert _has_kernel(op, "CPU") and _has_kernel(op, "Meta"), op


def test_has_cuda_kernels_matches_the_registered_cuda_dispatch():
    cuda = _ext.has_cuda_kernels()
    assert isinstance(cuda, bool)
    # with_cuda (CPD_WITH_CUDA) and the CUDA kernels of csrc/dpp_cuda.cu come from the same build rule
    for op in OPS:
        assert _has_kernel(op, "CUDA") is cuda, (op, cuda)
    if cuda:  # a CUDAExtension links torch's CUDA libraries: it cannot load into a CPU-only torch
        assert torch.version.cuda is not None


def test_kernels_subpackage_is_installed_under_cpd_fast(tmp_path):
    """kernels/ is installed as cpd_fast.kernels (setup.py's package_dir), not as a top-level package.

    In a fresh process outside the checkout: importing the Triton kernels here would fix Triton's
    interpreter mode for every later test module (see test_moe_triton_interpret.py).
    """
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import importlib.util, inspect, torch
        from triton.runtime.jit import JITFunction
        import cpd_fast.kernels
        from cpd_fast.kernels.moe_experts import TritonExperts  # what MoELayer(backend="triton") calls
        from cpd_fast.kernels.moe_grouped import _grouped_rows_kernel, grouped_rows
        from cpd_fast.kernels.moe_wgrad import _wgrad_kernel, grouped_wgrad

        assert importlib.util.find_spec("kernels") is None, "kernels/ leaked as a top-level package"
        assert issubclass(TritonExperts, torch.autograd.Function)
        # MoELayer._triton_experts passes x, w1, b1, w2, b2, topk_p, order, offs, frozen, activation
        assert len(inspect.signature(TritonExperts.forward).parameters) == 11
        assert callable(grouped_rows) and callable(grouped_wgrad)
        for kernel in (_grouped_rows_kernel, _wgrad_kernel):
            assert isinstance(kernel.fn, JITFunction), kernel  # @autotune over @triton.jit
        print(TritonExperts.__module__)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "cpd_fast.kernels.moe_experts"


def test_missing_extension_error_says_how_to_rebuild(monkeypatch):
    def fail(name):
        raise ImportError("undefined symbol: _ZN3c10...")

    monkeypatch.setattr(_ext.importlib, "import_module", fail)
    with pytest.raises(_ext.ExtensionError, match="pip install --no-build-isolation"):
        _ext.load()


def test_cli_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert cpd_fast.__version__ in capsys.readouterr().out
    assert main([]) == 0
    assert "dpp-demo" in capsys.readouterr().out


def test_cpd_entry_point_runs_the_dpp_demo():
    out = subprocess.run(
        [sys.executable, "-m", "cpd_fast.cli", "dpp-demo", "--n", "1500", "--k", "40"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert "compiled greedy" in out and "compiled lazy" in out
    assert "random subsets" in out
