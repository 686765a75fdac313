"""``cpd teachers train | export | collect | eval``: per-task teachers outside a ``cpd run``.

Bad input raises (ValueError, FileNotFoundError, ...); :func:`cpd_fast.cli.main` reports it as one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from cpd_fast.cli.checks import (
    fraction,
    give_up_rule,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    seed,
)
from cpd_fast.cli.flags import choice_keys
from cpd_fast.config import from_mapping, parse_set
from cpd_fast.data import collect_dataset, dataset_summary, record_dataset
from cpd_fast.errors import UserError
from cpd_fast.fidelity import collection_backends
from cpd_fast.runio import RunLock, file_sha256, read_json, write_json_atomic
from cpd_fast.tasks import SUITES, resolve_tasks
from cpd_fast.teachers.base import make_teacher
from cpd_fast.teachers.demos import DemoConfig
from cpd_fast.teachers.gate import (
    DEFAULT_THRESHOLD,
    ON_FAIL,
    TeacherSpec,
    evaluate_teacher,
    teacher_specs,
    usable_teachers,
)
from cpd_fast.teachers.jobs import BACKENDS
from cpd_fast.teachers.ppo import RECIPES, PPOConfig, recipe_config
from cpd_fast.teachers.provide import train_teachers
from cpd_fast.teachers.zoo import (
    DEFAULT_ZOO,
    FRESH_GOAL_SEEDS,
    add_teacher,
    check_goal_seeds,
    measure_fresh_goals,
    zoo_dir,
    zoo_records,
    zoo_teacher,
)

__all__ = ["add_cli"]


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cpd teachers {train,export,collect,eval}`` on the top-level ``cpd`` subparsers."""
    teachers = subparsers.add_parser("teachers", help="train, evaluate and roll out per-task teachers")
    sub = teachers.add_subparsers(dest="teachers_command", metavar="TEACHERS_COMMAND", required=True)
    _add_train(sub)
    _add_export(sub)
    _add_collect(sub)
    _add_eval(sub)


def _add_train(sub: argparse._SubParsersAction) -> None:
    """``cpd teachers train``: PPO teachers for a suite, then the gate."""
    train = sub.add_parser(
        "train",
        help="train one PPO teacher per task (local process pool or Ray), then gate them",
        description="Trains one PPO teacher per task into RUN_DIR/teachers/<task>/, evaluates each with "
        "Meta-World's official 50-goal protocol and writes RUN_DIR/teachers.json. Re-running resumes.",
    )
    _add_task_args(train)
    train.add_argument("--run-dir", required=True, help="run directory (created)")
    train.add_argument("--backend", choices=BACKENDS, default="local")
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
    train.add_argument("--algorithm", choices=("ppo", "ppo+demos"), default="ppo",
                       help="plain PPO, or PPO started from the scripted expert (behaviour cloning, critic "
                       "warm-up, a decaying cloning term: cpd_fast.teachers.demos)")  # fmt: skip
    train.add_argument("--ppo", action="append", default=[], metavar="KEY=VALUE",
                       help="a PPOConfig field on top of the recipe, e.g. --ppo learning_rate=1e-4 "
                       "--ppo target_kl=0.02 --ppo backend=gymnasium (the simulator of every task "
                       f"trained); keys with fixed choices: {choice_keys(PPOConfig)}")  # fmt: skip
    train.add_argument("--demo", action="append", default=[], metavar="KEY=VALUE",
                       help="a DemoConfig field for ppo+demos (and --on-fail demos), e.g. "
                       "--demo bc_coef=0.5")  # fmt: skip
    train.add_argument("--eval-every", type=positive_int, default=None, metavar="STEPS",
                       help="measure each teacher officially every STEPS env steps (a learning curve in "
                       "curve.json) and stop it once it reaches --stop-at")  # fmt: skip
    train.add_argument(
        "--stop-at",
        type=fraction,
        default=None,
        help="official success that ends a teacher's training early (needs --eval-every)",
    )
    train.add_argument(
        "--give-up", type=give_up_rule, default=None, metavar="STEPS:SUCCESS",
        help="end a teacher's first attempt at the first measurement at or after STEPS env steps still below "
        "SUCCESS (e.g. 500000:0.05), so that --on-fail's remedy starts sooner (needs --eval-every)",
    )  # fmt: skip
    train.add_argument("--progress", action="store_true", help="show a progress bar per teacher")
    train.set_defaults(func=_cli_train)


def _add_export(sub: argparse._SubParsersAction) -> None:
    """``cpd teachers export``: a trained teacher into a teacher zoo."""
    export = sub.add_parser(
        "export",
        help="add a trained teacher to a teacher zoo (actor-only file + measured record)",
        description="Exports a PPO checkpoint as ZOO/<task>.pt (actor and observation normaliser, no critic "
        "or optimizer), measures it with the official protocol and records it in ZOO/teachers.json with its "
        "provenance (from the run's curve.json / eval.json when given).",
    )
    export.add_argument("--zoo", required=True, help="zoo directory (created), e.g. ZOO or cpd_fast/zoo/NAME")
    export.add_argument("--task", required=True)
    export.add_argument("--checkpoint", required=True, help="checkpoint.pt or policy.pt of the teacher")
    export.add_argument(
        "--record",
        default=None,
        help="the training's curve.json or eval.json (algorithm, env steps, wall time), or the run's "
        "teachers.json (that, and the attempts before the exported one)",
    )
    export.add_argument(  # not dest "command": that is the top-level parser's sub-command
        "--command", dest="retrain_command", default=None, help="the command that re-trains this teacher"
    )
    export.add_argument("--threshold", type=fraction, default=0.9, help="the zoo's bar (official success)")
    export.add_argument("--goals", type=positive_int, default=50)
    export.add_argument("--num-envs", type=positive_int, default=10)
    export.set_defaults(func=_cli_export)


def _add_collect(sub: argparse._SubParsersAction) -> None:
    """``cpd teachers collect``: Minari datasets from the gated teachers."""
    collect = sub.add_parser(
        "collect",
        help="roll out the gated teachers and store Minari datasets",
        description="Rolls out each usable teacher from RUN_DIR/teachers.json (or a teacher zoo, or the "
        "scripted experts) and writes one Minari dataset per task under RUN_DIR/datasets (observations, "
        "executed actions, teacher action means, rewards, successes; minari.load_dataset with "
        "MINARI_DATASETS_PATH=RUN_DIR/datasets). --manifest records each dataset's size and content digest "
        "in a file to commit, and verifies a regenerated dataset against it.",
    )
    _add_task_args(collect, default_suite=None)
    collect.add_argument("--run-dir", required=True)
    collect.add_argument(
        "--source",
        choices=("gate", "scripted"),
        default="gate",
        help="teachers from teachers.json (default) or the scripted experts",
    )
    collect.add_argument(
        "--zoo", nargs="?", const=DEFAULT_ZOO, default=None, metavar="ZOO",
        help=f"the teachers of a zoo (name or directory; default {DEFAULT_ZOO}) instead of teachers.json",
    )  # fmt: skip
    collect.add_argument(
        "--manifest", default=None, metavar="FILE",
        help="datasets manifest (JSON): adds each task's episodes, steps, bytes and content sha256, or "
        "verifies a dataset made the same way against its entry",
    )  # fmt: skip
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


def _add_eval(sub: argparse._SubParsersAction) -> None:
    """``cpd teachers eval``: official success of one teacher or a whole zoo."""
    ev = sub.add_parser("eval", help="official 50-goal success of one teacher, or of a whole teacher zoo")
    ev.add_argument("--task", default=None, help="the task (with --zoo: only this one)")
    ev.add_argument("--checkpoint", default=None, help="policy.pt; omit with --source scripted")
    ev.add_argument("--source", choices=("checkpoint", "scripted"), default="checkpoint")
    ev.add_argument("--zoo", default=None, help="re-measure a zoo's teachers (name or directory)")
    ev.add_argument("--out", default=None, help="with --zoo: write the measurements as JSON")
    ev.add_argument("--goals", type=positive_int, default=50)
    ev.add_argument("--num-envs", type=positive_int, default=10)
    ev.add_argument(
        "--goal-seeds", type=int, nargs="+", default=None, metavar="SEED",
        help="with --zoo: measure on these MT1 goal sets (50 goals each) instead of the official one "
        f"(seed 0), e.g. {' '.join(map(str, FRESH_GOAL_SEEDS))}: goals no teacher was selected on",
    )  # fmt: skip
    ev.add_argument(
        "--record", action="store_true",
        help="with --zoo --goal-seeds: store the result in the zoo's teachers.json (fresh_goals)",
    )  # fmt: skip
    ev.set_defaults(func=_cli_eval)


def _add_task_args(p: argparse.ArgumentParser, default_suite: str | None = "mt25") -> None:
    p.add_argument("--suite", default=default_suite,
                   help=f"task suite, one of: {', '.join(SUITES)} (or one -v3 task's name)")  # fmt: skip
    p.add_argument("--tasks", nargs="+", default=None, help="explicit -v3 task names (override --suite)")


def _cli_train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tasks = resolve_tasks(args.tasks or args.suite)
    overrides = {"num_envs": args.num_envs, "num_steps": args.num_steps}
    ppo = parse_set(args.ppo)
    clash = sorted({"total_steps", "seed", *(k for k, v in overrides.items() if v is not None)} & set(ppo))
    if clash:
        raise UserError(
            f"set {', '.join(clash)} with its own flag (--{clash[0].replace('_', '-')}), not --ppo"
        )
    cfg = recipe_config(
        args.recipe,
        total_steps=args.total_steps,
        seed=args.seed,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    if ppo:  # unknown keys and bad values: one line naming them
        cfg = from_mapping(PPOConfig, {**cfg.to_dict(), **ppo}, "--ppo")
    for flag, value in (("--stop-at", args.stop_at), ("--give-up", args.give_up)):
        if value is not None and args.eval_every is None:
            raise UserError(f"{flag} needs --eval-every STEPS (how often to measure)")
    if args.demo and args.algorithm != "ppo+demos" and args.on_fail != "demos":
        raise UserError(
            "--demo settings are only read by --algorithm ppo+demos or --on-fail demos; drop them"
        )
    demos = from_mapping(DemoConfig, parse_set(args.demo), "--demo")
    # without a fidelity report, the known envpool mismatches (dial-turn-v3 -> gymnasium) still apply
    env_backends = collection_backends(args.fidelity)
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
        algorithm=args.algorithm,
        demos=demos,
        eval_every=args.eval_every,
        stop_at=args.stop_at,
        give_up=args.give_up,
    )
    print(f"{'task':<30} {'algorithm':<10} {'env steps':>10} {'success':>7}  status")
    for task, rec in records.items():
        rate = "-" if rec.success_rate is None else f"{rec.success_rate:.2f}"
        steps = "-" if rec.env_steps is None else f"{rec.env_steps:,}"
        print(f"{task:<30} {rec.algorithm or rec.source:<10} {steps:>10} {rate:>7}  {rec.status}"
              f"{'' if rec.used else ' (unused)'}")  # fmt: skip
    print(f"wrote {os.path.join(args.run_dir, 'teachers.json')} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _cli_collect(args: argparse.Namespace) -> int:
    if args.zoo is not None and args.source != "gate":
        raise UserError("--zoo collects from the zoo's teachers; drop --source")
    if args.zoo is not None:
        _, records = zoo_records(args.zoo)
        tasks = resolve_tasks(args.tasks or args.suite) if (args.tasks or args.suite) else list(records)
        specs = teacher_specs(f"zoo:{args.zoo}", tasks)  # a task the zoo lacks: one line naming the command
    elif args.source == "gate":
        usable = usable_teachers(args.run_dir)
        tasks = resolve_tasks(args.tasks or args.suite) if (args.tasks or args.suite) else list(usable)
        missing = [t for t in tasks if t not in usable]
        if missing:
            print(f"skipping tasks without a usable teacher (see teachers.json): {', '.join(missing)}")
        tasks = [t for t in tasks if t in usable]
        specs = {t: TeacherSpec(usable[t].source, usable[t].path) for t in tasks}
    else:
        tasks = resolve_tasks(args.tasks or args.suite or "mt25")
        specs = {t: TeacherSpec("scripted", None) for t in tasks}
    if not tasks:
        raise UserError(f"no usable teacher for the requested tasks in {args.run_dir}/teachers.json")
    collection_backends(args.fidelity)  # a missing or malformed report fails before the run is locked
    root = os.path.join(args.run_dir, "datasets")
    with RunLock(args.run_dir):  # one process writes a run directory at a time
        _collect_all(args, specs, root)
    return 0


def _teacher_sha256(spec: TeacherSpec, task: str) -> str | None:
    """The sha256 of the file ``spec``'s teacher of ``task`` acts from (None: a scripted expert)."""
    if spec.source == "zoo":
        _, records = zoo_records(spec.path)
        return file_sha256(os.path.join(zoo_dir(spec.path), records[task].path))
    return file_sha256(spec.path) if spec.path else None


def _collect_all(args: argparse.Namespace, specs: dict[str, TeacherSpec], root: str) -> None:
    # every teacher loads before any collection: a missing or mismatched checkpoint fails in seconds
    teachers = {t: spec.make(t) for t, spec in specs.items()}
    backends = collection_backends(args.fidelity, teachers)  # a trained teacher: the simulator it trained in
    for task, teacher in teachers.items():
        t0 = time.perf_counter()
        backend = backends.get(task, "envpool")
        ds = collect_dataset(
            teacher, task, root, episodes=args.episodes, num_envs=args.num_envs, noise_std=args.noise_std,
            backend=backend, seed=args.seed, max_episode_steps=args.max_episode_steps,
            overwrite=args.overwrite, teacher_name=specs[task].name(task),
        )  # fmt: skip
        line = f"{task:<30} -> {ds} ({time.perf_counter() - t0:.1f} s)"
        if args.manifest:
            made_by = {
                "teacher": specs[task].name(task), "teacher_sha256": _teacher_sha256(specs[task], task),
                "episodes": args.episodes, "noise_std": args.noise_std, "seed": args.seed,
                "max_episode_steps": args.max_episode_steps, "backend": backend,
            }  # fmt: skip
            summary = dataset_summary(root, task)
            try:
                verdict = record_dataset(args.manifest, task, made_by, summary)
            except ValueError as err:
                raise UserError(str(err)) from None
            line += (f": {summary['episodes']} episodes, {summary['steps']} steps, "
                     f"{summary['bytes'] / 2**20:.1f} MiB, {verdict} in {args.manifest}")  # fmt: skip
        print(line, flush=True)


def _earlier_attempts(run: dict, task: str, checkpoint: str, where: str) -> list[dict]:
    """The attempts of ``task`` in a `cpd teachers train` run's teachers.json before the one at ``checkpoint``
    (e.g. plain PPO below the gate before PPO from demonstrations): their cost belongs to the teacher's."""
    if task not in run["teachers"]:
        raise UserError(f"{where} has no record of {task}")
    tail = os.path.join(*os.path.normpath(os.path.abspath(checkpoint)).split(os.sep)[-2:])
    history = run["teachers"][task].get("history", [])
    earlier = [h for h in history if not os.path.normpath(h["path"]).endswith(tail)]
    if len(earlier) == len(history):
        raise UserError(f"{where} has no attempt of {task} at {tail}: export with that run's own record")
    keys = ("algorithm", "total_steps", "success_rate", "wall_time_s", "gave_up_at")
    return [{k: h[k] for k in keys if k in h} for h in earlier]


def _cli_export(args: argparse.Namespace) -> int:
    prov: dict = {"threshold": args.threshold}
    if args.record:
        where = args.record
        rec = read_json(where)
        if "teachers" in rec:  # the training run's teachers.json: the exported attempt and the ones before it
            prov["earlier_attempts"] = _earlier_attempts(rec, args.task, args.checkpoint, where)
            where = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval.json")
            rec = read_json(where)
        if "points" in rec:  # curve.json (cpd_fast.teachers.curve or bench/ppo_recipes.py)
            last = rec["points"][-1]
            prov.update(algorithm=rec.get("algorithm", "ppo"), env_steps=last["env_steps"],
                        wall_time_s=round(sum(p["wall_s"] for p in rec["points"]), 1),
                        curve=[[p["env_steps"], p["success"]] for p in rec["points"]],
                        seed=rec.get("config", {}).get("seed"), recipe=rec.get("recipe"))  # fmt: skip
        else:  # eval.json of `cpd teachers train`, with its curve.json when trained in measured chunks
            prov.update(algorithm=rec.get("algorithm", "ppo"),
                        env_steps=int(rec["total_steps"]) + int(rec.get("extra_env_steps") or 0),
                        wall_time_s=rec.get("wall_time_s"),
                        scripted_success=rec.get("scripted_success"))  # fmt: skip
            curve = read_json(os.path.join(os.path.dirname(where), "curve.json"), None)
            if curve is not None:
                prov.update(curve=[[p["env_steps"], p["success"]] for p in curve["points"]],
                            seed=curve.get("config", {}).get("seed"))  # fmt: skip
    if args.retrain_command:
        prov["command"] = args.retrain_command
    t0 = time.perf_counter()
    r = add_teacher(args.zoo, args.task, args.checkpoint, provenance=prov, eval_goals=args.goals,
                    eval_envs=args.num_envs)  # fmt: skip
    print(f"{args.task}: {r.algorithm}, {r.env_steps} env steps, official success {r.success_rate:.2f} "
          f"({r.status}) -> {os.path.join(args.zoo, r.path)} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return 0


def _eval_fresh_goals(args: argparse.Namespace) -> int:
    """``--zoo Z --goal-seeds ...``: each teacher on goal sets other than the one it was selected on."""
    path, records = zoo_records(args.zoo)
    tasks = [args.task] if args.task else [t for t, r in records.items() if r.used]
    for t in tasks:
        zoo_teacher(t, args.zoo)  # every file loads before anything runs
    seeds = tuple(args.goal_seeds)
    heads = " ".join(f"{'seed ' + str(s):>7}" for s in seeds)
    print(f"{'task':<30} {'official':>8} {heads} {'mean':>6}")
    out = {}
    for t in tasks:
        fresh = measure_fresh_goals(args.zoo, t, seeds, eval_goals=args.goals, eval_envs=args.num_envs,
                                    record=args.record)  # fmt: skip
        out[t] = {"official": records[t].success_rate, **fresh}
        rates = " ".join(f"{r:>7.2f}" for r in fresh["success_rates"])
        print(f"{t:<30} {records[t].success_rate:>8.2f} {rates} {fresh['success_rate']:>6.2f}", flush=True)
    if args.out:
        write_json_atomic(args.out, {"zoo": path, "goal_seeds": list(seeds), "teachers": out})
    print(f"{len(tasks)} teachers of {path}" + (" (recorded as fresh_goals)" if args.record else ""))
    return 0


def _eval_zoo(args: argparse.Namespace) -> int:
    if args.goal_seeds:
        return _eval_fresh_goals(args)
    path, records = zoo_records(args.zoo)
    tasks = [args.task] if args.task else [t for t, r in records.items() if r.used]
    teachers = {t: zoo_teacher(t, args.zoo) for t in tasks}  # every file loads before anything runs
    out, differ = {}, []
    print(f"{'task':<30} {'algorithm':<10} {'recorded':>8} {'measured':>8}")
    for t, teacher in teachers.items():
        m = evaluate_teacher(teacher, t, num_goals=args.goals, num_envs=args.num_envs)
        rec = records[t]
        out[t] = {"recorded": rec.success_rate, "measured": m["success_rate"], "protocol": m["protocol"]}
        differ += [t] if m["success_rate"] != rec.success_rate else []
        print(f"{t:<30} {rec.algorithm or '-':<10} {rec.success_rate:>8.2f} {m['success_rate']:>8.2f}")
    if args.out:
        write_json_atomic(args.out, {"zoo": path, "goals": args.goals, "teachers": out})
    print(
        f"{len(tasks)} teachers of {path}; measured differs from recorded for: {', '.join(differ) or 'none'}"
    )
    return 0


def _cli_eval(args: argparse.Namespace) -> int:
    if (args.goal_seeds or args.record) and not args.zoo:
        raise UserError("--goal-seeds / --record measure a zoo's teachers: add --zoo NAME")
    if args.record and not args.goal_seeds:
        seeds = " ".join(map(str, FRESH_GOAL_SEEDS))
        raise UserError(f"--record stores fresh-goal results: add --goal-seeds, e.g. {seeds}")
    if args.goal_seeds:
        check_goal_seeds(args.goal_seeds, args.record)
    if args.zoo:
        if args.checkpoint or args.source != "checkpoint":
            raise UserError("--zoo measures the zoo's own teachers; drop --checkpoint / --source")
        return _eval_zoo(args)
    if not args.task:
        raise UserError("--task is required (or --zoo NAME to measure a whole zoo)")
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
