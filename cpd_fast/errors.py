"""User errors and how the ``cpd`` command reports them.

A mistake in what the user asked for (an unknown task, a budget <= 0, a missing file, a device that is
not there) is a :class:`UserError` or one of the built-in errors listed in :data:`USER_ERRORS`; ``cpd``
prints it as one line, ``cpd <command>: <what was wrong and what to do>``, and exits with status 2.
Anything else is a bug: one line naming the exception and pointing at ``cpd --debug``, exit status 1.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

__all__ = [
    "USER_ERRORS",
    "UserError",
    "describe",
    "format_error",
    "printable",
    "require_device",
    "require_int",
]


class UserError(ValueError):
    """A bad argument, file or setting; the message says what was wrong and what to do instead."""


# ValueError: bad values (tasks, suites, budgets, configs, corrupt JSON); OSError: missing/unreadable
# files, unreachable addresses (ConnectionError); ImportError: an optional dependency is not installed;
# MemoryError / OverflowError: sizes too large for this machine or for a C integer.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, OSError, ImportError, KeyError, MemoryError, OverflowError
)  # fmt: skip

DEBUG_HINT = "re-run with `cpd --debug ...` for the traceback"


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\r``, ``\\x1b``, ``\\u202e``): user input
    echoed in a message can neither break the line nor drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def format_error(prog: str, err: BaseException) -> tuple[str, int]:
    """The one line ``cpd`` prints for ``err`` and the exit status (2 user error, 1 bug)."""
    if type(err).__name__ == "ValidationError" and hasattr(err, "errors"):  # pydantic: a bad config value
        return f"{prog}: {printable(describe(err))}", 2
    text = printable(" ".join(str(err).split()))  # one line, whatever the message held
    if isinstance(err, KeyError):  # str(KeyError) is only the key's repr
        return f"{prog}: missing entry {text} ({DEBUG_HINT})", 2
    if isinstance(err, MemoryError) or _is_torch_oom(err):  # sizes the user chose do not fit
        return f"{prog}: out of memory ({text or type(err).__name__}); choose smaller sizes or counts", 2
    if isinstance(err, USER_ERRORS):
        return f"{prog}: {text or type(err).__name__}", 2
    detail = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return f"{prog}: internal error: {detail} (a bug in cpd_fast; {DEBUG_HINT})", 1


def describe(err: Any, where: str | None = None, names: dict[str, str] | None = None) -> str:
    """One line for a pydantic ``ValidationError``: ``where: key: what is wrong, got VALUE`` (+ how many
    more). Only the error's ``errors()`` and ``title`` are read, so this module needs no pydantic.

    ``where`` None: the class name; ``""``: no prefix. ``names`` renames top-level keys (to flags).
    """
    errors = err.errors(include_url=False)
    title = err.title if where is None else where
    parts = []
    for e in errors[:2]:
        loc = [str(x) for x in e["loc"]]
        if loc and names and loc[0] in names:
            loc[0] = names[loc[0]]
        key = ".".join(loc)
        if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            parts.append(f"unknown key {key!r}")
            continue
        msg = e["msg"]
        msg = msg[len("Value error, ") :] if msg.startswith("Value error, ") else msg
        msg = msg[0].lower() + msg[1:] if msg else msg
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "value_error" else f", got {got!r}"
        parts.append(f"{key + ': ' if key else ''}{msg}{shown}")
    more = f" (+{len(errors) - 2} more)" if len(errors) > 2 else ""
    return f"{title + ': ' if title else ''}{'; '.join(parts)}{more}"


def _is_torch_oom(err: BaseException) -> bool:
    # torch.OutOfMemoryError (CUDA) or the CPU allocator's RuntimeError
    return type(err).__name__ == "OutOfMemoryError" or (
        isinstance(err, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(err)
    )


def require_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (numpy integers count, ``bool`` does not); otherwise a ValueError
    naming ``name`` — the one check behind every count, size and index argument of the package."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        rule = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return int(value)


def require_device(device: str) -> None:
    """Raise :class:`UserError` unless torch can use ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"--device {device!r} is not a torch device; use cpu or cuda") from err
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise UserError(f"--device {device!r} is not supported; use cpu or cuda")
    if not torch.cuda.is_available():
        raise UserError(
            f"--device {device} but torch {torch.__version__} sees no CUDA device; use --device cpu "
            "(or a machine with a GPU and a CUDA build of torch)"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(
            f"--device {device} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
            "pick an index below that"
        )
