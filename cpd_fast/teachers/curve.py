"""A teacher trained in measured chunks: its official-success learning curve, and the stop at a target.

:func:`train_measured` trains PPO (or any trainer with :func:`~cpd_fast.teachers.ppo.train_ppo`'s
signature, such as :func:`cpd_fast.teachers.demos.train_ppo_demos`) ``every`` env steps at a time on the
*whole* budget's schedule (the learning rate anneals over ``total_steps`` whether or not the run stops
early), and after each chunk measures the current policy with Meta-World's official protocol
(:func:`cpd_fast.teachers.records.evaluate_teacher`: ``goals`` of the 50 fixed goals, one episode each).
It stops at the first measurement ``>= stop_at``, at the budget, or — with ``give_up=(steps, success)`` —
at the first measurement at or after ``steps`` env steps that is still below ``success`` (a run that is not
learning; the gate's remedy can take over sooner), and writes the policy it measured last as ``policy.pt``.
The curve goes to ``curve.json``; re-running resumes from the checkpoint and the curve (a run killed
mid-chunk repeats that chunk from its last checkpoint). Every measured policy is kept as
``snapshots/policy-<env steps>.pt``: the teacher at each point of its curve, e.g. to distil from a
deliberately weaker one (``cpd teachers export`` puts one in a zoo).

``curve.json``: ``{"task", "config", "every", "stop_at", "goals", "points": [{"env_steps", "success",
"wall_s", "train_s", "steps_per_s", "snapshot"}], "steps_to_target", "algorithm", "protocol"}``, and
``"give_up"`` / ``"gave_up_at"`` (env steps) when that rule is set / ended the run.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

from cpd_fast.errors import require_int
from cpd_fast.runio import check_same_config, load_torch_checked, read_json, write_json_atomic
from cpd_fast.teachers.ppo import export_policy, load_policy, train_ppo
from cpd_fast.teachers.records import evaluate_teacher

__all__ = ["CURVE_JSON", "SNAPSHOTS", "check_give_up", "train_measured"]

CURVE_JSON = "curve.json"
SNAPSHOTS = "snapshots"  # run_dir/snapshots/policy-<env steps>.pt: the policy of each measured point
log = logging.getLogger(__name__)


def train_measured(
    task: str,
    cfg: Any,
    run_dir: str | os.PathLike,
    *,
    every: int,
    stop_at: float,
    goals: int = 50,
    eval_envs: int = 10,
    curve_path: str | os.PathLike | None = None,
    trainer: Callable[..., Any] | None = None,
    algorithm: str = "ppo",
    progress: bool = False,
    until: int | None = None,
    give_up: tuple[int, float] | None = None,
) -> dict[str, Any]:
    """Train ``task`` into ``run_dir`` until its official success reaches ``stop_at`` or ``cfg.total_steps``.

    Args:
        cfg: the :class:`~cpd_fast.teachers.ppo.PPOConfig` (``total_steps`` is the budget).
        every: env steps between measurements (rounded up to whole updates of ``cfg.batch_size``).
        stop_at: official success that ends training early (``> 1`` never stops early).
        goals / eval_envs: the measurement (50 goals is the official protocol).
        curve_path: where the curve lives (default ``run_dir/curve.json``).
        trainer: ``train_ppo``-like callable (default :func:`~cpd_fast.teachers.ppo.train_ppo`).
        algorithm: what ``trainer`` is, recorded in the curve (``"ppo"``, ``"ppo+demos"``).
        until: stop once this many env steps are measured, on the whole budget's schedule all the same
            (the teacher as it was at that point of a full run, e.g. for its snapshots); ``None``: the budget.
        give_up: ``(steps, success)``: stop at the first measurement at or after ``steps`` env steps whose
            official success is below ``success`` (recorded as ``gave_up_at``); ``None``: never.

    Returns:
        the curve (as written), with ``policy_path``.
    """
    require_int("every", every)
    if until is not None:
        require_int("until", until)
    if not stop_at >= 0.0:  # NaN too
        raise ValueError(f"stop_at must be a success rate >= 0, got {stop_at}")
    if give_up is not None:
        check_give_up(give_up)
    trainer = trainer or train_ppo
    run_dir = os.fspath(run_dir)
    path = os.fspath(curve_path) if curve_path is not None else os.path.join(run_dir, CURVE_JSON)
    fresh = {"task": task, "algorithm": algorithm, "config": cfg.to_dict(), "every": every,
             "stop_at": stop_at, "goals": goals, "points": [], "steps_to_target": None}  # fmt: skip
    curve = read_json(path, fresh)
    mine = {k: fresh[k] for k in ("task", "algorithm", "every", "goals")}
    check_same_config({k: curve.get(k) for k in mine}, mine, (), path, "use a new run directory")
    check_same_config(curve["config"], fresh["config"], ("total_steps",), path, "use a new run directory")
    curve["config"], curve["stop_at"] = fresh["config"], stop_at  # the budget and target may grow
    if give_up is not None:
        curve["give_up"] = list(give_up)
    updates_per_chunk = max(1, math.ceil(every / cfg.batch_size))
    ckpt, policy_path = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "policy.pt")

    def reached() -> bool:
        return bool(curve["points"]) and curve["points"][-1]["success"] >= stop_at

    def gave_up() -> bool:
        last = curve["points"][-1] if curve["points"] else None
        if give_up is None or last is None or last["env_steps"] < give_up[0] or last["success"] >= give_up[1]:
            return False
        curve["gave_up_at"] = last["env_steps"]
        return True

    trained = False
    while not reached() and not gave_up():
        done = curve["points"][-1]["env_steps"] if curve["points"] else 0
        if done >= min(cfg.total_steps, until or cfg.total_steps):
            break
        # up to the next measurement point: a run killed mid-chunk resumes from its last checkpoint and is
        # still measured every `every` steps, not `every` steps after wherever it was killed
        at = _checkpoint_step(ckpt)
        updates = max(1, math.ceil((done + updates_per_chunk * cfg.batch_size - at) / cfg.batch_size))
        t0 = time.perf_counter()
        result = trainer(task, cfg, run_dir, stop_after_updates=updates, tensorboard=False,
                         progress=progress)  # fmt: skip
        train_s, trained = time.perf_counter() - t0, True
        measured = evaluate_teacher(load_policy(ckpt), task, num_goals=goals, num_envs=eval_envs)
        success, curve["protocol"] = measured["success_rate"], measured["protocol"]
        snapshot = os.path.join(SNAPSHOTS, f"policy-{result.global_step}.pt")  # the teacher measured here
        export_policy(ckpt, os.path.join(run_dir, snapshot))
        curve["points"].append({
            "env_steps": result.global_step, "success": success, "wall_s": round(time.perf_counter() - t0, 1),
            "train_s": round(train_s, 1), "steps_per_s": round(result.steps_per_s, 1), "snapshot": snapshot,
        })  # fmt: skip
        log.info("%s: %d env steps, official success %.2f (%s)", task, result.global_step, success, path)
        if success >= stop_at and curve["steps_to_target"] is None:
            curve["steps_to_target"] = result.global_step
        write_json_atomic(path, curve)
    if curve["points"] and (trained or not os.path.isfile(policy_path)):
        export_policy(ckpt, policy_path)  # the policy measured last (the checkpoint after the last chunk)
    curve["policy_path"] = policy_path
    return curve


def check_give_up(give_up: Any) -> tuple[int, float]:
    """``give_up`` as ``(env steps, success)``: a positive int and a success rate in (0, 1]."""
    try:
        steps, success = give_up
    except (TypeError, ValueError):
        raise ValueError(f"give_up must be (env steps, success), got {give_up!r}") from None
    require_int("give_up steps", steps)
    if not 0.0 < success <= 1.0:  # NaN too
        raise ValueError(f"give_up success must be in (0, 1], got {success}")
    return int(steps), float(success)


def _checkpoint_step(path: str) -> int:
    """The env steps a resume checkpoint holds (0 when there is none yet)."""
    if not os.path.isfile(path):
        return 0
    state = load_torch_checked(
        path, "delete it and re-run: this teacher's training restarts", map_location="cpu"
    )
    return int(state["global_step"])
