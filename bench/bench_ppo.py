"""PPO training throughput (env steps/s *including* learning): envpool vs Meta-World's gymnasium envs.

    python bench/bench_ppo.py [--task reach-v3] [--total-steps 16384] [--repeats 2]

Same task, same PPO and hyper-parameters (``PPOConfig`` defaults unless overridden), in one process;
only the env backend changes. Modes:

* ``envpool-async`` — two pipelined envpool groups (``send``/``recv``; the default);
* ``envpool-sync`` — one envpool group, ``step`` = send + recv;
* ``gymnasium`` — ``gymnasium.vector.SyncVectorEnv`` over Meta-World's own Python envs.

Modes are interleaved ``--repeats`` times and the median is reported, so load from other jobs on the
machine spreads over all modes. The clock covers rollouts + GAE + updates + logging (``train_ppo``'s own
``steps_per_s``), not env construction. Respects the shared-CPU protocol: waits while
``/tmp/cpd_quiet.lock`` exists and holds ``/tmp/cpd_quiet_ppo.lock`` while it runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from cpd_fast.teachers.ppo import PPOConfig, train_ppo

MODES = {
    "envpool-async": {"backend": "envpool", "async_envs": True},
    "envpool-sync": {"backend": "envpool", "async_envs": False},
    "gymnasium": {"backend": "gymnasium", "async_envs": False},
}
OTHERS_LOCK, OUR_LOCK = "/tmp/cpd_quiet.lock", "/tmp/cpd_quiet_ppo.lock"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="reach-v3")
    p.add_argument("--total-steps", type=int, default=16_384, help="env steps per measurement")
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--num-steps", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--no-wait", action="store_true", help="do not wait for a stale other lock (check uptime)")
    args = p.parse_args()

    while os.path.exists(OTHERS_LOCK) and not args.no_wait:
        print(f"waiting: {OTHERS_LOCK} exists", flush=True)
        time.sleep(30)
    open(OUR_LOCK, "w").close()
    try:
        rates: dict[str, list[float]] = {m: [] for m in args.modes}
        for rep in range(args.repeats):
            for mode in args.modes:
                cfg = PPOConfig(
                    total_steps=args.total_steps,
                    num_envs=args.num_envs,
                    num_steps=args.num_steps,
                    seed=rep,
                    **MODES[mode],
                )
                with tempfile.TemporaryDirectory() as d:
                    r = train_ppo(args.task, cfg, d, tensorboard=False)
                rates[mode].append(r.steps_per_s)
                print(
                    f"  {mode:<14} repeat {rep}: {r.steps_per_s:7.0f} steps/s ({r.wall_time_s:.1f} s)",
                    flush=True,
                )
    finally:
        os.remove(OUR_LOCK)

    base = statistics.median(rates["gymnasium"]) if "gymnasium" in rates else None
    print(
        f"\n{args.task}, {args.num_envs} envs x {args.num_steps} steps/rollout, {args.total_steps} steps, "
        f"median of {args.repeats}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    )
    print("| mode | env steps/s incl. learning | vs gymnasium |")
    print("|---|---|---|")
    for mode, vals in rates.items():
        med = statistics.median(vals)
        ratio = f"{med / base:.2f}x" if base else "-"
        print(f"| {mode} | {med:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
