"""``cpd run``: the whole study in one command, in a run directory that survives being killed.

The modules, in the order a run uses them:

* :mod:`~cpd_fast.pipeline.config`: :class:`PipelineConfig`, the shipped presets (``quick``, ``mt10``,
  ``mt25``, ``mt25-plus`` in ``cpd_fast/presets``) and the layering preset <- ``--config FILE`` <- flags;
* :mod:`~cpd_fast.pipeline.rundir`: ``RUN/config.yaml`` written first, a resumed run's checksums verified;
* :mod:`~cpd_fast.pipeline.steps`: the steps (fidelity, teachers, collect, distill:METHOD, report) and the
  ledger loop that skips finished ones; :func:`run_pipeline` is the entry point;
* :mod:`~cpd_fast.pipeline.parallel`: methods distilled side by side in worker processes, each with its
  share of the cores;
* :mod:`~cpd_fast.pipeline.console`: what a run prints.

The command line (``cpd run``) is :mod:`cpd_fast.cli.run`.

**What ``quick`` shows** (the default; no GPU, nothing to download): Meta-World's scripted experts, gated
with the official protocol on 10 of the 50 goals, teach four MT25 tasks in two stages (reach +
drawer-close, then button-press-topdown + window-close). cpd and plain fine-tuning are distilled side by
side from the same datasets with the same budget and evaluated on every seen task after each stage. It is
smoke-sized (one seed, 10 evaluation goals: a task's success moves in steps of 0.1); mt10 and mt25 are the
study. Measured results and timings are in the README and ``bench/``. The report labels a run on an
explicit task list "custom".

**Resume.** Re-running with the same ``--out`` continues: finished steps are skipped (their outputs are
checked first), an interrupted distillation restarts at its last finished phase, an interrupted PPO
teacher at its last checkpoint, an interrupted collection at the next task. Once a step runs, every
later one runs too (cheaply: each skips its own finished work), so a redone step is never ignored
downstream. ``cpd run --out RUN`` alone resumes with ``RUN/config.yaml``. A different config is
refused, naming the keys that differ; the runtime-only keys (device, Ray backend/address, workers,
jobs, progress, distill threads and eval_workers) may change. A run directory records its own path
(teachers, datasets): resume it where it was made.

**Determinism.** Given the teachers, a resumed run reproduces an uninterrupted one exactly (collection is
seeded; every distillation phase has its own generator and a fresh optimizer; same machine and thread
count). A PPO teacher interrupted mid-training is not bit-identical to an uninterrupted one: its learner
state is restored exactly but its envs restart with fresh episodes (:mod:`cpd_fast.teachers.ppo`), so it
is another sample of the same training run.
"""

from __future__ import annotations

from cpd_fast.pipeline.config import (
    PRESETS,
    FidelitySettings,
    GateSettings,
    PipelineConfig,
    config_diff,
    load_preset,
    resolve_config,
)
from cpd_fast.pipeline.steps import Pipeline, run_pipeline

__all__ = [
    "PRESETS",
    "FidelitySettings",
    "GateSettings",
    "Pipeline",
    "PipelineConfig",
    "config_diff",
    "load_preset",
    "resolve_config",
    "run_pipeline",
]
