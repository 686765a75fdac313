"""How far a ppo+demos run's observation normaliser has moved from the demonstrations' statistics.

The clone is fitted with the normaliser set to the demonstration states' mean and variance. If PPO then
refreshes it with every rollout (``DemoConfig.freeze_obs_norm=False``), the same demonstration state
reaches the network as a different input. This script measures that shift per observation dimension:
the mean absolute change of the normalised (clipped) value over the demonstration states, in units of
the normalised scale (1.0 = one demonstration standard deviation).

    python bench/obs_norm_drift.py RUN/teachers/lever-pull-v3/ppo-demos --out drift.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from cpd_fast.teachers.demos import _arrays, holdout_split


def drift(run: str, task: str) -> dict:
    demos = json.load(open(os.path.join(run, "demos.json")))
    if demos.get("clone_rounds", 0):
        raise SystemExit(f"{run}: DAgger clone rounds clone on more than demos/; not measured here")
    obs, _ = _arrays(task, os.path.join(run, "demos"))
    state = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False, map_location="cpu")
    model = state["model"]
    mean, var, count = (model[f"obs_norm.{k}"] for k in ("mean", "var", "count"))
    x = obs.double()
    cfg = json.load(open(os.path.join(run, "config.json")))
    clip = cfg["clip_obs"]
    # the clone's normaliser: the statistics of the cloning states (the demonstrations minus the holdout)
    g = torch.Generator().manual_seed(cfg["seed"])
    _, train_idx = holdout_split(obs.shape[0], demos["holdout"], g)
    train, n_train = x[train_idx], int(train_idx.numel())
    m0, v0 = train.mean(0), train.var(0, unbiased=False)
    z0 = ((x - m0) / (v0 + 1e-8).sqrt()).clamp(-clip, clip)
    z1 = ((x - mean) / (var + 1e-8).sqrt()).clamp(-clip, clip)
    shift = (z1 - z0).abs().mean(0)
    top = sorted(range(shift.numel()), key=lambda i: -float(shift[i]))[:6]
    return {
        "run": run,
        "task": task,
        "update": int(state["update"]),
        "normaliser_count": float(count),
        "cloning_states": n_train,
        "max_shift": float(shift.max()),
        "largest": [_dim(i, m0, v0, mean, var, shift) for i in top],
    }


def _dim(i: int, m0, v0, mean, var, shift) -> dict:
    return {"dim": i, "demo_mean": float(m0[i]), "now_mean": float(mean[i]), "demo_std": float(v0[i].sqrt()),
            "now_std": float(var[i].sqrt()), "shift": float(shift[i])}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="ppo+demos run directories (…/teachers/<task>/ppo-demos)")
    p.add_argument("--out", default=None, help="write the measurements as JSON")
    args = p.parse_args()
    rows = []
    for run in args.runs:
        task = os.path.basename(os.path.dirname(os.path.normpath(run)))  # RUN/teachers/<task>/ppo-demos
        r = drift(run, task)
        rows.append(r)
        top = r["largest"][0]
        print(f"{run}: update {r['update']}, largest shift {r['max_shift']:.2f} (dim {top['dim']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
