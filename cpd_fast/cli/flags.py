"""Command-line flags generated from a config dataclass (``cpd distill``'s, from
:class:`~cpd_fast.distill.config.DistillConfig`): one flag per field, typed by the field's type, so a new
field is a new flag and a bad number is a usage error before anything runs.

A field with a fixed set of values (a ``Literal`` or an ``Enum``, or ``choices`` given for a plain string
checked against a fixed set) lists them in ``--help`` (``one of: cpd, finetune, ...``) and refuses another
value with argparse's one line naming them (``invalid choice: 'x' (choose from ...)``)."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from collections.abc import Iterable
from typing import Annotated, Any

from cpd_fast.cli.checks import (
    finite_float,
    fraction,
    integer,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    seed,
)
from cpd_fast.config import (
    Float,
    Fraction,
    Int,
    NonNegativeFloat,
    NonNegativeInt,
    OpenFraction,
    PositiveFloat,
    PositiveFraction,
    PositiveInt,
    Seed,
)

__all__ = ["add_config_flags", "choice_keys", "field_choices", "flag_values"]


def _flag_type(hint: Any) -> Any:
    """The argparse ``type`` of a config field's type (:mod:`cpd_fast.cli.checks`), so a bad number on the
    command line is a usage error before anything runs; ranges it does not cover are the schema's."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (
        typing.Union, types.UnionType) else [hint]  # fmt: skip
    table = ((PositiveInt, positive_int), (NonNegativeInt, nonnegative_int),
             (Seed, seed), (Int, integer), (PositiveFloat, positive_float),
             (NonNegativeFloat, nonnegative_float), (Fraction, fraction),
             (PositiveFraction, positive_float), (OpenFraction, positive_float),
             (Float, finite_float))  # fmt: skip
    for alias, parse in table:
        if len(args) == 1 and args[0] is alias:
            return parse
    kind, _ = _base(hint)
    return {int: integer, float: finite_float}.get(kind)


def _base(hint: Any) -> tuple[Any, bool]:
    """(the scalar or container type behind Annotated/Optional, whether None is allowed)."""
    while typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        inner, _ = _base(args[0]) if len(args) == 1 else (Any, False)
        return inner, True
    return hint, False


def field_choices(hint: Any) -> tuple[Any, ...] | None:
    """The fixed values a config field of type ``hint`` takes (a ``Literal``'s, an ``Enum``'s members; for a
    list, tuple or Optional, its item's), or None."""
    kind, _ = _base(hint)
    if typing.get_origin(kind) in (list, tuple):
        kind = _base(typing.get_args(kind)[0])[0]
    if typing.get_origin(kind) is typing.Literal:
        return typing.get_args(kind)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return tuple(kind)
    return None


def choice_keys(cls: type, prefix: str = "") -> str:
    """``"KEY (a | b); ..."`` for every field of config dataclass ``cls`` with fixed values
    (:func:`field_choices`), for the help of an option that sets keys (``--set``, ``--ppo``)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        allowed = field_choices(hints[f.name]) if f.init else None
        if allowed:
            out.append(f"{prefix}{f.name} ({' | '.join(map(_shown, allowed))})")
    return "; ".join(out)


def _enum_type(kind: type[enum.Enum]) -> Any:
    """An argparse ``type`` reading an ``Enum`` member by its value, refusing others by name."""

    def parse(text: str) -> enum.Enum:
        for member in kind:
            if str(member.value) == text:
                return member
        shown = ", ".join(repr(str(m.value)) for m in kind)
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {shown})")

    parse.__name__ = kind.__name__
    return parse


def _shown(value: Any) -> str:
    return str(value.value) if isinstance(value, enum.Enum) else str(value)


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: Iterable[str] = (),
    aliases: dict[str, str] | None = None,
    helps: dict[str, str] | None = None,
    choices: dict[str, Iterable[str]] | None = None,
    dest_prefix: str = "cfg_",
) -> dict[str, str]:
    """One flag per field of config dataclass ``cls`` (``--steps-per-stage``; ``--no-NAME`` for a bool
    that defaults to true, ``--NAME`` for one that defaults to false); returns ``{field: flag}``.

    Defaults are ``None`` (argparse's "not given"), so :func:`flag_values` keeps only what the user set and
    the dataclass supplies the rest; the values are validated when the config is built. ``aliases`` maps a
    field to its historical flag name (``episodes_per_task`` → ``--episodes``). ``choices`` gives the fixed
    values of a plain-string field; a ``Literal`` or ``Enum`` field's come from its type
    (:func:`field_choices`). Either way ``--help`` lists them.
    """
    aliases, helps, choices = aliases or {}, helps or {}, choices or {}
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = cls()
    made: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in set(skip) or dataclasses.is_dataclass(_base(hints[f.name])[0]):
            continue
        kind, _ = _base(hints[f.name])
        flag = "--" + aliases.get(f.name, f.name).replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = helps.get(f.name, f.metadata.get("help", ""))
        kw: dict[str, Any] = {"dest": dest_prefix + f.name, "default": None}
        if kind is not bool:
            kw["metavar"] = f.name.upper()
        if kind is bool:
            if default:
                flag = "--no-" + aliases.get(f.name, f.name).replace("_", "-")
                parser.add_argument(flag, action="store_false", help=help_text, **kw)
            else:
                parser.add_argument(flag, action="store_true", help=help_text, **kw)
            made[f.name] = flag
            continue
        origin = typing.get_origin(kind)
        if origin in (list, tuple):
            item = _base(typing.get_args(kind)[0])[0]
            kw["nargs"] = "+"
            kind = item
        if kind in (int, float):
            kw["type"] = _flag_type(hints[f.name])
        allowed = list(choices[f.name]) if f.name in choices else list(field_choices(hints[f.name]) or ())
        if allowed and isinstance(allowed[0], enum.Enum):
            kw["type"] = _enum_type(type(allowed[0]))
        if allowed:
            kw["choices"] = allowed
            listed = f"{'any' if 'nargs' in kw else 'one'} of: {', '.join(map(_shown, allowed))}"
            help_text = f"{help_text}; {listed}" if help_text else listed
        shown = _shown(default) if not isinstance(default, tuple | list) else " ".join(map(_shown, default))
        kw["help"] = f"{help_text} (default: {shown})" if help_text else f"default: {shown}"
        kw["help"] = kw["help"].replace("%", "%%")
        parser.add_argument(flag, **kw)
        made[f.name] = flag
    return made


def flag_values(args: argparse.Namespace, fields: Iterable[str], dest_prefix: str = "cfg_") -> dict[str, Any]:
    """The fields the user set on the command line (see :func:`add_config_flags`)."""
    out = {}
    for name in fields:
        v = getattr(args, dest_prefix + name)
        if v is not None:
            out[name] = v
    return out
