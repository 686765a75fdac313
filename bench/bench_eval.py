"""Student evaluation throughput against raw Meta-World stepping on the same cores (ratios, one run).

    python bench/bench_eval.py [--run bench/dagger_stage0/runs/cpd] [--goals 50] [--workers 2] [--out F.json]

What a run does after a stage: the official protocol (50 fixed goals, one episode each, stop at success)
for every seen task in both modes (task id / inferred), here with the final student of a committed run.
Arms, measured one after the other in this process:

* ``raw 1 core``: Meta-World's envs of the same tasks stepped with zero actions for the same number of
  steps in one process (no policy): the physical limit of one core for this protocol;
* ``raw N cores``: the same split over ``--workers`` processes (the limit of the machine);
* ``in-process``: :class:`cpd_fast.evalpool.EvalPool` with 0 workers (the student batched over 25 envs);
* ``pool``: ``EvalPool(--workers)``, the same jobs in worker processes; its success flags are checked
  equal to the in-process ones bit for bit.

Prints env steps/s per arm and the ratios; ``--out`` writes them as JSON. Nothing else heavy should run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from cpd_fast.distill import DistillConfig
from cpd_fast.evalpool import EvalJob, EvalPool
from cpd_fast.runio import load_torch_checked, write_json_atomic
from cpd_fast.student import Student
from cpd_fast.workers import process_pool


def raw_steps(task: str, steps: int, envs: int = 25) -> float:
    """Seconds to step ``envs`` Meta-World envs of ``task`` ``steps`` times in total (zero actions,
    resets every 500 steps; env construction excluded)."""
    import metaworld

    from cpd_fast.evaluation import official_goals

    cls = metaworld.env_dict.ALL_V3_ENVIRONMENTS[task]
    pool = [cls() for _ in range(envs)]
    goals = official_goals(task)
    for i, env in enumerate(pool):
        env.set_task(goals[i % len(goals)])
        env.reset()
    act = np.zeros(4, np.float32)
    t0, n = time.perf_counter(), 0
    while n < steps:
        for env in pool:
            env.step(act)
            n += 1
            if env.curr_path_length >= 500:
                env.reset()
    dt = time.perf_counter() - t0
    for env in pool:
        env.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="bench/dagger_stage0/runs/cpd")
    ap.add_argument("--goals", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with open(os.path.join(args.run, "config.json")) as f:
        cfg = DistillConfig.from_dict(json.load(f))
    ckpts = sorted(f for f in os.listdir(os.path.join(args.run, "checkpoints")) if f.endswith(".pt"))
    student = Student.from_state_dict(
        load_torch_checked(os.path.join(args.run, "checkpoints", ckpts[-1]))["student"]
    )
    student.eval()
    tasks = [t for stage in cfg.stage_tasks() for t in stage][: student.num_tasks]
    jobs = [EvalJob(t, m) for i, t in enumerate(tasks) for m in (i, None)]
    settings = dict(num_goals=args.goals, num_envs=cfg.eval_envs, max_episode_steps=cfg.eval_max_steps)
    out: dict[str, dict[str, float]] = {}

    with EvalPool(0) as pool:
        pool.evaluate(student, jobs[:1], **{**settings, "num_goals": 1})  # warm: imports, first envs
        t0 = time.perf_counter()
        ref = pool.evaluate(student, jobs, **settings)
        out["in-process"] = {"s": time.perf_counter() - t0}
    steps = {t: 0 for t in tasks}
    for j, r in zip(jobs, ref, strict=True):
        steps[j.task] += int(r.episode_lengths.sum())
    total = sum(steps.values())

    t0 = time.perf_counter()
    raw = sum(raw_steps(t, n) for t, n in steps.items())
    out["raw 1 core"] = {"s": raw, "wall_s": time.perf_counter() - t0}
    with process_pool(args.workers, 1) as ex:
        t0 = time.perf_counter()
        futs = [
            ex.submit(raw_steps, t, n // args.workers) for t, n in steps.items() for _ in range(args.workers)
        ]
        [f.result() for f in futs]
        out[f"raw {args.workers} cores"] = {"s": time.perf_counter() - t0}  # includes env construction

    with EvalPool(args.workers) as pool:
        pool.evaluate(student, jobs[:1], **{**settings, "num_goals": 1})  # warm: workers import, first envs
        t0 = time.perf_counter()
        got = pool.evaluate(student, jobs, **settings)
        out[f"pool ({args.workers} workers)"] = {"s": time.perf_counter() - t0}
    same = all(
        np.array_equal(a.successes, b.successes) and np.array_equal(a.episode_lengths, b.episode_lengths)
        for a, b in zip(ref, got, strict=True)
    )

    print(f"{len(jobs)} evaluations ({len(tasks)} tasks x 2 modes, {args.goals} goals), {total:,} env steps; "
          f"pool flags equal to in-process: {same}")  # fmt: skip
    print("| arm | seconds | env steps/s | vs raw 1 core |")
    print("|---|---|---|---|")
    for arm, d in out.items():
        d["steps_per_s"] = total / d["s"]
        d["vs_raw_1_core"] = out["raw 1 core"]["s"] / d["s"]
        print(f"| {arm} | {d['s']:.1f} | {d['steps_per_s']:,.0f} | {d['vs_raw_1_core']:.2f} |")
    if args.out:
        write_json_atomic(args.out, {"run": args.run, "goals": args.goals, "env_steps": total,
                                     "flags_equal": same, "arms": out})  # fmt: skip
    if not same:
        raise SystemExit("the pool's flags differ from the in-process ones")


if __name__ == "__main__":
    main()
