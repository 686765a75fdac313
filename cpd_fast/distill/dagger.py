"""Teacher-in-the-loop data (DAgger): the student acts, the teacher labels every state it visits.

Offline distillation only sees the teachers' own state distribution; once the student drifts off it,
nothing has told it what to do (Ross, Gordon & Bagnell, AISTATS 2011; Czarnecki et al. 2019,
"Distilling Policy Distillation", compare teacher- and student-driven distillation). With
``dagger_rounds = R > 0`` a stage's first phase is trained in ``R + 1`` equal chunks; before chunk
``r = 1..R`` every new task of the stage gets ``dagger_episodes`` episodes in which each env step executes
the teacher's action with probability ``dagger_beta ** r`` and the current student's otherwise (the
student acts as it is evaluated: task embedding inferred from its history). Every visited state is stored
with the teacher's action mean as its target, as a Minari dataset under ``RUN/dagger`` (namespace
``dagger-s{stage}-r{round}``, described as student-driven) with a manifest, and appended to the task's
training pool — so later chunks, and the stage's replay selection, draw from it too.

Resume: the phase saves its training state at each round boundary (:class:`Rounds`), before collecting, and
a finished round's datasets are reused; a resumed run appends every finished round's data in the order
the uninterrupted run did, so replay indices stay valid.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from cpd_fast import ddp
from cpd_fast.data import collect_dataset, load_teacher_data
from cpd_fast.distill.windows import TaskSampler, full_pool
from cpd_fast.runio import load_torch_checked, read_json, save_torch_atomic, write_json_atomic
from cpd_fast.student import HistoryBuffer

__all__ = ["Rounds", "StudentActor", "round_boundaries"]


def round_boundaries(steps: int, rounds: int) -> list[int]:
    """The step at which each round's data is collected: ``R`` boundaries splitting ``steps`` evenly."""
    return [round(steps * r / (rounds + 1)) for r in range(1, rounds + 1)]


class StudentActor:
    """``collect_dataset``'s actor: the teacher's action with probability ``beta`` per env step, else the
    student's (one observation history per env, restarted at each episode's first observation)."""

    def __init__(self, student: Any, num_envs: int, beta: float, seed: int) -> None:
        self.student, self.beta = student, float(beta)
        self.history = HistoryBuffer.for_student(student, num_envs)
        self.rng = np.random.default_rng(seed)
        self.steps = self.teacher_steps = 0

    @torch.no_grad()
    def __call__(self, obs: np.ndarray, fresh: np.ndarray, mean: np.ndarray) -> np.ndarray:
        act = self.student.act(torch.as_tensor(obs, dtype=torch.float32), self.history,
                               torch.as_tensor(fresh)).cpu().numpy()  # fmt: skip
        teacher = self.rng.random(len(obs)) < self.beta
        self.steps += len(obs)
        self.teacher_steps += int(teacher.sum())
        return np.where(teacher[:, None], mean, act)


class Rounds:
    """The DAgger rounds of one phase: where they fall, their data, and the phase's state at each boundary.

    ``begin(r)`` (called by :func:`~cpd_fast.distill.train.train_phase` at ``boundaries[r - 1]``) collects
    round ``r`` for every task (rank 0; skipped when its dataset is complete), appends it to ``data`` and
    returns the new sampler; ``save``/``resume`` keep the training state of the last boundary reached.
    """

    def __init__(self, run: Any, s: int, phase: str, steps: int, new_ids: list[int], pools: dict) -> None:
        self.run, self.s, self.phase, self.new_ids, self.pools = run, s, phase, new_ids, dict(pools)
        self.boundaries = round_boundaries(steps, run.cfg.dagger_rounds)
        self.root = run.path("dagger")

    # -- data
    def namespace(self, r: int) -> str:
        return f"dagger-s{self.s}-r{r}"

    def manifest(self, r: int, task: str) -> str:
        return os.path.join(self.root, f"{self.namespace(r)}-{task}.json")

    def collect(self, r: int) -> None:
        """Round ``r``'s student-driven datasets (rank 0), each recorded by a manifest once complete."""
        run, cfg = self.run, self.run.cfg
        beta = cfg.dagger_beta**r
        for t in self.new_ids:
            task = run.tasks[t]
            if os.path.isfile(self.manifest(r, task)):
                continue
            seed = (cfg.seed * 1_000_003 + self.s * 10_007 + r * 101 + t) % (2**31)
            actor = StudentActor(run.student, min(cfg.collect_envs, cfg.dagger_episodes), beta, seed)
            was = run.student.training
            collect_dataset(
                run.specs[task].make(task), task, self.root, episodes=cfg.dagger_episodes,
                num_envs=cfg.collect_envs, noise_std=0.0, backend=run.backends.get(task, "envpool"),
                seed=seed, max_episode_steps=cfg.max_episode_steps, namespace=self.namespace(r),
                teacher_name=run.specs[task].name(task), overwrite=True, actor=actor,
                description=f"student-driven Meta-World {task} episodes relabelled by the teacher (DAgger, "
                f"stage {self.s}, round {r}, teacher action with probability {beta:g})",
            )  # fmt: skip
            run.student.train(was)
            write_json_atomic(self.manifest(r, task), {
                "task": task, "stage": self.s, "round": r, "beta": beta, "episodes": cfg.dagger_episodes,
                "env_steps": actor.steps, "teacher_steps": actor.teacher_steps, "seed": seed,
            })  # fmt: skip

    def append(self, r: int) -> None:
        """Append round ``r``'s datasets to the run's windows and the phase's pools (every rank)."""
        run = self.run
        for t in self.new_ids:
            raw = load_teacher_data([f"{self.namespace(r)}/{run.tasks[t]}-v0"], self.root)
            run.data.append(raw, t)
            self.pools[t] = full_pool(run.data, t)

    def begin(self, r: int) -> Any:
        if self.run.main:
            self.collect(r)
        ddp.barrier(self.run.dist)
        self.append(r)
        return TaskSampler(self.pools)

    # -- the phase's state at a boundary
    def state_path(self) -> str:
        return self.run.path("checkpoints", f"stage{self.s}-{self.phase}-round.pt")

    def save(self, r: int, state: dict) -> None:
        """The training state reached at boundary ``r`` (before its data is collected)."""
        if self.run.main:
            save_torch_atomic({"round": r, **state}, self.state_path())

    def resume(self) -> tuple[int, dict] | None:
        """``(round, state)`` of the last boundary reached by an interrupted phase; its earlier rounds'
        data is appended again (same order as the first time)."""
        if not os.path.isfile(self.state_path()):
            return None
        redo = f"delete it and re-run: the phase restarts (the datasets under {self.root} are reused)"
        state = load_torch_checked(self.state_path(), redo, map_location=self.run.cfg.device)
        r = int(state.pop("round"))
        for done in range(1, r):
            self.append(done)
        return r, state

    def replay_finished(self) -> None:
        """A phase finished earlier (skipped on resume): append all its rounds' data, as it was."""
        for r in range(1, len(self.boundaries) + 1):
            self.append(r)

    def report(self) -> list[dict]:
        return [read_json(self.manifest(r, self.run.tasks[t]), {}) for r in range(1, len(self.boundaries) + 1)
                for t in self.new_ids]  # fmt: skip
