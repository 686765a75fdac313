"""The run directory of ``cpd run``: its config written first (or a resumed run's checked against it), and
every checksummed file verified before a resumed run does anything.

Every write is atomic (:mod:`cpd_fast.runio`). Torch checkpoints carry a ``.sha256`` sidecar and datasets a
checksum per file in their ``<task>.collected.json``; a damaged file is named with what to delete to redo
the step that made it (the step re-runs because its output is gone).
"""

from __future__ import annotations

import glob
import os

import yaml

from cpd_fast.config import load_yaml
from cpd_fast.data import verify_dataset_files
from cpd_fast.pipeline.config import DISTILL_ADDED, PipelineConfig, runtime_keys
from cpd_fast.runio import atomic_path, check_same_config, verify_sha256

__all__ = ["CONFIG_FILE", "prepare_run_dir", "verify_run_dir"]

CONFIG_FILE = "config.yaml"


def _remedy(run_dir: str, path: str) -> str:
    """What to delete to redo the step that wrote ``path`` (the step re-runs because its output is gone)."""
    rel = os.path.relpath(path, run_dir).split(os.sep)
    again = "and re-run the same command to redo"
    if rel[0] == "methods" and len(rel) > 2:
        return f"delete {os.path.join(run_dir, *rel[:2])} {again} that method's distillation"
    if rel[0] == "teachers" and len(rel) > 2:
        where = f"{os.path.join(run_dir, *rel[:2])} and {os.path.join(run_dir, 'teachers.json')}"
        return f"delete {where} {again} that teacher's training"
    return f"delete it {again} the step that wrote it"


def verify_run_dir(run_dir: str) -> int:
    """Check every checksummed file of a run (torch sidecars, dataset manifests); returns how many.

    Raises:
        CorruptFileError: naming the first damaged file and what to delete to redo its step.
    """
    n = 0
    for sidecar in sorted(glob.glob(os.path.join(run_dir, "**", "*.sha256"), recursive=True)):
        path = sidecar[: -len(".sha256")]
        if os.path.isfile(path):
            n += verify_sha256(path, _remedy(run_dir, path))
    for manifest_path in sorted(glob.glob(os.path.join(run_dir, "datasets", "*.collected.json"))):
        n += verify_dataset_files(manifest_path)
    return n


def prepare_run_dir(cfg: PipelineConfig, run_dir: str) -> None:
    """Write ``RUN/config.yaml`` (first), or check that an existing run was made with this config."""
    path = os.path.join(run_dir, CONFIG_FILE)
    mine = cfg.to_dict()
    if os.path.isfile(path):
        saved = load_yaml(path)
        saved["distill"] = {**DISTILL_ADDED, **saved.get("distill", {})}  # fields newer than the run
        remedy = f"resume it with `cpd run --out {run_dir}` alone, or choose a new --out"
        check_same_config(saved, mine, runtime_keys(saved, mine), run_dir, remedy)
        return
    os.makedirs(run_dir, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(f"# cpd run: resolved config (preset {cfg.preset}); rerun with cpd run --config {path}\n")
        yaml.safe_dump(mine, f, sort_keys=False)
