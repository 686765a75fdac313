"""Loads the compiled extension cpd_fast._C, which registers the torch.ops.cpd_fast operators."""

from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libc10/libtorch, which cpd_fast._C links against)

REBUILD_HINT = (
    "Rebuild it against the torch you have installed:\n"
    '    pip install --no-build-isolation -e ".[rl,dev]"\n'
    "(install torch first; add FORCE_CUDA=1 to build the CUDA kernels on a machine without a GPU)."
)


class ExtensionError(ImportError):
    """The compiled extension is missing or was built for another torch."""


def load():
    """Import cpd_fast._C once; raise ExtensionError with rebuild instructions if it fails."""
    try:
        return importlib.import_module("cpd_fast._C")
    except ImportError as err:  # missing .so, or an ABI mismatch with the installed torch
        raise ExtensionError(f"cpd_fast._C could not be imported ({err}).\n{REBUILD_HINT}") from err


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA sources."""
    return bool(load().with_cuda)
