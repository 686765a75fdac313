"""Which task does a task-free student think it is in? The inferred task (nearest prototype to the task
encoder's embedding of the observation history) at every step of the student's own official-protocol
episodes, after every stage of a run: accuracy against the position in the episode and a confusion matrix
per stage.

    python bench/task_free/inference.py RUN_DIR --out bench/task_free/inference/plus_s0   # resumable

``RUN_DIR`` is a distillation's directory (``checkpoints/stage<S>-*.pt``, ``results.json``); each stage's
last checkpoint is evaluated on the tasks seen by then, task-free, by Meta-World's official protocol (50
goals). The success flags equal the run's own task-free evaluation (the same student, the same episodes:
the recorder only reads the history the policy keeps); the script checks them against the run's
``success_matrix_modes["inferred"]`` and says where they differ.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time

import numpy as np
import torch

from cpd_fast.envs import MAX_EPISODE_STEPS
from cpd_fast.evalpool import StudentPolicy
from cpd_fast.evaluation import evaluate_official
from cpd_fast.metrics import RunResult
from cpd_fast.student import Student

BINS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, MAX_EPISODE_STEPS]  # episode-position bins: [lo, hi)


class RecordingPolicy(StudentPolicy):
    """A task-free :class:`StudentPolicy` that also records, per acting row, the episode position and the
    task the student infers from the same history window its action used."""

    def __init__(self, student: Student, num_envs: int) -> None:
        super().__init__(student, num_envs, task_id=None)
        self.position = np.zeros(num_envs, np.int64)
        self.records: list[tuple[np.ndarray, np.ndarray]] = []  # (positions, inferred tasks) per call

    def __call__(self, obs: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        actions = super().__call__(obs, slots, fresh)
        self.position[slots[fresh]] = 0
        rows = torch.from_numpy(slots)
        window, mask = self.history.obs[rows], self.history.mask[rows]
        inferred = self.student.infer_task(window, mask).cpu().numpy()
        self.records.append((self.position[slots].copy(), inferred))
        self.position[slots] += 1
        return actions


def stage_checkpoints(run: str) -> dict[int, str]:
    """Each stage's last checkpoint (``train`` or the last phase)."""
    out: dict[int, str] = {}
    for path in sorted(glob.glob(os.path.join(run, "checkpoints", "stage*-*.pt"))):
        m = re.match(r"stage(\d+)-(\w+)\.pt$", os.path.basename(path))
        if m and (int(m[1]) not in out or m[2] in ("train", "phase2")):
            out[int(m[1])] = path
    return out


def measure_stage(student: Student, tasks: list[str], seen: list[int]) -> dict:
    """Per seen task: success flags and, per position bin, the counts of each inferred task."""
    per_task = {}
    for t in seen:
        policy = RecordingPolicy(student, 25)
        with torch.inference_mode():
            res = evaluate_official(policy, tasks[t], num_envs=25, episode_info=True)
        pos = np.concatenate([p for p, _ in policy.records])
        inf = np.concatenate([i for _, i in policy.records])
        counts = np.zeros((len(BINS) - 1, len(tasks)), np.int64)
        np.add.at(counts, (np.digitize(pos, BINS[1:], right=False), inf), 1)
        per_task[tasks[t]] = {"successes": res.successes.astype(int).tolist(), "counts": counts.tolist()}
    return per_task


def measure(run: str, out: str) -> dict:
    path = os.path.join(out, "inference.json")
    rec = json.load(open(path)) if os.path.exists(path) else {"run": run, "bins": BINS, "stages": {}}
    results = json.load(open(os.path.join(run, "results.json")))
    tasks, task_stage = results["tasks"], results["task_stage"]
    rec["tasks"] = tasks
    torch.set_num_threads(1)
    for s, ck in stage_checkpoints(run).items():
        if str(s) in rec["stages"]:
            continue
        t0 = time.perf_counter()
        state = torch.load(ck, map_location="cpu", weights_only=False)["student"]
        student = Student.from_state_dict(state).eval()
        seen = [i for i, st in enumerate(task_stage) if st <= s]
        rec["stages"][str(s)] = measure_stage(student, tasks, seen)
        with open(path + ".tmp", "w") as f:
            json.dump(rec, f)
        os.replace(path + ".tmp", path)
        print(f"stage {s}: {len(seen)} tasks in {time.perf_counter() - t0:.0f} s", flush=True)
    return rec


def cell(percent: float, diagonal: bool) -> str:
    """A confusion cell: the diagonal in bold, off-diagonal shares below 0.5% left blank."""
    return f"**{percent:.0f}**" if diagonal else (f"{percent:.0f}" if percent >= 0.5 else "")


def report(rec: dict, run: str, out: str) -> str:
    tasks = rec["tasks"]
    short = [t.removesuffix("-v3") for t in tasks]
    R = RunResult.load(os.path.join(run, "results.json")).matrix("inferred")
    lines = [f"# Task inference of `{run}` on its own episodes", "",
             f"Measured from the stage checkpoints of `{rec['run']}`; this page: `python "
             f"bench/task_free/inference.py {run} --out {out} --report-only`.", ""]  # fmt: skip
    mismatch = []
    acc_rows = []
    for s, per_task in sorted(rec["stages"].items(), key=lambda kv: int(kv[0])):
        conf = np.zeros((len(tasks), len(tasks)), np.int64)
        by_bin = np.zeros((len(rec["bins"]) - 1, 2), np.int64)  # correct, total
        for task, r in per_task.items():
            t = tasks.index(task)
            counts = np.asarray(r["counts"])
            conf[t] += counts.sum(0)
            by_bin[:, 0] += counts[:, t]
            by_bin[:, 1] += counts.sum(1)
            rate = float(np.mean(r["successes"]))
            if abs(rate - R[int(s), t]) > 1e-9:
                mismatch.append(f"stage {s} {task}: {rate:.2f} here, {R[int(s), t]:.2f} in the run")
        acc_rows.append((s, by_bin))
        seen = sorted(tasks.index(t) for t in per_task)
        lines += [f"## Stage {s}: confusion (row: true task, column: inferred; % of steps)", "",
                  "| true \\ inferred | " + " | ".join(short[j] for j in seen) + " | success |",
                  "|---|" + "---:|" * (len(seen) + 1)]  # fmt: skip
        for i in seen:
            row = conf[i, seen] / max(1, conf[i].sum()) * 100
            cells = [cell(v, diagonal=j == i) for j, v in zip(seen, row, strict=True)]
            succ = np.mean(per_task[tasks[i]]["successes"])
            lines.append(f"| {short[i]} | " + " | ".join(cells) + f" | {succ:.2f} |")
        lines.append("")
    bins = rec["bins"]
    lines += ["## Inferred-task accuracy against the position in the episode (% of steps)", "",
              "| stage | " + " | ".join(f"{bins[k]}–{bins[k + 1] - 1}" for k in range(len(bins) - 1)) + " |",
              "|---|" + "---:|" * (len(bins) - 1)]  # fmt: skip
    for s, by_bin in acc_rows:
        cells = [f"{100 * c / n:.1f}" if n else "–" for c, n in by_bin]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "Success flags equal the run's own task-free evaluation: "
              + ("yes, every stage and task." if not mismatch else "NO: " + "; ".join(mismatch))]  # fmt: skip
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "inference.md"), "w") as f:
        f.write(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a distillation's run directory (checkpoints/, results.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rec = json.load(open(os.path.join(args.out, "inference.json"))) if args.report_only else None
    print(report(rec or measure(args.run, args.out), args.run, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
