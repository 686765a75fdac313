"""Regenerate ``zoo_reference.npz``: a fixed observation batch per shipped zoo teacher and its actions.

    python tests/data/make_zoo_reference.py

Run after adding or replacing a teacher in ``cpd_fast/zoo/metaworld-v3`` (``cpd teachers export``);
``tests/test_zoo.py`` checks every shipped teacher against it bit for bit. The observations are drawn
around each teacher's own normaliser statistics (mean + std x N(0, 1), seed 0), so they look like the
task's states and exercise the whole actor, normaliser clip included.
"""

from __future__ import annotations

import os

import numpy as np

from cpd_fast.teachers.zoo import zoo_records, zoo_teacher

BATCH = 32
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo_reference.npz")


def reference_obs(teacher, seed: int = 0) -> np.ndarray:
    norm = teacher._policy.model.obs_norm
    mean, std = norm.mean.numpy(), np.sqrt(norm.var.numpy())
    rng = np.random.default_rng(seed)
    return (mean + std * rng.standard_normal((BATCH, mean.shape[0]))).astype(np.float32)


def main() -> None:
    _, records = zoo_records("metaworld-v3")
    arrays = {}
    for task, rec in records.items():
        if rec.used:
            teacher = zoo_teacher(task, "metaworld-v3")
            obs = reference_obs(teacher)
            arrays[f"{task}/obs"], arrays[f"{task}/action"] = obs, teacher.action_mean(obs)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT}: {len(arrays) // 2} teachers x {BATCH} observations")


if __name__ == "__main__":
    main()
