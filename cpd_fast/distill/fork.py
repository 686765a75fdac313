"""A run started from another run's finished first stages, for grids whose points share them.

A tuning grid over a setting that does not act before stage ``k`` (EWC's λ and online EWC's γ act from the
first consolidation, i.e. from stage 1's training on) computes the same first ``k`` stages at every point.
:func:`fork_stages` copies them — checkpoints (with their checksums), replay sets, evaluations, the teacher
success record and the ledger entries — from a finished run into a new run directory; :func:`run_distill`
there then loads them as a resumed run would and computes only the later stages. The caller names the
config fields that may differ (``differ``) and so asserts that they do not act in the copied stages;
every other field must be equal. ``fork.json`` in the new run records where its first stages came from,
and its timing counts only the stages it computed.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from collections.abc import Iterable

from cpd_fast.distill.config import DistillConfig, saved_config
from cpd_fast.errors import UserError
from cpd_fast.runio import Ledger, config_diff, read_json, write_json_atomic

__all__ = ["FORK_FILE", "fork_stages"]

FORK_FILE = "fork.json"
_STAGE = re.compile(r"stage(\d+)")


def fork_stages(
    src: str | os.PathLike, cfg: DistillConfig, dst: str | os.PathLike, stages: int, differ: Iterable[str]
) -> None:
    """Start run ``dst`` (config ``cfg``, not started yet) from the first ``stages`` stages of run ``src``.

    Raises:
        UserError: ``dst`` already holds a run, ``src`` has not finished those stages, or the configs
            differ in a field outside ``differ``.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.exists(os.path.join(dst, "config.json")):
        raise UserError(f"{dst} already holds a run; fork into a new directory")
    theirs = saved_config(read_json(os.path.join(src, "config.json")))
    mine, allowed = json.loads(json.dumps(cfg.to_dict())), set(differ)  # as config.json holds it
    odd = config_diff(theirs, mine, allowed)
    if odd:
        raise UserError(
            f"cannot fork {src}: its config differs in {', '.join(odd)} (allowed: {sorted(allowed)})"
        )
    ledger = Ledger(os.path.join(src, "progress.json"))
    steps = {n: r for n, r in ledger.steps.items() if _stage(n) < stages}
    if any(f"stage{s}/eval" not in steps for s in range(stages)):
        raise UserError(f"cannot fork {src}: its first {stages} stage(s) are not finished")
    os.makedirs(dst, exist_ok=True)
    for sub in ("checkpoints", "replay", "eval"):
        for path in sorted(glob.glob(os.path.join(src, sub, "stage*"))):
            if _stage(os.path.basename(path)) < stages:
                os.makedirs(os.path.join(dst, sub), exist_ok=True)
                shutil.copy2(path, os.path.join(dst, sub, os.path.basename(path)))
    shutil.copy2(os.path.join(src, "teacher_success.json"), os.path.join(dst, "teacher_success.json"))
    write_json_atomic(os.path.join(dst, "progress.json"), {"steps": steps})
    write_json_atomic(os.path.join(dst, FORK_FILE), {
        "from": os.path.abspath(src), "stages": stages,
        "differ": {k: [theirs.get(k), mine.get(k)] for k in sorted(allowed) if theirs.get(k) != mine.get(k)},
    })  # fmt: skip


def _stage(name: str) -> float:
    """The stage of a ledger step or a run file (``stage3/eval``, ``stage3-phase1.pt``); inf if none."""
    m = _STAGE.match(name)
    return int(m.group(1)) if m else float("inf")
