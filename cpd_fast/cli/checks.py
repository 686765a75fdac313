"""The argparse value types of ``cpd``'s options (``type=positive_int``, ...): a bad number is a one-line
usage error (``argument --k: must be a positive int (>= 1), got '0'``) before any work starts."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "finite_float",
    "fraction",
    "give_up_rule",
    "integer",
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "seed",
]


def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        what = "an int" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _checked(name: str, kind: type, ok: Callable[[Any], bool], rule: str) -> Callable[[str], Any]:
    """An argparse ``type``: parse ``kind`` from the text, then require ``ok(value)`` (``must be <rule>``)."""

    def parse(text: str) -> Any:
        value = _number(text, kind)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    parse.__name__ = parse.__qualname__ = name
    parse.__doc__ = f"{'An int' if kind is int else 'A finite number'}: {rule}."
    return parse


positive_int = _checked("positive_int", int, lambda v: v >= 1, "a positive int (>= 1)")  # counts, steps
nonnegative_int = _checked("nonnegative_int", int, lambda v: v >= 0, "an int >= 0")  # retries
# every RNG in use (torch, numpy, the envs) accepts it
seed = _checked("seed", int, lambda v: 0 <= v < 2**31, "an int in [0, 2**31)")
positive_float = _checked("positive_float", float, lambda v: v > 0, "a finite number > 0")  # budgets, lr
nonnegative_float = _checked("nonnegative_float", float, lambda v: v >= 0, "a finite number >= 0")  # noise
finite_float = _checked("finite_float", float, lambda v: True, "a finite number")  # biases
integer = _checked("integer", int, lambda v: True, "an int")  # config flags (ranges: the config schema)
fraction = _checked("fraction", float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")  # thresholds, decays


def give_up_rule(text: str) -> tuple[int, float]:
    """``STEPS:SUCCESS`` (``500000:0.05``): a positive int of env steps and a success rate in (0, 1]."""
    steps, sep, success = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected STEPS:SUCCESS such as 500000:0.05, got {text!r}")
    rate = _number(success, float)
    if not 0.0 < rate <= 1.0:
        raise argparse.ArgumentTypeError(f"SUCCESS must be in (0, 1], got {text!r}")
    return positive_int(steps), rate
