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
the CLI but take over argument parsing and error formatting, which ``cpd`` already owns. The flags
``cpd distill`` generates from a config class are in :mod:`cpd_fast.cli.flags`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Annotated, Any

import yaml
from pydantic import ConfigDict, Field, Strict, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

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
    "config_class",
    "describe",
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
