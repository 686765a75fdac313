"""Continual-learning metrics on success matrices, one run's results record, and seed aggregation.

Notation. Tasks j = 0..J-1 arrive in stages s = 0..T (T = the last stage). ``task_stage[j]`` is the
stage that introduced task j (with 5 tasks per stage, task j's stage is ``j // 5``, not j).
``R[s, j]`` is the student's success rate on task j (a fraction in [0, 1] of evaluation episodes)
measured after training stage s, NaN where task j has not been seen yet (``s < task_stage[j]``).

* **ACC** = mean_j R[T, j] (over tasks measured after the last stage).
* **Forgetting** of task j (introduced before the last stage): ``max_{task_stage[j] ≤ l < T} R[l, j]
  − R[T, j]``; NaN for tasks introduced in the last stage. Not clipped at 0: a task that improved
  after its stage gets negative forgetting. Mean forgetting = mean over the defined tasks.
* **BWT** = mean over tasks with ``task_stage[j] < T`` of ``R[T, j] − R[task_stage[j], j]``, the change
  since the end of the task's own stage (negative = forgetting).
* **Relative performance** = mean_j R[T, j] / teacher_success[j]. A task whose teacher never succeeds
  (teacher success ≤ ``min_teacher_success``, 0 by default) has no defined ratio: it is **excluded**
  from the mean and counted in ``excluded_tasks`` (the teacher quality gate reports such teachers; a 0/0
  task must neither count as a perfect copy nor as a failure of the student). NaN if every task is
  excluded. Ratios are not capped, so a student that beats its teacher can exceed 1.
* **Confidence intervals** over seeds: percentile bootstrap of the mean (``bootstrap_ci``) with a fixed
  RNG seed, so reports are reproducible.

Everything here is numpy and plain dataclasses (this module imports no torch).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cpd_fast.errors import require_int
from cpd_fast.runio import write_json_atomic

__all__ = [
    "RunMetrics",
    "RunResult",
    "acc",
    "bootstrap_ci",
    "bwt",
    "compute_metrics",
    "forgetting",
    "forward_transfer",
    "matrix_from_json",
    "matrix_to_json",
    "relative_performance",
    "seen_success",
    "stage_of_tasks",
    "summarize",
]

RESULTS_SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------- input checks


def _as_matrix(R: Any) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] < 1 or R.shape[1] < 1:
        raise ValueError(f"R must be a 2-D [stages, tasks] array, got shape {R.shape}")
    finite = R[~np.isnan(R)]
    if finite.size and (np.isinf(finite).any() or finite.min() < 0 or finite.max() > 1):
        raise ValueError("success rates in R must lie in [0, 1] (NaN for tasks not seen yet)")
    return R


def _as_stages(task_stage: Any, R: np.ndarray) -> np.ndarray:
    s = np.asarray(task_stage)
    if s.shape != (R.shape[1],) or not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"task_stage must be {R.shape[1]} ints (one stage per task), got {task_stage!r}")
    if s.size and (s.min() < 0 or s.max() >= R.shape[0]):
        raise ValueError(f"task_stage values must lie in [0, {R.shape[0]}), got {s.tolist()}")
    return s.astype(np.int64)


def stage_of_tasks(stages: Sequence[Sequence[str]]) -> dict[str, int]:
    """Task → stage index map from a stage list such as ``cpd_fast.tasks.stages("mt25", 5)``: the last
    stage that trains the task (a stream may revisit a task, ``cw20``; forgetting and BWT then count from
    its last training). A task twice in one stage is refused."""
    out: dict[str, int] = {}
    for s, tasks in enumerate(stages):
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"stage {s} holds a task twice: {list(tasks)}")
        out.update(dict.fromkeys(tasks, s))
    return out


# ----------------------------------------------------------------------------- per-run metrics


def acc(R: Any) -> float:
    """Average success after the last stage: mean of ``R[-1, j]`` over the tasks measured there."""
    last = _as_matrix(R)[-1]
    last = last[~np.isnan(last)]
    return float(last.mean()) if last.size else math.nan


def forgetting(R: Any, task_stage: Any) -> np.ndarray:
    """Per-task forgetting ``[J]``: ``max_{task_stage[j] ≤ l < T} R[l, j] − R[T, j]``; NaN if undefined."""
    R = _as_matrix(R)
    s = _as_stages(task_stage, R)
    T = R.shape[0] - 1
    out = np.full(R.shape[1], np.nan)
    for j in range(R.shape[1]):
        if s[j] >= T or np.isnan(R[T, j]):
            continue
        earlier = R[s[j] : T, j]
        earlier = earlier[~np.isnan(earlier)]
        if earlier.size:
            out[j] = earlier.max() - R[T, j]
    return out


def bwt(R: Any, task_stage: Any) -> float:
    """Backward transfer: mean over tasks introduced before the last stage of ``R[T, j] − R[stage_j, j]``."""
    R = _as_matrix(R)
    s = _as_stages(task_stage, R)
    T = R.shape[0] - 1
    cols = np.flatnonzero(s < T)
    diffs = R[T, cols] - R[s[cols], cols]
    diffs = diffs[~np.isnan(diffs)]
    return float(diffs.mean()) if diffs.size else math.nan


def relative_performance(
    student_success: Any, teacher_success: Any, min_teacher_success: float = 0.0
) -> tuple[float, np.ndarray]:
    """Mean student/teacher success ratio and the per-task ratios ``[J]``.

    Tasks whose teacher success is ≤ ``min_teacher_success`` (or whose student success is NaN) get a NaN
    ratio and are excluded from the mean; NaN mean if no task is left.
    """
    st = np.asarray(student_success, dtype=np.float64)
    te = np.asarray(teacher_success, dtype=np.float64)
    if st.shape != te.shape or st.ndim != 1:
        raise ValueError(
            f"student and teacher success must be 1-D of equal length, got {st.shape}, {te.shape}"
        )
    ok = (te > min_teacher_success) & ~np.isnan(st) & ~np.isnan(te)
    ratio = np.full(st.shape, np.nan)
    ratio[ok] = st[ok] / te[ok]
    return (float(ratio[ok].mean()) if ok.any() else math.nan), ratio


def forward_transfer(R: Any, introduced: Any, R_ref: Any, introduced_ref: Any) -> np.ndarray:
    """Per-task forward transfer ``[J]``: success on task j right after the stage that first trains it,
    ``R[introduced[j], j]``, minus a from-scratch student's after the same budget on that task alone,
    ``R_ref[introduced_ref[j], j]`` (the ``scratch`` method's run; tasks in the same order). Positive: what
    the earlier tasks taught helped within the budget. Continual World compares the areas under the two
    training curves; with one evaluation per stage this compares their ends. NaN where either is missing."""
    R, R_ref = _as_matrix(R), _as_matrix(R_ref)
    a, b = _as_stages(introduced, R), _as_stages(introduced_ref, R_ref)
    if R.shape[1] != R_ref.shape[1]:
        raise ValueError(f"the run has {R.shape[1]} tasks, the reference {R_ref.shape[1]}")
    cols = np.arange(R.shape[1])
    return R[a, cols] - R_ref[b, cols]


@dataclass
class RunMetrics:
    """Metrics of one run. Scalars are fractions (success units); per-task arrays are lists of length J."""

    acc: float
    bwt: float
    mean_forgetting: float
    relative_performance: float
    forgetting: list[float]
    relative_per_task: list[float]
    final_success: list[float]
    excluded_tasks: list[int]  # tasks left out of relative performance (teacher success ≤ threshold)


def compute_metrics(
    R: Any, teacher_success: Any, task_stage: Any, min_teacher_success: float = 0.0
) -> RunMetrics:
    """All metrics of one run from its ``R [stages, tasks]``, teacher success ``[J]`` and task stages."""
    R = _as_matrix(R)
    s = _as_stages(task_stage, R)
    teacher = np.asarray(teacher_success, dtype=np.float64)
    if teacher.shape != (R.shape[1],):
        raise ValueError(f"teacher_success must have {R.shape[1]} entries, got shape {teacher.shape}")
    f = forgetting(R, s)
    rel, ratios = relative_performance(R[-1], teacher, min_teacher_success)
    excluded = [int(j) for j in np.flatnonzero(~(teacher > min_teacher_success))]
    return RunMetrics(
        acc=acc(R),
        bwt=bwt(R, s),
        mean_forgetting=float(np.nanmean(f)) if np.isfinite(f).any() else math.nan,
        relative_performance=rel,
        forgetting=f.tolist(),
        relative_per_task=ratios.tolist(),
        final_success=R[-1].tolist(),
        excluded_tasks=excluded,
    )


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    values: Any, level: float = 0.9, n_boot: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap CI of the mean: ``(mean, low, high)``.

    NaNs are dropped. One value gives ``(v, v, v)``; none gives NaNs. Deterministic for a given ``seed``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    # the bootstrap distribution of the mean is centred on the mean; clamp float round-off
    return mean, float(min(lo, mean)), float(max(hi, mean))


def matrix_to_json(R: Any) -> list[list[float | None]]:
    """A success matrix as JSON lists: NaN (task not seen yet) becomes ``null``."""
    return [[None if math.isnan(x) else float(x) for x in row] for row in np.asarray(R, float).tolist()]


def matrix_from_json(M: Sequence[Sequence[float | None]]) -> list[list[float]]:
    """Inverse of :func:`matrix_to_json`: ``null`` becomes NaN."""
    return [[math.nan if x is None else float(x) for x in row] for row in M]


# ----------------------------------------------------------------------------- one run's results


@dataclass
class RunResult:
    """Results record of one run, saved as JSON (``results.json`` in the run directory).

    Schema (version 1)::

        {"schema_version": 1, "suite": "mt25", "method": "cpd", "seed": 0,
         "tasks": ["reach-v3", ...],               # J task names, in suite order
         "task_stage": [0, 0, 0, 0, 0, 1, ...],    # J ints: stage that introduced each task
         "success_matrix": [[0.9, null, ...], ...],  # [stages][J] success fractions; null = not seen yet
         "teacher_success": [1.0, 0.96, ...],      # J teacher success fractions
         "wall_time_s": 1234.5,                    # wall-clock seconds of the whole run
         "extra": {...}}                           # optional free-form metadata (episodes, config ...)
    """

    suite: str
    method: str
    seed: int
    tasks: list[str]
    task_stage: list[int]
    success_matrix: list[list[float]]
    teacher_success: list[float]
    wall_time_s: float
    extra: dict = field(default_factory=dict)
    schema_version: int = RESULTS_SCHEMA_VERSION

    def __post_init__(self) -> None:
        R = _as_matrix(self.success_matrix)
        _as_stages(self.task_stage, R)
        if len(self.tasks) != R.shape[1] or len(self.teacher_success) != R.shape[1]:
            raise ValueError(
                f"{len(self.tasks)} tasks and {len(self.teacher_success)} teacher success values for a "
                f"success matrix of {R.shape[1]} tasks"
            )
        if self.schema_version != RESULTS_SCHEMA_VERSION:
            raise ValueError(f"unsupported results schema_version {self.schema_version!r}")

    @property
    def R(self) -> np.ndarray:
        return _as_matrix(self.success_matrix)

    @property
    def introduced(self) -> list[int]:
        """The stage that first trains each task: ``task_stage`` (its last), unless the stream revisits
        tasks (``extra["stages"]``, cw20)."""
        first: dict[str, int] = {}
        for s, stage in enumerate(self.extra.get("stages") or []):
            first.update({t: s for t in stage if t not in first})
        return [first.get(t, st) for t, st in zip(self.tasks, self.task_stage, strict=True)]

    def matrix(self, mode: str) -> np.ndarray:
        """The success matrix of evaluation mode ``mode`` (``"inferred"``: no task id; ``"prototype"``: the
        task id), whichever of the run's matrices holds it; ValueError if the run did not evaluate it."""
        if self.extra.get("eval_mode") == mode:
            return self.R
        modes = self.extra.get("success_matrix_modes", {})
        if mode not in modes:
            have = [m for m in [self.extra.get("eval_mode"), *modes] if m]
            raise ValueError(f"the run was not evaluated in mode {mode!r} (it has: {', '.join(have)})")
        return _as_matrix(matrix_from_json(modes[mode]))

    def metrics(self, min_teacher_success: float = 0.0) -> RunMetrics:
        return compute_metrics(self.R, self.teacher_success, self.task_stage, min_teacher_success)

    def first_stages(self, n: int) -> RunResult:
        """The run as of its first ``n`` stages: the tasks introduced in them and the rows measured after
        them, e.g. to set an MT25 run beside runs on MT25's first ten tasks. The suite is renamed
        ``"<suite>[:<tasks>]"`` and the wall time is unknown (NaN); a run with ≤ n stages is returned as is.
        """
        require_int("n", n)
        if self.R.shape[0] <= n:
            return self
        keep = [j for j, st in enumerate(self.introduced) if st < n]
        cut = lambda M: [[M[i][j] for j in keep] for i in range(n)]
        modes = {m: cut(M) for m, M in self.extra.get("success_matrix_modes", {}).items()}
        extra = {**self.extra, "success_matrix_modes": modes, "first_stages": n}
        last = {self.tasks[j]: self.task_stage[j] for j in keep}
        if self.extra.get("stages"):  # a revisited task's last training within the first n stages
            extra["stages"] = self.extra["stages"][:n]
            last = stage_of_tasks(extra["stages"])
        return RunResult(
            suite=f"{self.suite}[:{len(keep)}]", method=self.method, seed=self.seed,
            tasks=[self.tasks[j] for j in keep], task_stage=[last[self.tasks[j]] for j in keep],
            success_matrix=cut(self.R.tolist()), teacher_success=[self.teacher_success[j] for j in keep],
            wall_time_s=math.nan, extra=extra,
        )  # fmt: skip

    def to_json(self) -> dict:
        d = asdict(self)
        d["success_matrix"] = matrix_to_json(self.R)
        return d

    @classmethod
    def from_json(cls, d: dict) -> RunResult:
        d = dict(d)
        d["success_matrix"] = matrix_from_json(d["success_matrix"])
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunResult:
        """Load a results file, or ``results.json`` inside a run directory."""
        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "results.json")
        with open(p) as f:
            return cls.from_json(json.load(f))


# ----------------------------------------------------------------------------- aggregation

_SCALARS = ("relative_performance", "acc", "mean_forgetting", "bwt", "wall_time_s", "cpu_time_s")


def _scalar(run: RunResult, m: RunMetrics, name: str) -> float:
    """One run's value of a summarized scalar (CPU time: NaN where the run did not record it)."""
    if name == "wall_time_s":
        return run.wall_time_s
    if name == "cpu_time_s":
        v = run.extra.get("cpu_time_s")
        return math.nan if v is None else float(v)
    return getattr(m, name)


def summarize(
    runs: Iterable[RunResult],
    level: float = 0.9,
    n_boot: int = 10_000,
    seed: int = 0,
    reference: Sequence[RunResult] = (),
) -> dict[str, Any]:
    """Aggregate seeds of one (suite, method): per scalar metric its mean and bootstrap CI over seeds.

    Returns ``{"suite", "method", "seeds", "n", "tasks", "<metric>": {"mean", "low", "high", "values"},
    "final_success_mean": [J], "forgetting_mean": [J], "R_mean": [[...]], "teacher_success_mean": [J]}``
    for metric in relative_performance, acc, mean_forgetting, bwt, wall_time_s, cpu_time_s (the distillation's
    CPU seconds, evaluation workers included; NaN for runs that did not record it). All runs must share
    suite, method, tasks and task stages. With ``reference`` (the ``scratch`` method's runs on the same
    tasks, in the same evaluation mode) also ``forward_transfer``: per run the mean over tasks of
    :func:`forward_transfer` against the reference of its seed.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("summarize needs at least one run")
    first = runs[0]
    for r in runs[1:]:
        if (r.suite, r.method, r.tasks, r.task_stage) != (
            first.suite,
            first.method,
            first.tasks,
            first.task_stage,
        ):
            raise ValueError(
                "summarize: runs differ in suite, method, tasks or task stages; group them first"
            )
    seeds = [r.seed for r in runs]
    if len(set(seeds)) < len(seeds):
        again = sorted({s for s in seeds if seeds.count(s) > 1})
        raise ValueError(
            f"summarize: {first.method!r} on {first.suite} has seed(s) {again} more than once: runs with one "
            "label (another teacher zoo, gate or code?) would pool as if they were seeds; report them apart"
        )
    metrics = [r.metrics() for r in runs]
    if reference:
        ft = [float(np.nanmean(_transfer(r, reference))) for r in runs]
        mean, lo, hi = bootstrap_ci(ft, level, n_boot, seed)
        extra_scalars = {"forward_transfer": {"mean": mean, "low": lo, "high": hi, "values": ft}}
    else:
        extra_scalars = {}
    out: dict[str, Any] = {
        "suite": first.suite,
        "method": first.method,
        "seeds": [r.seed for r in runs],
        "n": len(runs),
        "tasks": list(first.tasks),
        "task_stage": list(first.task_stage),
    }
    for name in _SCALARS:
        vals = [_scalar(r, m, name) for r, m in zip(runs, metrics, strict=True)]
        if name == "cpu_time_s" and any(math.isnan(v) for v in vals):
            vals = [math.nan] * len(vals)  # a mean over the seeds that recorded it would mislabel n
        mean, lo, hi = bootstrap_ci(vals, level, n_boot, seed)
        out[name] = {"mean": mean, "low": lo, "high": hi, "values": [float(v) for v in vals]}
    with np.errstate(all="ignore"):  # all-NaN columns (tasks never forgotten-measurable) stay NaN quietly
        stack = lambda key: np.array([getattr(m, key) for m in metrics], dtype=np.float64)
        out["final_success_mean"] = _nanmean0(stack("final_success")).tolist()
        out["forgetting_mean"] = _nanmean0(stack("forgetting")).tolist()
        out["R_mean"] = _nanmean0(np.stack([r.R for r in runs])).tolist()
        out["teacher_success_mean"] = _nanmean0(
            np.array([r.teacher_success for r in runs], dtype=float)
        ).tolist()
    out["seen_success_by_stage"] = _seen_success_by_stage(runs, level, n_boot, seed)
    return {**out, **extra_scalars}


def _transfer(run: RunResult, reference: Sequence[RunResult]) -> np.ndarray:
    """Per-task forward transfer of ``run`` against the reference run of its seed (else the mean over
    the references' seeds)."""
    same = [r for r in reference if r.seed == run.seed] or list(reference)
    for r in same:
        if r.tasks != run.tasks:
            raise ValueError(f"the reference run has tasks {r.tasks}, the run {run.tasks}")
    with np.errstate(all="ignore"):
        return np.nanmean([forward_transfer(run.R, run.introduced, r.R, r.introduced) for r in same], axis=0)


def seen_success(R: Any, task_stage: Any) -> np.ndarray:
    """Per stage s, the mean of ``R[s, j]`` over the tasks introduced by then (``task_stage[j] <= s``; pass
    :attr:`RunResult.introduced` for a stream that revisits tasks):
    the curve continual-learning papers plot, ``[stages]``."""
    R = _as_matrix(R)
    s = _as_stages(task_stage, R)
    with np.errstate(all="ignore"):
        return np.array([np.nanmean(R[i, s <= i]) if (s <= i).any() else np.nan for i in range(R.shape[0])])


def _seen_success_by_stage(runs: list, level: float, n_boot: int, seed: int) -> dict[str, list[float]]:
    """:func:`seen_success` per stage: mean and bootstrap CI over the runs (seeds)."""
    curves = np.array([seen_success(r.R, r.introduced) for r in runs])  # [runs, stages]
    stats = [bootstrap_ci(curves[:, i].tolist(), level, n_boot, seed) for i in range(curves.shape[1])]
    return {k: [float(st[i]) for st in stats] for i, k in enumerate(("mean", "low", "high"))}


def _nanmean0(a: np.ndarray) -> np.ndarray:
    """nanmean over axis 0 without the all-NaN RuntimeWarning (NaN stays NaN)."""
    n = (~np.isnan(a)).sum(0)
    s = np.where(np.isnan(a), 0.0, a).sum(0)
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)
