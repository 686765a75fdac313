"""Where the growing MoE stops paying: each stage's cost, routing and forgetting, for the runs given.

    python bench/growth.py RUN [RUN ...] [--mode inferred|prototype] --out DIR

For every run (a directory holding ``results.json``, e.g. MT50's ``cpd``, ``finetune`` and the best
task-free configuration) one table, stage by stage (:func:`cpd_fast.distill.stats.stage_growth`): experts,
parameters, the share of them its phases train, the training step's wall time (its phases' training time
over their steps, DAgger's rollouts and checkpoints included), training and evaluation time, the process's
peak resident memory, routing concentration (effective experts per task, experts used, dead experts), the
mean success over the tasks seen so far and the forgetting of the tasks introduced before the stage.
``DIR/growth.md`` holds the tables, ``DIR/growth.png`` the four curves against the stage (one line per
run). Runs made before ``extra["stage_stats"]`` existed give routing and success only. The step time of a
plain Transformer of the same size is measured by ``python bench/bench_student.py --stages ...`` (ratios
side by side on one machine); a run's wall times are comparable only with runs of the same machine and load.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cpd_fast.distill.stats import stage_growth
from cpd_fast.metrics import RunResult

COLUMNS = [
    ("stage", "stage", "{}"), ("experts", "experts", "{}"), ("params", "params (M)", "{:.2f}"),
    ("trainable", "trained share", "{:.0%}"), ("ms_per_step", "ms / step", "{:.1f}"),
    ("train_s", "train (s)", "{:.0f}"), ("eval_s", "eval (s)", "{:.0f}"),
    ("peak_rss_mib", "peak RSS (MiB)", "{:.0f}"),
    ("effective_experts", "effective experts / task", "{:.2f}"),
    ("experts_used", "experts used", "{}"), ("dead_experts", "dead experts", "{}"),
    ("seen_success", "success on seen tasks", "{:.1%}"),
    ("forgetting", "forgetting of earlier tasks", "{:.1%}"),
]  # fmt: skip
CURVES = [
    ("ms_per_step", "training step (ms)"), ("seen_success", "success on the tasks seen so far"),
    ("forgetting", "forgetting of earlier tasks"), ("effective_experts", "effective experts per task"),
]  # fmt: skip


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return fmt.format(v / 1e6 if key == "params" else v)


def label(path: str, run: RunResult) -> str:
    return f"{os.path.basename(os.path.normpath(path))} ({run.method}, seed {run.seed})"


def table(run: RunResult, mode: str | None) -> str:
    rows = stage_growth(run, mode)
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def plot(runs: list[tuple[str, RunResult]], mode: str | None, path: Path) -> Path:
    fig = Figure(figsize=(11, 7))
    axes = fig.subplots(2, 2, sharex=True)
    for name, run in runs:
        rows = stage_growth(run, mode)
        for ax, (key, _) in zip(axes.flat, CURVES, strict=True):
            pts = [(r["stage"], r[key]) for r in rows if r.get(key) is not None and not math.isnan(r[key])]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    for ax, (_, title) in zip(axes.flat, CURVES, strict=True):
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("stage")
    handles, names = axes.flat[1].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(3, max(1, len(names))), fontsize=8,
               bbox_to_anchor=(0.5, -0.02))  # fmt: skip
    fig.subplots_adjust(bottom=0.16, hspace=0.3)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (results.json)")
    ap.add_argument("--mode", choices=["inferred", "prototype"], default=None,
                    help="the success columns' evaluation mode (default: each run's main mode)")  # fmt: skip
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runs = [(label(p, r), r) for p in args.runs for r in [RunResult.load(p)]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python bench/growth.py", *map(os.path.relpath, args.runs),
                        *(["--mode", args.mode] if args.mode else []), "--out", args.out])  # fmt: skip
    doc = ["# Where the growing MoE stops paying", "", f"`{command}`",
           "", "![per-stage curves](growth.png)", ""]  # fmt: skip
    for name, run in runs:
        mode = args.mode or run.extra.get("eval_mode", "inferred")
        doc += [f"## {name}: {run.suite}, success in {mode} mode", "", table(run, args.mode), ""]
    (out / "growth.md").write_text("\n".join(doc), encoding="utf-8")
    plot(runs, args.mode, out / "growth.png")
    print(f"wrote {out / 'growth.md'} and {out / 'growth.png'}")


if __name__ == "__main__":
    main()
