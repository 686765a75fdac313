"""The task-free ceiling on MT25: which tasks' starts look alike, how each zoo teacher does on the others'
envs, and what a student with no task id could reach at best with the teachers' behaviours.

    python bench/task_free/ceiling.py --out bench/task_free              # resumable; ~20 min of one core
    python bench/task_free/ceiling.py --out bench/task_free --report-only --runs bench/mt25_study/runs/plus_s*

1. **Starts.** Every task's initial observations on Meta-World's fixed goal sets (``--goal-seeds``, 50 goals
   each: the official set and fresh ones), and each env's sampling ranges (``_random_reset_space``: object
   and goal positions).
2. **Overlap** ``O[i, j]``: the share of task i's starts that lie inside task j's box of starts (every one of
   the 39 dimensions within j's range, widened by ``--tol``). A start inside another task's box cannot be
   told apart from that task's by the observation at t = 0; a student that sees no task id must act the
   same on it until the observations part.
3. **Cross-success** ``X[j -> i]``: the zoo teacher of task j run on task i's env by Meta-World's official
   protocol (50 goals, success if ever), for every pair that overlaps either way and every pair inside an
   ambiguity group. ``X[i -> i]`` is the teacher's own recorded success.
4. **Ceiling.** Ambiguity groups: tasks joined where most of one's starts lie in the other's box
   (``O >= --group-at`` either way). With one behaviour per group, the best a task-free student can do is
   the group's best teacher: ``max_j mean_i min(1, X[j -> i] / X[i -> i])`` over the group's tasks i;
   tasks alone in their group keep their own teacher (1.0). The ceiling is the mean over the 25 tasks:
   a student that tells a group's tasks apart later in the episode can beat it; one that imitates only the
   teachers' behaviours cannot beat it on a fully ambiguous group.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from cpd_fast.envs import official_env
from cpd_fast.evaluation import evaluate_official, official_goals
from cpd_fast.metrics import RunResult
from cpd_fast.tasks import resolve_tasks
from cpd_fast.teachers.base import make_teacher
from cpd_fast.teachers.zoo import zoo_records


def starts(task: str, goal_seeds: list[int]) -> tuple[np.ndarray, dict]:
    """Initial observations [len(goal_seeds) * 50, 39] and the env's sampling ranges."""
    env = official_env(task)
    try:
        obs = []
        for seed in goal_seeds:
            for goal in official_goals(task, seed):
                env.set_task(goal)
                o, _ = env.reset()
                obs.append(np.asarray(o, dtype=np.float64))
        space = env.unwrapped._random_reset_space
        ranges = {"low": space.low.tolist(), "high": space.high.tolist()}
    finally:
        env.close()
    return np.stack(obs), ranges


def overlap(obs: dict[str, np.ndarray], tasks: list[str], tol: float) -> np.ndarray:
    """``O[i, j]``: share of task i's starts inside task j's box of starts (widened by ``tol``)."""
    n = len(tasks)
    lo = {t: obs[t].min(0) - tol for t in tasks}
    hi = {t: obs[t].max(0) + tol for t in tasks}
    out = np.zeros((n, n))
    for i, a in enumerate(tasks):
        for j, b in enumerate(tasks):
            inside = np.all((obs[a] >= lo[b]) & (obs[a] <= hi[b]), axis=1)
            out[i, j] = inside.mean()
    return out


def groups(ov_m: np.ndarray, at: float) -> list[list[int]]:
    """Connected components of the graph joining i and j where ``O[i, j] >= at`` or ``O[j, i] >= at``."""
    n = len(ov_m)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(n):
            if i != j and max(ov_m[i, j], ov_m[j, i]) >= at:
                parent[root(i)] = root(j)
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(root(i), []).append(i)
    return sorted(comps.values(), key=lambda g: g[0])


def pairs_to_measure(ov_m: np.ndarray, comps: list[list[int]]) -> list[tuple[int, int]]:
    """Ordered (teacher j, env i) pairs: any overlap either way, and every pair inside a group."""
    n = len(ov_m)
    want = {(j, i) for i in range(n) for j in range(n) if i != j and max(ov_m[i, j], ov_m[j, i]) > 0}
    want |= {(j, i) for g in comps for i in g for j in g if i != j}
    return sorted(want)


def ceiling(X: np.ndarray, comps: list[list[int]]) -> tuple[np.ndarray, list[dict]]:
    """Per-task ratio of the group's best single behaviour (``min(1, X[j, i] / X[i, i])``) and per group
    the behaviour chosen. ``X[j, i]`` is teacher j on task i; NaN where it was not measured."""
    n = len(X)
    ratio = np.ones(n)
    chosen = []
    own = np.diag(X)
    for g in comps:
        if len(g) == 1:
            chosen.append({"tasks": g, "behaviour": g[0], "ratios": [1.0]})
            continue
        r = np.minimum(1.0, X[np.ix_(g, g)] / own[g][None, :])  # row: teacher j in g, column: task i
        best = int(np.argmax(r.mean(1)))
        ratio[g] = r[best]
        chosen.append({"tasks": g, "behaviour": g[best], "ratios": r[best].tolist()})
    return ratio, chosen


def measure(out: str, tasks: list[str], args: argparse.Namespace) -> dict:
    path = os.path.join(out, "ceiling.json")
    rec = json.load(open(path)) if os.path.exists(path) else {}
    if "starts" not in rec:
        obs, ranges = {}, {}
        for t in tasks:
            obs[t], ranges[t] = starts(t, args.goal_seeds)
        ov_m = overlap(obs, tasks, args.tol)
        rec = {"tasks": tasks, "goal_seeds": args.goal_seeds, "tol": args.tol, "group_at": args.group_at,
               "sampling_ranges": ranges, "overlap": ov_m.tolist(),
               "starts": {t: {"n": len(obs[t]), "min": obs[t].min(0).tolist(), "max": obs[t].max(0).tolist()}
                          for t in tasks},
               "cross": {}}  # fmt: skip
        save(path, rec)
    ov_m = np.asarray(rec["overlap"])
    comps = groups(ov_m, rec["group_at"])
    todo = [p for p in pairs_to_measure(ov_m, comps) if f"{tasks[p[0]]}|{tasks[p[1]]}" not in rec["cross"]]
    for k, (j, i) in enumerate(todo):
        t0 = time.perf_counter()
        teacher = make_teacher("zoo", tasks[j])
        res = evaluate_official(teacher.action_mean, tasks[i])
        rec["cross"][f"{tasks[j]}|{tasks[i]}"] = res.success_rate
        save(path, rec)
        print(f"[{k + 1}/{len(todo)}] {tasks[j]} teacher on {tasks[i]}: {res.success_rate:.2f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    return rec


def save(path: str, rec: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(tmp, path)


def cross_matrix(rec: dict, own: dict[str, float]) -> np.ndarray:
    tasks = rec["tasks"]
    X = np.full((len(tasks), len(tasks)), np.nan)
    for key, v in rec["cross"].items():
        j, i = key.split("|")
        X[tasks.index(j), tasks.index(i)] = v
    for i, t in enumerate(tasks):
        X[i, i] = own[t]
    return X


def student_success(runs: list[str], tasks: list[str]) -> dict[str, np.ndarray]:
    """Final task-free success per task (the ``inferred`` mode) of each run's results.json (``runs``: run
    directories, searched recursively, or results files)."""
    out = {}
    for r in runs:
        found = [os.path.join(d, "results.json") for d, _, files in os.walk(r) if "results.json" in files]
        for f in found if os.path.isdir(r) else [r]:
            res = RunResult.load(f)
            mat = res.matrix("inferred")
            order = [res.tasks.index(t) for t in tasks]
            out[os.path.relpath(f)] = mat[-1][order]
    return out


def report(rec: dict, out: str, runs: list[str]) -> str:
    tasks = rec["tasks"]
    own = {t: r.success_rate for t, r in zoo_records("mt25")[1].items()}
    X = cross_matrix(rec, own)
    ov_m = np.asarray(rec["overlap"])
    comps = groups(ov_m, rec["group_at"])
    ratio, chosen = ceiling(X, comps)
    short = [t.removesuffix("-v3") for t in tasks]
    runs_args = f" --report-only --runs {' '.join(runs)}" if runs else ""
    command = f"python bench/task_free/ceiling.py --out {out}{runs_args}"
    lines = [f"# The task-free ceiling on MT25 (`{command}`)", "",
             f"Starts: {rec['starts'][tasks[0]]['n']} per task (goal seeds {rec['goal_seeds']}); overlap "
             f"tolerance {rec['tol']}; groups join tasks with O >= {rec['group_at']} either way.", "",
             f"**Task-free ceiling with one teacher behaviour per ambiguity group: {100 * ratio.mean():.1f}% "
             "of teacher performance** (mean over the 25 tasks).", "",
             "## Ambiguity groups", "",
             "| group | O within the group (row's starts in column's box) | best single behaviour | "
             "per-task ratio |", "|---|---|---|---|"]  # fmt: skip
    for c in chosen:
        if len(c["tasks"]) == 1:
            continue
        g = c["tasks"]
        ov = "; ".join(f"{short[i]}→{short[j]} {ov_m[i, j]:.2f}" for i in g for j in g if i != j)
        rs = ", ".join(f"{short[i]} {r:.2f}" for i, r in zip(g, c["ratios"], strict=True))
        lines.append(f"| {', '.join(short[i] for i in g)} | {ov} | {short[c['behaviour']]} teacher | {rs} |")
    lines += ["", "## Cross-success: zoo teacher (row) on task (column), official protocol", ""]
    measured = sorted({i for key in rec["cross"] for i in map(tasks.index, key.split("|"))})
    lines.append("| teacher \\ task | " + " | ".join(short[i] for i in measured) + " |")
    lines.append("|---|" + "---:|" * len(measured))
    for j in measured:
        cells = ["–" if np.isnan(X[j, i]) else f"{X[j, i]:.2f}" for i in measured]
        lines.append(f"| {short[j]} | " + " | ".join(cells) + " |")
    stud = student_success(runs, tasks)
    lines += ["", "## Per task: teacher, ceiling, students (final task-free success)", ""]
    head = "| task | teacher | ceiling ratio | " + " | ".join(os.path.basename(os.path.dirname(k)) or k
                                                            for k in stud) + " |"  # fmt: skip
    lines += [head, "|---|---:|---:|" + "---:|" * len(stud)]
    for i in range(len(tasks)):
        cells = [f"{v[i]:.2f}" for v in stud.values()]
        lines.append(f"| {short[i]} | {X[i, i]:.2f} | {ratio[i]:.2f} | " + " | ".join(cells) + " |")
    if stud:  # the students' relative performance against each task's own zoo teacher (the yardstick)
        rel = [f"**{100 * np.mean(v / np.diag(X)):.1f}%**" for v in stud.values()]
        lines.append(f"| relative performance | | {100 * ratio.mean():.1f}% | " + " | ".join(rel) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "ceiling.md"), "w") as f:
        f.write(text)
    plot(ov_m, X, short, out)
    return text


def plot(ov_m: np.ndarray, X: np.ndarray, names: list[str], out: str) -> None:
    import matplotlib  # lazy: only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(20, 9))
    for ax, mat, title in [(axes[0], ov_m, "overlap O[i, j]: share of i's starts in j's box"),
                           (axes[1], X.T, "cross-success: task (row) by zoo teacher (column)")]:  # fmt: skip
        im = ax.imshow(np.nan_to_num(mat, nan=-0.1), vmin=-0.1, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ceiling.png"), dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--suite", default="mt25")
    ap.add_argument("--goal-seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--tol", type=float, default=0.005, help="box widening per dimension (metres)")
    ap.add_argument("--group-at", type=float, default=0.5)
    ap.add_argument("--runs", nargs="*", default=[], help="runs whose final task-free success to show")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    tasks = list(resolve_tasks(args.suite))
    if args.report_only:
        rec = json.load(open(os.path.join(args.out, "ceiling.json")))
    else:
        rec = measure(args.out, tasks, args)
    print(report(rec, args.out, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
