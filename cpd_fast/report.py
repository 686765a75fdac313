"""Report of continual-distillation runs: figures (PNG) and the results table (markdown).

Input: results files (``RunResult`` JSON, see :class:`cpd_fast.metrics.RunResult`) or run directories
holding ``results.json``. Runs are grouped by (suite, method); the seeds of a group are aggregated
with :func:`cpd_fast.metrics.summarize` (means, 90% percentile-bootstrap CIs over seeds).

Output in ``out_dir``:

* ``<suite>_<method>_success_matrix.png``: heatmap of R[stage, task] (mean over seeds), values annotated,
  grey for tasks not seen yet, stage boundaries marked;
* ``<suite>_teacher_vs_student.png``: per task, teacher success and each method's final success;
* ``<suite>_forgetting.png``: per task forgetting of each method (tasks of the last stage have none);
* ``results.md``: one table per suite, method | seeds | relative performance | ACC | mean forgetting |
  BWT | wall time | CPU time (the distillation, evaluation workers included; "–" where a run did not
  record it), with ``[low, high]`` CIs when a method has several seeds (the README's results table);
* ``summary.json``: the aggregated numbers behind the table and figures.

matplotlib is imported lazily and used through ``matplotlib.figure.Figure`` with the Agg canvas, so
making a report never changes pyplot's global backend.

CLI: ``cpd report RUN_DIR_OR_RESULTS_JSON... [--out DIR]`` (:mod:`cpd_fast.cli.report`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cpd_fast.distill.config import isolating
from cpd_fast.metrics import RunResult, matrix_from_json, summarize
from cpd_fast.runio import atomic_path, write_json_atomic

__all__ = ["format_table", "load_runs", "write_report"]

_TABLE_COLUMNS = ("relative_performance", "acc", "mean_forgetting", "bwt")


def load_runs(result_paths: Iterable[str | os.PathLike], stages: int | None = None) -> list[RunResult]:
    """Load results files or run directories (their ``results.json``); ``stages``: each run as of its first
    ``stages`` stages (:meth:`RunResult.first_stages`)."""
    runs = []
    for p in result_paths:
        path = Path(p)
        if not path.exists():
            raise FileNotFoundError(f"no results at {path}")
        if path.is_dir() and not (path / "results.json").exists():
            raise FileNotFoundError(f"run directory {path} has no results.json")
        run = RunResult.load(path)
        runs += _with_eval_modes(run.first_stages(stages) if stages else run)
    if not runs:
        raise ValueError("write_report needs at least one results file or run directory")
    return runs


MODE_LABELS = {"prototype": "task id"}
# the task-id mode of a configuration whose old tasks cannot change given their id (isolates_tasks)
ORACLE_LABEL = "oracle task id (isolation)"


def _mode_label(method: str, mode: str, isolation: bool = False) -> str:
    if mode == "inferred":
        return method
    return f"{method} [{ORACLE_LABEL if isolation and mode == 'prototype' else MODE_LABELS.get(mode, mode)}]"


def _isolation(run: RunResult) -> bool:
    """Recorded by the run; derived from its config for results written before it was recorded."""
    if "isolates_tasks" in run.extra:
        return bool(run.extra["isolates_tasks"])
    return isolating(run.extra.get("config", {}))


def _with_eval_modes(run: RunResult) -> list[RunResult]:
    """The run, plus one pseudo-run per extra evaluation mode (e.g. ``cpd [task id]``: the same student
    evaluated with its task's prototype instead of the inferred embedding), so each mode gets its row."""
    main, iso = run.extra.get("eval_mode", "inferred"), _isolation(run)
    out = [dataclasses.replace(run, method=_mode_label(run.method, main, iso))]
    for mode, matrix in run.extra.get("success_matrix_modes", {}).items():
        out.append(
            dataclasses.replace(
                run, method=_mode_label(run.method, mode, iso), success_matrix=matrix_from_json(matrix),
                extra={**run.extra, "eval_mode": mode, "success_matrix_modes": {}},
            )
        )  # fmt: skip
    return out


def _group(runs: Sequence[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.suite, r.method), []).append(r)
    return groups


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "run"


# ----------------------------------------------------------------------------- markdown


def _fmt_pct(stat: dict, n: int) -> str:
    if math.isnan(stat["mean"]):
        return "–"
    s = f"{100 * stat['mean']:.1f}"
    return s + (f" [{100 * stat['low']:.1f}, {100 * stat['high']:.1f}]" if n > 1 else "")


def _fmt_minutes(stat: dict, n: int) -> str:
    if math.isnan(stat["mean"]):
        return "–"
    s = f"{stat['mean'] / 60:.1f}"
    return s + (f" [{stat['low'] / 60:.1f}, {stat['high'] / 60:.1f}]" if n > 1 else "")


def format_table(summaries: Sequence[dict[str, Any]], level: float = 0.9) -> str:
    """Markdown results table of one suite's per-method summaries (from ``metrics.summarize``); a forward
    transfer column where a ``scratch`` reference was reported beside them."""
    ft = any("forward_transfer" in s for s in summaries)
    columns = (*_TABLE_COLUMNS, "forward_transfer") if ft else _TABLE_COLUMNS
    lines = [
        "| method | seeds | relative performance (%) | ACC (%) | mean forgetting (%) | BWT (%) "
        + ("| forward transfer (%) " if ft else "")
        + "| wall time (min) | CPU time (min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if ft else ""),
    ]
    nan = {"mean": math.nan}
    for s in summaries:
        n = s["n"]
        cells = [_fmt_pct(s.get(c, nan), n) for c in columns]
        lines.append(
            f"| {s['method']} | {n} | "
            + " | ".join(cells)
            + f" | {_fmt_minutes(s['wall_time_s'], n)} | {_fmt_minutes(s['cpu_time_s'], n)} |"
        )
    if any(s["n"] > 1 for s in summaries):
        lines += ["", f"Mean over seeds [{round(100 * level)}% percentile-bootstrap CI over seeds]."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


def _short(task: str) -> str:
    return task.removesuffix("-v3")


def _figure(**kwargs: Any):
    """A matplotlib ``Figure`` (no pyplot: no global state, no GUI backend)."""
    # lazy: matplotlib takes a while to import and only the figures need it, not every `cpd` command
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, path: Path) -> Path:
    # lazy: see _figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_stage_curve(summaries: Sequence[dict], path: Path, level: float = 0.9) -> Path:
    """Mean success over the tasks seen so far after each stage, per method (seed means), with the
    bootstrap CI over seeds as a band where a method has several; the legend sits outside the data."""
    fig = _figure(figsize=(8.5, 4.2))
    ax = fig.add_subplot()
    colors = _cmap("tab10")
    for i, s in enumerate(summaries):
        c = s["seen_success_by_stage"]
        x = np.arange(1, len(c["mean"]) + 1)
        n = f"{s['n']} seeds" if s["n"] > 1 else f"seed {s['seeds'][0]}"
        ax.plot(x, c["mean"], marker="o", color=colors(i % 10), label=f"{s['method']} ({n})")
        if s["n"] > 1:
            ax.fill_between(x, c["low"], c["high"], color=colors(i % 10), alpha=0.2, linewidth=0)
    ax.set_xticks(x)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("after stage")
    ax.set_ylabel("mean success over the tasks seen so far")
    several = any(s["n"] > 1 for s in summaries)
    bands = f"; bands: {round(100 * level)}% bootstrap CI over seeds" if several else ""
    ax.set_title(f"{summaries[0]['suite']}: success on the tasks seen so far{bands}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, path)


def plot_success_matrix(summary: dict, path: Path) -> Path:
    """Heatmap of the seed-mean R[stage, task], annotated, NaN (not seen yet) in grey."""
    R = np.array(summary["R_mean"], dtype=float)
    tasks = summary["tasks"]
    S, J = R.shape
    fig = _figure(figsize=(max(6.0, 0.55 * J + 2.0), max(3.0, 0.6 * S + 2.2)))
    ax = fig.add_subplot()
    cmap = _cmap("viridis").with_extremes(bad="#d9d9d9")  # grey: task not seen yet
    im = ax.imshow(np.ma.masked_invalid(R), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for s in range(S):
        for j in range(J):
            if not math.isnan(R[s, j]):
                ax.text(j, s, f"{R[s, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if R[s, j] > 0.6 else "white")  # fmt: skip
    stage = np.array(summary["task_stage"])
    for j in np.flatnonzero(np.diff(stage)):  # stage boundaries
        ax.axvline(j + 0.5, color="white", linewidth=2)
    ax.set_xticks(range(J), [_short(t) for t in tasks], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(S), [f"after stage {s + 1}" for s in range(S)], fontsize=8)
    ax.set_xlabel("task (evaluated)")
    ax.set_ylabel("training stage")
    seeds = f"mean of {summary['n']} seeds" if summary["n"] > 1 else f"seed {summary['seeds'][0]}"
    ax.set_title(f"{summary['method']} on {summary['suite']}: success rate R[stage, task] ({seeds})")
    fig.colorbar(im, ax=ax, label="success rate", fraction=0.03, pad=0.02)
    return _save(fig, path)


def _cmap(name: str):
    # lazy: see _figure
    from matplotlib import colormaps

    return colormaps[name].copy()


def _grouped_bars(ax, tasks, series: list[tuple[str, list[float]]]) -> None:
    J, k = len(tasks), len(series)
    width = 0.8 / k
    colors = _cmap("tab10")
    m = 0  # method counter: a method keeps its colour in every figure (the teacher is grey)
    for i, (label, vals) in enumerate(series):
        x = np.arange(J) - 0.4 + width * (i + 0.5)
        color = "#7f7f7f" if label == "teacher" else colors(m % 10)
        m += label != "teacher"
        ax.bar(x, np.nan_to_num(np.array(vals, dtype=float)), width, label=label, color=color)
    ax.set_xticks(range(J), [_short(t) for t in tasks], rotation=60, ha="right", fontsize=8)
    ax.set_xlim(-0.6, J - 0.4)
    ax.legend(fontsize=8, ncols=min(k, 4))


def plot_teacher_vs_student(summaries: Sequence[dict], path: Path) -> Path:
    """Per-task teacher success and each method's success after the last stage (seed means)."""
    tasks = summaries[0]["tasks"]
    fig = _figure(figsize=(max(6.0, 0.45 * len(tasks) + 2.0), 4.0))
    ax = fig.add_subplot()
    teacher = summaries[0]["teacher_success_mean"]
    _grouped_bars(
        ax, tasks, [("teacher", teacher)] + [(s["method"], s["final_success_mean"]) for s in summaries]
    )
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("success rate after the last stage")
    ax.set_xlabel("task")
    ax.set_title(f"{summaries[0]['suite']}: teacher vs student success per task (mean over seeds)")
    return _save(fig, path)


def plot_forgetting(summaries: Sequence[dict], path: Path) -> Path:
    """Per-task forgetting of each method (seed means); tasks of the last stage are left out."""
    last = max(summaries[0]["task_stage"])
    keep = [j for j, s in enumerate(summaries[0]["task_stage"]) if s < last] or list(
        range(len(summaries[0]["tasks"]))
    )
    tasks = [summaries[0]["tasks"][j] for j in keep]
    fig = _figure(figsize=(max(6.0, 0.45 * len(tasks) + 2.0), 4.0))
    ax = fig.add_subplot()
    _grouped_bars(ax, tasks, [(s["method"], [s["forgetting_mean"][j] for j in keep]) for s in summaries])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("forgetting (best earlier − final success)")
    ax.set_xlabel("task (introduced before the last stage)")
    ax.set_title(f"{summaries[0]['suite']}: forgetting per task (mean over seeds)")
    return _save(fig, path)


# ----------------------------------------------------------------------------- entry points


def write_report(
    result_paths: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    level: float = 0.9,
    stages: int | None = None,
) -> list[Path]:
    """Write figures, ``results.md`` and ``summary.json`` for the given runs; returns the written paths.

    ``stages``: report every run as of its first ``stages`` stages (longer runs beside prefix runs).
    """
    runs = load_runs(result_paths, stages)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the scratch method's runs are the reference of forward transfer, not rows of their own
    reference = [r for r in runs if r.extra.get("reference")]
    by_suite: dict[str, list[dict]] = {}
    for (suite, _), group in _group([r for r in runs if not r.extra.get("reference")]).items():
        mode = group[0].extra.get("eval_mode", "inferred")
        ref = [r for r in reference if r.suite == suite and r.extra.get("eval_mode", "inferred") == mode]
        by_suite.setdefault(suite, []).append(summarize(group, level=level, reference=ref))
    written: list[Path] = []
    md = ["# Results", ""]
    for suite, summaries in by_suite.items():
        if any(s["tasks"] != summaries[0]["tasks"] for s in summaries):
            raise ValueError(f"suite {suite!r}: methods were run on different task lists")
        for s in summaries:
            written.append(
                plot_success_matrix(s, out / f"{_slug(suite)}_{_slug(s['method'])}_success_matrix.png")
            )
        written.append(plot_teacher_vs_student(summaries, out / f"{_slug(suite)}_teacher_vs_student.png"))
        written.append(plot_forgetting(summaries, out / f"{_slug(suite)}_forgetting.png"))
        written.append(plot_stage_curve(summaries, out / f"{_slug(suite)}_stage_curve.png", level))
        md += [f"## {suite}", "", format_table(summaries, level), ""]
    md += [
        "Relative performance: mean over tasks of student / teacher success after the last stage (tasks "
        "whose teacher never succeeds are excluded). ACC: mean final success. Forgetting: best success "
        "at an earlier stage minus final success, per task, averaged. BWT: final minus end-of-own-stage "
        "success, averaged over tasks before the last stage. Rows marked [task id]: the student is given "
        "the task id, which selects the task's learned prototype embedding; unmarked rows give no task id "
        "(the embedding is inferred from the observation history). Rows marked [oracle task id "
        "(isolation)]: the task id selects a part of the network that nothing after the task's stage "
        "changes (parameter isolation), so nothing can be forgotten by construction: an upper bound chosen "
        "by an oracle, not a continual-learning result.",
        "",
    ]
    if reference:
        md[-1:] = [
            "Forward transfer: success on each task right after the stage that first trains it, minus the "
            "`scratch` reference's (a fresh student trained on that stage's tasks alone with the same "
            "budget), in success points, averaged over tasks; the reference of the same seed and "
            "evaluation mode.",
            "",
        ]
    md_path = out / "results.md"
    with atomic_path(md_path) as tmp, open(tmp, "w") as f:
        f.write("\n".join(md))
    written.append(md_path)
    summary_path = out / "summary.json"
    write_json_atomic(summary_path, _json_safe(by_suite))
    written.append(summary_path)
    return written


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x
