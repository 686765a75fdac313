"""Student evaluation throughput against raw Meta-World stepping on the same cores (ratios, one run).

    python bench/bench_eval.py [--run bench/dagger_stage0/runs/cpd] [--goals 50] [--workers 2] [--out F.json]

What a run does after a stage: the official protocol (50 fixed goals, one episode each, stop at success)
for every seen task in both modes (task id / inferred), here with the final student of a committed run.
Arms, measured one after the other in this process:

* ``raw 1 core``: the evaluation's own episodes (same tasks, goals, resets and episode lengths) replayed
  with zero actions on Meta-World's envs in one process, construction excluded, no policy: the physical
  limit of one core for this protocol;
* ``raw N cores``: the same, the tasks split over ``--workers`` processes (the limit of the machine);
* ``in-process``: :class:`cpd_fast.evalpool.EvalPool` with 0 workers (the student batched over the
  run's ``eval_envs`` envs); ``cold`` is the first call (it builds the envs), ``warm`` the second (cached);
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


def raw_episodes(lengths: dict[str, list[int]], start_at: float | None = None) -> float:
    """Seconds to replay the evaluation's episodes with zero actions: per task, its goals in order
    (``set_task`` + ``reset``, then as many steps as the episode ran) on one env per task, built first
    (construction excluded). ``start_at`` (a ``time.time()``): wait until then, so that workers start
    together."""
    import metaworld

    from cpd_fast.evaluation import official_goals

    envs = {t: metaworld.env_dict.ALL_V3_ENVIRONMENTS[t]() for t in lengths}
    goals = {t: official_goals(t) for t in lengths}
    act = np.zeros(4, np.float32)
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    t0 = time.perf_counter()
    for t, ls in lengths.items():
        env = envs[t]
        for i, n in enumerate(ls):
            env.set_task(goals[t][i % len(goals[t])])
            env.reset()
            for _ in range(n):
                env.step(act)
    dt = time.perf_counter() - t0
    for env in envs.values():
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

    def timed(pool: EvalPool, arm: str) -> list:
        got = []
        for call in ("cold", "warm"):  # the first call builds the envs (as a run's first stage does)
            t0 = time.perf_counter()
            got = pool.evaluate(student, jobs, **settings)
            out[f"{arm}, {call}"] = {"s": time.perf_counter() - t0}
        return got

    with EvalPool(0, max_envs=len(tasks) * cfg.eval_envs) as pool:
        pool.evaluate(student, jobs[:1], **{**settings, "num_goals": 1})  # imports, first env
        ref = timed(pool, "in-process")
    lengths: dict[str, list[int]] = {t: [] for t in tasks}
    for j, r in zip(jobs, ref, strict=True):
        lengths[j.task] += r.episode_lengths.tolist()
    total = sum(map(sum, lengths.values()))

    out["raw 1 core"] = {"s": raw_episodes(lengths)}
    share = [dict(list(lengths.items())[w :: args.workers]) for w in range(args.workers)]
    with process_pool(args.workers, 1) as ex:
        start = time.time() + 20  # after every worker has built its envs
        secs = [f.result() for f in [ex.submit(raw_episodes, part, start) for part in share]]
        out[f"raw {args.workers} cores"] = {"s": max(secs)}

    with EvalPool(args.workers, max_envs=len(tasks) * cfg.eval_envs) as pool:
        got = timed(pool, f"pool ({args.workers} workers)")
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
