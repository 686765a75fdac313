"""The student policy distilled from the teachers, one concept per module::

    config.py      StudentConfig: sizes, routing and conditioning modes
    model.py       the model: task encoder, causal blocks, trunk, MoE, head (tensors in, tensors out),
                   growth (add_task) and checkpoints
    prototypes.py  the prototype bank: per-task prototypes and conditioning vectors, their EMA and freeze sets
    routing.py     a token's task (given or nearest prototype) → its adapters, experts and conditioning
    adapters.py    per-task low-rank adapters on the shared blocks
    groups.py      named parameter groups and freezing by group name
    loss.py        the distillation loss (MSE + load balancing + supervised contrastive), one process or
                   data parallel
    rollout.py     the per-env observation history and one batched action step

Training loops, the method table and data parallelism are :mod:`cpd_fast.distill` and :mod:`cpd_fast.ddp`;
the student knows nothing of them.
"""

from __future__ import annotations

from cpd_fast.student.config import EXPERT_ROUTINGS, TASK_CONDITIONINGS, StudentConfig
from cpd_fast.student.groups import GROUPS
from cpd_fast.student.loss import distill_losses, supcon_loss
from cpd_fast.student.model import Student
from cpd_fast.student.rollout import HistoryBuffer

__all__ = [
    "EXPERT_ROUTINGS",
    "GROUPS",
    "TASK_CONDITIONINGS",
    "HistoryBuffer",
    "Student",
    "StudentConfig",
    "distill_losses",
    "supcon_loss",
]
