"""Run-directory I/O shared by the pipeline steps: atomic writes, so a killed run never leaves a torn file.

Every writer goes to a temporary file in the destination's directory and then ``os.replace``s it onto the
destination (atomic on POSIX within one filesystem): readers see the old file or the new one, never half.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

__all__ = ["append_jsonl", "atomic_path", "save_torch_atomic", "write_json_atomic"]


class atomic_path:
    """Context manager yielding a temp path next to ``path``; on clean exit it is renamed onto ``path``.

    ``with atomic_path("a/b.pt") as tmp: torch.save(obj, tmp)``. On an exception the temp file is removed.
    """

    def __init__(self, path: str | os.PathLike, suffix: str = "") -> None:
        self.path = os.fspath(path)
        self.suffix = suffix

    def __enter__(self) -> str:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(self.path) + "-")
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically (creating parent directories)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2)


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically. Keep ``obj`` to tensors and plain containers/scalars so that
    ``torch.load(path, weights_only=True)`` can read it back."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line (a log record; a torn last line after a kill is tolerated by readers)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
