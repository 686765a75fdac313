"""``cpd run``'s config: :class:`PipelineConfig` and its sections, the shipped presets, and the layering.

A config is layered: preset, then ``--config FILE`` (a partial or a full config; a run's own
``config.yaml`` works), then the flags (``--seed``, ``--methods``, ... and ``--set dotted.key=value`` for
anything else, values parsed as YAML). ``distill`` holds :class:`~cpd_fast.distill.config.DistillConfig`
fields, ``ppo`` :class:`~cpd_fast.teachers.ppo.PPOConfig` fields; what a preset leaves out is their
defaults, and the resolved config records every number, so a run states exactly what it did.

A ``distill`` (or ``per_method``) setting that would act in none of the run's methods
(:meth:`~cpd_fast.distill.config.DistillConfig.inactive_reasons`: ``gate_bias`` with task-routed experts)
is refused when a preset or a flag sets it, or a ``--config`` file sets it to another value than its
default (a run's own ``config.yaml`` lists every value, defaults included): :func:`inactive_given`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import field
from importlib import resources
from typing import Any

import yaml

from cpd_fast.config import (
    Bool,
    Fraction,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Seed,
    Str,
    config_class,
    from_mapping,
    load_yaml,
    merge,
)
from cpd_fast.distill.config import ADDED_FIELDS, DistillConfig, inactive_refusal
from cpd_fast.distill.methods import METHODS
from cpd_fast.runio import config_diff as _config_diff
from cpd_fast.tasks import stages
from cpd_fast.teachers.gate import ON_FAIL
from cpd_fast.teachers.jobs import BACKENDS
from cpd_fast.teachers.ppo import PPOConfig
from cpd_fast.teachers.provide import SOURCES

__all__ = [
    "PRESETS",
    "FidelitySettings",
    "GateSettings",
    "PipelineConfig",
    "config_diff",
    "inactive_given",
    "load_preset",
    "resolve_config",
    "runtime_keys",
]

# cpd_fast/presets/<name>.yaml
PRESETS = ("quick", "mt10", "mt25", "mt25-plus", "mt25-task-free", "mt25-study", "mt50", "cw10", "cw20")
# DistillConfig fields the pipeline sets itself (from the top level, or per step)
_OWNED = ("suite", "tasks", "tasks_per_stage", "method", "teachers", "behaviours", "fidelity", "seed",
          "device", "data_dir", "progress")  # fmt: skip
_PPO_OWNED = ("seed", "device")  # PPOConfig fields set from the top level
# DistillConfig fields added since older runs were made that config.yaml's distill section holds (the ones the
# pipeline sets itself live at its top level), at the value those runs behaved with
DISTILL_ADDED = {k: v for k, v in ADDED_FIELDS.items() if k not in _OWNED}
# DistillConfig fields that say what the teacher data is (collected once per run, shared by its methods)
DATA_FIELDS = ("episodes_per_task", "noise_std", "collect_envs", "max_episode_steps")
# keys that change how a run executes, not what it computes: they may differ on resume
_RUNTIME = (
    "device",
    "backend",
    "ray_address",
    "workers",
    "jobs",
    "progress",
    "distill.threads",
    "distill.eval_workers",
)


@config_class
class FidelitySettings:
    """``cpd envs check`` inside the run: scripted-expert episodes per task and backend (0 skips the check;
    then the known envpool mismatches of :data:`cpd_fast.fidelity.KNOWN_BAD_ENVPOOL` are used)."""

    episodes: NonNegativeInt = 8
    num_envs: PositiveInt = 8


@config_class
class GateSettings:
    """Teacher quality gate (:mod:`cpd_fast.teachers.gate`). ``eval_goals`` None: the distillation's."""

    threshold: Fraction = 0.8
    on_fail: Str = "retrain"  # retrain | demos | scripted | exclude (retrain, demos: PPO teachers only)
    eval_goals: PositiveInt | None = None
    eval_envs: PositiveInt = 10
    retrain_factor: PositiveFloat = 2.0


@config_class
class PipelineConfig:
    """One ``cpd run``: what to distil, with which teachers and methods. Written as ``RUN/config.yaml``."""

    preset: Str = "quick"
    suite: Str | None = None  # a suite name (mt10, mt25, ...), or
    tasks: list[Str] | None = None  # an explicit task list (then suite is ignored)
    tasks_per_stage: PositiveInt = 5
    teachers: Str = "scripted"  # scripted | ppo | zoo (trained RL teachers shipped with the package)
    zoo: Str = "metaworld-v3"  # teachers == zoo: a shipped zoo's name or a directory (cpd_fast.teachers.zoo)
    methods: list[Str] = field(default_factory=lambda: ["cpd"])
    seed: Seed = 0
    device: Str = "cpu"
    backend: Str = "local"  # PPO teacher training: local process pool | ray
    ray_address: Str | None = None
    workers: PositiveInt | None = None
    # methods distilled side by side, each in its own process (None: as many as there are methods and
    # cores); every method computes the same bits either way (each runs distill.threads threads)
    jobs: PositiveInt | None = None
    progress: Bool = True
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)
    gate: GateSettings = field(default_factory=GateSettings)
    ppo: dict[Str, Any] = field(default_factory=dict)  # PPOConfig fields (resolved when teachers == ppo)
    distill: dict[Str, Any] = field(default_factory=dict)  # DistillConfig fields (resolved)
    # DistillConfig fields of one method over ``distill`` (e.g. a tuned ewc_lambda, PackNet's eval_modes);
    # not the data's: the methods of a run share its datasets. Left out of config.yaml when empty
    per_method: dict[Str, dict[Str, Any]] = field(default_factory=dict)
    # teachers == zoo: {task: acting task}, the zoo teacher of the acting task collects (and under DAgger
    # labels) the task's data, e.g. for tasks a task-free student cannot tell apart (bench/task_free/
    # ceiling.md); the yardstick of relative performance stays the task's own teacher. Left out of
    # config.yaml when empty
    behaviours: dict[Str, Str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.suite and not self.tasks:
            raise ValueError("the config needs a suite (e.g. suite: mt10) or a task list (tasks: [...])")
        if self.tasks:
            self.suite = None
        for key, value, allowed in (
            ("teachers", self.teachers, SOURCES), ("backend", self.backend, BACKENDS),
            ("gate.on_fail", self.gate.on_fail, ON_FAIL), ("device", self.device, ("cpu", "cuda")),
        ):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"unknown {key} {value!r}; choose one of {', '.join(allowed)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(
                f"unknown method(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)}"
            )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"a method is listed twice: {' '.join(self.methods)}")
        for section, keys in (("distill", _OWNED), ("ppo", _PPO_OWNED)):
            owned = sorted(set(getattr(self, section)) & set(keys))
            if owned:
                raise ValueError(
                    f"set {', '.join(owned)} at the top level of the config, not under {section}"
                )
        self.task_list()  # known tasks that split into equal stages
        self._check_per_method()
        self._check_behaviours()
        # resolve (and so validate) the two nested configs: every number the run uses ends up in config.yaml
        self.distill = _strip(self.distill_config(self.methods[0], own=False).to_dict(), _OWNED)
        for m in self.per_method:
            self.distill_config(m)  # each method's own settings are valid too
        ppo = _strip(self.ppo_config().to_dict(), _PPO_OWNED)  # validated even when unused
        if self.teachers == "ppo":
            self.ppo = ppo
        if self.gate.eval_goals is None:
            self.gate.eval_goals = self.distill["eval_goals"]

    def _check_per_method(self) -> None:
        for method, fields in self.per_method.items():
            if method not in self.methods:
                raise ValueError(f"per_method.{method}: {method} is not among this run's methods "
                                 f"({' '.join(self.methods)})")  # fmt: skip
            shared = sorted(set(fields) & (set(_OWNED) | set(DATA_FIELDS)))
            if shared:
                raise ValueError(
                    f"per_method.{method} sets {', '.join(shared)}: the methods of a run share its teachers "
                    "and datasets; set it for the whole run (top level or distill), or run it separately"
                )

    def _check_behaviours(self) -> None:
        if self.behaviours and self.teachers != "zoo":  # the rest is DistillConfig's (distill_config)
            raise ValueError(f"behaviours act only with teachers: zoo (this run's teachers: {self.teachers})")

    def distill_config(
        self, method: str, run_dir: str = "", fidelity: str | None = None, own: bool = True
    ) -> DistillConfig:
        """The :class:`~cpd_fast.distill.config.DistillConfig` of one method of this run (``own``: with its
        ``per_method`` settings)."""
        d = merge(self.distill, self.per_method.get(method, {}) if own else {})  # nested: key by key
        # the report's title for the tasks: the suite, or the preset's name when the tasks are the preset's
        # own (None: DistillConfig names the list, e.g. "mt10" for MT25's first ten)
        own = self.tasks is None or self.tasks == load_preset(self.preset).get("tasks")
        d["name"] = d.get("name") or self.suite or (self.preset if own else None)
        d.update(
            suite=self.suite or "custom", tasks=self.tasks, tasks_per_stage=self.tasks_per_stage,
            method=method, teachers=run_dir or "scripted", behaviours=self.behaviours, fidelity=fidelity,
            seed=self.seed, device=self.device, progress=self.progress,
            data_dir=os.path.join(run_dir, "datasets") if run_dir else None,
        )  # fmt: skip
        return from_mapping(DistillConfig, d, "distill")

    def ppo_config(self) -> PPOConfig:
        return from_mapping(PPOConfig, {**self.ppo, "device": self.device, "seed": self.seed}, "ppo")

    def task_list(self) -> list[str]:
        """The run's distinct tasks in order of first appearance (a stream may revisit a task: cw20)."""
        stream = stages(self.tasks or self.suite, self.tasks_per_stage)  # validates the stage split
        return list(dict.fromkeys(t for stage in stream for t in stage))

    def unused_settings(self, given: dict[str, Any]) -> list[str]:
        """Settings the user gave (``given``: flags and --set keys) that this run does not use."""
        out = []
        if self.teachers != "ppo" or self.backend != "ray":
            out += [f"--{k.replace('_', '-')}" for k in ("ray_address",) if given.get(k) is not None]
        if self.teachers != "ppo":
            out += [f"--{k}" for k in ("workers",) if given.get(k) is not None]
        if given.get("distill"):
            configs = [self.distill_config(m) for m in self.methods]
            keys = sorted(given["distill"])
            out += [f"distill.{k}" for k in keys if all(k in c.unused(keys) for c in configs)]
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("per_method", "behaviours"):
            if not d[key]:
                del d[key]  # configs that use none read as they always did
        return json.loads(json.dumps(d))  # plain lists/dicts (tuples -> lists): YAML- and compare-friendly

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineConfig:
        if isinstance(d, dict) and isinstance(d.get("methods"), str):
            d = {**d, "methods": [d["methods"]]}
        return from_mapping(cls, d, "the config")


def _strip(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


# ----------------------------------------------------------------------------- config layering


def load_preset(name: str) -> dict[str, Any]:
    """The preset's YAML as a dict (shipped in the package: ``cpd_fast/presets/<name>.yaml``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("cpd_fast").joinpath("presets", f"{name}.yaml").read_text()
    return {**(yaml.safe_load(text) or {}), "preset": name}


def resolve_config(
    preset: str | None = None,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> PipelineConfig:
    """Preset (or ``base``, e.g. a run's saved config) <- ``config_file`` <- ``overrides``, validated.

    The preset is ``preset``, else the config file's ``preset`` key, else ``quick``. A setting that would
    not act is refused (:func:`inactive_given`; ``base``, a run made already, is not checked).
    """
    file_d = load_yaml(config_file) if config_file else {}
    preset_d: dict[str, Any] = {}
    if base is None:
        base = preset_d = load_preset(preset or file_d.get("preset") or "quick")
    elif preset:
        base = preset_d = load_preset(preset)
    d = merge(merge(base, file_d), overrides or {})
    if preset:
        d["preset"] = preset
    cfg = PipelineConfig.from_dict(d)
    refusal = inactive_given(cfg, [
        (preset_d, f" (set by the preset {preset_d.get('preset')})", True),
        (file_d, f" (set in {config_file})", False),
        (overrides or {}, "", True),
    ])  # fmt: skip
    if refusal:
        raise ValueError(refusal)
    return cfg


def _leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of the leaves of a nested mapping."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def inactive_given(cfg: PipelineConfig, layers: list[tuple[dict[str, Any], str, bool]]) -> str | None:
    """The one-line refusal of the ``distill`` / ``per_method`` settings the layers give that act in none
    of the run's methods that read them (None: every one acts somewhere).

    ``layers``: ``(a config layer, the note naming where it comes from, strict)``; a strict layer (a
    preset, the flags) gives every key it holds, a lenient one (a ``--config`` file, which may be a run's
    own config.yaml) only those whose value is not the default.
    """
    default = _leaves(json.loads(json.dumps(DistillConfig().to_dict())))
    given: dict[tuple[str | None, str], str] = {}  # (per_method's method or None, key) -> its name
    for layer, note, strict in layers:
        sections = [(None, "distill", layer.get("distill"))]
        sections += [(m, f"per_method.{m}", v) for m, v in (layer.get("per_method") or {}).items()]
        for method, where, values in sections:
            for key, value in _leaves(values if isinstance(values, dict) else {}).items():
                if strict or json.loads(json.dumps(value)) != default.get(key):
                    given[(method, key)] = f"{where}.{key}{note}"
    for (method, key), name in given.items():
        configs = [cfg.distill_config(m) for m in ([method] if method else cfg.methods)]
        if any(key not in c.inactive() and not c.unused([key]) for c in configs):
            continue  # it acts in one of the methods
        idle = next((c for c in configs if key in c.inactive()), None)
        if idle is not None:  # (read by no method at all: cpd_fast.cli.run warns about it)
            return inactive_refusal(idle, {key: name})
    return None


def runtime_keys(saved: dict[str, Any], mine: dict[str, Any]) -> tuple[str, ...]:
    """Keys a resumed run may change: the runtime-only ones, and the PPO settings of runs that train none."""
    untrained = saved.get("teachers") == mine.get("teachers") and mine.get("teachers") in ("scripted", "zoo")
    return _RUNTIME + (("ppo",) if untrained else ())


def config_diff(saved: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, ignoring :func:`runtime_keys`."""
    return _config_diff(saved, mine, runtime_keys(saved, mine))
