"""Evaluation with and without :class:`cpd_fast.envs.EnvCache`, side by side (ratio).

    python bench/bench_eval_cache.py [--tasks reach-v3 pick-place-v3] [--goals 50] [--envs 25] [--calls 2]

What a run does after each stage: every seen task evaluated ``--calls`` times (two modes) with
``--envs`` envs per call. The policy is Meta-World's scripted expert (so episodes end at success, as a
good student's do). Prints seconds per arm and the ratio; the flags are checked equal.
"""

from __future__ import annotations

import argparse
import time

from cpd_fast.envs import EnvCache
from cpd_fast.evaluation import evaluate_official
from cpd_fast.teachers.scripted import ScriptedExpert


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["reach-v3", "pick-place-v3"])
    ap.add_argument("--goals", type=int, default=50)
    ap.add_argument("--envs", type=int, default=25)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating repeats of both arms")
    args = ap.parse_args()
    experts = {t: ScriptedExpert(t) for t in args.tasks}
    times: dict[str, list[float]] = {"fresh envs": [], "EnvCache": []}
    flags: dict[str, list] = {}
    for _ in range(args.rounds):
        for arm in times:
            t0 = time.perf_counter()
            with EnvCache() as cache:
                out = [
                    evaluate_official(experts[t].action_mean, t, num_envs=args.envs, num_goals=args.goals,
                                      env_cache=cache if arm == "EnvCache" else None).successes.tolist()
                    for t in args.tasks for _ in range(args.calls)
                ]  # fmt: skip
            times[arm].append(time.perf_counter() - t0)
            flags.setdefault(arm, out)
    assert flags["fresh envs"] == flags["EnvCache"], "the cache changed a success flag"
    best = {arm: min(v) for arm, v in times.items()}
    for arm, v in best.items():
        print(f"{arm:>11}: {v:.1f} s (best of {args.rounds})")
    print(f"EnvCache / fresh: {best['EnvCache'] / best['fresh envs']:.2f}x the time; flags identical")


if __name__ == "__main__":
    main()
