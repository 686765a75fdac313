"""``cpd teachers train | collect | eval`` — register with ``add_cli(subparsers)`` from ``cpd_fast.cli``.

Bad input raises (ValueError, FileNotFoundError, ...); :func:`cpd_fast.cli.main` reports it as one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

__all__ = ["add_cli"]


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cpd teachers {train,collect,eval}`` on the top-level ``cpd`` subparsers."""
    from cpd_fast.errors import (
        fraction,
        nonnegative_float,
        nonnegative_int,
        positive_float,
        positive_int,
        seed,
    )
    from cpd_fast.teachers.gate import DEFAULT_THRESHOLD, ON_FAIL
    from cpd_fast.teachers.ppo import RECIPES

    teachers = subparsers.add_parser("teachers", help="train, evaluate and roll out per-task teachers")
    sub = teachers.add_subparsers(dest="teachers_command", metavar="TEACHERS_COMMAND", required=True)

    train = sub.add_parser(
        "train",
        help="train one PPO teacher per task (local process pool or Ray), then gate them",
        description="Trains one PPO teacher per task into RUN_DIR/teachers/<task>/, evaluates each with "
        "Meta-World's official 50-goal protocol and writes RUN_DIR/teachers.json. Re-running resumes.",
    )
    _add_task_args(train)
    train.add_argument("--run-dir", required=True, help="run directory (created)")
    train.add_argument("--backend", choices=("local", "ray"), default="local")
    train.add_argument(
        "--workers", type=positive_int, default=None, help="parallel teachers (default: cores)"
    )
    train.add_argument("--ray-address", default=None, help="existing Ray cluster ('auto', 'ray://h:p')")
    train.add_argument(
        "--gpus-per-teacher", type=nonnegative_float, default=0.0, help="Ray num_gpus per teacher"
    )
    train.add_argument(
        "--max-retries", type=nonnegative_int, default=2, help="re-runs of a teacher whose worker died"
    )
    train.add_argument("--total-steps", type=positive_int, default=1_000_000, help="env steps per teacher")
    train.add_argument("--recipe", choices=tuple(RECIPES), default="cpd",
                       help="PPO hyper-parameters: cpd (PPOConfig's defaults) or metaworld (the Meta-World+ "
                       "authors' recipe); --num-envs/--num-steps override it")  # fmt: skip
    train.add_argument(
        "--num-envs", type=positive_int, default=None, help="envs per teacher (PPOConfig default)"
    )
    train.add_argument("--num-steps", type=positive_int, default=None, help="rollout length per env")
    train.add_argument("--seed", type=seed, default=0)
    train.add_argument("--fidelity", default=None, help="JSON from `cpd envs check --out` (env backend/task)")
    train.add_argument(
        "--threshold", type=fraction, default=DEFAULT_THRESHOLD, help="official success needed"
    )
    train.add_argument(
        "--on-fail", choices=ON_FAIL, default="retrain", help="what to do with a failed teacher"
    )
    train.add_argument(
        "--retrain-factor", type=positive_float, default=2.0, help="budget multiplier for retraining"
    )
    train.add_argument(
        "--eval-goals", type=positive_int, default=50, help="official goals (50 = official protocol)"
    )
    train.add_argument("--progress", action="store_true", help="show a progress bar per teacher")
    train.set_defaults(func=_cli_train)

    collect = sub.add_parser(
        "collect",
        help="roll out the gated teachers and store Minari datasets",
        description="Rolls out each usable teacher from RUN_DIR/teachers.json (or --source scripted) and "
        "writes one Minari dataset per task under RUN_DIR/datasets.",
    )
    _add_task_args(collect, default_suite=None)
    collect.add_argument("--run-dir", required=True)
    collect.add_argument(
        "--source",
        choices=("gate", "scripted"),
        default="gate",
        help="teachers from teachers.json (default) or the scripted experts",
    )
    collect.add_argument("--episodes", type=positive_int, default=50, help="episodes per task")
    collect.add_argument("--num-envs", type=positive_int, default=10)
    collect.add_argument(
        "--noise-std", type=nonnegative_float, default=0.1, help="exploration noise on executed actions"
    )
    collect.add_argument("--max-episode-steps", type=positive_int, default=500)
    collect.add_argument("--fidelity", default=None, help="JSON from `cpd envs check --out`")
    collect.add_argument("--seed", type=seed, default=0)
    collect.add_argument("--overwrite", action="store_true", help="replace existing datasets")
    collect.set_defaults(func=_cli_collect)

    ev = sub.add_parser("eval", help="official 50-goal success of one teacher")
    ev.add_argument("--task", required=True)
    ev.add_argument("--checkpoint", default=None, help="policy.pt; omit with --source scripted")
    ev.add_argument("--source", choices=("checkpoint", "scripted"), default="checkpoint")
    ev.add_argument("--goals", type=positive_int, default=50)
    ev.add_argument("--num-envs", type=positive_int, default=10)
    ev.set_defaults(func=_cli_eval)


def _add_task_args(p: argparse.ArgumentParser, default_suite: str | None = "mt25") -> None:
    p.add_argument("--suite", default=default_suite, help="task suite: mt10, mt25, mt50, cw10")
    p.add_argument("--tasks", nargs="+", default=None, help="explicit -v3 task names (override --suite)")


def _cli_train(args: argparse.Namespace) -> int:
    from cpd_fast.distributed import train_teachers
    from cpd_fast.fidelity import load_backend_choices
    from cpd_fast.tasks import resolve_tasks
    from cpd_fast.teachers.ppo import recipe_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tasks = resolve_tasks(args.tasks or args.suite)
    overrides = {"num_envs": args.num_envs, "num_steps": args.num_steps}
    cfg = recipe_config(
        args.recipe,
        total_steps=args.total_steps,
        seed=args.seed,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    env_backends = load_backend_choices(args.fidelity) if args.fidelity else None
    t0 = time.perf_counter()
    records = train_teachers(
        tasks,
        args.run_dir,
        cfg,
        backend=args.backend,
        workers=args.workers,
        ray_address=args.ray_address,
        num_gpus_per_job=args.gpus_per_teacher,
        env_backends=env_backends,
        threshold=args.threshold,
        on_fail=args.on_fail,
        retrain_factor=args.retrain_factor,
        eval_goals=args.eval_goals,
        max_retries=args.max_retries,
        progress=args.progress,
    )
    print(f"{'task':<30} {'source':<9} {'success':>7}  status")
    for task, rec in records.items():
        rate = "-" if rec.success_rate is None else f"{rec.success_rate:.2f}"
        print(f"{task:<30} {rec.source:<9} {rate:>7}  {rec.status}{'' if rec.used else ' (unused)'}")
    print(f"wrote {os.path.join(args.run_dir, 'teachers.json')} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _cli_collect(args: argparse.Namespace) -> int:
    from cpd_fast.errors import UserError
    from cpd_fast.fidelity import load_backend_choices
    from cpd_fast.runio import RunLock
    from cpd_fast.tasks import resolve_tasks
    from cpd_fast.teachers.gate import usable_teachers

    usable = {}
    if args.source == "gate":
        usable = usable_teachers(args.run_dir)
        tasks = resolve_tasks(args.tasks or args.suite) if (args.tasks or args.suite) else list(usable)
        missing = [t for t in tasks if t not in usable]
        if missing:
            print(f"skipping tasks without a usable teacher (see teachers.json): {', '.join(missing)}")
        tasks = [t for t in tasks if t in usable]
    else:
        tasks = resolve_tasks(args.tasks or args.suite or "mt25")
    if not tasks:
        raise UserError(f"no usable teacher for the requested tasks in {args.run_dir}/teachers.json")
    env_backends = load_backend_choices(args.fidelity) if args.fidelity else {}
    root = os.path.join(args.run_dir, "datasets")
    with RunLock(args.run_dir):  # one process writes a run directory at a time
        _collect_all(args, tasks, usable, root, env_backends)
    return 0


def _collect_all(args: argparse.Namespace, tasks: list[str], usable: dict, root: str, backends: dict) -> None:
    from cpd_fast.data import collect_dataset
    from cpd_fast.teachers.base import make_teacher

    # every teacher loads before any collection: a missing or mismatched checkpoint fails in seconds
    teachers = {
        t: make_teacher(usable[t].source, t, usable[t].path)
        if args.source == "gate"
        else make_teacher("scripted", t)
        for t in tasks
    }
    for task, teacher in teachers.items():
        t0 = time.perf_counter()
        ds = collect_dataset(
            teacher,
            task,
            root,
            episodes=args.episodes,
            num_envs=args.num_envs,
            noise_std=args.noise_std,
            backend=backends.get(task, "envpool"),
            seed=args.seed,
            max_episode_steps=args.max_episode_steps,
            overwrite=args.overwrite,
        )
        print(f"{task:<30} -> {ds} ({time.perf_counter() - t0:.1f} s)")


def _cli_eval(args: argparse.Namespace) -> int:
    from cpd_fast.errors import UserError
    from cpd_fast.teachers.base import make_teacher
    from cpd_fast.teachers.gate import evaluate_teacher

    if args.source == "checkpoint" and not args.checkpoint:
        raise UserError("--checkpoint PATH is required (or use --source scripted)")
    teacher = make_teacher(args.source, args.task, args.checkpoint)
    t0 = time.perf_counter()
    result = evaluate_teacher(teacher, args.task, num_goals=args.goals, num_envs=args.num_envs)
    out = {"task": args.task, "source": args.source, "checkpoint": args.checkpoint, **result}
    out["wall_time_s"] = round(time.perf_counter() - t0, 1)
    out.pop("successes")
    print(json.dumps(out))
    return 0
