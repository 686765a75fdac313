"""``DistillConfig``: every number one continual-distillation run uses, saved first as ``RUN/config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, field
from typing import Annotated, Literal

from pydantic import BeforeValidator

from cpd_fast.config import (
    Bool,
    Float,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    OpenFraction,
    PositiveFloat,
    PositiveFraction,
    PositiveInt,
    Seed,
    Str,
    config_class,
    from_mapping,
)
from cpd_fast.distill.methods import METHOD_FIELDS, get_method
from cpd_fast.student import StudentConfig
from cpd_fast.tasks import SUITES, stages, validate_task
from cpd_fast.workers import available_cores, core_share

__all__ = [
    "ADDED_FIELDS",
    "EVAL_MODES",
    "INACTIVE_KEY",
    "RUNTIME_KEYS",
    "DistillConfig",
    "config_values",
    "inactive_refusal",
    "isolating",
    "saved_config",
]

EVAL_MODES = ("inferred", "prototype")
# keys that change how a run executes, not what it computes: a resumed run may change them (eval_modes
# may grow: a finished run evaluates just the added modes)
RUNTIME_KEYS = ("progress", "tensorboard", "threads", "device", "eval_modes", "eval_workers")
# fields added after runs were made with this config, at the value those runs behaved with: a resumed run
# whose saved config predates a field reads it as this value
ADDED_FIELDS = {"packnet_retrain_fraction": 0.25, "behaviours": {}}
_DAGGER_FIELDS = ("dagger_rounds", "dagger_episodes", "dagger_beta")  # read only with dagger on
# config.json's list of the settings that do not act (DistillConfig.inactive_reasons), beside the values
INACTIVE_KEY = "inactive_settings"


def _cpu_student() -> StudentConfig:
    # Sized for the CPU budget (step times in bench/README.md, bench/bench_student.py; d_model 256 costs
    # several times as much).
    return StudentConfig(
        d_model=128, n_heads=4, n_layers=2, d_ff=256, expert_hidden=256, task_encoder_hidden=128
    )


def _over_cpu_student(value: object) -> object:
    return {**asdict(_cpu_student()), **value} if isinstance(value, dict) else value


# a mapping (YAML, --set student.KEY=V, a partial config) sets fields of the default student, the one
# _cpu_student() gives, not of StudentConfig() (a d_model-256, 3-block model no run here was sized for)
DefaultStudent = Annotated[StudentConfig, BeforeValidator(_over_cpu_student)]


def config_values(saved: dict) -> dict:
    """A saved config's values: ``config.json`` (:meth:`DistillConfig.to_record`) without the
    ``inactive_settings`` list, which is derived from them."""
    return {k: v for k, v in saved.items() if k != INACTIVE_KEY} if isinstance(saved, dict) else saved


def saved_config(saved: dict) -> dict:
    """A saved config (``config.json``, a result's ``extra.config``) as this version compares it with a run's:
    its values (:func:`config_values`), with each field added since at the value that reproduces what the run
    did (:data:`ADDED_FIELDS`)."""
    return {**ADDED_FIELDS, **config_values(saved)}


def inactive_refusal(cfg: DistillConfig, given: dict[str, str]) -> str | None:
    """The one-line refusal of settings the user gave that do not act in run ``cfg`` (None: all act).

    ``given``: ``{dotted key: how the user named it}`` (``{"gate_bias": "--gate-bias"}``,
    ``{"student.top_k": "distill.student.top_k"}``)."""
    parts = cfg._inactive()
    hit = [k for k in given if k in parts]
    if not hit:
        return None
    if len(hit) == 1:
        cause, effect = parts[hit[0]]
        return f"{given[hit[0]]} does nothing in this run: {cause}, so {effect}; drop it"
    by_cause: dict[str, list[str]] = {}
    for k in hit:
        by_cause.setdefault(parts[k][0], []).append(f"{given[k]}: {parts[k][1]}")
    why = "; ".join(f"{cause} ({'; '.join(effects)})" for cause, effects in by_cause.items())
    return f"{', '.join(given[k] for k in hit)} do nothing in this run: {why}; drop them"


def isolating(config: dict) -> bool:
    """:attr:`DistillConfig.isolates_tasks` of a saved config (``config.json``, ``results.json``'s
    ``extra["config"]``): also readable for runs whose configs predate a field."""
    method = get_method(config.get("method", "cpd"))
    if method.isolation:
        return True
    routed = config.get("student", {}).get("expert_routing", "gate") == "task"
    return routed and method.grows and method.freezes_shared and bool(config.get("freeze_shared", True))


@config_class
class DistillConfig:
    """Everything one run needs. Step counts are *before* ``budget`` scaling
    (``steps = round(budget · steps_per_stage)``)."""

    suite: Str = "mt25"
    tasks: list[Str] | None = None  # explicit task list (overrides the suite's tasks)
    name: Str | None = None  # the task list's name in results and reports (default: task_list_name())
    tasks_per_stage: PositiveInt = 5
    method: Str = "cpd"  # a key of cpd_fast.distill.methods.METHODS
    # "scripted", "zoo" / "zoo:NAME_OR_DIR" (shipped RL teachers) or a RUN_DIR with teachers.json
    teachers: Str = "scripted"
    # zoo teachers: {task: acting task}, the acting task's teacher collects (and under DAgger labels) the
    # task's data; the task's own teacher stays the yardstick (cpd_fast.teachers.gate.TeacherSpec.acts_as)
    behaviours: dict[Str, Str] = field(default_factory=dict)
    fidelity: Str | None = None  # `cpd envs check` JSON: per-task collection backend
    seed: Seed = 0
    device: Str = "cpu"
    budget: PositiveFloat = 1.0
    # data
    # teacher datasets directory (default RUN_DIR/datasets); runs that share one reuse each task's data
    # when its collection settings match (RUN/datasets/<task>.collected.json)
    data_dir: Str | None = None
    episodes_per_task: PositiveInt = 20
    noise_std: NonNegativeFloat = 0.1
    collect_envs: PositiveInt = 10
    max_episode_steps: PositiveInt = 500
    # training
    # 4000: the full MT25 cpd run (both eval modes) fits the hour on one of 2 cores (bench/mt25_default)
    steps_per_stage: PositiveInt = 4000
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 5e-4
    # per phase: linear warm-up, then cosine decay to lr_min_ratio · lr; or "constant"
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: NonNegativeInt = 100
    lr_min_ratio: Fraction = 0.1
    weight_decay: NonNegativeFloat = 0.0
    grad_clip: NonNegativeFloat = 1.0
    # which predictions of a window are supervised: every real position (each has its teacher target) or
    # only the last (the one that acts) — the ablation of issue 14's "use every prediction"
    loss_positions: Literal["all", "last"] = "all"
    # the training step's arithmetic: "fp32", or "bf16" mixed precision (torch.autocast: matmuls in
    # bfloat16, parameters, optimizer state, normalisations and the losses in float32). bf16 is fast only
    # where the hardware multiplies bf16 natively (CPUs with AVX512-BF16 or AMX, recent GPUs; elsewhere a
    # run warns that it is emulated). Evaluation always runs in float32
    precision: Literal["fp32", "bf16"] = "fp32"
    phase1_fraction: OpenFraction = 0.5  # cpd: share of a stage's steps in Phase 1
    # ablations (cpd)
    freeze_shared: Bool = True
    phase2: Bool = True
    gate_bias: Float = -5.0
    # Phase 1 routes every token to the newborn experts too (MoELayer.always_route), so they and
    # their gate logits learn although a −5 bias keeps them out of every top-k.
    route_new_experts: Bool = True
    # teacher-in-the-loop data (cpd_fast.distill.dagger): the stage's first phase in dagger_rounds + 1
    # chunks, each after the first preceded by dagger_episodes student-driven episodes per new task, every
    # state labelled by the teacher; round r executes the teacher's action with probability dagger_beta**r
    dagger: Bool = False
    dagger_rounds: PositiveInt = 2
    dagger_episodes: PositiveInt = 10
    dagger_beta: Fraction = 0.5
    replay_selection: Literal["dpp", "uniform"] | None = None  # None: the method's own (see methods.py)
    # replay
    replay_fraction: PositiveFraction = 0.1
    # DPP weighting: "error" leans the diverse set to segments the student predicts worst (replay.py)
    replay_quality: Literal["none", "error"] = "none"
    segment_len: PositiveInt = 10
    # EWC
    ewc_lambda: NonNegativeFloat = 100.0
    ewc_gamma: Fraction = 0.9
    fisher_batches: PositiveInt = 200  # the sign-trick estimate's relative noise is ~sqrt(2 / fisher_batches)
    fisher_batch_size: PositiveInt = 8
    # PackNet: share of a stage's steps spent retraining the entries its pruning kept (cpd_fast.packnet)
    packnet_retrain_fraction: OpenFraction = 0.25
    # evaluation
    eval_goals: PositiveInt = 50
    eval_envs: PositiveInt = 25
    eval_max_steps: PositiveInt = 500
    # "inferred": no task id, the embedding comes from the history (the main number); "prototype": the
    # task id selects its prototype embedding (extra["success_matrix_modes"], its own report row)
    eval_modes: tuple[Literal["inferred", "prototype"], ...] = ("inferred", "prototype")
    # evaluation worker processes (cpd_fast.evalpool; 0: in this process; None: one per core when there
    # are two or more). The success flags are the same bit for bit whatever the number (a runtime key);
    # workers evaluate on the CPU with one thread each
    eval_workers: NonNegativeInt | None = None
    # logging
    progress: Bool = True
    tensorboard: Bool = True
    # torch threads: None, this process's share of the cores (all of them for a lone run, cores / ranks
    # under DDP, cores / jobs for methods side by side in `cpd run`); 0: torch's default. A run resumed
    # with another count computes in another float order (a runtime key all the same)
    threads: NonNegativeInt | None = None
    student: DefaultStudent = field(default_factory=_cpu_student)

    def __post_init__(self) -> None:
        get_method(self.method)
        self.stage_tasks()  # unknown task/suite, or tasks that do not split into equal stages: now
        self._check_behaviours()
        self.eval_modes = tuple(self.eval_modes)
        if not self.eval_modes or len(set(self.eval_modes)) != len(self.eval_modes):
            raise ValueError(f"eval_modes must be a non-empty subset of {EVAL_MODES}, got {self.eval_modes}")
        if get_method(self.method).isolation and "inferred" in self.eval_modes:
            raise ValueError(
                f"{self.method} evaluates each task with its stage's subnetwork, which only the task id "
                "picks: it has no task-free evaluation; set eval_modes to [prototype] (--eval-modes "
                "prototype, or --set distill.eval_modes=[prototype])"
            )
        self.student.new_expert_gate_bias = float(self.gate_bias)

    @property
    def stage_steps(self) -> int:
        return max(1, round(self.budget * self.steps_per_stage))

    def thread_count(self, processes: int = 1) -> int:
        """``threads`` resolved for one of ``processes`` processes sharing the cores (0: torch's default)."""
        return self.threads if self.threads is not None else core_share(processes)

    def eval_worker_count(self) -> int:
        """``eval_workers`` resolved: None gives one worker per core on a CPU run with two or more cores."""
        if self.eval_workers is not None:
            return self.eval_workers
        cores = available_cores()
        return cores if cores > 1 and self.device == "cpu" else 0

    def _check_behaviours(self) -> None:
        tasks = {t for stage in self.stage_tasks() for t in stage}
        for task, acting in self.behaviours.items():
            for t in (task, acting):
                validate_task(t)
            if task not in tasks:
                raise ValueError(f"behaviours.{task}: {task} is not among this run's tasks")
            if acting == task or acting in self.behaviours:
                raise ValueError(f"behaviours.{task}: {acting} must be another task acting as itself")

    def stage_tasks(self) -> list[list[str]]:
        """The run's tasks, stage by stage."""
        return stages(self.tasks if self.tasks else self.suite, self.tasks_per_stage)

    def task_list_name(self) -> str:
        """``name``, else the suite, ``"mt25[:10]"`` for a list that is a suite's first tasks (with no suite
        given: any known suite's, e.g. ``"mt10"``), or "custom"."""
        if self.name:
            return self.name
        if not self.tasks:
            return self.suite
        n, tasks = len(self.tasks), list(self.tasks)
        if self.suite in SUITES:
            return f"{self.suite}[:{n}]" if list(SUITES[self.suite][:n]) == tasks else "custom"
        for name, suite in SUITES.items():  # no suite given: a known suite, or the first tasks of one
            if list(suite[:n]) == tasks:
                return name if n == len(suite) else f"{name}[:{n}]"
        return "custom"

    @property
    def selection(self) -> str | None:
        """Replay selection of this run (None: the method keeps no replay memory)."""
        default = get_method(self.method).replay
        return None if default is None else (self.replay_selection or default)

    @property
    def label(self) -> str:
        """The method's name in results and reports, with every ablation that differs from the default
        (``cpd`` / ``cpd (no shared freeze)`` / ...): runs group by it, so ablations never pool as seeds.
        Only the fields the method reads count (:meth:`Method.uses`), and of those only the ones that act
        (:meth:`inactive_reasons`)."""
        d, uses = DistillConfig(), get_method(self.method).uses() - set(self.inactive())
        notes = []
        for key, note in (
            ("freeze_shared", lambda v: None if v else "no shared freeze"),
            ("phase2", lambda v: None if v else "no phase 2"),
            ("gate_bias", lambda v: f"gate bias {v:g}"),
            ("route_new_experts", lambda v: None if v else "top-k routing only"),
            ("replay_selection", lambda v: None),  # see below: compared with the method's own default
            ("replay_fraction", lambda v: f"replay {100 * v:g}%"),
            ("replay_quality", lambda v: f"{v}-weighted replay"),
            ("ewc_lambda", lambda v: f"lambda {v:g}"),
            ("ewc_gamma", lambda v: f"gamma {v:g}"),
            ("packnet_retrain_fraction", lambda v: f"retrain {100 * v:g}%"),
        ):
            if key == "replay_selection" and key in uses and self.selection != get_method(self.method).replay:
                notes.append(f"{self.selection} replay")
            elif key in uses and getattr(self, key) != getattr(d, key) and note(getattr(self, key)):
                notes.append(note(getattr(self, key)))
        for key, unit in (("episodes_per_task", "episodes/task"), ("noise_std", "noise std")):
            if getattr(self, key) != getattr(d, key):  # what the data is: runs with other data never pool
                notes.append(f"{getattr(self, key):g} {unit}")
        for key, unit in (("adapter_rank", "adapter rank"), ("experts_per_task", "experts/task"),
                          ("history", "history")):  # fmt: skip
            if getattr(self.student, key) != getattr(d.student, key):  # capacity: never pooled as seeds
                notes.append(f"{unit} {getattr(self.student, key)}")
        if self.student.expert_routing != d.student.expert_routing:
            notes.append(f"{self.student.expert_routing}-routed experts")
        if self.student.task_conditioning != d.student.task_conditioning:
            notes.append(f"{self.student.task_conditioning} conditioning")
        if self.loss_positions != "all":
            notes.append(f"{self.loss_positions}-position loss")
        if self.precision != "fp32":
            notes.append(f"{self.precision} training")
        if self.behaviours:  # what the data is: the behaviour that collected a task's
            notes.append(
                "behaviours " + ", ".join(f"{_short(t)}→{_short(a)}" for t, a in self.behaviours.items())
            )
        if self.dagger:  # any method
            notes.append(f"DAgger {self.dagger_rounds}x{self.dagger_episodes} beta {self.dagger_beta:g}")
        return self.method + (f" ({', '.join(notes)})" if notes else "")

    @property
    def isolates_tasks(self) -> bool:
        """Whether, given its task id, an old task's output cannot change after its stage (parameter
        isolation: PackNet, or a growing method with task-routed experts and frozen shared layers, where
        everything an old task reads stays frozen). Its task-id results are then those of an **oracle task
        id** choosing the isolated part: an upper bound, not a continual-learning result."""
        return isolating(self.to_dict())

    def inactive_reasons(self) -> dict[str, str]:
        """Settings (dotted keys) this configuration holds but never acts on, each with why.

        With task-routed experts the gate is never consulted, so the learned router's top-k (unless it
        sizes the student: a first stage with fewer task experts than ``top_k``), its load-balancing loss,
        a new expert's gate bias and cpd's Phase 1/2 split do nothing; with uniform replay selection,
        ``replay_quality`` (which weights DPP's selection) does nothing.

        **How such a setting is recorded (one design for every one of them).** Its value is kept as it is
        (the run is rebuilt and resumed from these values, and a resumed run compares them) and its key is
        listed beside it as inactive: ``inactive_settings`` in ``RUN/config.json`` (:meth:`to_record`) and
        ``extra["inactive_settings"]`` in ``results.json``; :attr:`label` leaves it out, so a report never
        names a setting that did not act. Set explicitly (a ``cpd distill`` flag, ``--set``, a preset or a
        ``cpd run --config`` file that gives it another value than its default), it is refused before
        anything runs (:func:`inactive_refusal`), as the method table refuses a flag its method does not
        read.
        """
        return {key: f"{cause}, so {effect}" for key, (cause, effect) in self._inactive().items()}

    def _inactive(self) -> dict[str, tuple[str, str]]:
        """``{key: (why it cannot act, what it would have done)}``: :meth:`inactive_reasons`' parts."""
        method, out = get_method(self.method), {}
        if self.student.expert_routing == "task":
            routed = "the experts are task-routed (student.expert_routing=task) and the gate never consulted"
            if self.student.top_k <= self._fewest_task_experts():
                out["student.top_k"] = routed, "no top-k choice is made"
            out["student.aux_loss_weight"] = routed, "there is no load-balancing loss"
            if method.expert_phases:
                out["gate_bias"] = routed, "a new expert's gate bias is never read"
                for key in ("phase2", "phase1_fraction"):
                    out[key] = routed, "a stage trains in one phase, with no Phase 1/2 split"
                out["route_new_experts"] = routed, "new experts are routed by their task"
        if self.selection == "uniform":
            uniform = "replay is selected uniformly (replay_selection=uniform)"
            out["replay_quality"] = uniform, "there is no DPP selection for the error to weight"
        return out

    def inactive(self) -> list[str]:
        """The keys of :meth:`inactive_reasons`, in order."""
        return list(self.inactive_reasons())

    def _fewest_task_experts(self) -> int:
        """Experts the student is born with for its tasks (growth only adds): the first stage's tasks for a
        growing method, every task for the others (``top_k`` above it would raise the count)."""
        method = get_method(self.method)
        tasks = self.stage_tasks()
        born = len(tasks[0]) if method.grows and not method.joint else sum(map(len, tasks))
        return born * self.student.experts_per_task

    def unused(self, keys: list[str]) -> list[str]:
        """Those of ``keys`` (fields set by the user) that this run's method does not read."""
        uses = get_method(self.method).uses()
        if self.dagger:
            uses = uses | set(_DAGGER_FIELDS)
        return [k for k in keys if (k in METHOD_FIELDS or k in _DAGGER_FIELDS) and k not in uses]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_record(self) -> dict:
        """``RUN/config.json``: :meth:`to_dict` with the ``inactive_settings`` list beside the values (see
        :meth:`inactive_reasons`); :func:`config_values` reads the values back."""
        return {**self.to_dict(), INACTIVE_KEY: self.inactive()}

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        """From a saved ``config.json`` (or any mapping); an unknown key is refused by name."""
        return from_mapping(cls, config_values(d), "distill config")

    def replace(self, **changes: object) -> DistillConfig:
        return dataclasses.replace(self, **changes)


def _short(task: str) -> str:
    return task.removesuffix("-v3")
