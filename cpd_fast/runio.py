"""The run-directory layer used by ``cpd run``, ``cpd distill`` and PPO: atomic writes with checksums, one
step ledger, one config-compatibility check, one logger (JSONL + TensorBoard), and a lock per directory.

**Atomic writes**, so a killed run never leaves a torn file.

Every writer goes to a temporary file in the destination's directory and then ``os.replace``s it onto the
destination (atomic on POSIX within one filesystem): readers see the old file or the new one, never half.

Checkpoints also get a checksum: :func:`save_torch_atomic` writes ``<file>.sha256`` (``sha256sum`` format)
next to the file and :func:`load_torch_checked` verifies it, so a file damaged *after* it was written (a
half-copied run directory, a bad disk) is reported by name with how to recover instead of loading silently
wrong weights. Order of writes: the old sidecar is removed, the file replaced, then the new sidecar
written; a kill in between leaves a complete file without a sidecar (loaded unverified), never a
complete file with a stale sidecar (which would be a false alarm).

**Ledger** (:class:`Ledger`): the finished steps of a run with a record each, appended only after the
step's outputs are on disk (``pipeline.json`` of ``cpd run``, ``progress.json`` of ``cpd distill``).
**Compatibility** (:func:`config_diff` / :func:`check_same_config`): a resumed run must use the config it
was made with, except for the keys a caller lists as runtime-only (device, threads, progress, ...).
**Lock** (:class:`RunLock`): one process works in a run directory at a time; a second is refused at
once, naming the holder (pid, host). The lock is an ``flock`` on ``RUN/.lock``, so the kernel releases it
when the holder dies however it dies, and the next process takes a stale lock over without a race.

**Fault injection** — the package's one test hook, for crash tests only: with
``CPD_TEST_KILL_AFTER=<fnmatch pattern>`` in the environment, the process SIGKILLs itself right after an
atomic write whose absolute path matches the pattern. ``CPD_TEST_KILL_DELAY=<seconds>`` kills that much
later, from a timer thread, to land inside the work that follows; ``CPD_TEST_KILL_SCOPE=process`` kills
only this process (default ``group``: its whole process group); ``CPD_TEST_KILL_ONCE=<marker file>``
kills only while the marker does not exist (it is created first), so a retried job survives. It is a
deterministic stand-in for a power cut at that exact point.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import math
import os
import pickle
import signal
import socket
import tempfile
import threading
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "CorruptFileError",
    "Ledger",
    "RunLock",
    "RunLockedError",
    "RunLogger",
    "append_jsonl",
    "atomic_path",
    "check_same_config",
    "config_diff",
    "file_sha256",
    "load_torch_checked",
    "read_json",
    "save_torch_atomic",
    "verify_sha256",
    "write_json_atomic",
    "write_sha256",
]

KILL_ENV = "CPD_TEST_KILL_AFTER"
KILL_DELAY_ENV = "CPD_TEST_KILL_DELAY"
KILL_SCOPE_ENV = "CPD_TEST_KILL_SCOPE"
KILL_ONCE_ENV = "CPD_TEST_KILL_ONCE"


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
    """The fault-injection point (see the module docstring); a no-op unless ``CPD_TEST_KILL_AFTER`` is set."""
    pattern = os.environ.get(KILL_ENV)
    if not pattern or not fnmatch.fnmatch(os.path.abspath(path), pattern):
        return
    marker = os.environ.get(KILL_ONCE_ENV)
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # killed once already

    def kill() -> None:
        if os.environ.get(KILL_SCOPE_ENV) == "process":
            os.kill(os.getpid(), signal.SIGKILL)
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


def read_json(path: str | os.PathLike, default: Any = ...) -> Any:
    """The JSON in ``path``; ``default`` when the file does not exist (without one: FileNotFoundError).

    Raises:
        CorruptFileError: the file exists but does not parse (names it and the remedy).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        if default is ...:
            raise FileNotFoundError(f"{path} is missing; re-run the step that writes it")
        return default
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise CorruptFileError(_corrupt_message(path, f"not JSON: {err}", None)) from None


# ----------------------------------------------------------------------------- the step ledger


class Ledger:
    """The finished steps of a run, ``{name: record}``, in one JSON file written after each step's outputs.

    ``name in ledger`` tells whether a step finished; :meth:`mark` records it (atomically). Files written by
    older versions as ``{"done": [names]}`` are read too.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        payload = read_json(self.path, {"steps": {}})
        try:
            steps = payload["steps"] if "steps" in payload else {name: {} for name in payload["done"]}
            self.steps: dict[str, dict[str, Any]] = dict(steps)
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(_corrupt_message(self.path, "not a step ledger", None)) from None

    def __contains__(self, name: str) -> bool:
        return name in self.steps

    def done(self, name: str, outputs: Iterable[str] = ()) -> bool:
        """Finished, and every one of its ``outputs`` still exists."""
        return name in self.steps and all(os.path.exists(p) for p in outputs)

    def mark(self, name: str, record: dict[str, Any] | None = None) -> None:
        self.steps[name] = dict(record or {})
        write_json_atomic(self.path, {"steps": self.steps})


# ----------------------------------------------------------------------------- config compatibility


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _flat_json(d: dict[str, Any]) -> dict[str, Any]:
    return _flat(json.loads(json.dumps(d)))  # values as JSON (tuples equal lists)


def _diff_keys(a: dict[str, Any], b: dict[str, Any], runtime: Iterable[str]) -> list[str]:
    skip = set(runtime)

    def ignored(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[: i + 1]) in skip for i in range(len(parts)))

    return sorted(k for k in a.keys() | b.keys() if not ignored(k) and a.get(k) != b.get(k))


def config_diff(saved: dict[str, Any], mine: dict[str, Any], runtime: Iterable[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs, ignoring ``runtime`` keys (and any key below
    a runtime prefix: ``"ppo"`` covers ``ppo.lr``). Values compare as JSON (tuples equal lists)."""
    return _diff_keys(_flat_json(saved), _flat_json(mine), runtime)


def check_same_config(
    saved: dict[str, Any], mine: dict[str, Any], runtime: Iterable[str], where: str, remedy: str
) -> None:
    """Refuse to resume ``where`` with a config that differs from the ``saved`` one (one line: the keys
    with their old and new values, then ``remedy``)."""
    a, b = _flat_json(saved), _flat_json(mine)
    diff = _diff_keys(a, b, runtime)
    if diff:
        shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4])
        more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
        raise ValueError(f"{where} holds a run made with a different config ({shown}{more}); {remedy}")


# ----------------------------------------------------------------------------- the logger


class RunLogger:
    """``metrics.jsonl`` always, TensorBoard events under ``tb/`` when asked for.

    ``log(step, record, prefix)`` appends ``{"step": step, **record}`` and writes every finite number as a
    scalar ``prefix + key``; ``event(record)`` appends a line that is not a scalar series.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, enabled: bool = True) -> None:
        self.path = os.path.join(os.fspath(run_dir), "metrics.jsonl")
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            self.writer = SummaryWriter(os.path.join(os.fspath(run_dir), "tb"))

    def log(self, step: int, record: dict[str, Any], prefix: str = "", **fields: Any) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, {"step": step, **fields, **record})
        self.scalars(step, record, prefix)

    def scalars(self, step: int, record: dict[str, Any], prefix: str = "") -> None:
        """TensorBoard only (no JSONL line)."""
        if self.writer is None:
            return
        for k, v in record.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(prefix + k, v, step)

    def event(self, record: dict[str, Any]) -> None:
        if self.enabled:
            append_jsonl(self.path, record)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- the lock


class RunLockedError(ValueError):
    """Another live process works in the run directory (a user error: ``cpd`` exits 2)."""


_HELD: dict[str, list[Any]] = {}  # realpath -> [open file, depth]: this process's locks (re-entrant)


class RunLock:
    """Exclusive lock on a run directory for this process (re-entrant within it).

    ``with RunLock(run_dir): ...`` — or :meth:`acquire` / :meth:`release`. A second process is refused
    at once with :class:`RunLockedError` naming the holder; a holder that died released its ``flock``
    with its last file descriptor, so its lock is taken over (the file is rewritten with the new holder).
    """

    FILE = ".lock"

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = os.fspath(run_dir)
        self.path = os.path.join(self.run_dir, self.FILE)

    def acquire(self) -> RunLock:
        os.makedirs(self.run_dir, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
            return self
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLockedError(
                f"{self.run_dir} is in use by {holder}; wait for it to finish or stop it, or choose another "
                "--out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        _HELD[key] = [f, 1]
        return self

    def release(self) -> None:
        key = os.path.realpath(self.path)
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            held[0].close()  # closing the descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
