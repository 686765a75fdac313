"""What made a result: the code (package version, git commit and whether the checkout differed from it),
the libraries (torch, Triton, Python) and the machine (CPU model, threads, device, precision).

:func:`provenance` is the one record, written into ``results.json`` (``extra["provenance"]``, by
:mod:`cpd_fast.distill.run`) and into each step of ``cpd run``'s ``pipeline.json``
(:mod:`cpd_fast.pipeline.steps`). The git fields describe the checkout the running package was imported
from, found from the package's own location (never from the working directory): ``None`` when the
package is not a git checkout's top-level folder (an installed wheel) or git cannot answer.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from cpd_fast import __version__

__all__ = ["checkout_root", "cpu_model", "git_state", "provenance"]

_GIT_TIMEOUT_S = 10.0


def checkout_root() -> Path:
    """The folder the ``cpd_fast`` package lies in: a source checkout's root when run from one."""
    return Path(__file__).resolve().parent.parent


def _git(root: Path, *args: str) -> str | None:
    """``git -C root ARGS``' stdout, or None when git is missing, fails or hangs. The user's ``GIT_*``
    variables (a hook's GIT_DIR, ...) are dropped: they could point git at another repository."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, env=env, timeout=_GIT_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(root: Path | None = None, package: str = "cpd_fast") -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout whose top level is ``root`` (default
    :func:`checkout_root`); ``(None, None)`` when ``root`` is not a checkout's top level (a package
    installed inside some other repository is not attributed to that repository's commit).

    ``dirty``: a tracked file differs from the commit, or an untracked file lies in the package's source
    folders (``package/`` and ``kernels/``, which installs as ``cpd_fast.kernels``): code the commit does
    not hold. Untracked files elsewhere (run directories, notes) do not count.
    """
    root = (root or checkout_root()).resolve()
    if not (root / ".git").exists():  # a folder (checkout) or a file (worktree, submodule)
        return None, None
    top = _git(root, "rev-parse", "--show-toplevel")
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=normal")
    if top is None or Path(top.strip()).resolve() != root or commit is None or status is None:
        return None, None
    sources = (f"{package}/", "kernels/")
    dirty = any(
        not line.startswith("??") or line[3:].strip('"').startswith(sources)
        for line in status.splitlines()
        if line.strip()
    )
    return commit.strip(), dirty


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what :mod:`platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(device: str, precision: str | None, threads: int | None = None) -> dict[str, Any]:
    """The record of what makes a result now, in this process.

    Args:
        device: the torch device the work runs on (``"cpu"``, ``"cuda:0"``).
        precision: the training arithmetic (``"fp32"``, ``"bf16"``); None for work that trains no student.
        threads: torch's intra-op threads (default: :func:`torch.get_num_threads`, the count in force).

    Returns:
        ``package``, ``version``, ``git_commit`` (str or None), ``git_dirty`` (bool or None), ``torch``,
        ``triton`` (its installed version, or None; Triton itself is not imported), ``python``, ``cpu``,
        ``threads``, ``precision``, ``device`` and ``gpu`` (the CUDA device's name, None on the CPU).
    """
    commit, dirty = git_state()
    gpu = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {
        "package": "cpd_fast",
        "version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "triton": _version("triton") or _version("pytorch-triton"),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "threads": int(torch.get_num_threads() if threads is None else threads),
        "precision": precision,
        "device": str(device),
        "gpu": gpu,
    }
