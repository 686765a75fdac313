"""Evaluate a finished run's final student in the evaluation modes its run did not measure.

``cpd distill ... --eval-modes prototype inferred`` re-run on a finished run adds a mode for *every* stage
(needed for forgetting); this script measures only the final checkpoint (ACC and relative performance of
that mode), which is 1/3 of the cost on MT25. Official protocol (50 fixed goals per task).

    python bench/eval_final_modes.py runs/cmp/cpd-b05-s0 --modes inferred --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from cpd_fast.distill import DistillConfig, phases_of
from cpd_fast.evalpool import evaluate_student
from cpd_fast.metrics import RunResult, relative_performance
from cpd_fast.runio import load_torch_checked, write_json_atomic
from cpd_fast.student import Student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--modes", nargs="+", default=["inferred"], choices=("inferred", "prototype"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with open(os.path.join(args.run_dir, "config.json")) as f:
        cfg = DistillConfig.from_dict(json.load(f))
    result = RunResult.load(args.run_dir)
    last = result.R.shape[0] - 1
    phase = phases_of(cfg, last)[-1][0]
    ckpt = os.path.join(args.run_dir, "checkpoints", f"stage{last}-{phase}.pt")
    student = Student.from_state_dict(load_torch_checked(ckpt)["student"]).eval()
    out = {"run": args.run_dir, "checkpoint": ckpt, "modes": {}}
    settings = dict(num_goals=cfg.eval_goals, num_envs=cfg.eval_envs, max_episode_steps=cfg.eval_max_steps)
    for mode in args.modes:
        t0 = time.perf_counter()
        succ = {
            t: evaluate_student(student, t, **settings, task_id=None if mode == "inferred" else j)
            for j, t in enumerate(result.tasks)
        }
        final = [succ[t] for t in result.tasks]
        out["modes"][mode] = {
            "success": succ,
            "acc": float(np.mean(final)),
            "relative_performance": relative_performance(final, result.teacher_success)[0],
            "eval_s": round(time.perf_counter() - t0, 1),
        }
        m = out["modes"][mode]
        print(f"{mode}: ACC {m['acc']:.3f} relative {m['relative_performance']:.3f}")
    write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
