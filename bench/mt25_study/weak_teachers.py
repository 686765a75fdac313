"""Teacher quality (the paper's open question 2; issue 29): distil from deliberately weakened zoo teachers.

Three of MT25's first-stage teachers (push, pick-place, door-open) are replaced by the same PPO training
stopped early: each is re-trained by its zoo teacher's own recipe (config, seed, measurement every
``--eval-every`` env steps, on the whole budget's learning-rate schedule) up to half of the env steps its
zoo teacher took, keeping the policy of every measured point (``cpd_fast.teachers.curve``); the point
nearest 25% and the one nearest 50% of the zoo teacher's env steps become the teachers of two zoos,
``zoo-25`` and ``zoo-50`` (copies of the shipped MT25 zoo with those three replaced, each record saying
what it is). The distillation runs then show what weak teachers cost the student and what the quality
gate's remedy does about it:

    python bench/mt25_study/weak_teachers.py --out runs/weak          # teachers + zoos (resumable)
    cpd run --config bench/mt25_study/weak.yaml --set zoo=runs/weak/zoo-25 --set gate.threshold=0 \\
        --out runs/weak/run-25-nogate                                      # weak teachers used as they are
    ... (bench/mt25_study/README.md lists the four runs)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from typing import Any

import torch

from cpd_fast.teachers.curve import train_measured
from cpd_fast.teachers.ppo import PPOConfig
from cpd_fast.teachers.zoo import add_teacher, zoo_dir, zoo_records

TASKS = ("push-v3", "pick-place-v3", "door-open-v3")
FRACTIONS = (0.25, 0.5)


def retrain(task: str, record: Any, out: str) -> dict:
    """Re-run ``task``'s zoo recipe up to half its env steps, measuring (and keeping) every point."""
    history = record.history[-1]
    every = int(re.search(r"--eval-every (\d+)", history["command"]).group(1))
    policy = torch.load(os.path.join(zoo_dir("mt25"), record.path), map_location="cpu", weights_only=False)
    cfg = PPOConfig.from_dict(policy["config"])
    until = math.ceil(max(FRACTIONS) * record.env_steps)
    return train_measured(task, cfg, os.path.join(out, "ppo", task), every=every, stop_at=2.0, until=until)


def nearest(curve: dict, steps: float) -> dict:
    """The measured point whose env steps are nearest ``steps`` (the earlier one on a tie)."""
    return min(curve["points"], key=lambda p: (abs(p["env_steps"] - steps), p["env_steps"]))


def build_zoo(out: str, fraction: float, curves: dict[str, dict], records: dict[str, Any]) -> str:
    """``out/zoo-<percent>``: the shipped MT25 zoo with each of TASKS replaced by its snapshot nearest
    ``fraction`` of its zoo teacher's env steps (exported with a bar of 0: weak on purpose)."""
    zoo = os.path.join(out, f"zoo-{round(100 * fraction)}")
    if not os.path.isfile(os.path.join(zoo, "teachers.json")):
        shutil.copytree(zoo_dir("mt25"), zoo + ".tmp", dirs_exist_ok=True)
        for task in TASKS:
            zoo_rec = records[task]
            point = nearest(curves[task], fraction * zoo_rec.env_steps)
            add_teacher(zoo + ".tmp", task, os.path.join(out, "ppo", task, point["snapshot"]), provenance={
                "threshold": 0.0, "algorithm": zoo_rec.algorithm, "env_steps": point["env_steps"],
                "weakened": f"its zoo recipe re-run and stopped at {point['env_steps']} of the zoo teacher's "
                            f"{zoo_rec.env_steps} env steps (~{round(100 * fraction)}%); measured "
                            f"{point['success']:.2f} then",
                "command": f"python bench/mt25_study/weak_teachers.py --out {out}",
            })  # fmt: skip
        os.replace(zoo + ".tmp", zoo)
    return zoo


def row(records: dict[str, Any]) -> dict[str, dict]:
    return {t: {"env_steps": records[t].env_steps, "success": records[t].success_rate} for t in TASKS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core: the other runs the distillation beside it
    _, records = zoo_records("mt25")
    curves = {task: retrain(task, records[task], args.out) for task in TASKS}
    table = {}
    for fraction in FRACTIONS:
        zoo = build_zoo(args.out, fraction, curves, records)
        _, held = zoo_records(zoo)
        table[f"{round(100 * fraction)}%"] = row(held)
    table["zoo"] = row(records)
    with open(os.path.join(args.out, "weak_teachers.json"), "w") as f:
        json.dump(table, f, indent=1)
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
