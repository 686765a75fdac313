"""``cpd run``: the whole pipeline (:mod:`cpd_fast.pipeline`) from a preset, a config file and flags."""

from __future__ import annotations

import argparse
import logging
import os

import yaml

from cpd_fast.cli.distill import student_choices
from cpd_fast.cli.flags import choice_keys
from cpd_fast.config import load_yaml, merge, parse_set
from cpd_fast.distill.config import DistillConfig
from cpd_fast.distill.methods import METHODS
from cpd_fast.pipeline import PRESETS, resolve_config, run_pipeline
from cpd_fast.teachers.gate import ON_FAIL
from cpd_fast.teachers.jobs import BACKENDS
from cpd_fast.teachers.provide import SOURCES

__all__ = ["add_cli"]

log = logging.getLogger(__name__)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cpd run`` on the top-level ``cpd`` subparsers."""
    p = subparsers.add_parser(
        "run",
        help="the whole pipeline: teachers, gate, data, continual distillation, evaluation, report",
        description="Teachers (scripted or PPO) -> fidelity and quality gate -> data collection -> continual "
        "distillation of each method -> evaluation after every stage -> report, in one run directory. "
        "Re-running with the same --out resumes; `cpd run --out RUN` alone resumes with RUN/config.yaml.",
    )
    p.add_argument("--preset", choices=PRESETS, default=None, help="base config (default quick)")
    p.add_argument(
        "--config", default=None, metavar="FILE", help="YAML config (partial or a run's config.yaml)"
    )
    p.add_argument("--teachers", choices=SOURCES, default=None,
                   help="Meta-World's scripted experts, PPO trained in the run, or the shipped RL teachers "
                   "(--set zoo=NAME_OR_DIR; default mt25)")  # fmt: skip
    p.add_argument("--backend", choices=BACKENDS, default=None, help="where PPO teachers train")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster ('auto', 'ray://host:port')")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, metavar="METHOD",
                   help=f"methods to distil with ({', '.join(METHODS)})")  # fmt: skip
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None)
    seeds.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                       help="one run per seed, one after another, in RUN_DIR/s<SEED>")  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    fixed = "; ".join([f"gate.on_fail ({' | '.join(ON_FAIL)})", choice_keys(DistillConfig, "distill."),
                       student_choices("distill.student.")])  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config key, e.g. distill.steps_per_stage=500; keys with fixed "
                   f"choices (besides the flags above): {fixed}")  # fmt: skip
    p.add_argument(
        "--out",
        default=None,
        metavar="RUN_DIR",
        help="run directory (default runs/<preset>_s<seed>; with --seeds, runs/<preset>)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cli_run)


def _cli_run(args: argparse.Namespace) -> int:
    if args.seeds is None:
        return _run_one(args, args.seed, args.out)
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds lists a seed twice: {' '.join(map(str, args.seeds))}")
    root = args.out or os.path.join("runs", args.preset or "quick")
    for s in args.seeds:
        _run_one(args, s, os.path.join(root, f"s{s}"))
    return 0


def _run_one(args: argparse.Namespace, seed: int | None, out: str | None) -> int:
    overrides = parse_set(args.overrides)
    given = merge(overrides, {"ray_address": args.ray_address})
    flags = {"teachers": args.teachers, "backend": args.backend, "ray_address": args.ray_address,
             "methods": args.methods, "seed": seed, "device": args.device,
             "progress": False if args.no_progress else None}  # fmt: skip
    if args.ray_address and args.backend is None:
        flags["backend"] = "ray"  # an address only makes sense for the Ray backend
    overrides = merge(overrides, {k: v for k, v in flags.items() if v is not None})
    base = None
    saved = os.path.join(out, "config.yaml") if out else None
    if saved and os.path.isfile(saved) and not args.preset and not args.config:
        base = load_yaml(saved)  # `cpd run --out RUN` resumes RUN with its own config
    cfg = resolve_config(args.preset, args.config, overrides, base=base)
    unused = cfg.unused_settings(given)
    flags_unused = [u for u in unused if u.startswith("--")]
    if flags_unused:
        raise ValueError(
            f"{', '.join(flags_unused)}: only used to train PPO teachers (--teachers ppo), and this run uses "
            f"{cfg.teachers} teachers; drop it (it would be ignored)"
        )
    for key in unused:  # distill settings no selected method reads: a typo or a leftover, said once
        log.warning("%s is not used by the methods %s (ignored)", key, cfg.methods)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    run_pipeline(cfg, out or os.path.join("runs", f"{cfg.preset}_s{cfg.seed}"))
    return 0
