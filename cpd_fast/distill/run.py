"""One continual-distillation run, stage by stage, in a run directory that survives being killed.

:func:`run_distill` top to bottom (:meth:`DistillRun.run` is the stage loop; each step is a method)::

    resolved config → RUN/config.json (a resumed run must use the same one)
    teachers (scripted or RUN/teachers.json) → dataset per task (Minari, shared via data_dir)
    teacher success per task (measured once, stored with its dataset) → RUN/teacher_success.json
    for stage s in stages:
        grow (growing methods: one expert per new task; a revisited task (cw20) grows none and trains its own)
        for phase of the stage: configure what trains, train → checkpoints/stage{s}-{phase}.pt   (ledger)
        replay selection for the stage's tasks → replay/stage{s}.pt                              (ledger)
        evaluate every task seen so far → eval/stage{s}.json, results.json                        (ledger)
    results.json (RunResult), metrics.jsonl, tb/ (TensorBoard), timing.json

**Resume and determinism.** A step's outputs are written atomically and only then is it recorded in the
ledger ``progress.json`` (:class:`cpd_fast.runio.Ledger`); a re-run skips finished steps and restarts the
first unfinished one from the last checkpoint. Each phase draws from its own generator seeded by
``(seed, stage, phase)`` and builds a fresh optimizer, so a resumed run repeats exactly what an
uninterrupted one does (on the same machine and thread count). The run directory is locked
(:class:`cpd_fast.runio.RunLock`) while a process works in it. Under DDP, rank 0 alone collects, selects
replay, evaluates and writes; the other ranks wait at barriers and read its files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import shutil
import time
from typing import Any

import numpy as np
import torch

from cpd_fast import ddp
from cpd_fast.data import ensure_dataset, load_teacher_data
from cpd_fast.distill.config import RUNTIME_KEYS, DistillConfig, saved_config
from cpd_fast.distill.dagger import Rounds
from cpd_fast.distill.fork import FORK_FILE
from cpd_fast.distill.methods import configure_phase, get_method, make_hook, phases_of
from cpd_fast.distill.stats import peak_memory, replay_report, routing_shares, student_error, student_size
from cpd_fast.distill.train import train_phase
from cpd_fast.distill.windows import TaskSampler, WindowData, full_pool
from cpd_fast.envs import collection_backends
from cpd_fast.errors import UserError
from cpd_fast.evalpool import TMP_PREFIX, EvalJob, EvalPool
from cpd_fast.metrics import RunResult, matrix_to_json
from cpd_fast.provenance import provenance
from cpd_fast.replay import ReplaySet, select_replay
from cpd_fast.runio import (
    Ledger,
    RunLock,
    RunLogger,
    check_same_config,
    config_diff,
    load_torch_checked,
    read_json,
    save_torch_atomic,
    write_json_atomic,
)
from cpd_fast.student import Student
from cpd_fast.teachers.gate import record_success, teacher_specs, trained_teachers

__all__ = ["DistillRun", "collect_task_data", "finished_result", "run_distill"]


log = logging.getLogger(__name__)


def phase_seed(seed: int, stage: int, tag: str) -> int:
    return (seed * 1_000_003 + stage * 10_007 + sum(map(ord, tag)) * 101) % (2**62)


def collect_task_data(cfg: DistillConfig, task: str, root: str, spec: Any, backend: str) -> float:
    """``task``'s teacher dataset under ``root`` (collected unless one with the same settings is there) and
    its teacher's official success on ``cfg.eval_goals`` goals (recorded with it, measured once)."""
    ensure_dataset(
        task, root, lambda: spec.make(task), spec.name(task), episodes=cfg.episodes_per_task,
        noise_std=cfg.noise_std, seed=cfg.seed, max_episode_steps=cfg.max_episode_steps,
        num_envs=cfg.collect_envs, backend=backend, eval_goals=cfg.eval_goals,
    )  # fmt: skip
    manifest = os.path.join(root, f"{task}.collected.json")
    return record_success(manifest, task, spec, eval_goals=cfg.eval_goals, eval_envs=cfg.eval_envs)


def run_distill(cfg: DistillConfig, run_dir: str | os.PathLike, data_parallel: bool | None = None) -> Any:
    """Run (or resume) one continual-distillation run in ``run_dir``; returns its :class:`RunResult`.

    ``data_parallel``: train with DDP over the processes torchrun started (:mod:`cpd_fast.ddp`; default:
    when ``WORLD_SIZE > 1``). Rank 0 alone collects, evaluates and writes; every rank returns the result.
    A finished run asked for again with the same config returns its stored result and writes nothing
    (:func:`finished_result`).
    """
    stored = finished_result(cfg, run_dir)
    if stored is not None:
        return stored
    dist = ddp.setup(cfg.device) if ddp.requested(data_parallel) else None
    try:
        if dist is not None and dist.device.type == "cuda":
            cfg = cfg.replace(device=str(dist.device))  # cuda:LOCAL_RANK
        main = dist is None or dist.is_main
        with RunLock(run_dir) if main else contextlib.nullcontext():
            return DistillRun(cfg, os.fspath(run_dir), dist).run()
    finally:
        ddp.teardown(dist)


def finished_result(cfg: DistillConfig, run_dir: str | os.PathLike) -> RunResult | None:
    """The stored result of ``run_dir`` when it is complete and was made with ``cfg`` (runtime-only keys
    aside, but with the same ``eval_modes``: a run asked for more evaluates them); else None.

    Read only: no lock is taken and no file is touched, so a re-run of a finished run leaves its
    directory byte for byte as it was (its timing is not grown by the re-run's seconds)."""
    saved = read_json(os.path.join(os.fspath(run_dir), "results.json"), None)
    extra = saved.get("extra") if isinstance(saved, dict) else None
    if not isinstance(extra, dict) or extra.get("complete") is not True or "config" not in extra:
        return None
    made, mine = saved_config(extra["config"]), cfg.to_dict()
    if list(made.get("eval_modes", ())) != list(cfg.eval_modes) or config_diff(made, mine, RUNTIME_KEYS):
        return None  # more evaluation to do, or another config: the run itself evaluates or refuses
    return RunResult.from_json(saved)


class DistillRun:
    """The state of one run; :meth:`run` is the stage loop (module docstring)."""

    def __init__(self, cfg: DistillConfig, run_dir: str, dist: ddp.DistContext | None) -> None:
        self.cfg, self.run_dir, self.dist = cfg, run_dir, dist
        self.main = dist is None or dist.is_main  # the only process that writes the run directory
        self.method = get_method(cfg.method)
        # the distinct tasks in order of first appearance (their ids); a stream may revisit a task (cw20)
        self.tasks = list(dict.fromkeys(t for s in cfg.stage_tasks() for t in s))
        self.stages = [self.tasks] if self.method.joint else cfg.stage_tasks()
        self.task_index = {t: i for i, t in enumerate(self.tasks)}
        self.ledger = Ledger(self.path("progress.json"))
        timing = read_json(self.path("timing.json"), {})
        self.prior_time = float(timing.get("wall_time_s", 0.0))
        self.clock = {"data": 0.0, "train": 0.0, "replay": 0.0, "eval": 0.0, **timing.get("clock", {})}
        # CPU seconds per clock key: this process's, plus the evaluation workers' on their jobs (None: a
        # run resumed from a timing.json older than this record, whose earlier CPU time is unknown)
        cpu = timing.get("cpu", {} if not timing else None)
        self.cpu = None if cpu is None else {k: 0.0 for k in self.clock} | cpu
        # env steps the official evaluations took (episodes end at success): the work behind clock["eval"]
        self.eval_env_steps = int(timing.get("eval_env_steps", 0))
        # each stage's cost (str(stage) -> {"phases": {phase: steps, train_s, ms_per_step, trainable params},
        # "clock_s", experts, params, peak memory}), written with timing.json at the stage's end; a phase a
        # killed run trained before the stage ended is restored without one (listed in "restored_phases")
        self.stage_stats: dict[str, dict[str, Any]] = timing.get("stages", {})
        self.t_start = time.perf_counter()
        self.replay: dict[int, Any] = {}
        # expert routing shares (stats.routing_shares) of every seen task: at the end of each stage, and
        # within it at the new experts' birth and after each phase but the last
        self.routing: dict[int, dict[str, list[float]]] = {}
        self.routing_within: dict[int, dict[str, dict[str, list[float]]]] = {}
        self.seen: list[int] = []
        self.dagger: dict[int, list[dict]] = {}  # stage -> DAgger rounds' records
        self.global_step = 0
        # what made this result: this invocation's record (set in run()) and the earlier ones of a
        # resumed run (from its results.json), each once
        self.provenance: dict[str, Any] = {}
        stored = read_json(self.path("results.json"), {}).get("extra", {})
        self.earlier_provenance = [
            p for p in [*stored.get("earlier_provenance", []), stored.get("provenance")] if p
        ]
        self.R_modes = {m: np.full((len(self.stages), len(self.tasks)), np.nan) for m in cfg.eval_modes}

    @contextlib.contextmanager
    def timed(self, key: str) -> Any:
        """Adds the block's wall time to ``clock[key]`` and this process's CPU time to ``cpu[key]``."""
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.clock[key] += time.perf_counter() - t0
        if self.cpu is not None:
            self.cpu[key] += time.process_time() - c0

    def eval_workers(self) -> int:
        """Evaluation worker processes: none on the ranks that do not evaluate, never more than jobs."""
        return (
            min(self.cfg.eval_worker_count(), len(self.tasks) * len(self.cfg.eval_modes)) if self.main else 0
        )

    def path(self, *parts: str) -> str:
        return os.path.join(self.run_dir, *parts)

    # ---- the stage loop
    def run(self) -> Any:
        os.makedirs(self.run_dir, exist_ok=True)
        # this node's processes share its cores (torchrun sets LOCAL_WORLD_SIZE)
        local = 1 if self.dist is None else int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
        threads = self.cfg.thread_count(local)
        if threads:
            torch.set_num_threads(threads)
        self.provenance = provenance(self.cfg.device, self.cfg.precision)
        for stale in glob.glob(self.path(TMP_PREFIX + "*")) if self.main else []:  # a killed run's
            shutil.rmtree(stale, ignore_errors=True)
        self.check_config()
        if self.cfg.precision == "bf16" and self.cfg.device == "cpu" and not native_bf16_cpu():
            log.warning("precision bf16: this CPU has no native bf16 arithmetic (AVX512-BF16/AMX); it is "
                        "emulated and slower than fp32")  # fmt: skip
        self.teacher_success = self.prepare_data()
        self.student = self.build_student()
        self.hook = make_hook(self.cfg, self.student)  # EWC, online EWC, PackNet; None for the others
        # the evaluation envs (and worker processes) live as long as the run: every stage, both modes
        with (
            RunLogger(self.run_dir, self.cfg.tensorboard, enabled=self.main) as self.logger,
            EvalPool(self.eval_workers(), tmp_dir=self.run_dir) as self.evaluator,
        ):
            for s, stage in enumerate(self.stages):
                clock0 = dict(self.clock)
                new_ids = [self.task_index[t] for t in stage]
                if s > 0 and self.method.resets:  # scratch: a fresh student for every stage
                    self.student = self.build_student(phase_seed(self.cfg.seed, s, "init"))
                new_experts = self.grow(s, stage)
                phases = phases_of(self.cfg, s)
                if s > 0 and new_experts:
                    self.record_routing(s, "birth", new_ids)
                for phase, steps in phases:
                    last = phase == phases[-1][0]
                    self.train(s, phase, steps, new_ids, new_experts, last=last, first=phase == phases[0][0])
                    if s > 0 and new_experts and not last:
                        self.record_routing(s, phase, new_ids)
                self.seen += [t for t in new_ids if t not in self.seen]
                self.routing[s] = routing_shares(self.student, self.data, self.seen, self.cfg.device)
                if self.cfg.selection is not None and not self.method.joint:
                    self.select_replay(s, new_ids)
                self.evaluate(s)
                if "clock_s" not in self.stage_stats.get(str(s), {}):  # not a stage an earlier run finished
                    self.stage_stats.setdefault(str(s), {}).update(
                        clock_s={k: round(v - clock0[k], 2) for k, v in self.clock.items()},
                        **student_size(self.student), **peak_memory(self.cfg.device),
                    )  # fmt: skip
                self.record(s)
        return self.result(self.wall(), complete=True)

    # ---- steps
    def record_routing(self, s: int, moment: str, new_ids: list[int]) -> None:
        """Routing shares of the old and the new tasks within stage ``s`` (newborn experts: the cold-start
        gate bias at ``"birth"``, then after each phase). Recomputed on resume: a finished phase loads its
        checkpoint, and the grown student is the previous stage's plus the seeded new experts."""
        shares = routing_shares(self.student, self.data, self.seen + new_ids, self.cfg.device)
        self.routing_within.setdefault(s, {})[moment] = shares

    def check_config(self) -> None:
        """Write the resolved config first; a resumed run must match it (runtime-only keys aside)."""
        path, mine = self.path("config.json"), self.cfg.to_dict()
        if os.path.isfile(path):
            saved = saved_config(read_json(path))
            check_same_config(saved, mine, RUNTIME_KEYS, self.run_dir, "use a new --out")
        elif self.main:
            write_json_atomic(path, self.cfg.to_record())  # the values, and which of them do not act

    def prepare_data(self) -> dict[str, float]:
        """Collect each task's dataset and record its teacher's success; load every transition as windows."""
        cfg = self.cfg
        specs = self.specs = teacher_specs(cfg.teachers, self.tasks)
        for task, acting in cfg.behaviours.items():  # another task's zoo teacher collects this task's data
            if specs[task].source != "zoo":
                raise UserError(f"behaviours.{task}: behaviours act on zoo teachers; {task}'s is "
                                f"{specs[task].source}")  # fmt: skip
            specs[task] = dataclasses.replace(specs[task], acts_as=acting)
        # every trained teacher loads now (DAgger queries them in training), each to collect in its simulator
        backends = self.backends = collection_backends(cfg.fidelity, trained_teachers(specs))
        root = cfg.data_dir or self.path("datasets")
        ts_path = self.path("teacher_success.json")
        success: dict[str, float] = read_json(ts_path, {})
        for task in self.tasks if self.main else []:  # the other ranks read rank 0's files after the barrier
            with self.timed("data"):
                value = collect_task_data(cfg, task, root, specs[task], backends.get(task, "envpool"))
                if task not in success:
                    success[task] = value
                    write_json_atomic(ts_path, success)
        if self.dist is not None:
            ddp.barrier(self.dist)
            success = read_json(ts_path)
        raw = load_teacher_data(self.tasks, root)
        if raw.obs.shape[1] != cfg.student.obs_dim:
            raise ValueError(
                f"teacher data has obs dim {raw.obs.shape[1]}, the student expects {cfg.student.obs_dim}"
            )
        self.data = WindowData(raw, cfg.student.history)
        return success

    def build_student(self, seed: int | None = None) -> Any:
        """The student as it was born (a checkpoint restores growth): growing methods start with the first
        stage's experts, the others with the capacity a growing method reaches at the end. ``seed``: the
        initialisation's (default the run's)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed if seed is None else seed)
        if self.method.grows:
            student = Student(cfg.student, num_tasks=len(self.stages[0]))
        else:
            n = max(len(self.tasks) * cfg.student.experts_per_task, cfg.student.top_k)
            student = Student(cfg.student, num_tasks=len(self.tasks), num_experts=n)
        return student.to(cfg.device)

    def grow(self, s: int, stage: list[str]) -> list[int]:
        """Growing methods: one expert per new task (stage 0's are the ones it was born with); the experts
        the stage trains as its own: the new ones, and a revisited task's own (it grows nothing)."""
        if not self.method.grows:
            return []
        if s == 0:
            return list(range(self.student.num_experts))
        torch.manual_seed(phase_seed(self.cfg.seed, s, "grow"))
        ids = [self.task_index[t] for t in stage]
        revisited = [e for i in ids if i < self.student.num_tasks for e in self.student.experts_of_task(i)]
        new = [e for i in ids if i >= self.student.num_tasks for e in self.student.add_task()]
        self.student.to(self.cfg.device)
        return revisited + new

    def train(
        self,
        s: int,
        phase: str,
        steps: int,
        new_ids: list[int],
        new_experts: list[int],
        last: bool,
        first: bool,
    ) -> None:
        """One phase: restored from its checkpoint when the ledger has it, else trained and checkpointed."""
        cfg, name = self.cfg, f"stage{s}/{phase}"
        ckpt = self.path("checkpoints", f"stage{s}-{phase}.pt")
        base, self.global_step = self.global_step, self.global_step + steps
        # the stage's tasks train on all their data (a revisited task too), the others on their replay
        pools = {t: full_pool(self.data, t) for t in new_ids}
        pools.update({t: (r.index, r.hist_start) for t, r in self.replay.items() if t not in new_ids})
        # DAgger rounds in the phase that first trains the stage's new tasks
        rounds = Rounds(self, s, phase, steps, new_ids, pools) if cfg.dagger and first else None
        if name in self.ledger:
            redo = f"delete {self.run_dir} and re-run: a finished phase is never redone, the run restarts"
            state = load_torch_checked(ckpt, redo, map_location=cfg.device)
            self.student.load_state_dict(state["student"])
            if self.hook is not None:
                self.hook.load_state_dict(state[self.hook.key])
            if rounds is not None:  # its data, appended again in the order the first run appended it
                rounds.replay_finished()
                self.dagger[s] = rounds.report()
            stats = self.stage_stats.setdefault(str(s), {})
            if phase not in stats.get("phases", {}) and "clock_s" not in stats:  # trained by a killed run
                stats.setdefault("restored_phases", []).append(phase)
            return
        before = self.clock["train"]
        with self.timed("train"):
            trainable = self.fit(s, phase, steps, new_ids, new_experts, last, base, pools, rounds)
        took = self.clock["train"] - before  # its steps (DAgger rollouts included), checkpoint
        self.stage_stats.setdefault(str(s), {}).setdefault("phases", {})[phase] = {
            "steps": steps, "train_s": round(took, 2), "ms_per_step": round(1000 * took / steps, 2),
            "trainable_params": trainable,
        }  # fmt: skip

    def fit(
        self, s: int, phase: str, steps: int, new_ids: list[int], new_experts: list[int], last: bool,
        base: int, pools: dict[int, Any], rounds: Rounds | None,
    ) -> int:  # fmt: skip
        """Train one phase from the student as it is, then checkpoint it and mark it in the ledger; returns
        the number of parameters the phase trained."""
        cfg, name = self.cfg, f"stage{s}/{phase}"
        configure_phase(self.student, cfg, s, phase, new_experts, new_ids)
        trainable = student_size(self.student)["trainable_params"]
        if self.hook is not None:
            self.hook.begin_phase(self.student, s, phase)
        gen = torch.Generator().manual_seed(phase_seed(cfg.seed, s, phase))

        def log(it: int, rec: dict) -> None:
            self.logger.log(base + it, rec, prefix="loss/", phase=name)

        summary = train_phase(
            self.student, self.data, TaskSampler(pools), steps, cfg, gen, self.hook,
            log if self.main else None, name, self.dist, rounds,
        )  # fmt: skip
        if rounds is not None:
            self.dagger[s] = rounds.report()
        self.student.moe.always_route([])  # a training aid only: evaluation and routing stats use top-k
        if self.hook is not None:
            self.hook.end_phase(self.student, s, phase)
        if self.hook is not None and last:
            fgen = torch.Generator().manual_seed(phase_seed(cfg.seed, s, "fisher"))
            pools = {t: full_pool(self.data, t) for t in new_ids}
            self.hook.end_of_stage(self.student, self.data, pools, fgen)
        payload = {"student": self.student.state_dict()}
        if self.hook is not None:
            payload[self.hook.key] = self.hook.state_dict()
        if self.main:
            save_torch_atomic(payload, self.path("checkpoints", f"stage{s}-{phase}.pt"))
            self.logger.event({"step": self.global_step, "phase": name, "summary": summary})
            self.ledger.mark(name)
            if rounds is not None and os.path.isfile(rounds.state_path()):
                os.remove(rounds.state_path())  # the phase is done: its mid-phase resume state is not needed
        return trainable

    def select_replay(self, s: int, new_ids: list[int]) -> None:
        """The replay memory of the stage's tasks (rank 0 selects; every rank loads it)."""
        cfg, data, path = self.cfg, self.data, self.path("replay", f"stage{s}.pt")
        if self.main and f"stage{s}/replay" not in self.ledger:
            with self.timed("replay"):
                sets = {}
                for t in new_ids:
                    rows = data.task_rows(t)
                    quality = None
                    if cfg.replay_quality == "error" and cfg.selection == "dpp":
                        quality = student_error(self.student, data, rows, cfg.device)
                    sets[t] = select_replay(
                        data.obs[rows], data.target[rows], data.step[rows], data.episode[rows], rows,
                        fraction=cfg.replay_fraction, segment_len=cfg.segment_len, selection=cfg.selection,
                        seed=phase_seed(cfg.seed, s, f"replay{t}"), quality=quality,
                    )  # fmt: skip
                save_torch_atomic({str(t): r.to_dict() for t, r in sets.items()}, path)
                self.ledger.mark(f"stage{s}/replay")
        ddp.barrier(self.dist)
        loaded = load_torch_checked(path, f"delete {self.run_dir} and re-run: the run restarts")
        self.replay.update({int(t): ReplaySet.from_dict(d) for t, d in loaded.items()})

    def evaluate(self, s: int) -> None:
        """Official-protocol success of every task seen so far, in every evaluation mode. A finished stage
        re-run with more ``eval_modes`` evaluates only the missing ones (the student holds this stage's
        final weights here: skipped phases load their checkpoints)."""
        cfg, path, name = self.cfg, self.path("eval", f"stage{s}.json"), f"stage{s}/eval"
        rows = read_json(path, {}) if name in self.ledger else {}
        missing = [m for m in cfg.eval_modes if m not in rows]
        if self.main and (name not in self.ledger or missing):
            with self.timed("eval"):
                self.student.eval()
                rows.update({m: {} for m in missing})
                # scratch: only the stage's tasks (an old one would measure a network never trained on it)
                tasks = [self.task_index[t] for t in self.stages[s]] if self.method.resets else self.seen
                keys = [(t, m) for t in tasks for m in missing]
                for (t, m), r in zip(keys, self.evaluate_jobs(keys, s), strict=True):
                    rows[m][self.tasks[t]] = r.success_rate
                    self.eval_env_steps += int(r.episode_lengths.sum())
                    if self.cpu is not None:  # worker processes' CPU time (this process's is timed)
                        self.cpu["eval"] += r.meta.get("worker_cpu_s", 0.0)
                    self.logger.scalars(s, {f"success_{m}/{self.tasks[t]}": r.success_rate})
                write_json_atomic(path, rows)
                if name not in self.ledger:
                    self.ledger.mark(name)
        ddp.barrier(self.dist)
        self.rows = read_json(path)
        for m in cfg.eval_modes:
            for t, v in self.rows[m].items():
                self.R_modes[m][s, self.task_index[t]] = v

    def evaluate_jobs(self, keys: list[tuple[int, str]], s: int) -> list[Any]:
        """Official results of ``keys`` ((task id, mode) pairs) after stage ``s``, in order. A method that
        keeps one network per stage (:attr:`MethodHook.stage_networks`: PackNet) evaluates each task with
        the network of the last stage so far that trained it."""
        cfg = self.cfg
        per_stage = self.hook is not None and self.hook.stage_networks
        stage_of = {self.task_index[t]: i for i, st in enumerate(self.stages[: s + 1]) for t in st}
        groups: dict[int, list[int]] = {}
        for i, (t, _) in enumerate(keys):
            groups.setdefault(stage_of[t] if per_stage else 0, []).append(i)
        out: list[Any] = [None] * len(keys)
        for stage, idx in groups.items():
            net = self.hook.stage_student(self.student, stage) if per_stage else self.student
            jobs = [EvalJob(self.tasks[t], None if m == "inferred" else t) for t, m in (keys[i] for i in idx)]
            results = self.evaluator.evaluate(
                net, jobs, num_goals=cfg.eval_goals, num_envs=cfg.eval_envs,
                max_episode_steps=cfg.eval_max_steps,
            )  # fmt: skip
            for i, r in zip(idx, results, strict=True):
                out[i] = r
        return out

    def record(self, s: int) -> None:
        """After each stage: timing, the results so far, and the stage's line in metrics.jsonl."""
        if not self.main:
            return
        wall = self.wall()
        write_json_atomic(
            self.path("timing.json"),
            {"wall_time_s": wall, "clock": self.clock, "eval_env_steps": self.eval_env_steps}
            | {"stages": self.stage_stats}
            | ({} if self.cpu is None else {"cpu": self.cpu}),
        )
        self.result(wall, s == len(self.stages) - 1).save(self.path("results.json"))
        self.logger.event({"stage": s, "success": self.rows, "wall_time_s": wall})

    # ---- results
    def wall(self) -> float:
        return self.prior_time + time.perf_counter() - self.t_start

    def result(self, wall: float, complete: bool) -> Any:
        cfg, main_mode = self.cfg, self.cfg.eval_modes[0]
        stage_of = {t: i for i, st in enumerate(self.stages) for t in st}  # a revisited task: its last
        return RunResult(
            suite=cfg.task_list_name(), method=cfg.label, seed=cfg.seed, tasks=self.tasks,
            task_stage=[stage_of[t] for t in self.tasks], success_matrix=self.R_modes[main_mode].tolist(),
            teacher_success=[self.teacher_success[t] for t in self.tasks], wall_time_s=wall,
            extra={"complete": complete, "eval_mode": main_mode, "stages": self.stages,
                   "reference": "scratch" if self.method.resets else None,
                   "isolates_tasks": cfg.isolates_tasks, "inactive_settings": cfg.inactive(),
                   "success_matrix_modes": {
                       m: matrix_to_json(M) for m, M in self.R_modes.items() if m != main_mode
                   },
                   "time_s": {k: round(v, 1) for k, v in self.clock.items()},
                   "eval_env_steps": self.eval_env_steps,
                   "config": cfg.to_dict(), "replay": replay_report(self.replay, self.data),
                   "num_experts": self.student.num_experts, "budget_steps_per_stage": cfg.stage_steps,
                   "stage_stats": self.stage_stats,
                   "dagger": {str(k): v for k, v in self.dagger.items()},
                   "routing": {str(k): v for k, v in self.routing.items()},
                   "routing_within_stage": {str(k): v for k, v in self.routing_within.items()},
                   "cpu_s": None if self.cpu is None else {k: round(v, 1) for k, v in self.cpu.items()},
                   "cpu_time_s": None if self.cpu is None else round(sum(self.cpu.values()), 1),
                   "forked_from": read_json(self.path(FORK_FILE), None),
                   "provenance": self.provenance,
                   "earlier_provenance": [p for i, p in enumerate(self.earlier_provenance)
                                          if p != self.provenance and p not in self.earlier_provenance[:i]]},
        )  # fmt: skip


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 natively (oneDNN's AVX512-BF16 / AMX kernels)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False
