"""One config schema: typed dataclasses validated by pydantic, one rule for unknown keys, one-line errors.

The run configurations (:class:`~cpd_fast.distill.config.DistillConfig`,
:class:`~cpd_fast.teachers.ppo.PPOConfig`, :class:`~cpd_fast.pipeline.PipelineConfig` and its sections)
are pydantic dataclasses declared with :func:`config_class` (:data:`SCHEMA`); the model's
:class:`~cpd_fast.student.StudentConfig` stays a plain dataclass, so the model imports without pydantic,
and is validated as a field of ``DistillConfig``. Field types are checked when the object is built (from
Python, YAML or flags), unknown keys are refused, and the shared value types below
(:data:`PositiveInt`, :data:`Fraction`, ...) carry the range rules that used to be repeated by hand in
every ``__post_init__``. Scalars are *strict* (``"5"`` is not an int, ``true`` is not a number); lists
stand for tuples and mappings for nested configs.

Why pydantic: it validates plain dataclasses (``dataclasses.asdict``/``replace``/``fields`` keep working),
it is already in the environment through Ray, and its structured errors (``loc``, ``msg``, ``input``) turn
into the one-line messages the ``cpd`` command prints (:func:`describe`); tyro/draccus would also generate
the CLI but take over argument parsing and error formatting, which ``cpd`` already owns.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import types
import typing
from collections.abc import Iterable
from typing import Annotated, Any

import yaml
from pydantic import ConfigDict, Field, Strict, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from cpd_fast import errors
from cpd_fast.errors import describe

__all__ = [
    "SCHEMA",
    "Bool",
    "Float",
    "Fraction",
    "Int",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenFraction",
    "PositiveFloat",
    "PositiveFraction",
    "PositiveInt",
    "Seed",
    "Str",
    "add_config_flags",
    "config_class",
    "describe",
    "flag_values",
    "from_mapping",
    "load_yaml",
    "merge",
    "parse_set",
]

# The schema every config dataclass uses: unknown keys are an error; assignments are not re-validated
# (the dataclasses set derived fields in __post_init__).
SCHEMA = ConfigDict(extra="forbid", arbitrary_types_allowed=False)

Int = Annotated[int, Strict()]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
Seed = Annotated[int, Strict(), Field(ge=0, lt=2**31)]  # every RNG in use (torch, numpy, envs) takes it
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
PositiveFloat = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False)]
OpenFraction = Annotated[float, Strict(), Field(gt=0, lt=1, allow_inf_nan=False)]
PositiveFraction = Annotated[float, Strict(), Field(gt=0, le=1, allow_inf_nan=False)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]


def _flag_type(hint: Any) -> Any:
    """The argparse ``type`` of a config field's type (:mod:`cpd_fast.errors`), so a bad number on the
    command line is a usage error before anything runs; ranges it does not cover are the schema's."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (
        typing.Union, types.UnionType) else [hint]  # fmt: skip
    table = ((PositiveInt, errors.positive_int), (NonNegativeInt, errors.nonnegative_int),
             (Seed, errors.seed), (Int, errors.integer), (PositiveFloat, errors.positive_float),
             (NonNegativeFloat, errors.nonnegative_float), (Fraction, errors.fraction),
             (PositiveFraction, errors.positive_float), (OpenFraction, errors.positive_float),
             (Float, errors.finite_float))  # fmt: skip
    for alias, parse in table:
        if len(args) == 1 and args[0] is alias:
            return parse
    kind, _ = _base(hint)
    return {int: errors.integer, float: errors.finite_float}.get(kind)


def config_class(cls: type) -> type:
    """Declare a config dataclass: ``@config_class`` over a ``@dataclass``-style class body.

    The class becomes a pydantic dataclass with :data:`SCHEMA` whose constructor raises a one-line
    ``ValueError`` (:func:`describe`) instead of pydantic's multi-line ``ValidationError``.
    """
    cls = _pydantic_dataclass(config=SCHEMA)(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as err:
            raise ValueError(describe(err)) from None

    cls.__init__ = __init__
    return cls


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def from_mapping(cls: type, data: Any, where: str, names: dict[str, str] | None = None) -> Any:
    """Build config ``cls`` from a mapping (YAML, JSON, ``--set``), refusing unknown keys by name.

    Raises ``ValueError`` with one line: the unknown key(s) and the known ones, or what is wrong with a
    value (:func:`describe`).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping (key: value), got {data!r}")
    known = _field_names(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"unknown key(s){' in ' + where if where else ''}: {', '.join(map(str, unknown))}; "
            f"known: {', '.join(known)}"
        )
    validate = getattr(cls, "__pydantic_validator__", None)
    try:
        if validate is None:  # a plain dataclass
            return cls(**data)
        return validate.validate_python(data)  # what the constructor runs, with the raw error kept
    except ValidationError as err:
        raise ValueError(describe(err, where, names)) from None


# ----------------------------------------------------------------------------- flags from a dataclass


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
    field to its historical flag name (``episodes_per_task`` → ``--episodes``).
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
        if f.name in choices:
            kw["choices"] = list(choices[f.name])
        shown = default if not isinstance(default, tuple | list) else " ".join(map(str, default))
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


# ----------------------------------------------------------------------------- config layering


def load_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    with open(path) as f:
        try:
            d = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a YAML mapping (key: value), not {type(d).__name__}")
    return d


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update: nested sections merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["distill.steps_per_stage=500", "methods=[cpd, ewc]"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE (e.g. distill.steps_per_stage=500), got {item!r}")
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if not all([*parents, leaf]):
            raise ValueError(f"--set key {key!r} has an empty part; write e.g. distill.steps_per_stage=500")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"--set {key}: {value!r} is not a YAML value ({type(err).__name__})") from None
        # YAML 1.1 reads 1e-4 (no dot) as a string; on a command line it is a number
        node[leaf] = float(parsed) if isinstance(parsed, str) and _EXPONENT.fullmatch(parsed) else parsed
    return out


_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
