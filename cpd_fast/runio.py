"""Run-directory I/O shared by the pipeline steps: atomic writes, so a killed run never leaves a torn file.

Every writer goes to a temporary file in the destination's directory and then ``os.replace``s it onto the
destination (atomic on POSIX within one filesystem): readers see the old file or the new one, never half.

Checkpoints also get a checksum: :func:`save_torch_atomic` writes ``<file>.sha256`` (``sha256sum`` format)
next to the file and :func:`load_torch_checked` verifies it, so a file damaged *after* it was written (a
half-copied run directory, a bad disk) is reported by name with how to recover instead of loading silently
wrong weights. Order of writes: the old sidecar is removed, the file replaced, then the new sidecar
written; a kill in between leaves a complete file without a sidecar (loaded unverified), never a
complete file with a stale sidecar (which would be a false alarm).

Test hook (crash tests only): with ``CPD_TEST_KILL_AFTER=<fnmatch pattern>`` in the environment, the
process SIGKILLs its whole process group right after an atomic write whose absolute path matches the
pattern (``CPD_TEST_KILL_DELAY=<seconds>`` kills that much later, from a timer thread, to land inside the
work that follows). It is a deterministic stand-in for a power cut at that exact point.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import pickle
import signal
import tempfile
import threading
from typing import Any

__all__ = [
    "CorruptFileError",
    "append_jsonl",
    "atomic_path",
    "file_sha256",
    "load_torch_checked",
    "save_torch_atomic",
    "verify_sha256",
    "write_json_atomic",
    "write_sha256",
]

KILL_ENV = "CPD_TEST_KILL_AFTER"
KILL_DELAY_ENV = "CPD_TEST_KILL_DELAY"


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
            _kill_point(self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically (creating parent directories)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2)


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically, plus its checksum sidecar ``<path>.sha256``. Keep ``obj`` to
    tensors and plain containers/scalars so that ``torch.load(path, weights_only=True)`` can read it back
    (:func:`load_torch_checked` does, after verifying the checksum)."""
    import torch

    sidecar = _sidecar(path)
    if os.path.exists(sidecar):
        os.remove(sidecar)  # never leave an old checksum next to a new file (see the module docstring)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    write_sha256(path)


class CorruptFileError(ValueError):
    """A run-directory file fails its checksum or cannot be parsed; the message names it and the remedy."""


def _sidecar(path: str | os.PathLike) -> str:
    return os.fspath(path) + ".sha256"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_sha256(path: str | os.PathLike) -> str:
    """Write ``<path>.sha256`` (``sha256sum -c`` compatible) atomically; returns the digest."""
    digest = file_sha256(path)
    with atomic_path(_sidecar(path)) as tmp, open(tmp, "w") as f:
        f.write(f"{digest}  {os.path.basename(os.fspath(path))}\n")
    return digest


def verify_sha256(path: str | os.PathLike, recover: str | None = None) -> bool:
    """Check ``path`` against its sidecar; False when there is no sidecar (nothing to check against).

    Raises:
        CorruptFileError: the bytes differ from the recorded checksum.
    """
    sidecar = _sidecar(path)
    if not os.path.isfile(sidecar):
        return False
    with open(sidecar) as f:
        expected = f.read().split()[:1]
    if expected != [file_sha256(path)]:
        raise CorruptFileError(_corrupt_message(path, "sha256 mismatch", recover))
    return True


def _corrupt_message(path: str | os.PathLike, why: str, recover: str | None) -> str:
    remedy = recover or "delete it and re-run the same command to redo the step that wrote it"
    return f"{os.fspath(path)} is corrupt or truncated ({why}); {remedy}"


def load_torch_checked(path: str | os.PathLike, recover: str | None = None, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, **kwargs)`` after checking the checksum sidecar.

    ``recover``: what the user should do about a damaged file (the default says to delete it and re-run).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptFileError: checksum mismatch, or the file does not parse (a truncated zip archive).
    """
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; {recover or 're-run the step that writes it'}")
    verify_sha256(path, recover)
    kwargs.setdefault("weights_only", True)
    try:
        return torch.load(path, **kwargs)
    except PermissionError:
        raise
    # a damaged zip archive: RuntimeError "failed finding central directory", OSError EINVAL, EOFError, ...
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        why = f"{type(err).__name__}: {err}".splitlines()[0]
        raise CorruptFileError(_corrupt_message(path, why, recover)) from err


def _kill_point(path: str) -> None:
    """The crash-test hook (see the module docstring); a no-op unless ``CPD_TEST_KILL_AFTER`` is set."""
    pattern = os.environ.get(KILL_ENV)
    if not pattern or not fnmatch.fnmatch(os.path.abspath(path), pattern):
        return

    def kill() -> None:
        os.killpg(os.getpgrp(), signal.SIGKILL)

    delay = float(os.environ.get(KILL_DELAY_ENV) or 0)
    if delay > 0:
        threading.Timer(delay, kill).start()
    else:
        kill()


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line (a log record; a torn last line after a kill is tolerated by readers)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
