"""Continual distillation: stages of tasks distilled into one growing student.

Read in module order, the data path of one run (``cpd distill``, :mod:`cpd_fast.cli.distill`; ``cpd run``
calls the same code)::

    config.py   DistillConfig: every number the run uses (saved first as RUN/config.json)
    methods.py  the method table (cpd, finetune, ewc, online-ewc, replay, static-moe, joint): what grows,
                what is frozen in which phase, which replay, which penalty
    windows.py  teacher transitions as observation-history windows; the task-balanced sampler
    train.py    one training phase: the distillation loss (DDP-aware), AdamW, the LR schedule
    rows.py     a speed-up: the windows that train nothing are left out of the forward pass
    run.py      the stage loop: data → grow → phases → replay selection → evaluation → results
    stats.py    routing shares and the replay budget recorded with the results
    fork.py     a run started from another run's finished first stages (grid points that share them)

The model is :mod:`cpd_fast.student` (it knows nothing of training loops or process groups), teachers and
their datasets are :mod:`cpd_fast.teachers` / :mod:`cpd_fast.data`, replay selection
:mod:`cpd_fast.replay`, evaluation :mod:`cpd_fast.evaluation`, metrics and reports :mod:`cpd_fast.metrics`
/ :mod:`cpd_fast.report`.
"""

from __future__ import annotations

from cpd_fast.distill.config import EVAL_MODES, DistillConfig
from cpd_fast.distill.methods import METHODS, Method, configure_phase, phases_of
from cpd_fast.distill.run import run_distill
from cpd_fast.distill.train import DistillLoss, lr_factor, train_phase
from cpd_fast.distill.windows import TaskSampler, WindowData

__all__ = [
    "EVAL_MODES",
    "METHODS",
    "DistillConfig",
    "DistillLoss",
    "Method",
    "TaskSampler",
    "WindowData",
    "configure_phase",
    "lr_factor",
    "phases_of",
    "run_distill",
    "train_phase",
]
