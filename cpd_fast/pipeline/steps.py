"""The steps of ``cpd run`` and the ledger loop that runs them in one run directory.

Steps, in order (each is skipped when a previous invocation finished it and its outputs are intact)::

    config      RUN/config.yaml         the resolved config, written before anything else (rundir.py)
    fidelity    RUN/fidelity.json       scripted expert under envpool vs Meta-World's envs -> backend per task
    teachers    RUN/teachers.json       PPO training (local pool or Ray), the teacher zoo or the scripted
                                        experts, then the quality gate (official protocol); every task needs
                                        a usable teacher
    collect     RUN/datasets/           one Minari dataset per task, shared by every method
    distill:M   RUN/methods/M/          continual distillation with method M, evaluated after every stage
                                        (``cpd_fast.distill.run.run_distill``: checkpoints per phase)
    report      RUN/report/             results.md, summary.json, heatmaps and bar charts

Once a step runs, every later one runs too (cheaply: each skips its own finished work), so a redone step
is never ignored downstream. Progress is recorded in ``RUN/pipeline.json`` (:class:`~cpd_fast.runio.Ledger`),
each step's record with what made it (``provenance``, :func:`cpd_fast.provenance.provenance`: a distillation's
is its results.json's, the others' this process's, with ``precision`` None: they train no student), so a run
resumed with other code says which steps which code made.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from tqdm import tqdm

from cpd_fast.data import verify_dataset_files
from cpd_fast.distill.run import collect_task_data
from cpd_fast.fidelity import backend_choices, check_fidelity, collection_backends, format_table, save_report
from cpd_fast.pipeline.config import PipelineConfig
from cpd_fast.pipeline.console import describe_step, new_console, print_summary, teacher_table
from cpd_fast.pipeline.parallel import (
    beside,
    distill_method,
    distill_side_by_side,
    method_jobs,
    method_threads,
)
from cpd_fast.pipeline.rundir import CONFIG_FILE, prepare_run_dir, verify_run_dir
from cpd_fast.provenance import provenance
from cpd_fast.report import write_report
from cpd_fast.runio import Ledger, RunLock, read_json
from cpd_fast.teachers.gate import teacher_specs, trained_teachers
from cpd_fast.teachers.jobs import check_ray_address
from cpd_fast.teachers.provide import check_zoo, provide
from cpd_fast.workers import cpu_seconds

__all__ = ["STATE_FILE", "Pipeline", "run_pipeline"]

STATE_FILE = "pipeline.json"
Step = tuple[str, Any, list[str]]  # (name, function, outputs)


class Pipeline:
    """Runs the steps of one config in one run directory (see the module docstring)."""

    def __init__(self, cfg: PipelineConfig, run_dir: str, console: Any) -> None:
        self.cfg, self.run_dir, self.console = cfg, run_dir, console
        self.tasks = cfg.task_list()
        self.state = Ledger(os.path.join(run_dir, STATE_FILE))
        self.fidelity_path = os.path.join(run_dir, "fidelity.json") if cfg.fidelity.episodes else None
        self.data_root = os.path.join(run_dir, "datasets")
        self._grouped: set[str] = set()  # distill steps run side by side with an earlier one

    def steps(self) -> list[Step]:
        """``[(name, function, outputs)]`` in order; a finished step is skipped if its outputs exist."""
        out: list[Step] = []
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
            self.console.print(f"{head}: {describe_step(self.cfg, name)}")
            t0, c0 = time.perf_counter(), cpu_seconds()
            record = fn() or {}
            record["time_s"] = round(time.perf_counter() - t0, 1)
            record["cpu_s"] = round(cpu_seconds() - c0, 1)  # this process's and its ended children's
            if "provenance" not in record:  # (a distillation's comes with its result)
                record["provenance"] = provenance(self.cfg.device, None)
            self.state.mark(name, record)
            self.console.print(f"    [green]done[/green] in {record['time_s']:.1f} s")
        return self.state.steps

    # ---- fidelity
    def fidelity(self) -> dict[str, Any]:
        f = self.cfg.fidelity
        rows = check_fidelity(self.tasks, episodes=f.episodes, num_envs=f.num_envs, seed=self.cfg.seed)
        save_report(rows, self.fidelity_path, episodes=f.episodes, seed=self.cfg.seed)
        self.console.print(format_table(rows), markup=False, highlight=False)
        return {"backend": backend_choices(rows)}

    def _backends(self, teachers: dict[str, Any] | None = None) -> dict[str, str]:
        return collection_backends(self.fidelity_path, teachers)

    # ---- teachers + quality gate
    def teachers(self) -> dict[str, Any]:
        """The run's teachers from ``teachers`` (:func:`cpd_fast.teachers.provide`), gated; every task needs
        a usable one."""
        c = self.cfg
        records = provide(
            c.teachers, self.tasks, self.run_dir, c.gate, zoo=c.zoo, ppo=c.ppo_config(), backend=c.backend,
            workers=c.workers, ray_address=c.ray_address, env_backends=self._backends(), progress=c.progress,
            behaviours=c.behaviours,
        )  # fmt: skip
        teacher_table(self.console, self.tasks, records)
        unusable = [t for t in self.tasks if t not in records or not records[t].used]
        if unusable:
            raise ValueError(
                f"no usable teacher for {', '.join(unusable)} (see {self.run_dir}/teachers.json); with a new "
                "--out, try --set gate.on_fail=scripted, a larger ppo.total_steps or a lower gate.threshold"
            )
        return {t: {"source": r.source, "success": r.success_rate} for t, r in records.items()}

    # ---- collection
    def collect(self) -> dict[str, Any]:
        """One dataset per task, reused by every method, with its teacher's success recorded once
        (:func:`cpd_fast.distill.run.collect_task_data`, which ``run_distill`` calls too and then skips)."""
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
        return distill_method(self._method_config(method, method_threads(self.cfg)), self.method_dir(method))

    def _verify_datasets(self) -> None:
        for task in self.tasks:  # a method must not train on data that changed since it was collected
            verify_dataset_files(os.path.join(self.data_root, f"{task}.collected.json"))

    def _method_config(self, method: str, threads: int) -> dict[str, Any]:
        """A method's DistillConfig as a dict with its ``threads``."""
        d = self.cfg.distill_config(method, self.run_dir, self.fidelity_path).to_dict()
        d["threads"] = threads
        return d

    def _side_by_side(self, rest: list[Step]) -> list[str]:
        """The methods of the distill steps starting ``rest`` if they run side by side, else ``[]``."""
        methods = [n.split(":", 1)[1] for n, _, _ in rest if n.startswith("distill:")]
        return methods if method_jobs(self.cfg) > 1 and len(methods) > 1 else []

    def _distill_side_by_side(self, methods: list[str], head: str) -> None:
        """Distil ``methods`` in worker processes (:func:`~cpd_fast.pipeline.parallel.distill_side_by_side`);
        each is marked done as it ends."""
        jobs, threads = method_jobs(self.cfg), method_threads(self.cfg)
        self._grouped.update(f"distill:{m}" for m in methods)
        each = f"{threads} thread(s)" if threads else "torch's default threads"
        self.console.print(f"{head}: {', '.join(methods)} side by side ({jobs} processes, {each} each), "
                           f"{describe_step(self.cfg, 'distill:' + methods[0])}")  # fmt: skip
        self._verify_datasets()
        work = {m: (beside(self._method_config(m, threads)), self.method_dir(m)) for m in methods}
        distill_side_by_side(
            work, jobs, threads, lambda m, record: self.state.mark(f"distill:{m}", record), self.console
        )

    # ---- report
    def report(self) -> dict[str, Any]:
        paths = write_report(
            [self.method_dir(m) for m in self.cfg.methods], os.path.join(self.run_dir, "report")
        )
        return {"files": [os.path.relpath(p, self.run_dir) for p in map(str, paths)]}


# ----------------------------------------------------------------------------- entry point


def run_pipeline(cfg: PipelineConfig, run_dir: str, console: Any = None) -> dict[str, Any]:
    """Run (or resume) the whole pipeline of ``cfg`` in ``run_dir``; returns ``pipeline.json``'s steps."""
    console = console or new_console()
    run_dir = os.path.normpath(run_dir)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu")
    if cfg.teachers == "ppo" and cfg.backend == "ray":  # fail now, not after the fidelity check
        check_ray_address(cfg.ray_address)
    if cfg.teachers == "zoo":  # a zoo that lacks a task it cannot train: refused before anything is written
        check_zoo(cfg.zoo, list(dict.fromkeys([*cfg.task_list(), *cfg.behaviours.values()])), cfg.gate)
    t0 = time.perf_counter()
    with RunLock(run_dir):  # a second process on this directory is refused at once
        resumed = os.path.isfile(os.path.join(run_dir, CONFIG_FILE))
        prepare_run_dir(cfg, run_dir)
        if resumed:
            n = verify_run_dir(run_dir)
            console.print(f"resuming {run_dir} ({n} checksummed files verified)")
        # warnings (a teacher below the gate, an envpool mismatch) as one line each
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        steps = Pipeline(cfg, run_dir, console).run()
        print_summary(cfg, run_dir, console, time.perf_counter() - t0)
    return steps
