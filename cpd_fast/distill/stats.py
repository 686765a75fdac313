"""What a run records beside its success matrix: expert routing shares, the replay budget stored, and each
stage's cost (its phases' step time, the student's size, the process's peak memory)."""

from __future__ import annotations

import math
import resource
import sys
from typing import Any

import numpy as np
import torch

from cpd_fast.distill.windows import TaskSampler, WindowData, full_pool

__all__ = [
    "newborn_shares", "peak_memory", "replay_report", "routing_shares", "stage_growth", "student_error",
    "student_size",
]  # fmt: skip


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


def student_size(student: Any) -> dict[str, int]:
    """``{"experts", "params", "trainable_params"}`` of the student as it is configured now."""
    params = list(student.parameters())
    return {"experts": int(student.num_experts), "params": sum(p.numel() for p in params),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad)}  # fmt: skip


def peak_memory(device: str) -> dict[str, float]:
    """This process's peak resident memory so far in MiB (``ru_maxrss``: the whole process's life, so a
    stage's figure is the peak up to its end), and on CUDA the peak allocated by torch on ``device``."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_mib": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if torch.device(device).type == "cuda":
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def stage_growth(result: Any, mode: str | None = None) -> list[dict[str, Any]]:
    """Where a growing MoE stops paying, stage by stage, from a :class:`cpd_fast.metrics.RunResult`: one row
    per stage with

    - its cost (``extra["stage_stats"]``, None where the run predates that record): ``experts``, ``params``,
      ``ms_per_step`` (its phases' training wall time over their steps), ``trainable`` (the steps-weighted
      share of the parameters its phases train), ``train_s``, ``eval_s``, ``peak_rss_mib``;
    - its routing at the stage's end (``extra["routing"]``): ``effective_experts`` (the mean over the seen
      tasks of exp(entropy) of a task's routing shares: 1 = one expert per task, top-2 spreads to ≤ 2 per
      token but more per task), ``experts_used`` (experts that receive ≥ 1% of some seen task's routing)
      and ``dead_experts``;
    - its success in ``mode`` (default the run's main mode): ``seen_success`` (mean over the tasks introduced
      by then) and ``forgetting`` (mean over the tasks introduced before the stage of their best earlier
      success minus the success now; None at stage 0).
    """
    R = np.asarray(result.matrix(mode) if mode else result.R, dtype=float)
    introduced = np.asarray(result.introduced)
    stats, routing = result.extra.get("stage_stats") or {}, result.extra.get("routing") or {}
    rows = []
    for s in range(R.shape[0]):
        st, row = stats.get(str(s)), {"stage": s}
        if st and st.get("phases"):
            phases = st["phases"].values()
            steps = sum(ph["steps"] for ph in phases)
            row.update(
                experts=st["experts"], params=st["params"], train_s=st["clock_s"]["train"],
                eval_s=st["clock_s"]["eval"], peak_rss_mib=st["peak_rss_mib"],
                ms_per_step=sum(ph["train_s"] for ph in phases) * 1000 / steps,
                trainable=sum(ph["trainable_params"] * ph["steps"] for ph in phases) / steps / st["params"],
            )  # fmt: skip
        shares = routing.get(str(s))
        if shares:
            m = np.asarray(list(shares.values()), dtype=float)  # [seen tasks, experts]
            p = np.where(m > 0, m, 1.0)
            used = (m >= 0.01).any(0)
            row.update(effective_experts=float(np.exp(-(m * np.log(p)).sum(1)).mean()),
                       experts_used=int(used.sum()), dead_experts=int((~used).sum()))  # fmt: skip
        seen = introduced <= s
        row["seen_success"] = float(np.nanmean(R[s, seen])) if seen.any() else math.nan
        old = np.flatnonzero(introduced < s)
        drops = [np.nanmax(R[introduced[j] : s, j]) - R[s, j] for j in old if not np.isnan(R[s, j])]
        row["forgetting"] = float(np.mean(drops)) if drops else None
        rows.append(row)
    return rows
