"""What a run records beside its success matrix: expert routing shares and the replay budget stored."""

from __future__ import annotations

from typing import Any

import torch

from cpd_fast.distill.windows import TaskSampler, WindowData, full_pool

__all__ = ["newborn_shares", "replay_report", "routing_shares", "student_error"]


@torch.no_grad()
def routing_shares(student: Any, data: WindowData, seen: list[int], device: str) -> dict[str, list[float]]:
    """Share of each task's routed (token, slot) rows per expert, on 256 of its windows (last position).

    Shows whether experts born with a cold gate are ever used: with top-k routing a dormant expert gets
    gradient only once its logit enters the top k.
    """
    was = student.training
    student.eval()
    out = {}
    gen = torch.Generator().manual_seed(0)
    for t in seen:
        idx, start = TaskSampler({t: full_pool(data, t)}).sample(256, gen)
        obs, _, mask = data.windows(idx, start)
        student(obs.to(device), mask=mask.to(device))
        counts = student.moe.tokens_per_expert.float()
        out[data.tasks[t]] = [round(float(c), 4) for c in counts / counts.sum()]
    student.train(was)
    return out


def newborn_shares(result: Any) -> list[dict[str, Any]]:
    """How much of the old and of the new tasks' routing goes to each stage's newborn experts (the cold-start
    gate bias's Mechanism 2, arXiv 2601.22475): one row per stage ≥ 1 and moment (``"birth"``, after each
    phase but the last, ``"end"`` of the stage), from a :class:`cpd_fast.metrics.RunResult` of a growing
    method. ``new_tasks`` / ``old_tasks``: the mean over those tasks of the routing share their windows give
    the experts born in that stage (``routing_shares``); runs older than the within-stage record give only
    ``"end"`` rows."""
    end, within = result.extra.get("routing", {}), result.extra.get("routing_within_stage", {})
    stage_tasks: dict[int, list[str]] = {}  # the tasks each stage introduces (a revisit introduces none)
    first = {}
    for s, stage in enumerate(result.extra.get("stages") or []):
        first.update({t: s for t in stage if t not in first})
    for t, st in zip(result.tasks, result.task_stage, strict=True):
        stage_tasks.setdefault(first.get(t, st), []).append(t)
    rows = []
    for s in range(1, len(end)):
        born = range(len(next(iter(end[str(s - 1)].values()))), len(next(iter(end[str(s)].values()))))
        if s not in stage_tasks:
            continue  # no expert born: the stage only revisits tasks
        moments = {**within.get(str(s), {}), "end": end[str(s)]}
        for moment, shares in moments.items():
            row: dict[str, Any] = {"stage": s, "moment": moment, "newborn_experts": list(born)}
            for key, tasks in (
                ("new_tasks", stage_tasks[s]),
                ("old_tasks", [t for o in range(s) for t in stage_tasks[o]]),
            ):
                row[key] = sum(sum(shares[t][e] for e in born) for t in tasks) / len(tasks)
            rows.append(row)
    return rows


def replay_report(replay: dict[int, Any], data: WindowData) -> dict:
    """Replay budget actually stored: transitions per task and as a fraction of the task's data."""
    per_task = {}
    for t, r in sorted(replay.items()):
        n = data.task_rows(t).numel()
        per_task[data.tasks[t]] = {"transitions": int(r.index.numel()), "fraction": r.index.numel() / n,
                                   "segments": r.selected, "candidates": r.candidates}  # fmt: skip
    total = sum(v["transitions"] for v in per_task.values())
    return {"per_task": per_task, "stored_transitions": total}


@torch.no_grad()
def student_error(student: Any, data: WindowData, rows: torch.Tensor, device: str, batch: int = 1024):
    """The student's squared error (mean over action dims, last position) at each of ``rows``: ``[n]``."""
    was = student.training
    student.eval()
    out = []
    for i in range(0, rows.numel(), batch):
        idx = rows[i : i + batch]
        obs, target, mask = data.windows(idx, data.ep_start[idx])
        pred = student(obs.to(device), mask=mask.to(device))
        out.append(((pred - target[:, -1].to(device).clamp(-1, 1)) ** 2).mean(1).cpu())
    student.train(was)
    return torch.cat(out)
