"""What ``cpd run`` prints: each step's one-line description, the teacher table, and the closing summary."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.table import Table

from cpd_fast.metrics import RunResult
from cpd_fast.pipeline.config import PipelineConfig

__all__ = ["describe_step", "new_console", "print_summary", "teacher_table"]

_TEACHERS = {
    "ppo": "PPO training ({backend}) +",
    "scripted": "scripted experts,",
    "zoo": "teacher zoo {zoo},",
}


def new_console() -> Console:
    # soft_wrap: long lines (paths, the fidelity table) are not folded at 80 columns when piped to a log
    return Console(highlight=False, soft_wrap=True)


def describe_step(cfg: PipelineConfig, name: str) -> str:
    """The line shown when step ``name`` (fidelity, teachers, collect, distill:METHOD, report) starts."""
    c, n = cfg, len(cfg.task_list())
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


def teacher_table(console: Any, tasks: list[str], records: dict[str, Any]) -> None:
    """Task, teacher source, official success and gate status of each task's teacher."""
    table = Table("task", "teacher", "success", "status", box=None, padding=(0, 2))
    for t in tasks:
        r = records.get(t)
        rate = "-" if r is None or r.success_rate is None else f"{r.success_rate:.2f}"
        table.add_row(t, r.source if r else "-", rate, (r.status if r else "missing"))
    console.print(table)


def print_summary(cfg: PipelineConfig, run_dir: str, console: Any, wall: float) -> None:
    """Two tables, methods x metrics and tasks x (teacher, methods) final success, then where the files are.

    Tasks are rows so that the table stays readable for 25 tasks.
    """
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
