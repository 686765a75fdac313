"""``cpd distill``: one continual-distillation run (:func:`cpd_fast.distill.run.run_distill`).

Every :class:`~cpd_fast.distill.config.DistillConfig` field is a flag, generated from the dataclass
(``--steps-per-stage``, ``--no-freeze-shared``, ...), so a new field is one line there; the student's
fields are set with ``--set student.d_model=192`` (values parsed as YAML). A flag the chosen method does not
read (``--ewc-lambda`` with ``--method cpd``) is refused: it would be silently ignored. So is a setting that
does not act in this run (``--gate-bias`` with task-routed experts,
:meth:`~cpd_fast.distill.config.DistillConfig.inactive_reasons`): it would be recorded as if it had.
Every flag with a fixed set of values lists them in ``--help`` (a ``Literal`` field's, or ``choices``
below) and refuses another with one line naming them.
"""

from __future__ import annotations

import argparse
import os

from cpd_fast.cli.flags import add_config_flags, flag_values
from cpd_fast.config import from_mapping, merge, parse_set
from cpd_fast.distill.config import DistillConfig, inactive_refusal
from cpd_fast.distill.methods import METHODS
from cpd_fast.distill.run import run_distill
from cpd_fast.moe import BACKENDS as MOE_BACKENDS
from cpd_fast.student.config import EXPERT_ROUTINGS, TASK_CONDITIONINGS
from cpd_fast.tasks import SUITES

__all__ = ["add_cli", "student_choices"]

_ALIASES = {"episodes_per_task": "episodes"}  # historical flag names
_HELP = {
    "suite": f"task suite, one of: {', '.join(SUITES)} (or one -v3 task's name)",
    "tasks": "explicit task list (overrides --suite's tasks)",
    "tasks_per_stage": "tasks per stage (default 5, or 2 with --tasks)",
    "teachers": "'scripted', 'zoo' (the shipped RL teachers; 'zoo:NAME_OR_DIR' for another zoo) or a "
    "teachers RUN_DIR with teachers.json",
    "fidelity": "`cpd envs check` JSON choosing each task's data backend",
    "budget": "scales the optimizer steps per stage",
    "steps_per_stage": "optimizer steps per stage, before --budget scaling",
    "data_dir": "teacher datasets directory shared between runs (default RUN_DIR/datasets); a task's data "
    "is reused when its collection settings match",
    "episodes_per_task": "teacher episodes per task",
    "noise_std": "exploration noise of the data",
    "eval_modes": "evaluation modes, the first one is the main matrix: inferred (no task id) and/or "
    "prototype (the task id selects its prototype embedding)",
    "eval_goals": "official goals per evaluation (50)",
    "replay_selection": "default: dpp for cpd/static-moe, uniform for replay",
    "freeze_shared": "ablation: keep the shared layers trainable",
    "phase2": "ablation: skip Phase 2 (all steps in Phase 1)",
    "gate_bias": "gate bias of new experts",
    "route_new_experts": "ablation: Phase 1 routes by top-k only (newborn experts may never be routed)",
    "ewc_gamma": "online-EWC decay",
    "threads": "torch threads (0: torch's default; 1 is fastest on a busy CPU)",
    "eval_workers": "evaluation worker processes (0: in this process; default one per core); the success "
    "flags are the same bit for bit whatever the number",
    "precision": "training arithmetic: fp32, or bf16 mixed precision (fast where the hardware has native "
    "bf16: AVX512-BF16/AMX CPUs, recent GPUs); evaluation is float32 either way",
    "progress": "no progress bars",
    "tensorboard": "no TensorBoard events (metrics.jsonl only)",
}


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cpd distill`` on the top-level ``cpd`` subparsers."""
    p = subparsers.add_parser(
        "distill",
        help="continual distillation of teachers into one student, stage by stage",
        description="Collects teacher data, trains the student stage by stage with METHOD, evaluates every "
        "seen task after each stage (Meta-World's official protocol) and writes RUN_DIR/results.json. A "
        "killed run resumes from its last finished phase when re-run with the same arguments.",
    )
    # the Literal fields (lr_schedule, precision, eval_modes, ...) get their choices from their type; these
    # are plain strings checked against a fixed set when the config is built
    fields = add_config_flags(
        p, DistillConfig, skip=("student",), aliases=_ALIASES, helps=_HELP,
        choices={"method": METHODS, "device": ("cpu", "cuda")},
    )  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="any config key, dotted for the student: --set student.d_model=192; the student's "
                   "keys with fixed choices: " + student_choices())  # fmt: skip
    p.add_argument(
        "--ddp", action="store_true",
        help="data-parallel training over the processes torchrun starts (automatic under torchrun): "
        "torchrun --nproc-per-node N -m cpd_fast.cli distill ... --ddp (docs/scale.md)",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.set_defaults(func=_cli_distill, config_fields=fields)


def student_choices(prefix: str = "student.") -> str:
    """The student's fields with a fixed set of values (set with ``--set student.KEY=VALUE``; a plain
    dataclass, checked by its ``__post_init__``), for ``--set``'s help."""
    fixed = (("expert_routing", EXPERT_ROUTINGS), ("task_conditioning", TASK_CONDITIONINGS),
             ("moe_backend", MOE_BACKENDS))  # fmt: skip
    return "; ".join(f"{prefix}{k} ({' | '.join(v)})" for k, v in fixed)


def _dotted(values: dict, prefix: str = "") -> list[str]:
    """The dotted keys of the leaves of ``values``: ``{"student": {"top_k": 1}}`` -> ``["student.top_k"]``."""
    out = []
    for k, v in values.items():
        out += _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def _cli_distill(args: argparse.Namespace) -> int:
    # bad values raise ValueError/FileNotFoundError: cpd_fast.cli.main prints them as one line (exit 2)
    given = flag_values(args, args.config_fields)
    values = merge(parse_set(args.overrides), given)
    named = {k: args.config_fields[k] if k in given else f"--set {k}" for k in _dotted(values)}  # user's
    values.setdefault("tasks_per_stage", 2 if values.get("tasks") else 5)
    if "eval_modes" in values:
        values["eval_modes"] = tuple(values["eval_modes"])
    flags = args.config_fields  # {field: its flag}; the student's fields are set with --set student.KEY=V
    cfg = from_mapping(DistillConfig, values, "", names=flags)  # errors name the flag: "--lr: ..."
    unused = cfg.unused(sorted(values))
    if unused:
        shown = ", ".join(flags[k] for k in unused)
        raise ValueError(f"{shown}: not used by --method {cfg.method} (it would be ignored); drop it")
    refusal = inactive_refusal(cfg, named)  # set by the user, and it would not act
    if refusal:
        raise ValueError(refusal)
    result = run_distill(cfg, args.out, data_parallel=True if args.ddp else None)
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel: rank 0 reports
        return 0
    m = result.metrics()
    print(f"{args.out}/results.json: ACC {m.acc:.3f}  BWT {m.bwt:.3f}  relative {m.relative_performance:.3f}")
    return 0
