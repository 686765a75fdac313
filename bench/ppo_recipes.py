"""PPO sample efficiency by recipe: env steps until a teacher reaches an official success threshold.

Trains one task with a named recipe (:data:`cpd_fast.teachers.ppo.RECIPES`) with
:func:`cpd_fast.teachers.curve.train_measured` (the same loop as ``cpd teachers train --eval-every``):
chunks of ``--every`` env steps on the full budget's LR schedule, each followed by Meta-World's official
protocol (``--goals`` of the 50 fixed goals; 50 is the official figure). Stops at the first measurement
>= ``--threshold`` or at ``--budget``. Resumable: re-running continues from ``OUT/ppo`` and the JSON.

    python bench/ppo_recipes.py --task push-v3 --recipe metaworld --seed 0 \
        --out runs/recipes/push-metaworld-s0

``python bench/ppo_recipes.py --summary DIR...`` prints the markdown table of finished or partial curves.

Writes ``OUT/curve.json`` (:mod:`cpd_fast.teachers.curve`'s format plus ``recipe`` and ``seed``).
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from cpd_fast.envs import KNOWN_BAD_ENVPOOL
from cpd_fast.runio import read_json, write_json_atomic
from cpd_fast.teachers.curve import train_measured
from cpd_fast.teachers.ppo import RECIPES, recipe_config


def _steps_to_target(c: dict) -> int | None:
    return c.get("steps_to_target", c.get("steps_to_threshold"))  # the key before train_measured existed


def summary(dirs: list[str]) -> None:
    """Markdown table of curves: steps to the threshold (or the best success so far), throughput."""
    print(
        "| task | recipe | seed | env steps to >= 0.9 | official success at each measurement | env steps/s |"
    )
    print("|---|---|---|---|---|---|")
    for d in dirs:
        c = read_json(os.path.join(d, "curve.json"))
        pts = c["points"]
        reached = _steps_to_target(c)
        last = pts[-1]["env_steps"] if pts else 0
        shown = f"{reached / 1e6:.2f}M" if reached else f"not within {last / 1e6:.2f}M (so far)"
        curve = ", ".join(f"{p['success']:.2f}" for p in pts)
        sps = sum(p["steps_per_s"] for p in pts) / max(1, len(pts))
        print(f"| {c['task']} | {c['recipe']} | {c['seed']} | {shown} | {curve} | {sps:.0f} |")


def _upgrade(path: str, every: int, goals: int) -> None:
    """Give a curve.json written before train_measured the keys it checks on resume."""
    c = read_json(path, None)
    if c is None or "every" in c:
        return
    c.update(algorithm="ppo", every=every, goals=goals, steps_to_target=c.pop("steps_to_threshold", None))
    write_json_atomic(path, c)


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
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # one line per measured chunk
    cfg = recipe_config(
        args.recipe,
        total_steps=args.budget,
        seed=args.seed,
        device="cpu",
        checkpoint_every=1,
        backend=KNOWN_BAD_ENVPOOL.get(args.task, "envpool"),  # the fidelity gate's choice (dial-turn)
    )
    path = os.path.join(args.out, "curve.json")
    _upgrade(path, args.every, args.goals)
    curve = train_measured(args.task, cfg, os.path.join(args.out, "ppo"), every=args.every,
                           stop_at=args.threshold, goals=args.goals, curve_path=path)  # fmt: skip
    write_json_atomic(path, {**read_json(path), "recipe": args.recipe, "seed": args.seed})
    print(
        f"{args.task} {args.recipe} seed {args.seed}: "
        f"steps to >= {args.threshold}: {curve['steps_to_target']}"
    )


if __name__ == "__main__":
    main()
