"""What a run records beside its success matrix: expert routing shares and the replay budget stored."""

from __future__ import annotations

from typing import Any

import torch

from cpd_fast.distill.windows import TaskSampler, WindowData, full_pool

__all__ = ["replay_report", "routing_shares", "student_error"]


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
