"""Package surface: the extension loads (or explains how to rebuild), the CLI answers."""

import subprocess
import sys

import pytest
import torch

import cpd_fast
from cpd_fast import _ext
from cpd_fast.cli import main


def test_version_and_ops_are_exposed():
    assert cpd_fast.__version__
    assert torch.ops.cpd_fast.dpp_greedy.default is not None
    assert _ext.has_cuda_kernels() in (True, False)


def test_kernels_subpackage_is_installed_under_cpd_fast():
    import cpd_fast.kernels

    assert cpd_fast.kernels.__name__ == "cpd_fast.kernels"


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
