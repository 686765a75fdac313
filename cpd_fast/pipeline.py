"""``cpd run``: the whole study in one command, in a run directory that survives being killed.

Steps, in order (each is skipped when a previous invocation finished it and its outputs are intact)::

    config      RUN/config.yaml         the resolved config, written before anything else
    fidelity    RUN/fidelity.json       scripted expert under envpool vs Meta-World's envs -> backend per task
    teachers    RUN/teachers.json       PPO training (local pool or Ray) or the scripted experts, then the
                                        quality gate (official protocol); every task needs a usable teacher
    collect     RUN/datasets/           one Minari dataset per task, shared by every method
    distill:M   RUN/methods/M/          continual distillation with method M, evaluated after every stage
                                        (``cpd_fast.continual.run_distill``: checkpoints per phase)
    report      RUN/report/             results.md, summary.json, heatmaps and bar charts

**Presets** are YAML files shipped in ``cpd_fast/presets`` (``quick``, ``mt10``, ``mt25``). A config is
layered: preset, then ``--config FILE`` (a partial or a full config; a run's own ``config.yaml`` works),
then the flags (``--seed``, ``--methods``, ... and ``--set dotted.key=value`` for anything else, values
parsed as YAML). ``distill`` holds :class:`~cpd_fast.continual.DistillConfig` fields, ``ppo``
:class:`~cpd_fast.teachers.ppo.PPOConfig` fields; what a preset leaves out is their defaults, and the
resolved config records every number, so a run states exactly what it did.

**What ``quick`` shows** (the default; 5 min 45 s end to end measured on this project's 2-core CPU
machine while other jobs kept its load at ~6; no GPU, nothing to download): Meta-World's scripted
experts, gated with the official protocol on 10 of the 50 goals, teach four MT25 tasks in two stages
(reach + drawer-close, then button-press-topdown + window-close). cpd and plain fine-tuning are distilled
from the same datasets with the same budget (1500 steps of 128 windows per stage) and evaluated on every
seen task after each stage. Measured (seed 0): cpd keeps the first stage (ACC 0.95, forgetting 0.05:
reach 0.9 -> 0.8, drawer-close 1.0 -> 1.0), fine-tuning forgets it (ACC 0.68, forgetting 0.60: reach
0.9 -> 0.0, drawer-close 1.0 -> 0.7); both learn the second stage fully. It is smoke-sized (one seed, 10
evaluation goals: a task's success moves in steps of 0.1); mt10 and mt25 are the study. The report
labels a run on an explicit task list "custom".

**Resume.** Re-running with the same ``--out`` continues: finished steps are skipped (their outputs are
checked first), an interrupted distillation restarts at its last finished phase, an interrupted PPO
teacher at its last checkpoint, an interrupted collection at the next task. Once a step runs, every
later one runs too (cheaply: each skips its own finished work), so a redone step is never ignored
downstream. ``cpd run --out RUN`` alone resumes with ``RUN/config.yaml``. A different config is
refused, naming the keys that differ; the runtime-only keys (device, Ray backend/address, workers,
progress) may change. A run directory records its own path (teachers, datasets): resume it where it was
made.

**Integrity.** Every write is atomic (:mod:`cpd_fast.runio`). Torch checkpoints carry a ``.sha256``
sidecar and datasets a checksum per file in their ``<task>.collected.json``; a resumed run verifies them
all before doing anything and names the damaged file with what to delete to redo the step that made it.

**Determinism.** Given the teachers, a resumed run reproduces an uninterrupted one exactly (collection is
seeded; every distillation phase has its own generator and a fresh optimizer; same machine and thread
count). A PPO teacher interrupted mid-training is not bit-identical to an uninterrupted one: its learner
state is restored exactly but its envs restart with fresh episodes (:mod:`cpd_fast.teachers.ppo`), so it
is another sample of the same training run.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import time
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from cpd_fast.data import verify_dataset_files
from cpd_fast.runio import CorruptFileError, atomic_path, verify_sha256, write_json_atomic

__all__ = ["PRESETS", "PipelineConfig", "add_cli", "load_preset", "resolve_config", "run_pipeline"]

PRESETS = ("quick", "mt10", "mt25")
# DistillConfig fields the pipeline sets itself (from the top level, or per step)
_OWNED = ("suite", "tasks", "tasks_per_stage", "method", "teachers", "fidelity", "seed", "device", "data_dir",
          "progress")  # fmt: skip
# keys that change how a run executes, not what it computes: they may differ on resume
_PPO_OWNED = ("seed", "device")  # PPOConfig fields set from the top level
_RUNTIME = {"device", "backend", "ray_address", "workers", "progress", "distill.threads"}
STATE_FILE = "pipeline.json"


@dataclass
class FidelitySettings:
    """``cpd envs check`` inside the run: scripted-expert episodes per task and backend (0 skips the check;
    then the known envpool mismatches of :data:`cpd_fast.continual.KNOWN_BAD_ENVPOOL` are used)."""

    episodes: int = 8
    num_envs: int = 8


@dataclass
class GateSettings:
    """Teacher quality gate (:mod:`cpd_fast.teachers.gate`). ``eval_goals`` None: the distillation's."""

    threshold: float = 0.8
    on_fail: str = "retrain"  # PPO teachers only: retrain | scripted | exclude
    eval_goals: int | None = None
    eval_envs: int = 10
    retrain_factor: float = 2.0


@dataclass
class PipelineConfig:
    """One ``cpd run``: what to distil, with which teachers and methods. Written as ``RUN/config.yaml``."""

    preset: str = "quick"
    suite: str | None = None  # a suite name (mt10, mt25, ...), or
    tasks: list[str] | None = None  # an explicit task list (then suite is ignored)
    tasks_per_stage: int = 5
    teachers: str = "scripted"  # scripted | ppo
    methods: list[str] = field(default_factory=lambda: ["cpd"])
    seed: int = 0
    device: str = "cpu"
    backend: str = "local"  # PPO teacher training: local process pool | ray
    ray_address: str | None = None
    workers: int | None = None
    progress: bool = True
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)
    gate: GateSettings = field(default_factory=GateSettings)
    ppo: dict[str, Any] = field(default_factory=dict)  # PPOConfig fields (resolved when teachers == ppo)
    distill: dict[str, Any] = field(default_factory=dict)  # DistillConfig fields (resolved)

    def __post_init__(self) -> None:
        from cpd_fast.continual import METHODS
        from cpd_fast.distributed import BACKENDS
        from cpd_fast.teachers.gate import ON_FAIL

        if isinstance(self.methods, str):
            self.methods = [self.methods]
        _known(PipelineConfig, dict(vars(self)), "the config")  # field types
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be a positive int, got {self.workers}")
        if isinstance(self.fidelity, dict):
            self.fidelity = FidelitySettings(**_known(FidelitySettings, self.fidelity, "fidelity"))
        if isinstance(self.gate, dict):
            self.gate = GateSettings(**_known(GateSettings, self.gate, "gate"))
        if not self.suite and not self.tasks:
            raise ValueError("the config needs a suite (e.g. suite: mt10) or a task list (tasks: [...])")
        if self.tasks:
            self.suite = None
        if self.teachers not in ("scripted", "ppo"):
            raise ValueError(f"unknown teachers {self.teachers!r}; choose scripted or ppo")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(
                f"unknown method(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)}"
            )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"a method is listed twice: {' '.join(self.methods)}")
        if self.gate.on_fail not in ON_FAIL:
            raise ValueError(
                f"unknown gate.on_fail {self.gate.on_fail!r}; choose one of {', '.join(ON_FAIL)}"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; choose cpu or cuda")
        if self.fidelity.episodes < 0:
            raise ValueError(
                f"fidelity.episodes must be >= 0 (0 skips the check), got {self.fidelity.episodes}"
            )
        for section, keys in (("distill", _OWNED), ("ppo", _PPO_OWNED)):
            owned = sorted(set(getattr(self, section)) & set(keys))
            if owned:
                raise ValueError(
                    f"set {', '.join(owned)} at the top level of the config, not under {section}"
                )
        self.task_list()  # known tasks that split into equal stages
        # resolve (and so validate) the two nested configs: every number the run uses ends up in config.yaml
        self.distill = _strip(self.distill_config(self.methods[0]).to_dict(), _OWNED)
        ppo = _strip(self.ppo_config().to_dict(), _PPO_OWNED)  # validated even when unused
        if self.teachers == "ppo":
            self.ppo = ppo
        if self.gate.eval_goals is None:
            self.gate.eval_goals = self.distill["eval_goals"]

    def distill_config(self, method: str, run_dir: str = "", fidelity: str | None = None) -> Any:
        """The :class:`~cpd_fast.continual.DistillConfig` of one method of this run."""
        from cpd_fast.continual import DistillConfig

        known = _known(DistillConfig, self.distill, "distill")
        known["name"] = known.get("name") or self.suite or self.preset  # the report's title for the tasks
        return DistillConfig(
            **known, suite=self.suite or "custom", tasks=self.tasks, tasks_per_stage=self.tasks_per_stage,
            method=method, teachers=run_dir or "scripted", fidelity=fidelity, seed=self.seed,
            device=self.device, data_dir=os.path.join(run_dir, "datasets") if run_dir else None,
            progress=self.progress,
        )  # fmt: skip

    def ppo_config(self) -> Any:
        from cpd_fast.teachers.ppo import PPOConfig

        known = _known(PPOConfig, self.ppo, "ppo")
        return PPOConfig(**known, device=self.device, seed=self.seed)

    def task_list(self) -> list[str]:
        from cpd_fast.tasks import resolve_tasks, stages

        stages(self.tasks or self.suite, self.tasks_per_stage)  # validates the stage split
        return resolve_tasks(self.tasks or self.suite)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))  # plain lists/dicts (tuples -> lists): YAML- and compare-friendly

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a mapping (key: value), got {d!r}")
        d = {**d, "methods": [d["methods"]]} if isinstance(d.get("methods"), str) else d
        return cls(**_known(cls, d, "the config"))


def _known(cls: type, d: dict[str, Any], where: str) -> dict[str, Any]:
    """``d`` checked against ``cls``'s fields: an unknown key (a typo) or a value of the wrong type (``abc``
    for a number) is a user mistake, said in one line, not a ``TypeError`` deep inside a constructor."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping (key: value), got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(
            f"unknown key(s) in {where}: {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    for k, v in d.items():
        if not _type_ok(v, hints[k]):
            raise ValueError(f"{where}: {k} must be {_type_name(hints[k])}, got {v!r}")
    return dict(d)


def _type_ok(v: Any, hint: Any) -> bool:
    """Does a YAML value fit a field annotation? (lists stand for tuples, mappings for dataclasses)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(v, a) for a in args)
    if hint is Any:
        return True
    if hint is type(None):
        return v is None
    if origin in (list, tuple):
        return isinstance(v, list | tuple) and all(_type_ok(x, args[0]) for x in v)
    if origin is dict or dataclasses.is_dataclass(hint):
        return isinstance(v, dict) or (dataclasses.is_dataclass(hint) and isinstance(v, hint))
    if hint is float:
        return isinstance(v, int | float) and not isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (list, tuple):
        return "a list"
    if typing.get_origin(hint) is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _strip(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


# ----------------------------------------------------------------------------- config layering


def load_preset(name: str) -> dict[str, Any]:
    """The preset's YAML as a dict (shipped in the package: ``cpd_fast/presets/<name>.yaml``)."""
    import yaml

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("cpd_fast").joinpath("presets", f"{name}.yaml").read_text()
    return {**(yaml.safe_load(text) or {}), "preset": name}


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

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


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update: nested sections merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["distill.steps_per_stage=500", "methods=[cpd, ewc]"]`` -> nested dict (values parsed as YAML)."""
    import yaml

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
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"--set {key}: {value!r} is not a YAML value ({type(err).__name__})") from None
    return out


def resolve_config(
    preset: str | None = None,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> PipelineConfig:
    """Preset (or ``base``, e.g. a run's saved config) <- ``config_file`` <- ``overrides``, validated.

    The preset is ``preset``, else the config file's ``preset`` key, else ``quick``.
    """
    file_d = _load_yaml(config_file) if config_file else {}
    if base is None:
        base = load_preset(preset or file_d.get("preset") or "quick")
    elif preset:
        base = load_preset(preset)
    d = _merge(_merge(base, file_d), overrides or {})
    if preset:
        d["preset"] = preset
    return PipelineConfig.from_dict(d)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ (runtime-only keys and unused PPO settings are ignored)."""
    a, b = _flat(saved), _flat(mine)
    ignore = set(_RUNTIME)
    if saved.get("teachers") == mine.get("teachers") == "scripted":
        ignore |= {k for k in a.keys() | b.keys() if k.startswith("ppo.") or k == "ppo"}
    return sorted(k for k in a.keys() | b.keys() if k not in ignore and a.get(k) != b.get(k))


# ----------------------------------------------------------------------------- the run directory


class _State:
    """``RUN/pipeline.json``: finished steps with their records, written only after a step's outputs."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, STATE_FILE)
        self.steps: dict[str, dict[str, Any]] = {}
        if os.path.isfile(self.path):
            with open(self.path) as f:
                try:
                    self.steps = json.load(f)["steps"]
                except (json.JSONDecodeError, KeyError):
                    raise CorruptFileError(f"{self.path} is corrupt; delete it and re-run") from None

    def done(self, name: str, outputs: list[str]) -> bool:
        return name in self.steps and all(os.path.exists(p) for p in outputs)

    def mark(self, name: str, record: dict[str, Any]) -> None:
        self.steps[name] = record
        write_json_atomic(self.path, {"steps": self.steps})


def _remedy(run_dir: str, path: str) -> str:
    """What to delete to redo the step that wrote ``path`` (the step re-runs because its output is gone)."""
    rel = os.path.relpath(path, run_dir).split(os.sep)
    again = "and re-run the same command to redo"
    if rel[0] == "methods" and len(rel) > 2:
        return f"delete {os.path.join(run_dir, *rel[:2])} {again} that method's distillation"
    if rel[0] == "teachers" and len(rel) > 2:
        where = f"{os.path.join(run_dir, *rel[:2])} and {os.path.join(run_dir, 'teachers.json')}"
        return f"delete {where} {again} that teacher's training"
    return f"delete it {again} the step that wrote it"


def verify_run_dir(run_dir: str) -> int:
    """Check every checksummed file of a run (torch sidecars, dataset manifests); returns how many.

    Raises:
        CorruptFileError: naming the first damaged file and what to delete to redo its step.
    """
    n = 0
    for sidecar in sorted(glob.glob(os.path.join(run_dir, "**", "*.sha256"), recursive=True)):
        path = sidecar[: -len(".sha256")]
        if os.path.isfile(path):
            n += verify_sha256(path, _remedy(run_dir, path))
    for manifest_path in sorted(glob.glob(os.path.join(run_dir, "datasets", "*.collected.json"))):
        n += verify_dataset_files(manifest_path)
    return n


# ----------------------------------------------------------------------------- the steps


class Pipeline:
    """Runs the steps of one config in one run directory (see the module docstring)."""

    def __init__(self, cfg: PipelineConfig, run_dir: str, console: Any) -> None:
        self.cfg, self.run_dir, self.console = cfg, run_dir, console
        self.tasks = cfg.task_list()
        self.state = _State(run_dir)
        self.fidelity_path = os.path.join(run_dir, "fidelity.json") if cfg.fidelity.episodes else None
        self.data_root = os.path.join(run_dir, "datasets")

    def steps(self) -> list[tuple[str, Any, list[str]]]:
        """``[(name, function, outputs)]`` in order; a finished step is skipped if its outputs exist."""
        out: list[tuple[str, Any, list[str]]] = []
        if self.fidelity_path:
            out.append(("fidelity", self.fidelity, [self.fidelity_path]))
        out.append(("teachers", self.teachers, [os.path.join(self.run_dir, "teachers.json")]))
        manifests = [os.path.join(self.data_root, f"{t}.collected.json") for t in self.tasks]
        out.append(("collect", self.collect, manifests))
        for m in self.cfg.methods:
            res = os.path.join(self.method_dir(m), "results.json")
            out.append((f"distill:{m}", lambda m=m: self.distill(m), [res]))
        out.append(("report", self.report, [os.path.join(self.run_dir, "report", "results.md")]))
        return out

    def method_dir(self, method: str) -> str:
        return os.path.join(self.run_dir, "methods", method)

    def run(self) -> dict[str, dict[str, Any]]:
        """Run the unfinished steps. Once one runs, every later step runs too (each is idempotent, so what
        is already done inside it is skipped): a redone upstream step is never silently ignored."""
        steps = self.steps()
        cascade = False
        for i, (name, fn, outputs) in enumerate(steps, 1):
            head = f"[bold]\\[{i}/{len(steps)}] {name}[/bold]"
            if not cascade and self.state.done(name, outputs):
                self.console.print(f"{head}: done earlier, skipped")
                continue
            self.console.print(f"{head}: {self.describe(name)}")
            cascade = True
            t0 = time.perf_counter()
            record = fn() or {}
            record["time_s"] = round(time.perf_counter() - t0, 1)
            self.state.mark(name, record)
            self.console.print(f"    [green]done[/green] in {record['time_s']:.1f} s")
        return self.state.steps

    def describe(self, name: str) -> str:
        c, n = self.cfg, len(self.tasks)
        d = c.distill
        return {
            "fidelity": f"scripted experts on envpool vs Meta-World, {c.fidelity.episodes} episodes/task",
            "teachers": (
                f"{'PPO training (' + c.backend + ') +' if c.teachers == 'ppo' else 'scripted experts,'} "
                f"quality gate (official protocol, {c.gate.eval_goals} goals, threshold {c.gate.threshold})"
            ),
            "collect": f"{d['episodes_per_task']} episodes x {n} tasks (noise std {d['noise_std']})",
            "report": "figures and results table",
        }.get(name, f"{n // c.tasks_per_stage} stages x {c.tasks_per_stage} tasks, {d['steps_per_stage']} "
                    f"steps/stage, eval on {d['eval_goals']} goals after each stage")  # fmt: skip

    # ---- fidelity
    def fidelity(self) -> dict[str, Any]:
        from cpd_fast.fidelity import backend_choices, check_fidelity, format_table, save_report

        f = self.cfg.fidelity
        rows = check_fidelity(self.tasks, episodes=f.episodes, num_envs=f.num_envs, seed=self.cfg.seed)
        save_report(rows, self.fidelity_path, episodes=f.episodes, seed=self.cfg.seed)
        self.console.print(format_table(rows), markup=False, highlight=False)
        return {"backend": backend_choices(rows)}

    def _backends(self) -> dict[str, str]:
        from cpd_fast.continual import KNOWN_BAD_ENVPOOL
        from cpd_fast.fidelity import load_backend_choices

        return load_backend_choices(self.fidelity_path) if self.fidelity_path else dict(KNOWN_BAD_ENVPOOL)

    # ---- teachers + quality gate
    def teachers(self) -> dict[str, Any]:
        from cpd_fast.teachers.gate import load_teachers_json

        if self.cfg.teachers == "ppo":
            self._train_ppo()
        else:
            self._gate_scripted()
        records = load_teachers_json(self.run_dir)
        self._teacher_table(records)
        unusable = [t for t in self.tasks if t not in records or not records[t].used]
        if unusable:
            raise ValueError(
                f"no usable teacher for {', '.join(unusable)} (see {self.run_dir}/teachers.json); with a new "
                "--out, try --set gate.on_fail=scripted, a larger ppo.total_steps or a lower gate.threshold"
            )
        return {t: {"source": r.source, "success": r.success_rate} for t, r in records.items()}

    def _train_ppo(self) -> None:
        from cpd_fast.distributed import train_teachers

        g = self.cfg.gate
        train_teachers(
            self.tasks, self.run_dir, self.cfg.ppo_config(), backend=self.cfg.backend,
            workers=self.cfg.workers, ray_address=self.cfg.ray_address, env_backends=self._backends(),
            threshold=g.threshold, on_fail=g.on_fail, retrain_factor=g.retrain_factor,
            eval_goals=g.eval_goals, eval_envs=g.eval_envs, progress=self.cfg.progress,
        )  # fmt: skip

    def _gate_scripted(self) -> None:
        """The gate on Meta-World's scripted experts: measured, recorded, never used below the threshold."""
        from tqdm import tqdm

        from cpd_fast.teachers.gate import TeacherRecord, evaluate_teacher, passes, write_teachers_json
        from cpd_fast.teachers.scripted import ScriptedExpert

        g = self.cfg.gate
        records = {}
        for task in tqdm(self.tasks, desc="gate", disable=not self.cfg.progress, leave=False):
            m = evaluate_teacher(ScriptedExpert(task), task, num_goals=g.eval_goals, num_envs=g.eval_envs)
            ok = passes(m["success_rate"], g.threshold)
            records[task] = TeacherRecord(
                task=task, source="scripted", path=None, success_rate=m["success_rate"],
                protocol=m["protocol"], threshold=g.threshold, passed=ok, status="ok" if ok else "failed",
                used=ok, flagged=not ok,
                history=[{"source": "scripted", "path": None, "success_rate": m["success_rate"]}],
            )  # fmt: skip
        write_teachers_json(
            self.run_dir, records, tasks=self.tasks, threshold=g.threshold, eval_goals=g.eval_goals
        )

    def _teacher_table(self, records: dict[str, Any]) -> None:
        from rich.table import Table

        table = Table("task", "teacher", "success", "status", box=None, padding=(0, 2))
        for t in self.tasks:
            r = records.get(t)
            rate = "-" if r is None or r.success_rate is None else f"{r.success_rate:.2f}"
            table.add_row(t, r.source if r else "-", rate, (r.status if r else "missing"))
        self.console.print(table)

    # ---- collection
    def collect(self) -> dict[str, Any]:
        """One dataset per task, reused by every method (:func:`cpd_fast.continual.ensure_dataset`: the
        same manifest ``<task>.collected.json`` that ``run_distill`` checks before collecting)."""
        from tqdm import tqdm

        from cpd_fast.continual import ensure_dataset, teacher_specs

        dcfg = self.cfg.distill_config(self.cfg.methods[0], self.run_dir, self.fidelity_path)
        specs = teacher_specs(dcfg, self.tasks)
        backends = self._backends()
        out = {}
        for task in tqdm(self.tasks, desc="collect", disable=not self.cfg.progress, leave=False):
            source, path, _ = specs[task]
            manifest = ensure_dataset(dcfg, task, self.data_root, source, path, backends.get(task, "envpool"))
            if "teacher_success" not in manifest and self.cfg.gate.eval_goals == dcfg.eval_goals:
                manifest["teacher_success"] = self._teacher_success(task)  # the gate measured it already
                write_json_atomic(os.path.join(self.data_root, f"{task}.collected.json"), manifest)
            out[task] = {"files": len(manifest["files"])}
        return out

    def _teacher_success(self, task: str) -> float:
        from cpd_fast.teachers.gate import load_teachers_json

        return float(load_teachers_json(self.run_dir)[task].success_rate)

    # ---- distillation (+ evaluation after every stage)
    def distill(self, method: str) -> dict[str, Any]:
        from cpd_fast.continual import run_distill

        for task in self.tasks:  # a method must not train on data that changed since it was collected
            verify_dataset_files(os.path.join(self.data_root, f"{task}.collected.json"))
        result = run_distill(
            self.cfg.distill_config(method, self.run_dir, self.fidelity_path), self.method_dir(method)
        )
        m = result.metrics()
        return {
            "acc": m.acc,
            "bwt": m.bwt,
            "forgetting": m.mean_forgetting,
            "relative": m.relative_performance,
        }

    # ---- report
    def report(self) -> dict[str, Any]:
        from cpd_fast.report import write_report

        paths = write_report(
            [self.method_dir(m) for m in self.cfg.methods], os.path.join(self.run_dir, "report")
        )
        return {"files": [os.path.relpath(p, self.run_dir) for p in map(str, paths)]}


# ----------------------------------------------------------------------------- entry points


def prepare_run_dir(cfg: PipelineConfig, run_dir: str) -> None:
    """Write ``RUN/config.yaml`` (first), or check that an existing run was made with this config."""
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    mine = cfg.to_dict()
    if os.path.isfile(path):
        saved = _load_yaml(path)
        diff = config_diff(saved, mine)
        if diff:
            a, b = _flat(saved), _flat(mine)
            shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4])
            more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
            raise ValueError(
                f"{run_dir} holds a run made with a different config ({shown}{more}); resume it with "
                f"`cpd run --out {run_dir}` alone, or choose a new --out"
            )
        return
    os.makedirs(run_dir, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(f"# cpd run: resolved config (preset {cfg.preset}); rerun with cpd run --config {path}\n")
        yaml.safe_dump(mine, f, sort_keys=False)


def run_pipeline(cfg: PipelineConfig, run_dir: str, console: Any = None) -> dict[str, Any]:
    """Run (or resume) the whole pipeline of ``cfg`` in ``run_dir``; returns ``pipeline.json``'s steps."""
    from rich.console import Console

    # soft_wrap: long lines (paths, the fidelity table) are not folded at 80 columns when piped to a log
    console = console or Console(highlight=False, soft_wrap=True)
    run_dir = os.path.normpath(run_dir)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu")
    if cfg.teachers == "ppo" and cfg.backend == "ray":  # fail now, not after the fidelity check
        from cpd_fast.distributed import check_ray_address

        check_ray_address(cfg.ray_address)
    t0 = time.perf_counter()
    resumed = os.path.isfile(os.path.join(run_dir, "config.yaml"))
    prepare_run_dir(cfg, run_dir)
    if resumed:
        n = verify_run_dir(run_dir)
        console.print(f"resuming {run_dir} ({n} checksummed files verified)")
    # warnings (a teacher below the gate, an envpool mismatch) as one line each
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    steps = Pipeline(cfg, run_dir, console).run()
    print_summary(cfg, run_dir, console, time.perf_counter() - t0)
    return steps


def print_summary(cfg: PipelineConfig, run_dir: str, console: Any, wall: float) -> None:
    """Two tables, methods x metrics and tasks x (teacher, methods) final success, then where the files are.

    Tasks are rows so that the table stays readable for 25 tasks.
    """
    from rich.table import Table

    from cpd_fast.metrics import RunResult

    tasks = cfg.task_list()
    runs = {m: RunResult.load(os.path.join(run_dir, "methods", m, "results.json")) for m in cfg.methods}
    metrics = {m: r.metrics() for m, r in runs.items()}
    n_stages = len(tasks) // cfg.tasks_per_stage
    table = Table(title=f"cpd run {cfg.preset}: {len(tasks)} tasks in {n_stages} stages, seed {cfg.seed}")
    for col in ("method", "relative to teacher", "ACC", "forgetting", "BWT", "wall time"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m, x in metrics.items():
        vals = (x.relative_performance, x.acc, x.mean_forgetting, x.bwt)
        table.add_row(m, *(f"{v:.2f}" for v in vals), f"{runs[m].wall_time_s / 60:.1f} min")
    console.print(table)
    per_task = Table(title="final success per task (after the last stage)")
    for col in ("task", "stage", "teacher", *cfg.methods):
        per_task.add_column(col, justify="left" if col == "task" else "right")
    first = next(iter(runs.values()))
    for j, t in enumerate(tasks):
        row = [f"{metrics[m].final_success[j]:.2f}" for m in cfg.methods]
        per_task.add_row(t, str(first.task_stage[j]), f"{first.teacher_success[j]:.2f}", *row)
    console.print(per_task)
    report = os.path.join(run_dir, "report")
    console.print(f"report: {report}/results.md, figures {report}/*.png, numbers {report}/summary.json")
    console.print(f"success matrices per stage: {run_dir}/methods/<method>/results.json")
    console.print(f"config: {run_dir}/config.yaml; this invocation took {wall:.0f} s")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cpd run`` on the top-level ``cpd`` subparsers."""
    from cpd_fast.continual import METHODS

    p = subparsers.add_parser(
        "run",
        help="the whole pipeline: teachers, gate, data, continual distillation, evaluation, report",
        description="Teachers (scripted or PPO) -> fidelity and quality gate -> data collection -> continual "
        "distillation of each method -> evaluation after every stage -> report, in one run directory. "
        "Re-running with the same --out resumes; `cpd run --out RUN` alone resumes with RUN/config.yaml.",
    )
    p.add_argument("--preset", choices=PRESETS, default=None, help="base config (default quick)")
    p.add_argument(
        "--config", default=None, metavar="FILE", help="YAML config (partial or a run's config.yaml)"
    )
    p.add_argument("--teachers", choices=("scripted", "ppo"), default=None)
    p.add_argument("--backend", choices=("local", "ray"), default=None, help="where PPO teachers train")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster ('auto', 'ray://host:port')")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None, metavar="METHOD",
                   help=f"methods to distil with ({', '.join(METHODS)})")  # fmt: skip
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config key, e.g. distill.steps_per_stage=500")  # fmt: skip
    p.add_argument(
        "--out", default=None, metavar="RUN_DIR", help="run directory (default runs/<preset>_s<seed>)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cli_run)


def _cli_run(args: argparse.Namespace) -> int:
    import yaml

    overrides = parse_set(args.overrides)
    flags = {"teachers": args.teachers, "backend": args.backend, "ray_address": args.ray_address,
             "methods": args.methods, "seed": args.seed, "device": args.device,
             "progress": False if args.no_progress else None}  # fmt: skip
    if args.ray_address and args.backend is None:
        flags["backend"] = "ray"  # an address only makes sense for the Ray backend
    overrides = _merge(overrides, {k: v for k, v in flags.items() if v is not None})
    base = None
    saved = os.path.join(args.out, "config.yaml") if args.out else None
    if saved and os.path.isfile(saved) and not args.preset and not args.config:
        base = _load_yaml(saved)  # `cpd run --out RUN` resumes RUN with its own config
    cfg = resolve_config(args.preset, args.config, overrides, base=base)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    run_pipeline(cfg, args.out or os.path.join("runs", f"{cfg.preset}_s{cfg.seed}"))
    return 0
