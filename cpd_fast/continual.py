"""The continual-distillation protocol (issue 5): stages of tasks distilled into one growing student.

One run, top to bottom (:func:`run_distill`)::

    resolved config → RUN_DIR/config.json
    teachers (scripted or RUN_DIR/teachers.json) → collect_dataset per task → RUN_DIR/datasets (Minari)
    teacher success per task (teachers.json, or the official protocol once) → RUN_DIR/teacher_success.json
    for stage s in stages:
        grow / freeze per method (:func:`configure_phase`)
        for phase in the stage's phases: train  → checkpoints/stage{s}-{phase}.pt     (phase done)
        replay selection for the stage's tasks → replay/stage{s}.pt                  (   "      )
        evaluate every task seen so far       → eval/stage{s}.json, results.json      (   "      )
    results.json (RunResult), metrics.jsonl, tb/ (TensorBoard)

**Methods.** What trains where (``stage > 0``; stage 0 always trains everything in one phase):

============ ====== ============================ ============================================ ==========
method       growth shared layers + head         experts / gate                               replay
============ ====== ============================ ============================================ ==========
cpd          +1/task frozen (``freeze_shared``)  P1: old experts frozen, new + gate train;     DPP
                                                 P2: gate frozen, all experts train
static-moe   fixed  frozen (``freeze_shared``)   all train                                     DPP
replay       fixed  train                        all train                                     uniform
finetune     fixed  train                        all train                                     none
ewc          fixed  train (+ EWC penalty)        all train (+ EWC penalty)                     none
online-ewc   fixed  train (+ online-EWC penalty) all train (+ online-EWC penalty)              none
joint        fixed  one stage with every task, all parameters, the total step budget           —
============ ====== ============================ ============================================ ==========

Fixed-capacity methods get ``num_tasks · experts_per_task`` experts from the start, the capacity cpd
reaches at the end. The task encoder trains throughout (see :mod:`cpd_fast.student`). Every method
sees the same data and the same number of optimizer steps per stage (joint: their sum).

**Sampling.** A batch draws tasks uniformly among those trained in the stage (the stage's tasks plus
replayed ones), then one window uniformly within the task's pool, so a replayed task weighs as much as
a new one however few transitions are stored for it. Each window gives a target per position (the
teacher's mean at every real observation of the window; see ``Student.losses``).

**Resume and determinism.** Work is cut into *phases* (train, replay, eval per stage). A phase's
outputs are written atomically and only then is it appended to ``progress.json``; a re-run skips
finished phases and restarts the first unfinished one from the last checkpoint. Each phase draws from
its own generator seeded by ``(seed, stage, phase)`` and builds a fresh optimizer, so a resumed run
repeats exactly what an uninterrupted one does (on the same machine and thread count).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from cpd_fast import ddp
from cpd_fast.ewc import EWCPenalty, diagonal_fisher
from cpd_fast.replay import REPLAY_SELECTIONS, ReplaySet, select_replay
from cpd_fast.runio import append_jsonl, load_torch_checked, save_torch_atomic, write_json_atomic
from cpd_fast.student import HistoryBuffer, Student, StudentConfig

__all__ = [
    "METHODS",
    "DistillConfig",
    "WindowData",
    "configure_phase",
    "evaluate_student",
    "phases_of",
    "run_distill",
    "train_phase",
]

EVAL_MODES = ("inferred", "prototype")
METHODS = ("cpd", "finetune", "ewc", "online-ewc", "replay", "static-moe", "joint")
GROWING = ("cpd",)
FREEZING = ("cpd", "static-moe")  # freeze the shared layers (and head) after stage 0
# Tasks whose scripted expert fails under envpool 1.2.5 (DESIGN.md §3): collect them with gymnasium.
KNOWN_BAD_ENVPOOL = {"dial-turn-v3": "gymnasium"}


def _cpu_student() -> StudentConfig:
    # Sized for the CPU budget: ~0.085 s per step of 256 windows on one busy core (d_model 256 costs 4.5x).
    return StudentConfig(
        d_model=128, n_heads=4, n_layers=2, d_ff=256, expert_hidden=256, task_encoder_hidden=128
    )


@dataclass
class DistillConfig:
    """Everything one run needs; saved first as ``RUN_DIR/config.json``.

    Step counts are *before* ``budget`` scaling (``steps = round(budget · steps_per_stage)``).
    """

    suite: str = "mt25"
    tasks: list[str] | None = None  # explicit task list (overrides the suite's tasks)
    name: str | None = None  # the task list's name in results and reports (default: see _task_list_name)
    tasks_per_stage: int = 5
    method: str = "cpd"
    teachers: str = "scripted"  # "scripted" or a teachers RUN_DIR holding teachers.json
    fidelity: str | None = None  # `cpd envs check` JSON: per-task collection backend
    seed: int = 0
    device: str = "cpu"
    budget: float = 1.0
    # data
    # teacher datasets directory (default RUN_DIR/datasets); runs that share one reuse each task's data
    # when its collection settings match (RUN/datasets/<task>.collected.json)
    data_dir: str | None = None
    episodes_per_task: int = 20
    noise_std: float = 0.1
    collect_envs: int = 10
    max_episode_steps: int = 500
    # training
    # 4000 fits the hour: the full MT25 cpd run (both eval modes) took 46.7 min on one of 2 cores
    # (26 min training, 20.5 min evaluation; bench/mt25_default)
    steps_per_stage: int = 4000
    batch_size: int = 256
    lr: float = 5e-4
    # per phase: linear warm-up, then cosine decay to lr_min_ratio · lr; or "constant"
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    lr_min_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    phase1_fraction: float = 0.5  # cpd: share of a stage's steps in Phase 1
    # ablations (cpd)
    freeze_shared: bool = True
    phase2: bool = True
    gate_bias: float = -5.0
    # Phase 1 routes every token to the newborn experts too (MoELayer.always_route), so they and
    # their gate logits learn although a −5 bias keeps them out of every top-k.
    route_new_experts: bool = True
    replay_selection: str | None = None  # None: the method's own (cpd/static-moe dpp, replay uniform)
    # replay
    replay_fraction: float = 0.1
    segment_len: int = 10
    # EWC
    ewc_lambda: float = 100.0
    ewc_gamma: float = 0.9
    fisher_batches: int = 200  # the sign-trick estimate's relative noise is ~sqrt(2 / fisher_batches)
    fisher_batch_size: int = 8
    # evaluation
    eval_goals: int = 50
    eval_envs: int = 25
    eval_max_steps: int = 500
    # "inferred": no task id, the embedding comes from the history (the main number); "prototype": the
    # task id selects its prototype embedding (extra["success_matrix_modes"], its own report row)
    eval_modes: tuple[str, ...] = ("inferred", "prototype")
    # logging
    progress: bool = True
    tensorboard: bool = True
    threads: int | None = 1  # torch threads; 1 is fastest for this model size on 2 shared cores
    student: StudentConfig = field(default_factory=_cpu_student)

    def __post_init__(self) -> None:
        if isinstance(self.student, dict):
            self.student = StudentConfig(**self.student)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not (isinstance(self.budget, int | float) and self.budget > 0 and math.isfinite(self.budget)):
            raise ValueError(f"budget must be a positive number, got {self.budget!r}")
        if self.replay_selection is not None and self.replay_selection not in REPLAY_SELECTIONS:
            raise ValueError(f"replay selection must be one of {', '.join(REPLAY_SELECTIONS)}")
        if not 0.0 < self.replay_fraction <= 1.0:
            raise ValueError(f"replay fraction must be in (0, 1], got {self.replay_fraction}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not 0.0 < self.phase1_fraction < 1.0:
            raise ValueError(f"phase1_fraction must be in (0, 1), got {self.phase1_fraction}")
        for name in ("episodes_per_task", "steps_per_stage", "batch_size", "eval_goals", "eval_envs",
                     "segment_len", "fisher_batches", "fisher_batch_size", "tasks_per_stage"):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name, low in (("noise_std", 0.0), ("ewc_lambda", 0.0), ("gate_bias", -math.inf)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < low:
                raise ValueError(f"{name} must be a finite number{' >= 0' if low == 0 else ''}, got {v!r}")
        if not 0.0 <= self.ewc_gamma <= 1.0:
            raise ValueError(f"ewc_gamma must be in [0, 1], got {self.ewc_gamma!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 0):
            raise ValueError(f"threads must be None or an int >= 0 (0: torch default), got {self.threads!r}")
        from cpd_fast.tasks import stages

        stages(self.tasks if self.tasks else self.suite, self.tasks_per_stage)  # unknown task/suite: now
        self.eval_modes = tuple(self.eval_modes)
        if not self.eval_modes or any(m not in EVAL_MODES for m in self.eval_modes):
            raise ValueError(f"eval_modes must be a non-empty subset of {EVAL_MODES}, got {self.eval_modes}")
        self.student.new_expert_gate_bias = float(self.gate_bias)

    @property
    def stage_steps(self) -> int:
        return max(1, round(self.budget * self.steps_per_stage))

    @property
    def label(self) -> str:
        """The method's name in results and reports, with every ablation that differs from the default
        (``cpd`` / ``cpd (no shared freeze)`` / ...): runs group by it, so ablations never pool as seeds."""
        d = DistillConfig()
        notes = []
        if self.method in FREEZING and not self.freeze_shared:
            notes.append("no shared freeze")
        if self.method == "cpd":
            if not self.phase2:
                notes.append("no phase 2")
            if self.gate_bias != d.gate_bias:
                notes.append(f"gate bias {self.gate_bias:g}")
            if not self.route_new_experts:
                notes.append("top-k routing only")
        if self.selection is not None:
            default_selection = "uniform" if self.method == "replay" else "dpp"
            if self.selection != default_selection:
                notes.append(f"{self.selection} replay")
            if self.replay_fraction != d.replay_fraction:
                notes.append(f"replay {100 * self.replay_fraction:g}%")
        if self.method in ("ewc", "online-ewc") and self.ewc_lambda != d.ewc_lambda:
            notes.append(f"lambda {self.ewc_lambda:g}")
        return self.method + (f" ({', '.join(notes)})" if notes else "")

    @property
    def selection(self) -> str | None:
        """Replay selection of this run (None: no replay)."""
        if self.method in ("cpd", "static-moe"):
            return self.replay_selection or "dpp"
        if self.method == "replay":
            return self.replay_selection or "uniform"
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------- data as windows


class WindowData:
    """All teacher transitions of the run as tensors, served as observation-history windows.

    ``obs [M, obs_dim]``, ``target [M, act_dim]`` (teacher mean), ``task [M]`` (index into the run's
    task list), ``ep_start [M]`` (global index of the step's episode start), ``step``, ``episode [M]``.
    """

    def __init__(self, data: Any, history: int) -> None:
        self.obs = data.obs.float().contiguous()
        self.target = data.action_mean.float().contiguous()
        self.task = data.task_id.long()
        self.step = data.step.long()
        self.episode = data.episode.long()
        self.ep_start = torch.arange(self.obs.shape[0]) - self.step
        self.history = history
        self.tasks = list(data.tasks)

    def task_slice(self, t: int) -> slice:
        idx = (self.task == t).nonzero().squeeze(1)
        if idx.numel() == 0:
            raise ValueError(f"no data for task {self.tasks[t]!r}")
        return slice(int(idx[0]), int(idx[-1]) + 1)  # load_teacher_data keeps each task contiguous

    def windows(self, index: torch.Tensor, hist_start: torch.Tensor):
        """Windows ending at ``index [B]``: ``(obs [B, H, obs_dim], target [B, H, act_dim], mask [B, H])``.

        Positions before ``hist_start`` are padding: they repeat the first real observation (the
        convention of :class:`~cpd_fast.student.HistoryBuffer`) and are masked out.
        """
        H = self.history
        pos = index[:, None] - (H - 1) + torch.arange(H)[None, :]
        real = pos >= hist_start[:, None]
        pos = torch.where(real, pos, hist_start[:, None])
        return self.obs[pos], self.target[pos], real


class TaskSampler:
    """Task-balanced window sampler over per-task pools ``(index [n], hist_start [n])``."""

    def __init__(self, pools: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        pools = {t: p for t, p in pools.items() if p[0].numel() > 0}
        if not pools:
            raise ValueError("nothing to train on: every task pool is empty")
        self.task_ids = torch.tensor(sorted(pools), dtype=torch.int64)
        self.index = torch.cat([pools[t][0] for t in sorted(pools)])
        self.hist_start = torch.cat([pools[t][1] for t in sorted(pools)])
        sizes = torch.tensor([pools[t][0].numel() for t in sorted(pools)])
        self.sizes, self.offsets = sizes, torch.cumsum(sizes, 0) - sizes

    def sample(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.randint(0, len(self.task_ids), (batch,), generator=gen)
        r = (torch.rand(batch, generator=gen, dtype=torch.float64) * self.sizes[k]).long()
        j = self.offsets[k] + r
        return self.index[j], self.hist_start[j]


# ----------------------------------------------------------------------------- phases


def phases_of(cfg: DistillConfig, stage: int) -> list[tuple[str, int]]:
    """``[(phase name, optimizer steps)]`` of a stage."""
    n = cfg.stage_steps
    if cfg.method == "joint":
        return [("train", n * _num_stages(cfg))]
    if cfg.method == "cpd" and stage > 0 and cfg.phase2:
        n1 = max(1, round(n * cfg.phase1_fraction))
        return [("phase1", n1), ("phase2", max(1, n - n1))]
    return [("train", n)]


def _num_stages(cfg: DistillConfig) -> int:
    return len(_stage_tasks(cfg))


def _stage_tasks(cfg: DistillConfig) -> list[list[str]]:
    from cpd_fast.tasks import stages

    return stages(cfg.tasks if cfg.tasks else cfg.suite, cfg.tasks_per_stage)


def configure_phase(
    student: Student, cfg: DistillConfig, stage: int, phase: str, new_experts: list[int]
) -> None:
    """Set what trains in ``phase`` of ``stage`` (idempotent: a resumed run calls it again).

    ``new_experts``: the experts added for this stage's tasks (cpd only).
    """
    moe = student.moe
    moe.always_route([])
    student.unfreeze_shared()
    student.unfreeze_head()
    student.unfreeze_task_encoder()
    moe.unfreeze_experts(list(range(moe.num_experts)))
    moe.unfreeze_gate()
    if stage == 0 or cfg.method not in FREEZING:
        return
    if cfg.freeze_shared:
        student.freeze_shared()
        student.freeze_head()  # the head maps every expert's output: training it moves old tasks too
    if cfg.method == "cpd":
        if phase == "phase2":
            moe.freeze_gate()
        else:  # phase1 (or the only phase with --no-phase2)
            old = [e for e in range(moe.num_experts) if e not in set(new_experts)]
            if old:
                moe.freeze_experts(old)
            if cfg.route_new_experts and new_experts:
                moe.always_route(new_experts)


def train_phase(
    student: Student,
    data: WindowData,
    sampler: TaskSampler,
    steps: int,
    cfg: DistillConfig,
    gen: torch.Generator,
    penalty: EWCPenalty | None = None,
    log: Any = None,
    desc: str = "train",
    dist: ddp.DistContext | None = None,
) -> dict[str, float]:
    """``steps`` AdamW steps on task-balanced windows; returns the mean of the last 10% of losses.

    ``dist``: data-parallel (:mod:`cpd_fast.ddp`): every rank draws the same global batch from ``gen`` and
    trains on its slice; the losses returned and logged are the global batch's.
    """
    from tqdm import tqdm

    device = torch.device(cfg.device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(cfg, it, steps))
    p_proto = student.config.prototype_conditioning
    student.train()
    # per phase: growth and freezing change the parameters DDP synchronises
    losses, group = student.losses, None
    if dist is not None:
        losses, group = ddp.wrap(student, dist), ddp.ShardedBatch(dist, student.moe)
    rows = ddp.rank_rows(cfg.batch_size, dist)
    tail: list[dict[str, float]] = []
    quiet = not cfg.progress or (dist is not None and not dist.is_main)
    bar = tqdm(range(steps), desc=desc, disable=quiet, leave=False, mininterval=2.0)
    for it in bar:
        idx, start = sampler.sample(cfg.batch_size, gen)
        use_proto = torch.rand(len(idx), generator=gen) < p_proto
        idx, start, use_proto = idx[rows], start[rows], use_proto[rows]  # this rank's slice
        obs, target, mask = data.windows(idx, start)
        tid = data.task[idx]
        obs, target, mask, tid, use_proto = (x.to(device) for x in (obs, target, mask, tid, use_proto))
        kw = {} if group is None else {"group": group}
        out = losses(obs, target, tid, mask, use_prototype=use_proto if p_proto > 0 else None, **kw)
        loss = out.pop("backward", out["total"])
        if penalty is not None and penalty.terms:
            out["ewc"] = penalty.penalty(student)
            loss = loss + out["ewc"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        rec = {k: float(v.detach()) for k, v in out.items()}
        if it >= steps - max(1, steps // 10):
            tail.append(rec)
        if log is not None and (it % 50 == 0 or it == steps - 1):
            log(it, rec)
        if it % 50 == 0:
            bar.set_postfix(mse=f"{rec['mse']:.4f}")
    if group is not None:
        group.close()
    return {k: float(np.mean([r[k] for r in tail])) for k in tail[0]}


def lr_factor(cfg: DistillConfig, it: int, steps: int) -> float:
    """Learning-rate multiplier at step ``it`` of a ``steps``-step phase (the schedule restarts per phase:
    each phase trains a different parameter set, from a fresh optimizer)."""
    if cfg.lr_schedule == "constant":
        return 1.0
    warm = min(cfg.warmup_steps, max(1, steps // 10))
    if it < warm:
        return (it + 1) / warm
    t = (it - warm) / max(1, steps - warm)
    return cfg.lr_min_ratio + (1.0 - cfg.lr_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


# ----------------------------------------------------------------------------- evaluation


class _HistoryPolicy:
    """Adapts the student to ``evaluate_official(..., episode_info=True)``: one history per env slot."""

    def __init__(self, student: Student, num_envs: int, task_id: int | None = None) -> None:
        self.student = student
        self.history = HistoryBuffer.for_student(student, num_envs)
        self.last = np.zeros((num_envs, student.config.obs_dim), np.float32)
        device = next(student.parameters()).device
        self.task_ids = None if task_id is None else torch.full((num_envs,), task_id, device=device)

    def __call__(self, obs: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        self.last[slots] = obs
        reset = np.zeros(len(self.last), bool)
        reset[slots] = fresh
        # idle slots push their stale observation: harmless, their output is dropped
        obs_t, reset_t = torch.from_numpy(self.last), torch.from_numpy(reset)
        act = self.student.act(obs_t, self.history, reset_t, self.task_ids)
        return act[torch.from_numpy(slots)].cpu().numpy()


def evaluate_student(student: Student, task: str, cfg: DistillConfig, task_id: int | None = None) -> float:
    """Official-protocol success of the student on ``task``: with ``task_id=None`` the task embedding is
    inferred from the history (no task id); otherwise the task's prototype conditions the policy."""
    from cpd_fast.evaluation import evaluate_official

    n_envs = min(cfg.eval_envs, cfg.eval_goals)
    result = evaluate_official(
        _HistoryPolicy(student, n_envs, task_id), task, num_envs=n_envs, num_goals=cfg.eval_goals,
        max_episode_steps=cfg.eval_max_steps, episode_info=True,
    )  # fmt: skip
    return result.success_rate


# ----------------------------------------------------------------------------- the run


class _Progress:
    """``progress.json``: the finished phases, appended only after their outputs are on disk."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, "progress.json")
        self.done: list[str] = []
        if os.path.isfile(self.path):
            with open(self.path) as f:
                self.done = list(json.load(f)["done"])

    def __contains__(self, name: str) -> bool:
        return name in self.done

    def mark(self, name: str) -> None:
        _mark_done(self, name)


def _mark_done(progress: _Progress, name: str) -> None:
    progress.done.append(name)
    write_json_atomic(progress.path, {"done": progress.done})


def _phase_seed(seed: int, stage: int, tag: str) -> int:
    return (seed * 1_000_003 + stage * 10_007 + sum(map(ord, tag)) * 101) % (2**62)


def teacher_specs(cfg: DistillConfig, tasks: list[str]) -> dict[str, tuple[str, str | None, float | None]]:
    """``{task: (source, path, recorded official success or None)}``; one-line errors for user mistakes."""
    if cfg.teachers == "scripted":
        return {t: ("scripted", None, None) for t in tasks}
    from cpd_fast.teachers.gate import load_teachers_json

    records = load_teachers_json(cfg.teachers)
    out = {}
    for t in tasks:
        r = records.get(t)
        if r is None or not r.used:
            raise ValueError(f"no usable teacher for {t} in {cfg.teachers}/teachers.json")
        path = r.path
        if path and not os.path.isabs(path) and not os.path.isfile(path):
            path = os.path.join(cfg.teachers, path)
        if r.source != "scripted" and (not path or not os.path.isfile(path)):
            raise FileNotFoundError(f"teacher checkpoint for {t} not found: {path!r}")
        official = r.success_rate if r.protocol == "official" else None
        out[t] = (r.source, path, official)
    return out


def _task_list_name(cfg: DistillConfig) -> str:
    """The suite, ``"mt25[:10]"`` for an explicit list that is a suite's first tasks, else ``"custom"``."""
    if not cfg.tasks:
        return cfg.suite
    from cpd_fast.tasks import SUITES

    suite = SUITES.get(cfg.suite, ())
    n = len(cfg.tasks)
    return f"{cfg.suite}[:{n}]" if list(suite[:n]) == list(cfg.tasks) else "custom"


def ensure_dataset(
    cfg: DistillConfig, task: str, root: str, source: str, path: str | None, backend: str
) -> dict[str, Any]:
    """Collect ``task``'s teacher dataset under ``root`` unless one made with the same settings is there.

    What makes the data is recorded in ``root/<task>.collected.json`` (``spec``: teacher, episodes, noise,
    seed, episode length, env backend, evaluation goals; ``files``: sha256 of each dataset file), written
    after the dataset is complete; runs (and every method of a ``cpd run``) sharing ``root`` reuse it.
    Returns the manifest (callers may add ``teacher_success`` and rewrite it).
    """
    from cpd_fast.data import collect_dataset, dataset_files
    from cpd_fast.teachers.base import make_teacher

    spec = {"teacher": f"{source}:{path or task}", "episodes": cfg.episodes_per_task,
            "noise_std": cfg.noise_std, "seed": cfg.seed, "max_episode_steps": cfg.max_episode_steps,
            "backend": backend, "eval_goals": cfg.eval_goals}  # fmt: skip
    manifest_path = os.path.join(root, f"{task}.collected.json")
    manifest: dict[str, Any] = {}
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    if manifest.get("spec") != spec:
        teacher = make_teacher(source, task, path, device="cpu")
        collect_dataset(
            teacher, task, root, episodes=cfg.episodes_per_task, num_envs=cfg.collect_envs,
            noise_std=cfg.noise_std, backend=backend, seed=cfg.seed, max_episode_steps=cfg.max_episode_steps,
            overwrite=True, teacher_name=spec["teacher"],
        )  # fmt: skip
        manifest = {"spec": spec, "files": dataset_files(root, task)}
        write_json_atomic(manifest_path, manifest)
    return manifest


def _log_writer(run_dir: str, cfg: DistillConfig):
    writer = None
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(run_dir, "tb"))
        except ImportError:  # metrics.jsonl is complete on its own
            writer = None
    return writer


def run_distill(cfg: DistillConfig, run_dir: str | os.PathLike, data_parallel: bool | None = None) -> Any:
    """Run (or resume) one continual-distillation run in ``run_dir``; returns its :class:`RunResult`.

    ``data_parallel``: train with DDP over the processes torchrun started (:mod:`cpd_fast.ddp`; default:
    when ``WORLD_SIZE > 1``). Rank 0 alone collects, evaluates and writes; every rank returns the result.
    """
    dist = ddp.setup(cfg.device) if ddp.requested(data_parallel) else None
    try:
        if dist is not None and dist.device.type == "cuda":
            cfg = dataclasses.replace(cfg, device=str(dist.device))  # cuda:LOCAL_RANK
        return _run_distill(cfg, run_dir, dist)
    finally:
        ddp.teardown(dist)


def _run_distill(cfg: DistillConfig, run_dir: str | os.PathLike, dist: ddp.DistContext | None) -> Any:
    from cpd_fast.data import load_teacher_data
    from cpd_fast.metrics import RunResult, matrix_to_json
    from cpd_fast.teachers.base import make_teacher
    from cpd_fast.teachers.gate import evaluate_teacher

    t_start = time.perf_counter()
    main = dist is None or dist.is_main  # the only process that writes the run directory
    run_dir = os.fspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stage_tasks = _stage_tasks(cfg)
    tasks = [t for s in stage_tasks for t in s]
    suite_name = cfg.name or _task_list_name(cfg)
    # 1. resolved config first (a resumed run must use the same one)
    cfg_path = os.path.join(run_dir, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            saved = json.load(f)
        mine = json.loads(json.dumps(cfg.to_dict()))
        # runtime-only keys; eval_modes may grow (a finished run evaluates just the added modes)
        ignore = {"progress", "tensorboard", "threads", "device", "eval_modes"}
        diff = sorted(k for k in mine if k not in ignore and saved.get(k) != mine[k])
        if diff:
            raise ValueError(
                f"{run_dir} holds a run with a different config ({', '.join(diff)}); use a new --out"
            )
    elif main:
        write_json_atomic(cfg_path, cfg.to_dict())
    progress = _Progress(run_dir)
    prior_time = 0.0
    clock = {"data": 0.0, "train": 0.0, "replay": 0.0, "eval": 0.0}  # seconds per activity
    timing_path = os.path.join(run_dir, "timing.json")
    if os.path.isfile(timing_path):
        with open(timing_path) as f:
            timing = json.load(f)
        prior_time = float(timing["wall_time_s"])
        clock.update(timing.get("clock", {}))

    # 2. teachers and data
    specs = teacher_specs(cfg, tasks)
    backends = dict(KNOWN_BAD_ENVPOOL)
    if cfg.fidelity:
        from cpd_fast.fidelity import load_backend_choices

        backends = load_backend_choices(cfg.fidelity)
    root = cfg.data_dir or os.path.join(run_dir, "datasets")
    ts_path = os.path.join(run_dir, "teacher_success.json")
    teacher_success: dict[str, float] = {}
    if os.path.isfile(ts_path):
        with open(ts_path) as f:
            teacher_success = json.load(f)
    for task in tasks if main else []:  # rank 0 collects; the other ranks read its files after the barrier
        source, path, official = specs[task]
        t0 = time.perf_counter()
        manifest = ensure_dataset(cfg, task, root, source, path, backends.get(task, "envpool"))
        if task not in teacher_success:
            if "teacher_success" not in manifest:
                if official is not None and cfg.eval_goals == 50:
                    manifest["teacher_success"] = float(official)
                else:
                    teacher = make_teacher(source, task, path, device="cpu")
                    manifest["teacher_success"] = float(
                        evaluate_teacher(teacher, task, num_goals=cfg.eval_goals, num_envs=cfg.eval_envs)[
                            "success_rate"
                        ]
                    )
                write_json_atomic(os.path.join(root, f"{task}.collected.json"), manifest)
            teacher_success[task] = manifest["teacher_success"]
            write_json_atomic(ts_path, teacher_success)
        clock["data"] += time.perf_counter() - t0
    if dist is not None:
        ddp.barrier(dist)
        with open(ts_path) as f:
            teacher_success = json.load(f)
    raw = load_teacher_data(tasks, root)
    if raw.obs.shape[1] != cfg.student.obs_dim:
        raise ValueError(
            f"teacher data has obs dim {raw.obs.shape[1]}, the student expects {cfg.student.obs_dim}"
        )
    data = WindowData(raw, cfg.student.history)
    task_index = {t: i for i, t in enumerate(tasks)}

    # 3. the student, built as it was born (a checkpoint restores growth)
    joint = cfg.method == "joint"
    run_stages = [tasks] if joint else stage_tasks
    torch.manual_seed(cfg.seed)
    ept = cfg.student.experts_per_task
    if cfg.method in GROWING:
        student = Student(cfg.student, num_tasks=len(run_stages[0]))
    else:
        student = Student(
            cfg.student, num_tasks=len(tasks), num_experts=max(len(tasks) * ept, cfg.student.top_k)
        )
    student.to(cfg.device)
    penalty = None
    if cfg.method in ("ewc", "online-ewc"):
        penalty = EWCPenalty(cfg.ewc_lambda, online=cfg.method == "online-ewc", gamma=cfg.ewc_gamma)
    replay: dict[int, ReplaySet] = {}
    R = np.full((len(run_stages), len(tasks)), np.nan)
    R_modes = {m: np.full_like(R, np.nan) for m in cfg.eval_modes}
    main_mode = cfg.eval_modes[0]
    writer = _log_writer(run_dir, cfg) if main else None
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    global_step = 0
    seen: list[int] = []
    routing: dict[int, dict[str, list[float]]] = {}

    def result(wall: float, complete: bool) -> RunResult:
        task_stage = [0 if joint else next(s for s, st in enumerate(run_stages) if t in st) for t in tasks]
        return RunResult(
            suite=suite_name, method=cfg.label, seed=cfg.seed, tasks=tasks, task_stage=task_stage,
            success_matrix=R.tolist(), teacher_success=[teacher_success[t] for t in tasks], wall_time_s=wall,
            extra={"complete": complete, "eval_mode": main_mode,
                   "success_matrix_modes": {
                       m: matrix_to_json(M) for m, M in R_modes.items() if m != main_mode
                   },
                   "time_s": {k: round(v, 1) for k, v in clock.items()},
                   "config": cfg.to_dict(), "replay": _replay_report(replay, data),
                   "num_experts": student.num_experts, "budget_steps_per_stage": cfg.stage_steps,
                   "routing": {str(k): v for k, v in routing.items()}},
        )  # fmt: skip

    for s, stage in enumerate(run_stages):
        new_ids = [task_index[t] for t in stage]
        new_experts: list[int] = []
        if cfg.method in GROWING and s > 0:
            torch.manual_seed(_phase_seed(cfg.seed, s, "grow"))
            for _ in stage:
                new_experts += student.add_task()
            student.to(cfg.device)
        elif cfg.method in GROWING:
            new_experts = list(range(student.num_experts))
        for phase, steps in phases_of(cfg, s):
            name = f"stage{s}/{phase}"
            ckpt = os.path.join(run_dir, "checkpoints", f"stage{s}-{phase}.pt")
            if name in progress:
                redo = f"delete {run_dir} and re-run: a finished phase is never redone, the run restarts"
                state = load_torch_checked(ckpt, redo, map_location=cfg.device)
                student.load_state_dict(state["student"])
                if penalty is not None:
                    penalty.load_state_dict(state["ewc"])
                global_step += steps
                continue
            configure_phase(student, cfg, s, phase, new_experts)
            pools = {t: _full_pool(data, t) for t in new_ids}
            pools.update({t: (r.index, r.hist_start) for t, r in replay.items()})
            gen = torch.Generator().manual_seed(_phase_seed(cfg.seed, s, phase))

            def log(it: int, rec: dict, _base: int = global_step, _name: str = name) -> None:
                append_jsonl(metrics_path, {"step": _base + it, "phase": _name, **rec})
                if writer is not None:
                    for k, v in rec.items():
                        writer.add_scalar(f"loss/{k}", v, _base + it)

            t0 = time.perf_counter()
            summary = train_phase(
                student, data, TaskSampler(pools), steps, cfg, gen, penalty, log if main else None, name, dist
            )
            student.moe.always_route([])  # a training aid only: evaluation and routing stats use top-k
            global_step += steps
            if penalty is not None and phase == phases_of(cfg, s)[-1][0]:
                fgen = torch.Generator().manual_seed(_phase_seed(cfg.seed, s, "fisher"))
                fisher = _stage_fisher(student, data, {t: _full_pool(data, t) for t in new_ids}, cfg, fgen)
                penalty.consolidate(student, fisher)
            payload = {"student": student.state_dict()}
            if penalty is not None:
                payload["ewc"] = penalty.state_dict()
            if main:
                save_torch_atomic(payload, ckpt)
                append_jsonl(metrics_path, {"step": global_step, "phase": name, "summary": summary})
                progress.mark(name)
            clock["train"] += time.perf_counter() - t0
        seen += new_ids
        routing[s] = _routing(student, data, seen, cfg)
        # replay memory of the finished tasks
        replay_path = os.path.join(run_dir, "replay", f"stage{s}.pt")
        if cfg.selection is not None and not joint:
            if main and f"stage{s}/replay" not in progress:
                t0 = time.perf_counter()
                sets = {}
                for t in new_ids:
                    sl = data.task_slice(t)
                    sets[t] = select_replay(
                        data.obs[sl], data.target[sl], data.step[sl], data.episode[sl], sl.start,
                        fraction=cfg.replay_fraction, segment_len=cfg.segment_len, selection=cfg.selection,
                        seed=_phase_seed(cfg.seed, s, f"replay{t}"),
                    )  # fmt: skip
                save_torch_atomic({str(t): r.to_dict() for t, r in sets.items()}, replay_path)
                progress.mark(f"stage{s}/replay")
                clock["replay"] += time.perf_counter() - t0
            ddp.barrier(dist)
            loaded = load_torch_checked(replay_path, f"delete {run_dir} and re-run: the run restarts")
            replay.update({int(t): ReplaySet.from_dict(d) for t, d in loaded.items()})
        # evaluation of every task seen so far
        eval_path = os.path.join(run_dir, "eval", f"stage{s}.json")
        # a finished stage re-run with more eval_modes evaluates only the missing ones (the student holds
        # this stage's final weights here: skipped phases load their checkpoints)
        rows = {}
        if f"stage{s}/eval" in progress and os.path.isfile(eval_path):
            with open(eval_path) as f:
                rows = json.load(f)
        missing = [m for m in cfg.eval_modes if m not in rows]
        if main and (f"stage{s}/eval" not in progress or missing):
            t0 = time.perf_counter()
            student.eval()
            rows.update({m: {} for m in missing})
            for t in seen:
                for m in missing:
                    with torch.no_grad():
                        v = evaluate_student(student, tasks[t], cfg, None if m == "inferred" else t)
                    rows[m][tasks[t]] = v
                    if writer is not None:
                        writer.add_scalar(f"success_{m}/{tasks[t]}", v, s)
            write_json_atomic(eval_path, rows)
            if f"stage{s}/eval" not in progress:
                progress.mark(f"stage{s}/eval")
            clock["eval"] += time.perf_counter() - t0
        ddp.barrier(dist)
        with open(eval_path) as f:
            rows = json.load(f)
        for m in cfg.eval_modes:
            for t, v in rows[m].items():
                R_modes[m][s, task_index[t]] = v
        R[s] = R_modes[main_mode][s]
        wall = prior_time + time.perf_counter() - t_start
        if main:
            write_json_atomic(timing_path, {"wall_time_s": wall, "clock": clock})
            result(wall, s == len(run_stages) - 1).save(os.path.join(run_dir, "results.json"))
            append_jsonl(metrics_path, {"stage": s, "success": rows, "wall_time_s": wall})
    if writer is not None:
        writer.close()
    return result(prior_time + time.perf_counter() - t_start, True)


@torch.no_grad()
def _routing(
    student: Student, data: WindowData, seen: list[int], cfg: DistillConfig
) -> dict[str, list[float]]:
    """Share of each task's routed (token, slot) rows per expert, on 256 of its windows (last position).

    Shows whether experts born with a cold gate are ever used: with top-k routing a dormant expert gets
    gradient only once its logit enters the top k.
    """
    was = student.training
    student.eval()
    out = {}
    gen = torch.Generator().manual_seed(0)
    for t in seen:
        idx, start = TaskSampler({t: _full_pool(data, t)}).sample(256, gen)
        obs, _, mask = data.windows(idx, start)
        student(obs.to(cfg.device), mask=mask.to(cfg.device))
        counts = student.moe.tokens_per_expert.float()
        out[data.tasks[t]] = [round(float(c), 4) for c in counts / counts.sum()]
    student.train(was)
    return out


def _full_pool(data: WindowData, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    sl = data.task_slice(t)
    idx = torch.arange(sl.start, sl.stop)
    return idx, data.ep_start[idx]


def _stage_fisher(student, data, pools, cfg, gen) -> dict[str, torch.Tensor]:
    sampler = TaskSampler(pools)
    device = torch.device(cfg.device)
    was = student.training
    student.eval()
    batches = []
    for _ in range(cfg.fisher_batches):
        idx, start = sampler.sample(cfg.fisher_batch_size, gen)
        obs, _, mask = data.windows(idx, start)
        batches.append((obs.to(device), mask.to(device)))
    fisher = diagonal_fisher(student, batches, lambda o, m: student(o, mask=m), generator=gen)
    student.train(was)
    return fisher


def _replay_report(replay: dict[int, ReplaySet], data: WindowData) -> dict:
    """Replay budget actually stored: transitions per task and as a fraction of the task's data."""
    per_task = {}
    for t, r in sorted(replay.items()):
        sl = data.task_slice(t)
        n = sl.stop - sl.start
        per_task[data.tasks[t]] = {"transitions": int(r.index.numel()), "fraction": r.index.numel() / n,
                                   "segments": r.selected, "candidates": r.candidates}  # fmt: skip
    total = sum(v["transitions"] for v in per_task.values())
    return {"per_task": per_task, "stored_transitions": total}
