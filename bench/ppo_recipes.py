"""PPO sample efficiency by recipe: env steps until a teacher reaches an official success threshold.

Trains one task with a named recipe (:data:`cpd_fast.teachers.ppo.RECIPES`) in chunks of ``--every`` env
steps (``train_ppo(..., stop_after_updates=...)`` on the full budget, so the LR schedule is the budget's)
and, after each chunk, measures the current policy with Meta-World's official protocol
(``--goals`` of the 50 fixed goals; 50 is the official figure). Stops at the first measurement
>= ``--threshold`` or at ``--budget``. Resumable: re-running continues from ``OUT/ppo`` and the JSON.

    python bench/ppo_recipes.py --task push-v3 --recipe metaworld --seed 0 \
        --out runs/recipes/push-metaworld-s0

``python bench/ppo_recipes.py --summary DIR...`` prints the markdown table of finished or partial curves.

Writes ``OUT/curve.json``: ``{"task", "recipe", "seed", "config", "points": [{"env_steps", "success",
"wall_s", "steps_per_s"}], "steps_to_threshold"}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from cpd_fast.runio import read_json, write_json_atomic
from cpd_fast.teachers.gate import evaluate_teacher
from cpd_fast.teachers.ppo import RECIPES, load_policy, recipe_config, train_ppo


def summary(dirs: list[str]) -> None:
    """Markdown table of curves: steps to the threshold (or the best success so far), throughput."""
    print(
        "| task | recipe | seed | env steps to >= 0.9 | official success at each measurement | env steps/s |"
    )
    print("|---|---|---|---|---|---|")
    for d in dirs:
        c = read_json(os.path.join(d, "curve.json"))
        pts = c["points"]
        reached = c["steps_to_threshold"]
        last = pts[-1]["env_steps"] if pts else 0
        shown = f"{reached / 1e6:.2f}M" if reached else f"not within {last / 1e6:.2f}M (so far)"
        curve = ", ".join(f"{p['success']:.2f}" for p in pts)
        sps = sum(p["steps_per_s"] for p in pts) / max(1, len(pts))
        print(f"| {c['task']} | {c['recipe']} | {c['seed']} | {shown} | {curve} | {sps:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", nargs="+", metavar="DIR", help="print the table of these runs and exit")
    ap.add_argument("--task")
    ap.add_argument("--recipe", choices=tuple(RECIPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=3_000_000, help="env steps at most")
    ap.add_argument("--every", type=int, default=250_000, help="env steps between official measurements")
    ap.add_argument("--goals", type=int, default=50)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.summary:
        summary(args.summary)
        return
    if not (args.task and args.recipe and args.out):
        ap.error("--task, --recipe and --out are required (or --summary DIR...)")
    torch.set_num_threads(args.threads)
    cfg = recipe_config(
        args.recipe, total_steps=args.budget, seed=args.seed, device="cpu", checkpoint_every=1
    )
    path = os.path.join(args.out, "curve.json")
    curve = read_json(path, {"task": args.task, "recipe": args.recipe, "seed": args.seed,
                             "config": cfg.to_dict(), "points": [], "steps_to_threshold": None})  # fmt: skip
    updates_per_chunk = max(1, math.ceil(args.every / cfg.batch_size))
    run_dir = os.path.join(args.out, "ppo")
    while curve["steps_to_threshold"] is None:
        done = curve["points"][-1]["env_steps"] if curve["points"] else 0
        if done >= args.budget:
            break
        t0 = time.perf_counter()
        result = train_ppo(args.task, cfg, run_dir, stop_after_updates=updates_per_chunk, tensorboard=False)
        train_s = time.perf_counter() - t0
        policy = load_policy(os.path.join(run_dir, "checkpoint.pt"))
        success = evaluate_teacher(policy, args.task, num_goals=args.goals, num_envs=10)["success_rate"]
        point = {"env_steps": result.global_step, "success": success,
                 "wall_s": round(time.perf_counter() - t0, 1), "steps_per_s": round(result.steps_per_s, 1),
                 "train_s": round(train_s, 1)}  # fmt: skip
        curve["points"].append(point)
        if success >= args.threshold:
            curve["steps_to_threshold"] = result.global_step
        write_json_atomic(path, curve)
        print(json.dumps(point), flush=True)
    reached = curve["steps_to_threshold"]
    print(f"{args.task} {args.recipe} seed {args.seed}: steps to >= {args.threshold}: {reached}")


if __name__ == "__main__":
    main()
