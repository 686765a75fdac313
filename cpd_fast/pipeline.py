"""``cpd run``: the whole study in one command, in a run directory that survives being killed.

Steps, in order (each is skipped when a previous invocation finished it and its outputs are intact)::

    config      RUN/config.yaml         the resolved config, written before anything else
    fidelity    RUN/fidelity.json       scripted expert under envpool vs Meta-World's envs -> backend per task
    teachers    RUN/teachers.json       PPO training (local pool or Ray) or the scripted experts, then the
                                        quality gate (official protocol); every task needs a usable teacher
    collect     RUN/datasets/           one Minari dataset per task, shared by every method
    distill:M   RUN/methods/M/          continual distillation with method M, evaluated after every stage
                                        (``cpd_fast.distill.run.run_distill``: checkpoints per phase)
    report      RUN/report/             results.md, summary.json, heatmaps and bar charts

**Presets** are YAML files shipped in ``cpd_fast/presets`` (``quick``, ``mt10``, ``mt25``, ``mt25-plus``).
A config is layered: preset, then ``--config FILE`` (a partial or a full config; a run's own
``config.yaml`` works), then the flags (``--seed``, ``--methods``, ... and ``--set dotted.key=value`` for
anything else, values parsed as YAML). ``distill`` holds :class:`~cpd_fast.distill.config.DistillConfig`
fields, ``ppo`` :class:`~cpd_fast.teachers.ppo.PPOConfig` fields; what a preset leaves out is their
defaults, and the resolved config records every number, so a run states exactly what it did.

**What ``quick`` shows** (the default; 5 min 47 s on this project's 2-core CPU machine, its two methods
side by side; no GPU, nothing to download): Meta-World's scripted experts, gated with the official
protocol on 10 of the 50 goals, teach four MT25 tasks in two stages (reach + drawer-close, then
button-press-topdown + window-close). cpd and plain fine-tuning are distilled from the same datasets with
the same budget (1500 steps of 128 windows per stage) and evaluated on every seen task after each stage.
Measured (seed 0): cpd keeps the first stage (ACC 0.97, forgetting 0.00: reach 0.9 -> 0.9, drawer-close
1.0 -> 1.0), fine-tuning forgets it (ACC 0.75, forgetting 0.45: reach 0.9 -> 0.3, drawer-close 1.0 ->
0.7); both learn the second stage fully. It is smoke-sized (one seed, 10 evaluation goals: a task's
success moves in steps of 0.1); mt10 and mt25 are the study. The report labels a run on an explicit task
list "custom".

**Resume.** Re-running with the same ``--out`` continues: finished steps are skipped (their outputs are
checked first), an interrupted distillation restarts at its last finished phase, an interrupted PPO
teacher at its last checkpoint, an interrupted collection at the next task. Once a step runs, every
later one runs too (cheaply: each skips its own finished work), so a redone step is never ignored
downstream. ``cpd run --out RUN`` alone resumes with ``RUN/config.yaml``. A different config is
refused, naming the keys that differ; the runtime-only keys (device, Ray backend/address, workers,
jobs, progress, distill threads and eval_workers) may change.

**Cores.** The methods are distilled side by side, one worker process each (``jobs``; default: as many
as there are methods and cores), each with its share of the cores as torch threads (``distill.threads``
overrides it) and its evaluations in its own process; a lone method trains on every core and evaluates
in ``distill.eval_workers`` worker processes (default: one per core, :mod:`cpd_fast.evalpool`). The
share is fixed by the config, not by what is left to do, so a resumed run computes what an uninterrupted
one does; at the same ``distill.threads``, side by side or one after another gives the same bits
(tested), and evaluation gives the same flags whatever the number of workers. A run
directory records its own path (teachers, datasets): resume it where it was made.

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
from dataclasses import field
from importlib import resources
from typing import Any

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
    parse_set,
)
from cpd_fast.data import verify_dataset_files
from cpd_fast.runio import Ledger, RunLock, atomic_path, check_same_config, read_json, verify_sha256
from cpd_fast.runio import config_diff as _config_diff

__all__ = [
    "PRESETS",
    "PipelineConfig",
    "add_cli",
    "config_diff",
    "load_preset",
    "resolve_config",
    "run_pipeline",
]

PRESETS = ("quick", "mt10", "mt25", "mt25-plus")
# DistillConfig fields the pipeline sets itself (from the top level, or per step)
_OWNED = ("suite", "tasks", "tasks_per_stage", "method", "teachers", "fidelity", "seed", "device", "data_dir",
          "progress")  # fmt: skip
_PPO_OWNED = ("seed", "device")  # PPOConfig fields set from the top level
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
STATE_FILE = "pipeline.json"
_TEACHERS = {
    "ppo": "PPO training ({backend}) +",
    "scripted": "scripted experts,",
    "zoo": "teacher zoo {zoo},",
}


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
    zoo: Str = "mt25"  # teachers == zoo: a shipped zoo's name or a zoo directory (cpd_fast.teachers.zoo)
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

    def __post_init__(self) -> None:
        from cpd_fast.distill.methods import METHODS
        from cpd_fast.distributed import BACKENDS
        from cpd_fast.teachers.gate import ON_FAIL

        if not self.suite and not self.tasks:
            raise ValueError("the config needs a suite (e.g. suite: mt10) or a task list (tasks: [...])")
        if self.tasks:
            self.suite = None
        for key, value, allowed in (
            ("teachers", self.teachers, ("scripted", "ppo", "zoo")), ("backend", self.backend, BACKENDS),
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
        # resolve (and so validate) the two nested configs: every number the run uses ends up in config.yaml
        self.distill = _strip(self.distill_config(self.methods[0]).to_dict(), _OWNED)
        ppo = _strip(self.ppo_config().to_dict(), _PPO_OWNED)  # validated even when unused
        if self.teachers == "ppo":
            self.ppo = ppo
        if self.gate.eval_goals is None:
            self.gate.eval_goals = self.distill["eval_goals"]

    def distill_config(self, method: str, run_dir: str = "", fidelity: str | None = None) -> Any:
        """The :class:`~cpd_fast.distill.config.DistillConfig` of one method of this run."""
        from cpd_fast.distill.config import DistillConfig

        d = dict(self.distill)
        d["name"] = d.get("name") or self.suite or self.preset  # the report's title for the tasks
        d.update(
            suite=self.suite or "custom", tasks=self.tasks, tasks_per_stage=self.tasks_per_stage,
            method=method, teachers=run_dir or "scripted", fidelity=fidelity, seed=self.seed,
            device=self.device, data_dir=os.path.join(run_dir, "datasets") if run_dir else None,
            progress=self.progress,
        )  # fmt: skip
        return from_mapping(DistillConfig, d, "distill")

    def ppo_config(self) -> Any:
        from cpd_fast.teachers.ppo import PPOConfig

        return from_mapping(PPOConfig, {**self.ppo, "device": self.device, "seed": self.seed}, "ppo")

    def task_list(self) -> list[str]:
        from cpd_fast.tasks import resolve_tasks, stages

        stages(self.tasks or self.suite, self.tasks_per_stage)  # validates the stage split
        return resolve_tasks(self.tasks or self.suite)

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
    import yaml

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

    The preset is ``preset``, else the config file's ``preset`` key, else ``quick``.
    """
    file_d = load_yaml(config_file) if config_file else {}
    if base is None:
        base = load_preset(preset or file_d.get("preset") or "quick")
    elif preset:
        base = load_preset(preset)
    d = merge(merge(base, file_d), overrides or {})
    if preset:
        d["preset"] = preset
    return PipelineConfig.from_dict(d)


def _runtime_keys(saved: dict[str, Any], mine: dict[str, Any]) -> tuple[str, ...]:
    """Keys a resumed run may change: the runtime-only ones, and the PPO settings of runs that train none."""
    untrained = saved.get("teachers") == mine.get("teachers") and mine.get("teachers") in ("scripted", "zoo")
    return _RUNTIME + (("ppo",) if untrained else ())


def config_diff(saved: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, ignoring :func:`_runtime_keys`."""
    return _config_diff(saved, mine, _runtime_keys(saved, mine))


# ----------------------------------------------------------------------------- the run directory


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
        self.state = Ledger(os.path.join(run_dir, STATE_FILE))
        self.fidelity_path = os.path.join(run_dir, "fidelity.json") if cfg.fidelity.episodes else None
        self.data_root = os.path.join(run_dir, "datasets")
        self._grouped: set[str] = set()  # distill steps run side by side with an earlier one

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
        self._grouped = set()
        for i, (name, fn, outputs) in enumerate(steps, 1):
            head = f"[bold]\\[{i}/{len(steps)}] {name}[/bold]"
            if not cascade and self.state.done(name, outputs):
                self.console.print(f"{head}: done earlier, skipped")
                continue
            cascade = True
            if name in self._grouped:
                continue  # ran side by side with the first method of its group
            group = self._side_by_side(steps[i - 1 :]) if name.startswith("distill:") else []
            if group:
                self._distill_side_by_side(group, head)
                continue
            self.console.print(f"{head}: {self.describe(name)}")
            t0 = time.perf_counter()
            record = fn() or {}
            record["time_s"] = round(time.perf_counter() - t0, 1)
            self.state.mark(name, record)
            self.console.print(f"    [green]done[/green] in {record['time_s']:.1f} s")
        return self.state.steps

    def _jobs(self) -> int:
        """Methods side by side: ``jobs``, or as many as there are methods and cores. Fixed by the config,
        not by what is left to do, so that a resumed method keeps its thread share (its float order)."""
        from cpd_fast.workers import available_cores

        return max(1, min(self.cfg.jobs or available_cores(), len(self.cfg.methods)))

    def _threads(self) -> int:
        """Each method's torch threads: ``distill.threads``, or its share of the cores (0: torch's)."""
        return self.cfg.distill_config(self.cfg.methods[0]).thread_count(self._jobs())

    def _side_by_side(self, rest: list[tuple[str, Any, list[str]]]) -> list[str]:
        """The methods of the distill steps starting ``rest`` if they run side by side, else ``[]``."""
        methods = [n.split(":", 1)[1] for n, _, _ in rest if n.startswith("distill:")]
        return methods if self._jobs() > 1 and len(methods) > 1 else []

    def _distill_side_by_side(self, methods: list[str], head: str) -> None:
        """Distil ``methods`` in worker processes, one pool of one process each
        (:func:`cpd_fast.workers.process_pool`), ``jobs`` at a time; each is marked done as it ends. A
        method that raises or whose process dies does not stop the others; the first error is raised
        after them. An error in this process (or Ctrl-C) kills the workers at once."""
        import contextlib
        from concurrent.futures import FIRST_COMPLETED, wait

        from cpd_fast.workers import core_share, process_pool, terminate

        jobs, threads = self._jobs(), self._threads()
        self._grouped.update(f"distill:{m}" for m in methods)
        each = f"{threads} thread(s)" if threads else "torch's default threads"
        self.console.print(f"{head}: {', '.join(methods)} side by side ({jobs} processes, {each} each), "
                           f"{self.describe('distill:' + methods[0])}")  # fmt: skip
        self._verify_datasets()
        t0, failed = time.perf_counter(), None
        shown = {m: set(Ledger(os.path.join(self.method_dir(m), "progress.json")).steps) for m in methods}
        queue, futures, pools = list(methods), {}, []
        with contextlib.ExitStack() as stack:
            stack.callback(lambda: [terminate(p) for p in pools])  # normally all idle by then
            while queue or futures:
                while queue and len(futures) < jobs:
                    m = queue.pop(0)
                    pool = process_pool(1, threads or core_share(jobs))
                    pools.append(pool)
                    fut = pool.submit(distill_method, self._method_config(m, threads, beside=True),
                                      self.method_dir(m))  # fmt: skip
                    futures[fut] = m, pool
                finished, _ = wait(futures, timeout=10, return_when=FIRST_COMPLETED)
                self._show_progress(shown, t0)  # each method's finished phases and evaluations, as lines
                for fut in finished:
                    m, pool = futures.pop(fut)
                    pool.shutdown(wait=True)  # idle now: its process exits
                    pools.remove(pool)
                    try:
                        record = fut.result()
                    except Exception as err:  # the others still finish and are kept; then this is raised
                        failed = failed or err
                        self.console.print(f"    [red]{m} failed[/red]: {err}")
                        continue
                    record["time_s"] = round(time.perf_counter() - t0, 1)
                    self.state.mark(f"distill:{m}", record)
                    self.console.print(f"    [green]{m} done[/green] after {record['time_s']:.1f} s")
        if failed is not None:
            raise failed

    def _show_progress(self, shown: dict[str, set[str]], t0: float) -> None:
        for m, seen in shown.items():
            path = os.path.join(self.method_dir(m), "progress.json")
            steps = Ledger(path).steps if os.path.isfile(path) else {}  # written atomically: never half
            for step in [s for s in steps if s not in seen]:
                seen.add(step)
                self.console.print(f"    {m}: {step} ({time.perf_counter() - t0:.0f} s)")

    def describe(self, name: str) -> str:
        c, n = self.cfg, len(self.tasks)
        d = c.distill
        return {
            "fidelity": f"scripted experts on envpool vs Meta-World, {c.fidelity.episodes} episodes/task",
            "teachers": (
                f"{_TEACHERS[c.teachers].format(backend=c.backend, zoo=c.zoo)} "
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

    def _backends(self, teachers: dict[str, Any] | None = None) -> dict[str, str]:
        from cpd_fast.fidelity import collection_backends

        return collection_backends(self.fidelity_path, teachers)

    # ---- teachers + quality gate
    def teachers(self) -> dict[str, Any]:
        from cpd_fast.teachers.gate import load_teachers_json

        if self.cfg.teachers == "ppo":
            self._train_ppo()
        elif self.cfg.teachers == "zoo":
            self._gate_zoo()
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
        from cpd_fast.teachers.gate import gate_scripted, write_teachers_json

        g = self.cfg.gate
        records = gate_scripted(
            self.tasks, g.threshold, eval_goals=g.eval_goals, eval_envs=g.eval_envs,
            progress=self.cfg.progress,
        )  # fmt: skip
        write_teachers_json(
            self.run_dir, records, tasks=self.tasks, threshold=g.threshold, eval_goals=g.eval_goals
        )

    def _gate_zoo(self) -> None:
        """The gate on a teacher zoo's records (measured when the zoo was built, 50 official goals): a task
        the zoo lacks is a failed teacher, and ``gate.on_fail`` says what happens (scripted, exclude)."""
        import dataclasses

        from cpd_fast.teachers.gate import TeacherRecord, apply_remedy, passes, write_teachers_json
        from cpd_fast.teachers.zoo import zoo_name, zoo_records

        g = self.cfg.gate
        path, zoo = zoo_records(self.cfg.zoo)
        name = zoo_name(self.cfg.zoo)
        records = {}
        for t in self.tasks:
            z = zoo.get(t)
            if z is not None and z.used:
                ok = passes(z.success_rate, g.threshold)
                records[t] = dataclasses.replace(z, path=name, threshold=g.threshold, passed=ok, used=ok,
                                                 status="ok" if ok else "failed", flagged=not ok)  # fmt: skip
            else:
                records[t] = TeacherRecord(
                    task=t, source="zoo", path=name, success_rate=None, protocol="official",
                    threshold=g.threshold, passed=False, status="failed", used=False, flagged=True,
                    history=[{"source": "zoo", "missing_from": path}],
                )  # fmt: skip
        # a failure with on_fail retrain/demos was refused before the run started (_check_zoo)
        apply_remedy(records, g.on_fail, eval_goals=g.eval_goals, eval_envs=g.eval_envs)
        write_teachers_json(
            self.run_dir, records, tasks=self.tasks, threshold=g.threshold, eval_goals=g.eval_goals, zoo=path
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
        """One dataset per task, reused by every method, with its teacher's success recorded once
        (:func:`cpd_fast.distill.run.collect_task_data`, which ``run_distill`` calls too and then skips)."""
        from tqdm import tqdm

        from cpd_fast.distill.run import collect_task_data
        from cpd_fast.teachers.gate import teacher_specs, trained_teachers

        dcfg = self.cfg.distill_config(self.cfg.methods[0], self.run_dir, self.fidelity_path)
        specs = teacher_specs(dcfg.teachers, self.tasks)
        backends = self._backends(trained_teachers(specs))
        out = {}
        for task in tqdm(self.tasks, desc="collect", disable=not self.cfg.progress, leave=False):
            collect_task_data(dcfg, task, self.data_root, specs[task], backends.get(task, "envpool"))
            manifest = os.path.join(self.data_root, f"{task}.collected.json")
            out[task] = {"files": len(read_json(manifest)["files"])}
        return out

    # ---- distillation (+ evaluation after every stage)
    def distill(self, method: str) -> dict[str, Any]:
        self._verify_datasets()
        return distill_method(self._method_config(method, self._threads()), self.method_dir(method))

    def _verify_datasets(self) -> None:
        for task in self.tasks:  # a method must not train on data that changed since it was collected
            verify_dataset_files(os.path.join(self.data_root, f"{task}.collected.json"))

    def _method_config(self, method: str, threads: int, beside: bool = False) -> dict[str, Any]:
        """A method's DistillConfig as a dict with its ``threads``. Beside other methods it runs without
        progress bars and evaluates in its own process, unless ``distill.eval_workers`` is set."""
        d = self.cfg.distill_config(method, self.run_dir, self.fidelity_path).to_dict()
        d["threads"] = threads
        if beside:
            d["progress"] = False
            if d.get("eval_workers") is None:
                d["eval_workers"] = 0
        return d

    # ---- report
    def report(self) -> dict[str, Any]:
        from cpd_fast.report import write_report

        paths = write_report(
            [self.method_dir(m) for m in self.cfg.methods], os.path.join(self.run_dir, "report")
        )
        return {"files": [os.path.relpath(p, self.run_dir) for p in map(str, paths)]}


def distill_method(config: dict[str, Any], method_dir: str) -> dict[str, Any]:
    """One method's distillation (:func:`~cpd_fast.distill.run.run_distill`) and its headline metrics; a
    module-level function so that a worker process can run it."""
    from cpd_fast.distill.config import DistillConfig
    from cpd_fast.distill.run import run_distill

    m = run_distill(DistillConfig.from_dict(config), method_dir).metrics()
    return {"acc": m.acc, "bwt": m.bwt, "forgetting": m.mean_forgetting, "relative": m.relative_performance}


# ----------------------------------------------------------------------------- entry points


def prepare_run_dir(cfg: PipelineConfig, run_dir: str) -> None:
    """Write ``RUN/config.yaml`` (first), or check that an existing run was made with this config."""
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    mine = cfg.to_dict()
    if os.path.isfile(path):
        saved = load_yaml(path)
        remedy = f"resume it with `cpd run --out {run_dir}` alone, or choose a new --out"
        check_same_config(saved, mine, _runtime_keys(saved, mine), run_dir, remedy)
        return
    os.makedirs(run_dir, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(f"# cpd run: resolved config (preset {cfg.preset}); rerun with cpd run --config {path}\n")
        yaml.safe_dump(mine, f, sort_keys=False)


def _check_zoo(cfg: PipelineConfig) -> None:
    """Refuse, before anything is written, a zoo that does not exist, or one whose gaps (tasks it lacks or
    holds below ``gate.threshold``) ``gate.on_fail`` would have to fill by training (retrain, demos)."""
    from cpd_fast.errors import UserError
    from cpd_fast.teachers.gate import passes
    from cpd_fast.teachers.zoo import missing_message, zoo_records

    path, zoo = zoo_records(cfg.zoo)
    g = cfg.gate
    lacking = [t for t in cfg.task_list() if t not in zoo or not zoo[t].used]
    weak = [t for t in cfg.task_list() if t not in lacking and not passes(zoo[t].success_rate, g.threshold)]
    if (lacking or weak) and g.on_fail in ("retrain", "demos"):
        why = [missing_message(path, zoo, lacking)] if lacking else []
        why += [f"{path} holds {', '.join(weak)} below gate.threshold {g.threshold:g}"] if weak else []
        raise UserError(f"{'; '.join(why)}; gate.on_fail={g.on_fail} cannot train a zoo")


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
    if cfg.teachers == "zoo":
        _check_zoo(cfg)
    t0 = time.perf_counter()
    with RunLock(run_dir):  # a second process on this directory is refused at once
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
    from cpd_fast.distill.methods import METHODS

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
    p.add_argument("--teachers", choices=("scripted", "ppo", "zoo"), default=None,
                   help="Meta-World's scripted experts, PPO trained in the run, or the shipped RL teachers "
                   "(--set zoo=NAME_OR_DIR; default mt25)")  # fmt: skip
    p.add_argument("--backend", choices=("local", "ray"), default=None, help="where PPO teachers train")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster ('auto', 'ray://host:port')")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, metavar="METHOD",
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
    given = merge(overrides, {"ray_address": args.ray_address})
    flags = {"teachers": args.teachers, "backend": args.backend, "ray_address": args.ray_address,
             "methods": args.methods, "seed": args.seed, "device": args.device,
             "progress": False if args.no_progress else None}  # fmt: skip
    if args.ray_address and args.backend is None:
        flags["backend"] = "ray"  # an address only makes sense for the Ray backend
    overrides = merge(overrides, {k: v for k, v in flags.items() if v is not None})
    base = None
    saved = os.path.join(args.out, "config.yaml") if args.out else None
    if saved and os.path.isfile(saved) and not args.preset and not args.config:
        base = load_yaml(saved)  # `cpd run --out RUN` resumes RUN with its own config
    cfg = resolve_config(args.preset, args.config, overrides, base=base)
    unused = cfg.unused_settings(given)
    flags_unused = [u for u in unused if u.startswith("--")]
    if flags_unused:
        raise ValueError(
            f"{', '.join(flags_unused)}: only used to train PPO teachers (--teachers ppo), and this run uses "
            f"{cfg.teachers} teachers; drop it (it would be ignored)"
        )
    for key in unused:  # distill settings no selected method reads: a typo or a leftover, said once
        logging.getLogger(__name__).warning("%s is not used by the methods %s (ignored)", key, cfg.methods)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    run_pipeline(cfg, args.out or os.path.join("runs", f"{cfg.preset}_s{cfg.seed}"))
    return 0
