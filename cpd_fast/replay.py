"""Replay memory for continual distillation: which of a finished task's transitions are kept.

The unit of replay is a **segment**: ``segment_len`` consecutive steps of one episode. The student reads
observation *histories*, so an isolated replayed step would lose its context; a segment keeps it (a
window inside a replayed segment sees the segment's earlier steps, and treats the segment start as its
history start, exactly as at an episode start). Only whole segments are candidates (episode tails
shorter than ``segment_len`` are dropped), so the stored transitions are ``k · segment_len`` with
``k = floor(fraction · N / segment_len)``: never more than ``fraction`` of the task's N transitions.

Selection:

* ``"dpp"`` — greedy MAP of a DPP (:func:`cpd_fast.dpp.greedy_map`, rbf kernel) over per-segment
  features (:func:`segment_features`): the replayed segments cover the task's state space (goal
  positions, phases of the motion) instead of piling up where the teacher spends most of its time
  (Meta-World's scripted and PPO teachers hold still for hundreds of steps after success).
* ``"uniform"`` — the same number of segments drawn uniformly at random (the ``replay`` baseline and
  the uniform-vs-DPP ablation).

``quality`` (DPP only): per-segment weights q of a quality-diversity DPP (L_ij = q_i q_j K_ij,
:func:`~cpd_fast.dpp.greedy_map`); the run passes the student's error on each segment
(:func:`segment_quality`), so the kept set stays diverse but leans to what the student gets wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpd_fast.dpp import greedy_map

__all__ = [
    "REPLAY_SELECTIONS",
    "ReplaySet",
    "segment_features",
    "segment_quality",
    "segment_starts",
    "select_replay",
]

REPLAY_SELECTIONS = ("dpp", "uniform")


@dataclass
class ReplaySet:
    """Replayed transitions of one task.

    Attributes:
        index: ``[n]`` int64 global step indices (into the run's :class:`~cpd_fast.data.TeacherData`).
        hist_start: ``[n]`` int64 first step a window ending at ``index`` may look back to (its segment's
            start): windows never reach outside the stored data.
        candidates: number of candidate segments; ``selected``: segments kept.
    """

    index: torch.Tensor
    hist_start: torch.Tensor
    candidates: int
    selected: int

    def to_dict(self) -> dict:
        sizes = {"candidates": torch.tensor(self.candidates), "selected": torch.tensor(self.selected)}
        return {"index": self.index, "hist_start": self.hist_start, **sizes}

    @classmethod
    def from_dict(cls, d: dict) -> ReplaySet:
        return cls(d["index"], d["hist_start"], int(d["candidates"]), int(d["selected"]))


def segment_starts(steps: torch.Tensor, episode: torch.Tensor, segment_len: int) -> torch.Tensor:
    """Positions (into the given ``[N]`` per-step arrays of one task) where whole segments start.

    A segment starts at every ``segment_len``-th step of an episode and must fit inside the episode.
    """
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    n = steps.shape[0]
    pos = torch.arange(n)
    aligned = steps % segment_len == 0
    end = pos + segment_len - 1
    fits = end < n
    fits[fits.clone()] &= episode[end[fits]] == episode[fits]
    return pos[aligned & fits]


def segment_quality(per_step: torch.Tensor, starts: torch.Tensor, segment_len: int) -> torch.Tensor:
    """DPP weights ``[S]`` from per-step scores (e.g. the student's squared error): each segment's mean
    score over the task's mean, square-rooted (so L_ii grows linearly with the score), in [0.1, 10]."""
    if per_step.shape[0] == 0 or not torch.isfinite(per_step).all() or (per_step < 0).any():
        raise ValueError("replay quality scores must be finite and >= 0, one per transition")
    idx = starts[:, None] + torch.arange(segment_len)[None, :]
    seg = per_step.double()[idx].mean(1)
    return (seg / seg.mean().clamp(min=1e-12)).sqrt().clamp(0.1, 10.0)


def segment_features(obs: torch.Tensor, action_mean: torch.Tensor, starts: torch.Tensor, segment_len: int):
    """Feature ``[S, 2·obs_dim + act_dim]`` per segment, z-scored per dimension over the task's segments.

    [mean observation, last − first observation, mean teacher action]: *where* the segment is (object,
    gripper and goal positions), *how it moves*, and *what the teacher does*. Z-scoring puts positions,
    quaternions and actions on one scale so that the rbf kernel's single bandwidth fits all of them.
    """
    idx = starts[:, None] + torch.arange(segment_len)[None, :]  # [S, L]
    o = obs[idx].double()
    a = action_mean[idx].double()
    f = torch.cat([o.mean(1), o[:, -1] - o[:, 0], a.mean(1)], dim=1)
    return (f - f.mean(0)) / f.std(0, unbiased=False).clamp(min=1e-6)


def select_replay(
    obs: torch.Tensor,
    action_mean: torch.Tensor,
    steps: torch.Tensor,
    episode: torch.Tensor,
    offset: int | torch.Tensor,
    *,
    fraction: float,
    segment_len: int,
    selection: str = "dpp",
    seed: int = 0,
    quality: torch.Tensor | None = None,
) -> ReplaySet:
    """Choose one task's replayed segments.

    Args:
        obs ``[N, obs_dim]``, action_mean ``[N, act_dim]``, steps ``[N]``, episode ``[N]``: the task's
            transitions; ``offset``: their global rows, as the first row of a contiguous slice (int) or
            one row per transition (``[N]`` LongTensor, ascending; each episode's rows consecutive).
        fraction: at most this fraction of the N transitions is kept (``0 < fraction ≤ 1``).
        segment_len: steps per replayed segment.
        selection: ``"dpp"`` or ``"uniform"``.
        seed: RNG seed of uniform selection.
        quality: ``[N]`` positive per-transition weights (DPP only); a segment's quality is the mean over
            its steps (:func:`segment_quality` turns them into DPP weights).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"replay fraction must be in (0, 1], got {fraction}")
    if selection not in REPLAY_SELECTIONS:
        raise ValueError(
            f"unknown replay selection {selection!r}; choose one of {', '.join(REPLAY_SELECTIONS)}"
        )
    starts = segment_starts(steps, episode, segment_len)
    k = min(int(fraction * obs.shape[0]) // segment_len, starts.numel())
    if k < 1:
        empty = torch.zeros(0, dtype=torch.int64)
        return ReplaySet(empty, empty.clone(), int(starts.numel()), 0)
    if selection == "dpp":
        feats = segment_features(obs, action_mean, starts, segment_len)
        q = None if quality is None else segment_quality(quality, starts, segment_len)
        picked = greedy_map(feats, k, kernel="rbf", quality=q)
        picked = torch.sort(picked.cpu()).values
    else:
        g = torch.Generator().manual_seed(seed)
        picked = torch.sort(torch.randperm(starts.numel(), generator=g)[:k]).values
    # global start of each kept segment (a segment lies inside one episode, whose rows are consecutive)
    seg = offset[starts[picked]] if isinstance(offset, torch.Tensor) else starts[picked] + offset
    index = (seg[:, None] + torch.arange(segment_len)[None, :]).reshape(-1)
    hist_start = seg.repeat_interleave(segment_len)
    return ReplaySet(index, hist_start, int(starts.numel()), int(picked.numel()))
