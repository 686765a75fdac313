"""Env steps/s of both cpd_fast.envs backends with random actions (prints a markdown table).

    python bench/env_steps.py [--task reach-v3] [--num-envs 8] [--steps 2000]

Counts sub-env steps (num_envs per ``step`` call); construction and reset are not timed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cpd_fast.envs import make_vec_env


def steps_per_second(task: str, backend: str, num_envs: int, steps: int) -> float:
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (steps, num_envs, 4)).astype(np.float32)
    with make_vec_env(task, num_envs, backend=backend) as env:
        env.reset()
        for a in actions[:50]:  # warm-up
            env.step(a)
        t0 = time.perf_counter()
        for a in actions:
            env.step(a)
        return steps * num_envs / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["reach-v3", "pick-place-v3", "dial-turn-v3"])
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--steps", type=int, default=2000, help="vector steps timed per measurement")
    args = p.parse_args()
    print(f"| task | envpool steps/s | gymnasium steps/s | ratio |  (num_envs={args.num_envs})")
    print("|---|---|---|---|")
    for task in args.tasks:
        ep = steps_per_second(task, "envpool", args.num_envs, args.steps)
        gy = steps_per_second(task, "gymnasium", args.num_envs, max(args.steps // 4, 100))
        print(f"| {task} | {ep:,.0f} | {gy:,.0f} | {ep / gy:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
