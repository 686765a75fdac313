"""The method table: one declarative record per continual-distillation method.

What trains where (``stage > 0``; stage 0 always trains everything in one phase):

============ ====== ============================ ============================================ ==========
method       growth shared layers + head         experts / gate                               replay
============ ====== ============================ ============================================ ==========
cpd          +1/task frozen (``freeze_shared``)  P1: old experts frozen, new + gate train;     DPP
                                                 P2: gate frozen, all experts train
                                                 (task-routed experts: one phase, new ones
                                                 train; task encoder and old prototypes frozen)
static-moe   fixed  frozen (``freeze_shared``)   all train                                     DPP
replay       fixed  train                        all train                                     uniform
finetune     fixed  train                        all train                                     none
ewc          fixed  train (+ EWC penalty)        all train (+ EWC penalty)                     none
online-ewc   fixed  train (+ online-EWC penalty) all train (+ online-EWC penalty)              none
joint        fixed  one stage with every task, all parameters, the total step budget           —
packnet      fixed  weights: per-stage owners (:mod:`cpd_fast.packnet`): train, prune, retrain;     none
                    biases and norms: stage 0 only. Needs the task id at test time
scratch      fixed  every stage starts from a freshly initialised student and trains its tasks alone  none
============ ====== ============================ ============================================ ==========

**scratch** is not a continual method but the reference of forward transfer (Continual World's: how much
the earlier tasks help a new one within its budget, :func:`cpd_fast.metrics.forward_transfer`): each stage
re-initialises the student (seeded per stage) and trains the stage's tasks with the stage's budget, and only
the stage's tasks are evaluated (the others would measure an untrained network). ``cpd report`` uses its runs
for the forward-transfer column and shows no row for them.

Fixed-capacity methods get ``num_tasks · experts_per_task`` experts from the start, the capacity cpd
reaches at the end. The task encoder trains throughout (see :mod:`cpd_fast.student.groups`). What a phase
freezes is named by parameter group (:func:`frozen_groups`). A new method is one :class:`Method` entry in
:data:`METHODS` (plus, at most, one hook such as :class:`EWCHook`); nothing else in the package tells
methods apart.

**PackNet** (``packnet``) isolates parameters by pruning: every weight entry belongs to the stage that kept
it, a stage trains only the entries no earlier stage kept, and a task is evaluated with its stage's
subnetwork (:meth:`cpd_fast.packnet.PackNet.view`), which only its task id can pick: it has no task-free
evaluation (``eval_modes`` must be ``[prototype]``). A stage but the last trains in two phases, ``train``
then, after the pruning, ``retrain`` (``packnet_retrain_fraction`` of the stage's steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cpd_fast.distill.windows import TaskSampler
from cpd_fast.ewc import EWCPenalty, diagonal_fisher
from cpd_fast.packnet import PackNet
from cpd_fast.student import Student

__all__ = [
    "METHODS",
    "EWCHook",
    "Method",
    "MethodHook",
    "PackNetHook",
    "configure_phase",
    "frozen_groups",
    "get_method",
    "phases_of",
    "task_routed",
]


@dataclass(frozen=True)
class Method:
    """What one method does; read by the stage loop (:mod:`cpd_fast.distill.run`).

    Attributes:
        name: the ``--method`` name.
        grows: one expert per new task each stage (else fixed capacity from the start).
        freezes_shared: shared layers and head are frozen after stage 0 (ablation ``freeze_shared``).
        expert_phases: stage > 0 trains in Phase 1 (old experts frozen, new experts + gate, new experts
            always routed) then Phase 2 (gate frozen, all experts) — ablations ``phase2``,
            ``route_new_experts``, ``gate_bias``, ``phase1_fraction``.
        replay: default replay selection (``"dpp"``, ``"uniform"``) or None for no replay memory.
        penalty: ``"ewc"`` / ``"online-ewc"``: an :class:`EWCHook` consolidates after every stage.
        joint: one stage with every task and the total step budget (the upper bound).
        isolation: ``"packnet"``: parameter isolation by pruning (a :class:`PackNetHook`); needs the task id.
        resets: a fresh student every stage, trained on the stage's tasks alone (``scratch``: the reference
            of forward transfer, evaluated on the stage's tasks only).
    """

    name: str
    grows: bool = False
    freezes_shared: bool = False
    expert_phases: bool = False
    replay: str | None = None
    penalty: str | None = None
    joint: bool = False
    isolation: str | None = None
    resets: bool = False

    def uses(self) -> set[str]:
        """The method-specific :class:`~cpd_fast.distill.config.DistillConfig` fields this method reads."""
        used = set()
        if self.freezes_shared:
            used.add("freeze_shared")
        if self.expert_phases:
            used |= {"phase2", "gate_bias", "route_new_experts", "phase1_fraction"}
        if self.replay is not None:
            used |= {"replay_selection", "replay_fraction", "segment_len", "replay_quality"}
        if self.penalty is not None:
            used |= {"ewc_lambda", "fisher_batches", "fisher_batch_size"}
        if self.penalty == "online-ewc":
            used.add("ewc_gamma")
        if self.isolation == "packnet":
            used.add("packnet_retrain_fraction")
        return used


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("cpd", grows=True, freezes_shared=True, expert_phases=True, replay="dpp"),
        Method("finetune"),
        Method("ewc", penalty="ewc"),
        Method("online-ewc", penalty="online-ewc"),
        Method("replay", replay="uniform"),
        Method("static-moe", freezes_shared=True, replay="dpp"),
        Method("joint", joint=True),
        Method("packnet", isolation="packnet"),
        Method("scratch", resets=True),
    )
}
# every method-specific field (the union of Method.uses): one a method does not read is reported unused
METHOD_FIELDS = set().union(*(m.uses() for m in METHODS.values()))


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def phases_of(cfg: Any, stage: int) -> list[tuple[str, int]]:
    """``[(phase name, optimizer steps)]`` of a stage of run ``cfg`` (a DistillConfig)."""
    method = get_method(cfg.method)
    n = cfg.stage_steps
    if method.joint:
        return [("train", n * len(cfg.stage_tasks()))]
    if method.expert_phases and stage > 0 and cfg.phase2 and not task_routed(cfg):
        n1 = max(1, round(n * cfg.phase1_fraction))
        return [("phase1", n1), ("phase2", max(1, n - n1))]
    if method.isolation == "packnet" and stage < len(cfg.stage_tasks()) - 1 and n > 1:
        n2 = min(n - 1, max(1, round(n * cfg.packnet_retrain_fraction)))
        return [("train", n - n2), ("retrain", n2)]  # the pruning between them
    return [("train", n)]


def task_routed(cfg: Any) -> bool:
    """Whether run ``cfg`` routes tokens to their task's experts (``student.expert_routing="task"``): no gate
    to train, so a growing method's stage is one phase in which only the new tasks' experts train."""
    return cfg.student.expert_routing == "task"


def frozen_groups(
    student: Any, cfg: Any, stage: int, phase: str, new_experts: list[int], new_tasks: list[int] = ()
) -> dict[str, list[int] | None]:
    """What ``phase`` of ``stage`` freezes, by parameter group (:mod:`cpd_fast.student.groups`): group name
    → None (all of it) or the tasks / experts of it that freeze; every other group trains.

    ``new_experts``: the experts added for this stage's tasks (growing methods only). ``new_tasks``: this
    stage's task ids; with per-task adapters (``student.adapter_rank``) only theirs train after stage 0,
    in every method (an adapter learns while its task is new, then keeps that task's features).
    """
    method = get_method(cfg.method)
    if stage == 0 or method.joint:
        return {}
    new = set(new_tasks)
    old_tasks = [t for t in range(student.num_tasks) if t not in new]
    frozen: dict[str, list[int] | None] = {"adapters": old_tasks}
    routed = task_routed(cfg)
    if method.freezes_shared and cfg.freeze_shared:
        # the head maps every expert's output: training it moves old tasks too
        frozen |= {"shared": None, "head": None}
        if method.expert_phases and routed:
            # Parameter isolation: everything an old task's output depends on stays as it is, so with its
            # task id it computes what it did, bit for bit.
            if student.config.task_conditioning == "task":
                # an old task is conditioned on its own frozen vector, so the encoder and the prototypes
                # go on learning to tell the tasks apart (on the replayed windows too)
                frozen["conditioning"] = old_tasks
            else:
                # conditioned on its prototype, an old task moves with the encoder, and its frozen parts
                # cannot follow (on MT25 an old task's success collapsed after one stage with the encoder
                # training: bench/mt25_levers): the encoder freezes too
                frozen |= {"task_encoder": None, "prototypes": old_tasks}
    if method.expert_phases:
        # with task-routed experts an old task's experts serve it alone, so they stay as they are all stage
        first = phase != "phase2"
        if routed or not first:
            frozen["gate"] = None
        born = set(new_experts)
        old = [e for e in range(student.num_experts) if e not in born]
        if (routed or first) and old:
            frozen["experts"] = old
    return frozen


def configure_phase(
    student: Any, cfg: Any, stage: int, phase: str, new_experts: list[int], new_tasks: list[int] = ()
) -> None:
    """Set what trains in ``phase`` of ``stage`` (idempotent: a resumed run calls it again): the groups of
    :func:`frozen_groups` freeze, everything else trains; in Phase 1 the newborn experts are always routed
    (``route_new_experts``: a dormant expert would otherwise never enter anyone's top-k)."""
    student.moe.always_route([])
    student.set_frozen(frozen_groups(student, cfg, stage, phase, new_experts, new_tasks))
    method = get_method(cfg.method)
    first_phase = stage > 0 and not method.joint and method.expert_phases and phase != "phase2"
    if first_phase and not task_routed(cfg) and cfg.route_new_experts and new_experts:
        student.moe.always_route(new_experts)


class MethodHook:
    """What a method with its own state adds to the stage loop (:mod:`cpd_fast.distill.run`); each step
    is a no-op here. ``key`` names its state in the phase checkpoints."""

    key = "hook"
    stage_networks = False  # True: a task is evaluated with its stage's network (stage_student)

    def begin_phase(self, student: Any, stage: int, phase: str) -> None:
        """After :func:`configure_phase`: the method's own trainable set."""

    def attach(self, student: Any, optimizer: torch.optim.Optimizer) -> Any:
        """A handle (``.remove()``) that confines ``optimizer``'s steps, or None."""
        return None

    def loss(self, student: Any) -> torch.Tensor | None:
        """A term added to the training loss, or None."""
        return None

    def end_phase(self, student: Any, stage: int, phase: str) -> None:
        """After a phase trained, before its checkpoint."""

    def end_of_stage(self, student: Any, data: Any, pools: dict, gen: torch.Generator) -> None:
        """After a stage's last phase, before its checkpoint (``pools``: the stage's tasks' windows)."""

    def stage_student(self, student: Any, stage: int) -> Any:
        """The network a task of ``stage`` is evaluated with (the student itself, unless the method keeps
        one per stage)."""
        return student

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EWCHook(MethodHook):
    """The penalty methods' one hook: the EWC penalty in the loss, consolidated after every stage."""

    key = "ewc"

    def __init__(self, cfg: Any) -> None:
        method = get_method(cfg.method)
        self.cfg = cfg
        self.penalty = EWCPenalty(cfg.ewc_lambda, online=method.penalty == "online-ewc", gamma=cfg.ewc_gamma)

    def loss(self, student: Any) -> torch.Tensor | None:
        return self.penalty.penalty(student) if self.penalty.terms else None

    def end_of_stage(self, student: Any, data: Any, pools: dict, gen: torch.Generator) -> None:
        """Estimate the stage's diagonal Fisher on its tasks' windows and consolidate."""
        sampler = TaskSampler(pools)
        device = torch.device(self.cfg.device)
        was = student.training
        student.eval()
        batches = []
        for _ in range(self.cfg.fisher_batches):
            idx, start = sampler.sample(self.cfg.fisher_batch_size, gen)
            obs, _, mask = data.windows(idx, start)
            batches.append((obs.to(device), mask.to(device)))
        fisher = diagonal_fisher(student, batches, lambda o, m: student(o, mask=m), generator=gen)
        student.train(was)
        self.penalty.consolidate(student, fisher)

    def state_dict(self) -> dict:
        return self.penalty.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """The consolidated terms of the checkpoint; λ and γ stay the run's own (a resumed run's equal the
        checkpoint's; a run forked from another grid point keeps its own: cpd_fast.distill.fork)."""
        self.penalty.load_state_dict(state)
        self.penalty.lam, self.penalty.gamma = float(self.cfg.ewc_lambda), float(self.cfg.ewc_gamma)


class PackNetHook(MethodHook):
    """PackNet's hook (:mod:`cpd_fast.packnet`): each phase trains the entries its stage owns, the ``train``
    phase of a stage but the last ends with the pruning, and a task is evaluated with its stage's view."""

    key = "packnet"
    stage_networks = True

    def __init__(self, cfg: Any, student: Any) -> None:
        self.packnet = PackNet(student, num_stages=len(cfg.stage_tasks()))
        self.stage = 0

    def begin_phase(self, student: Any, stage: int, phase: str) -> None:
        self.stage = stage
        self.packnet.set_trainable(student, stage)

    def attach(self, student: Any, optimizer: torch.optim.Optimizer) -> Any:
        return self.packnet.attach(student, optimizer, self.stage)

    def end_phase(self, student: Any, stage: int, phase: str) -> None:
        if phase == "train" and stage < self.packnet.num_stages - 1:
            self.packnet.prune(student, stage)

    def stage_student(self, student: Any, stage: int) -> Any:
        net = Student.from_state_dict(self.packnet.view(student, stage))
        return net.to(student.prototypes.device).eval()

    def state_dict(self) -> dict:
        return self.packnet.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.packnet.load_state_dict(state)


def make_hook(cfg: Any, student: Any) -> MethodHook | None:
    """The method's hook, if it has one (``student``: as it was born)."""
    method = get_method(cfg.method)
    if method.penalty is not None:
        return EWCHook(cfg)
    if method.isolation == "packnet":
        return PackNetHook(cfg, student)
    return None
