"""Continual distillation (cpd_fast.distill): phase masking, growth, a tiny run end to end, resume, errors."""

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cpd_fast.distill import (
    DistillConfig,
    TaskSampler,
    WindowData,
    configure_phase,
    lr_factor,
    phases_of,
    run_distill,
    train_phase,
)
from cpd_fast.distill.windows import full_pool
from cpd_fast.errors import UserError
from cpd_fast.packnet import PackNet
from cpd_fast.student import Student, StudentConfig
from cpd_fast.teachers.gate import teacher_specs

TINY = dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, expert_hidden=32, task_encoder_hidden=32,
            task_embed_dim=16, history=4)  # fmt: skip
TASKS = ["reach-v3", "drawer-close-v3", "button-press-topdown-v3", "window-open-v3"]  # 2 stages x 2


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on busy cores run much faster single-threaded
    yield
    torch.set_num_threads(n)


def tiny_config(**kw) -> DistillConfig:
    base = dict(
        tasks=TASKS, tasks_per_stage=2, method="cpd", episodes_per_task=2, collect_envs=2,
        max_episode_steps=100, steps_per_stage=40, batch_size=32, lr=3e-3, eval_goals=2, eval_envs=2,
        eval_max_steps=100, fisher_batches=4, fisher_batch_size=8, progress=False, tensorboard=False,
        threads=1, eval_workers=0, student=StudentConfig(**TINY),
    )  # fmt: skip
    base.update(kw)
    return DistillConfig(**base)


def synthetic_data(n_tasks=2, episodes=3, T=30, seed=0) -> WindowData:
    g = torch.Generator().manual_seed(seed)
    M = n_tasks * episodes * T
    raw = SimpleNamespace(
        obs=torch.randn(M, 39, generator=g),
        action_mean=torch.rand(M, 4, generator=g) * 2 - 1,
        task_id=torch.arange(n_tasks).repeat_interleave(episodes * T),
        step=torch.arange(T).repeat(n_tasks * episodes),
        episode=torch.arange(n_tasks * episodes).repeat_interleave(T),
        tasks=[f"t{i}" for i in range(n_tasks)],
    )
    return WindowData(raw, TINY["history"])


def _pools(data, tasks):
    return {t: full_pool(data, t) for t in tasks}


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ----------------------------------------------------------------------------- masking and growth


def test_growth_one_expert_per_task_with_cold_gate():
    s = Student(StudentConfig(**TINY), num_tasks=2)
    assert s.num_experts == 2
    for k in range(3):
        new = s.add_task()
        assert new == [2 + k] and s.num_experts == 3 + k and s.num_tasks == 3 + k
        assert float(s.moe.gate.bias.detach()[new[0]]) == -5.0
        assert float(s.moe.gate.weight.detach()[new[0]].abs().sum()) == 0.0
    s2 = Student(tiny_config(gate_bias=-2.0).student, num_tasks=2)
    new = s2.add_task()
    assert float(s2.moe.gate.bias.detach()[new[0]]) == -2.0


def test_phase_masking_is_bit_exact():
    data = synthetic_data()
    # gate bias 0: the new expert competes for the top-k slots at once, so it really receives gradient
    # (with -5 and E=3, top-2 it is never routed in 5 steps: nothing would show that it is trainable)
    cfg = tiny_config(steps_per_stage=20, gate_bias=0.0)
    torch.manual_seed(0)
    s = Student(cfg.student, num_tasks=1)
    new = s.add_task()
    old = [e for e in range(s.num_experts) if e not in new]
    gen = torch.Generator().manual_seed(0)
    sampler = TaskSampler(_pools(data, [0, 1]))

    configure_phase(s, cfg, 1, "phase1", new)
    before = _snapshot(s)
    train_phase(s, data, sampler, 5, cfg, gen)
    after = _snapshot(s)
    prefixes = ("obs_proj", "pos_emb", "task_proj", "blocks", "moe_norm", "head")
    shared = {n for n, _ in s.named_parameters() if n.startswith(prefixes)}
    assert shared and all(torch.equal(before[n], after[n]) for n in shared)
    for name in ("moe.w1", "moe.w2", "moe.b1", "moe.b2"):
        assert torch.equal(before[name][old], after[name][old]), name
        assert not torch.equal(before[name][new], after[name][new]), name
    assert not torch.equal(before["moe.gate.weight"], after["moe.gate.weight"])
    assert not torch.equal(before["task_encoder.step.0.weight"], after["task_encoder.step.0.weight"])

    configure_phase(s, cfg, 1, "phase2", new)
    before = _snapshot(s)
    train_phase(s, data, sampler, 5, cfg, gen)
    after = _snapshot(s)
    assert all(torch.equal(before[n], after[n]) for n in shared)
    assert torch.equal(before["moe.gate.weight"], after["moe.gate.weight"])
    assert torch.equal(before["moe.gate.bias"], after["moe.gate.bias"])
    assert not torch.equal(before["moe.w1"][old], after["moe.w1"][old])

    # ablation: no shared freeze -> shared layers move in a later stage
    configure_phase(s, tiny_config(freeze_shared=False), 1, "phase1", new)
    before = _snapshot(s)
    train_phase(s, data, sampler, 3, cfg, gen)
    assert not torch.equal(before["blocks.0.qkv.weight"], s.blocks[0].qkv.weight)


def test_phases_per_method():
    assert [p for p, _ in phases_of(tiny_config(), 0)] == ["train"]
    assert phases_of(tiny_config(), 1) == [("phase1", 20), ("phase2", 20)]
    assert phases_of(tiny_config(phase2=False), 1) == [("train", 40)]
    assert phases_of(tiny_config(method="finetune", budget=0.5), 1) == [("train", 20)]
    assert phases_of(tiny_config(method="joint"), 0) == [("train", 80)]  # the sum over the 2 stages


def test_label_names_every_ablation_so_reports_never_pool_them():
    assert DistillConfig().label == "cpd"
    # other data, another history: never pooled with the default's
    assert tiny_config().label == "cpd (2 episodes/task, history 4)"
    assert DistillConfig(noise_std=0.2, episodes_per_task=40).label == "cpd (40 episodes/task, 0.2 noise std)"
    assert DistillConfig(freeze_shared=False, phase2=False).label == "cpd (no shared freeze, no phase 2)"
    uniform5 = DistillConfig(replay_selection="uniform", replay_fraction=0.05)
    assert uniform5.label == "cpd (uniform replay, replay 5%)"
    assert DistillConfig(method="replay").label == "replay"  # uniform is replay's own default
    assert DistillConfig(method="finetune", freeze_shared=False).label == "finetune"  # flag unused there
    # what collected the data and how much history the student sees: never pooled either
    grouped = DistillConfig(behaviours={"reach-v3": "pick-place-v3", "pick-place-wall-v3": "pick-place-v3"})
    assert grouped.label == "cpd (behaviours reach→pick-place, pick-place-wall→pick-place)"
    assert DistillConfig(student={"history": 16}).label == "cpd (history 16)"
    for bad, why in [({"reach-v3": "reach-v3"}, "another task"), ({"reach-v9": "push-v3"}, "reach-v9"),
                     ({"reach-v3": "push-v3", "push-v3": "door-open-v3"}, "another task")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            DistillConfig(behaviours=bad)
    with pytest.raises(ValueError, match="not among"):
        DistillConfig(
            tasks=["reach-v3", "push-v3"], tasks_per_stage=1, behaviours={"door-open-v3": "push-v3"}
        )


def test_lr_schedule_warms_up_then_decays_per_phase():
    cfg = tiny_config(warmup_steps=10, lr_min_ratio=0.1)
    f = [lr_factor(cfg, it, 200) for it in range(200)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert all(a >= b for a, b in itertools.pairwise(f[9:]))  # then non-increasing
    assert f[-1] == pytest.approx(0.1, abs=1e-3)  # ends at lr_min_ratio
    assert lr_factor(tiny_config(lr_schedule="constant"), 5, 200) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        tiny_config(lr_schedule="step")


def test_windows_pad_at_history_start():
    data = synthetic_data()
    idx = torch.tensor([0, 2, 10])
    obs, target, mask = data.windows(idx, data.ep_start[idx])
    H = TINY["history"]
    assert obs.shape == (3, H, 39) and target.shape == (3, H, 4)
    assert mask[0].tolist() == [False] * (H - 1) + [True] and mask[2].all()
    assert torch.equal(obs[1, 0], data.obs[0]) and torch.equal(obs[1, -1], data.obs[2])


def test_config_errors():
    with pytest.raises(ValueError, match="unknown method"):
        tiny_config(method="pack-net")
    with pytest.raises(ValueError, match="no task-free evaluation"):
        tiny_config(method="packnet")  # the default eval_modes include the task-free one
    with pytest.raises(ValueError, match="budget"):
        tiny_config(budget=0)
    with pytest.raises(ValueError, match="unknown Meta-World"):
        run_distill(tiny_config(tasks=["reach-v9", "push-v3"]), "/nonexistent/never")
    with pytest.raises(FileNotFoundError, match=r"teachers\.json"):
        teacher_specs("/nonexistent/dir", TASKS)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    # a module fixture runs outside the per-test _one_thread fixture: set and restore the count itself
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("distill") / "cpd"
        cfg = tiny_config()
        result = run_distill(cfg, run_dir)
        yield cfg, run_dir, result
    finally:
        torch.set_num_threads(n)


def test_tiny_run_end_to_end(tiny_run, tmp_path):
    from cpd_fast.data import collect_dataset, load_teacher_data
    from cpd_fast.metrics import RunResult
    from cpd_fast.report import write_report
    from cpd_fast.teachers.scripted import ScriptedExpert

    cfg, run_dir, _ = tiny_run
    on_disk = RunResult.load(run_dir)
    assert on_disk.extra["complete"] and on_disk.tasks == TASKS and on_disk.task_stage == [0, 0, 1, 1]
    R = np.array(on_disk.R)
    assert R.shape == (2, 4) and np.isnan(R[0, 2:]).all() and not np.isnan(R[1]).any()
    assert on_disk.extra["num_experts"] == 4  # one expert per task
    replay = on_disk.extra["replay"]["per_task"]
    assert all(v["fraction"] <= cfg.replay_fraction for v in replay.values())
    assert set(json.load(open(run_dir / "progress.json"))["steps"]) >= {"stage1/phase2", "stage1/eval"}
    with open(run_dir / "config.json") as f:
        assert DistillConfig.from_dict(json.load(f)).method == "cpd"
    # both evaluation modes: the main matrix (inferred embedding) and the task-id (prototype) one
    assert on_disk.extra["eval_mode"] == "inferred"
    R_proto = np.array(on_disk.extra["success_matrix_modes"]["prototype"], dtype=float)
    assert R_proto.shape == R.shape and not np.isnan(R_proto[1]).any()
    assert set(on_disk.extra["time_s"]) == {"data", "train", "replay", "eval"}
    assert on_disk.extra["time_s"]["train"] > 0 and on_disk.extra["time_s"]["eval"] > 0
    # CPU time per clock key, this process's (the tiny run evaluates in it), summed in cpu_time_s
    timing = json.load(open(run_dir / "timing.json"))
    assert set(timing["cpu"]) == set(timing["clock"]) and timing["cpu"]["train"] > 0
    assert on_disk.extra["cpu_time_s"] == pytest.approx(sum(timing["cpu"].values()), abs=0.1)
    # each stage's cost: its phases' steps and step time, the student's size, the peak memory so far
    stats = on_disk.extra["stage_stats"]
    assert stats == timing["stages"] and set(stats) == {"0", "1"}
    assert set(stats["0"]["phases"]) == {"train"} and set(stats["1"]["phases"]) == {"phase1", "phase2"}
    for s, st in stats.items():
        assert (
            st["experts"] == 2 * (int(s) + 1)
            and st["params"] >= st["phases"][max(st["phases"])]["trainable_params"]
        )
        for ph in st["phases"].values():
            assert ph["steps"] > 0 and ph["ms_per_step"] == pytest.approx(
                1000 * ph["train_s"] / ph["steps"], abs=5 / ph["steps"] + 0.01
            )  # train_s is rounded to 10 ms
        assert st["clock_s"]["train"] >= sum(ph["train_s"] for ph in st["phases"].values()) - 0.05
        assert st["clock_s"]["eval"] > 0 and st["peak_rss_mib"] > 50
    # after stage 0 the shared layers are frozen: each phase trains a part of the student
    assert all(0 < ph["trainable_params"] < stats["1"]["params"] for ph in stats["1"]["phases"].values())
    assert stats["0"]["phases"]["train"]["trainable_params"] == stats["0"]["params"]
    assert sum(st["clock_s"]["train"] for st in stats.values()) == pytest.approx(
        timing["clock"]["train"], abs=0.1
    )
    written = write_report([run_dir], tmp_path / "report")
    assert (tmp_path / "report" / "results.md").is_file() and len(written) >= 4
    text = (tmp_path / "report" / "results.md").read_text()
    assert "| cpd (2 episodes/task, history 4) [task id] |" in text

    # the trained student imitates the teacher on held-out episodes far better than an untrained one
    collect_dataset(ScriptedExpert("reach-v3"), "reach-v3", tmp_path / "ho", episodes=1, num_envs=1,
                    seed=123, max_episode_steps=100)  # fmt: skip
    held = WindowData(load_teacher_data(["reach-v3"], tmp_path / "ho"), TINY["history"])
    idx = torch.arange(len(held.obs))
    obs, target, mask = held.windows(idx, held.ep_start[idx])
    state = torch.load(run_dir / "checkpoints" / "stage1-phase2.pt", weights_only=True)["student"]
    trained = Student.from_state_dict(state).eval()
    torch.manual_seed(0)
    untrained = Student(cfg.student, num_tasks=2).eval()
    with torch.no_grad():
        mse = [
            float(((m(obs, mask=mask) - target[:, -1].clamp(-1, 1)) ** 2).mean())
            for m in (trained, untrained)
        ]
    assert mse[0] < 0.5 * mse[1], mse


def run_killed_after(cfg: DistillConfig, run_dir, path) -> int:
    """``run_distill(cfg, run_dir)`` in a subprocess that SIGKILLs itself right after writing ``path`` (the
    package's fault-injection point, :mod:`cpd_fast.runio`); returns its exit status."""
    env = {**os.environ, "CPD_TEST_KILL_AFTER": str(path), "CPD_TEST_KILL_SCOPE": "process"}
    code = (
        "import json, sys; from cpd_fast.distill import DistillConfig, run_distill; "
        "run_distill(DistillConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2])"
    )
    return subprocess.run(
        [sys.executable, "-c", code, json.dumps(cfg.to_dict()), str(run_dir)], env=env
    ).returncode


def test_resume_after_kill_reproduces_the_run(tiny_run, tmp_path):
    cfg, run_dir, result = tiny_run
    killed = tmp_path / "killed"
    # SIGKILL right after stage 1's Phase-2 checkpoint is written, before the ledger records the phase:
    # the resumed run restores Phase 1 from its checkpoint and trains Phase 2 again
    assert run_killed_after(cfg, killed, killed / "checkpoints" / "stage1-phase2.pt") == -signal.SIGKILL
    done = json.load(open(killed / "progress.json"))["steps"]
    assert "stage0/eval" in done and "stage1/phase1" in done and "stage1/phase2" not in done
    assert (killed / "checkpoints" / "stage1-phase2.pt").is_file()
    resumed = run_distill(cfg, killed)
    assert resumed.success_matrix == result.success_matrix or np.array_equal(
        np.array(resumed.success_matrix), np.array(result.success_matrix), equal_nan=True
    )
    a = torch.load(run_dir / "checkpoints" / "stage1-phase2.pt", weights_only=True)["student"]
    b = torch.load(killed / "checkpoints" / "stage1-phase2.pt", weights_only=True)["student"]
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    # stage 0's cost is the killed run's; stage 1's Phase 1 was restored from the killed run's checkpoint
    stats = resumed.extra["stage_stats"]
    assert set(stats["0"]["phases"]) == {"train"} and "restored_phases" not in stats["0"]
    assert set(stats["1"]["phases"]) == {"phase2"} and stats["1"]["restored_phases"] == ["phase1"]
    # a re-run of a finished run does nothing new
    before = os.path.getmtime(killed / "checkpoints" / "stage1-phase2.pt")
    again = run_distill(cfg, killed)
    assert os.path.getmtime(killed / "checkpoints" / "stage1-phase2.pt") == before
    assert again.extra["stage_stats"] == stats  # a finished stage's record is kept as it was
    with pytest.raises(ValueError, match="different config"):
        run_distill(tiny_config(lr=1e-2), killed)


@pytest.mark.parametrize("method", ["online-ewc", "joint", "replay"])
def test_baselines_run(tiny_run, tmp_path, method):
    _, run_dir, _ = tiny_run
    out = tmp_path / method
    # share the collected teacher data (same collection settings) so the test only pays for training;
    # its manifests make the run skip collection: the datasets' files stay untouched
    data_dir = run_dir / "datasets"
    stamp = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()}
    cfg = tiny_config(method=method, steps_per_stage=10, data_dir=str(data_dir), eval_modes=("inferred",))
    r = run_distill(cfg, out)
    assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()} == stamp
    assert not (out / "datasets").exists() and r.extra["success_matrix_modes"] == {}
    if method == "replay":  # a finished run re-run with an added eval mode evaluates only that mode
        before = (out / "checkpoints" / "stage1-train.pt").stat().st_mtime_ns
        r2 = run_distill(dataclasses.replace(cfg, eval_modes=("inferred", "prototype")), out)
        assert (out / "checkpoints" / "stage1-train.pt").stat().st_mtime_ns == before  # no retraining
        np.testing.assert_array_equal(np.array(r2.R), np.array(r.R))
        assert not np.isnan(np.array(r2.extra["success_matrix_modes"]["prototype"], dtype=float)[1]).any()
    R = np.array(r.R)
    assert R.shape == ((1, 4) if method == "joint" else (2, 4))
    assert r.extra["num_experts"] == 4  # fixed capacity: one expert per task of the whole suite
    assert (r.extra["replay"]["stored_transitions"] > 0) == (method == "replay")


def test_settings_that_do_not_act_are_recorded_inactive():
    """With task-routed experts the gate is never consulted: its settings are recorded as inactive, and the
    task-id mode is an oracle's (parameter isolation)."""
    routed = tiny_config(student=StudentConfig(**{**TINY, "expert_routing": "task"}))
    assert routed.inactive() == [
        "student.top_k", "student.aux_loss_weight", "gate_bias", "phase2", "phase1_fraction",
        "route_new_experts",
    ]  # fmt: skip
    assert routed.isolates_tasks
    assert tiny_config().inactive() == [] and not tiny_config().isolates_tasks
    assert not tiny_config(freeze_shared=False, student=routed.student).isolates_tasks
    assert tiny_config(method="packnet", eval_modes=("prototype",)).isolates_tasks


def test_packnet_keeps_each_stage_network_bit_for_bit(tiny_run, tmp_path):
    """PackNet in a run: a stage but the last trains, prunes and retrains; at the next stage the earlier
    stage's view (its entries, later ones zeroed) is exactly the network that stage ended with, so its
    tasks (evaluated with the task id) succeed as they did."""
    _, run_dir, _ = tiny_run
    cfg = tiny_config(method="packnet", data_dir=str(run_dir / "datasets"), eval_modes=("prototype",))
    assert phases_of(cfg, 0) == [("train", 30), ("retrain", 10)] and phases_of(cfg, 1) == [("train", 40)]
    r = run_distill(cfg, tmp_path / "pn")
    assert r.method == "packnet (2 episodes/task, history 4)" and r.extra["eval_mode"] == "prototype"
    ckpt = tmp_path / "pn" / "checkpoints"
    end0 = torch.load(ckpt / "stage0-retrain.pt", weights_only=True)
    end1 = torch.load(ckpt / "stage1-train.pt", weights_only=True)
    student = Student.from_state_dict(end1["student"])
    packnet = PackNet(student, num_stages=2)
    packnet.load_state_dict(end1["packnet"])
    view = packnet.view(student, 0)
    names = [n for n, _ in student.named_parameters()]
    assert all(torch.equal(view[n], end0["student"][n]) for n in names)
    assert any(not torch.equal(end1["student"][n], end0["student"][n]) for n in names)  # stage 1 learnt
    R = np.array(r.R)
    np.testing.assert_array_equal(R[1, :2], R[0, :2])  # stage 0's tasks: nothing forgotten


def test_error_weighted_replay_in_a_run(tiny_run, tmp_path):
    """cpd with replay_quality="error": labelled, the stored fraction within budget, and a different kept
    set from the unweighted run on the same data and student."""
    _, run_dir, _ = tiny_run
    cfg = tiny_config(replay_quality="error", data_dir=str(run_dir / "datasets"))
    r = run_distill(cfg, tmp_path / "q")
    assert r.method == "cpd (error-weighted replay, 2 episodes/task, history 4)"
    per_task = r.extra["replay"]["per_task"]
    assert all(v["fraction"] <= cfg.replay_fraction for v in per_task.values())
    a = torch.load(run_dir / "replay" / "stage0.pt", weights_only=True)
    b = torch.load(tmp_path / "q" / "replay" / "stage0.pt", weights_only=True)
    assert a.keys() == b.keys() and any(not torch.equal(a[t]["index"], b[t]["index"]) for t in a)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from cpd_fast.cli import main  # reports user errors as one line on stderr (tests/test_cli_errors.py)

    cases = [
        (["--budget", "0"], "budget"),
        (["--tasks", "reach-v9", "push-v3"], "unknown Meta-World"),
        (["--teachers", str(tmp_path / "none")], "teachers.json"),
    ]
    for extra, msg in cases:
        try:
            code = main(["distill", "--out", str(tmp_path / "run"), *extra])
        except SystemExit as exit_:  # argparse rejects a bad number before the command runs
            code = exit_.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("cpd distill:") and msg in err and "\n" not in err


def test_phase1_trains_newborn_experts_at_gate_bias_minus_5():
    data = synthetic_data()
    sampler = TaskSampler(_pools(data, [0, 1]))
    for route_new, should_train in ((True, True), (False, False)):
        cfg = tiny_config(steps_per_stage=20, route_new_experts=route_new)
        torch.manual_seed(0)
        s = Student(cfg.student, num_tasks=1)
        new = s.add_task()
        configure_phase(s, cfg, 1, "phase1", new)
        before = _snapshot(s)
        train_phase(s, data, sampler, 5, cfg, torch.Generator().manual_seed(0))
        s.moe.always_route([])  # what run_distill does after a phase
        after = _snapshot(s)
        # a -5 expert outside every top-k gets no gradient unless it is routed for every token
        assert torch.equal(before["moe.w1"][new], after["moe.w1"][new]) is not should_train
        assert s.moe.always_routed == []


def _student_and_batch():
    """A fresh two-task TINY student (eval mode) and 30 windows of the synthetic data."""
    data = synthetic_data()
    torch.manual_seed(0)
    student = Student(StudentConfig(**TINY), num_tasks=2).eval()
    idx = torch.arange(10, 40)
    obs, target, mask = data.windows(idx, data.ep_start[idx])
    tid = data.task[idx]
    return student, obs, target, mask, tid


def test_last_position_loss_is_the_last_term_of_the_all_position_loss():
    """loss_positions="last" supervises only the prediction that acts: the same model and batch give the
    all-positions loss's last-position term (its mean squared error over the last position alone)."""
    student, obs, target, mask, tid = _student_and_batch()
    with torch.no_grad():
        last = student.losses(obs, target[:, -1], tid, mask, update_prototypes=False)["mse"]
        pred = student(obs, mask=mask)
    torch.testing.assert_close(last, ((pred - target[:, -1].clamp(-1, 1)) ** 2).mean())
    assert DistillConfig(loss_positions="last").label == "cpd (last-position loss)"
    with pytest.raises(ValueError, match="loss_positions"):
        tiny_config(loss_positions="first")


def test_routing_is_recorded_at_the_newborn_experts_birth_and_after_phase1(tiny_run):
    from cpd_fast.distill.stats import newborn_shares
    from cpd_fast.metrics import RunResult

    run = RunResult.load(tiny_run[1])
    within = run.extra["routing_within_stage"]
    assert list(within) == ["1"] and list(within["1"]) == ["birth", "phase1"]  # phase2 is the stage's end
    assert all(len(v) == 4 for m in within["1"].values() for v in m.values())  # 4 experts, all 4 tasks
    rows = newborn_shares(run)
    assert [(r["stage"], r["moment"]) for r in rows] == [(1, "birth"), (1, "phase1"), (1, "end")]
    assert rows[0]["newborn_experts"] == [2, 3]
    # born with gate bias -5: no token of any task is routed to them before they train
    assert rows[0]["new_tasks"] == 0 and rows[0]["old_tasks"] == 0


def test_newborn_shares_of_a_known_record():
    from cpd_fast.distill.stats import newborn_shares
    from cpd_fast.metrics import RunResult

    end = {
        "0": {"a": [0.5, 0.5], "b": [0.5, 0.5]},
        "1": {"a": [0.5, 0.3, 0.2, 0], "b": [0.5, 0.5, 0, 0], "c": [0, 0, 0.5, 0.5], "d": [0.1, 0.1, 0.8, 0]},
    }
    birth = {"a": [0.5, 0.5, 0, 0], "b": [0.5, 0.5, 0, 0], "c": [0.4, 0.6, 0, 0], "d": [1, 0, 0, 0]}
    run = RunResult(suite="s", method="cpd", seed=0, tasks=list("abcd"), task_stage=[0, 0, 1, 1],
                    success_matrix=[[1, 1, None, None], [1, 1, 1, 1]], teacher_success=[1] * 4,
                    wall_time_s=1.0,
                    extra={"routing": end, "routing_within_stage": {"1": {"birth": birth}}})  # fmt: skip
    rows = newborn_shares(run)
    assert [(r["moment"], r["new_tasks"], r["old_tasks"]) for r in rows] == [
        ("birth", 0.0, 0.0),
        ("end", pytest.approx(0.9), pytest.approx(0.1)),
    ]


def test_stage_growth_of_a_known_record(tiny_run):
    """bench/growth.py's rows: each stage's cost from stage_stats, routing concentration, seen success and
    the forgetting of the tasks introduced before the stage."""
    from cpd_fast.distill.stats import stage_growth
    from cpd_fast.metrics import RunResult

    end = {
        "0": {"a": [1.0, 0.0], "b": [0.5, 0.5]},
        "1": {"a": [1.0, 0, 0, 0], "b": [0.5, 0.5, 0, 0], "c": [0, 0, 1.0, 0], "d": [0, 0, 1.0, 0]},
    }
    stats = {
        "1": {
            "phases": {
                "phase1": {"steps": 10, "train_s": 1.0, "trainable_params": 20},
                "phase2": {"steps": 30, "train_s": 2.0, "trainable_params": 60},
            },
            "clock_s": {"train": 3.1, "eval": 4.0},
            "experts": 4,
            "params": 100,
            "peak_rss_mib": 512.0,
        }
    }
    run = RunResult(suite="s", method="cpd", seed=0, tasks=list("abcd"), task_stage=[0, 0, 1, 1],
                    success_matrix=[[1, 0.5, None, None], [0.5, 0.5, 1, 0]], teacher_success=[1] * 4,
                    wall_time_s=1.0, extra={"routing": end, "stage_stats": stats})  # fmt: skip
    r0, r1 = stage_growth(run)
    assert "ms_per_step" not in r0 and r0["forgetting"] is None and r0["seen_success"] == 0.75
    assert r0["effective_experts"] == pytest.approx((1 + 2) / 2) and r0["experts_used"] == 2
    assert r1["ms_per_step"] == pytest.approx(3000 / 40) and r1["trainable"] == pytest.approx(0.5)
    assert (r1["experts"], r1["train_s"], r1["eval_s"], r1["peak_rss_mib"]) == (4, 3.1, 4.0, 512.0)
    assert r1["experts_used"] == 3 and r1["dead_experts"] == 1  # expert 3 gets no task's routing
    assert r1["seen_success"] == 0.5 and r1["forgetting"] == pytest.approx(0.25)  # a: 1 -> 0.5, b: kept
    # a real run's record: every stage has its cost
    rows = stage_growth(RunResult.load(tiny_run[1]))
    assert [r["experts"] for r in rows] == [2, 4] and all(r["ms_per_step"] > 0 for r in rows)


def test_a_forked_ewc_grid_point_computes_what_a_full_run_does(tmp_path):
    """λ acts from stage 1 on: the λ = 1000 point forked from the λ = 1 run's stage 0 gives the λ = 1000
    run's stage-1 checkpoint and results bit for bit; a field outside `differ` is refused."""
    from cpd_fast.distill.fork import fork_stages
    from cpd_fast.metrics import RunResult

    data = str(tmp_path / "data")
    lam1, lam3 = (tiny_config(method="ewc", ewc_lambda=lam, data_dir=data) for lam in (1.0, 1e3))
    run_distill(lam1, tmp_path / "l1")
    run_distill(lam3, tmp_path / "l3")
    fork_stages(tmp_path / "l1", lam3, tmp_path / "fork", stages=1, differ=["ewc_lambda"])
    assert not (tmp_path / "fork" / "checkpoints" / "stage1-train.pt").exists()
    run_distill(lam3, tmp_path / "fork")
    a, b = (
        torch.load(tmp_path / r / "checkpoints" / "stage1-train.pt", weights_only=True)
        for r in ("l3", "fork")
    )
    assert a["ewc"]["lam"] == b["ewc"]["lam"] == 1e3
    flat = lambda d, p="": [
        x for k, v in d.items() for x in (flat(v, p + k + ".") if isinstance(v, dict) else [(p + k, v)])
    ]
    pairs = list(zip(flat(a["student"]), flat(b["student"]), strict=True))
    assert all(
        ka == kb and (torch.equal(va, vb) if torch.is_tensor(va) else va == vb)
        for (ka, va), (kb, vb) in pairs
    )
    full, forked = RunResult.load(tmp_path / "l3"), RunResult.load(tmp_path / "fork")
    assert forked.success_matrix == full.success_matrix
    assert forked.extra["forked_from"]["differ"] == {"ewc_lambda": [1.0, 1e3]}
    # on two stages online EWC trains what EWC does: the same one term in stage 1's penalty (γ would first
    # act on the next stage's); only the terms consolidated after the last stage differ
    run_distill(
        tiny_config(method="online-ewc", ewc_lambda=1e3, ewc_gamma=0.5, data_dir=data), tmp_path / "o3"
    )
    c = torch.load(tmp_path / "o3" / "checkpoints" / "stage1-train.pt", weights_only=True)
    assert RunResult.load(tmp_path / "o3").success_matrix == full.success_matrix
    pairs = list(zip(flat(a["student"]), flat(c["student"]), strict=True))
    assert all(torch.equal(va, vb) if torch.is_tensor(va) else va == vb for (_, va), (_, vb) in pairs)
    with pytest.raises(UserError, match="ewc_gamma"):
        fork_stages(tmp_path / "l1", tiny_config(method="ewc", ewc_gamma=0.5, data_dir=data), tmp_path / "f2",
                    stages=1, differ=["ewc_lambda"])  # fmt: skip
    with pytest.raises(UserError, match="already holds a run"):
        fork_stages(tmp_path / "l1", lam3, tmp_path / "fork", stages=1, differ=["ewc_lambda"])
    with pytest.raises(UserError, match="not finished"):
        fork_stages(tmp_path / "l1", lam3, tmp_path / "f3", stages=3, differ=["ewc_lambda"])


def test_last_position_run_trains(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    cfg = tiny_config(loss_positions="last", steps_per_stage=10, data_dir=str(run_dir / "datasets"),
                      eval_modes=("inferred",))  # fmt: skip
    r = run_distill(cfg, tmp_path / "last")
    assert r.method == "cpd (2 episodes/task, history 4, last-position loss)" and r.extra["complete"]
    summary = [json.loads(x) for x in open(tmp_path / "last" / "metrics.jsonl") if '"summary"' in x]
    assert summary and all(np.isfinite(e["summary"]["mse"]) for e in summary)


def test_bf16_losses_compare_actions_in_float32():
    """Under bf16 autocast the matmuls run in bfloat16 but the action means reach the loss as float32
    (the targets are never rounded to bf16), and the losses stay close to float32's."""
    student, obs, target, mask, tid = _student_and_batch()
    with torch.no_grad():
        ref = student.losses(obs, target, tid, mask, update_prototypes=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h, _ = student._trunk(obs, mask, None, "all")
            head = student.head(h)
            pred, _ = student.predict(obs, mask, tid, None, True)
            low = student.losses(obs, target, tid, mask, update_prototypes=False)
    assert head.dtype == torch.bfloat16  # the linear maps do compute in bf16
    assert pred.dtype == torch.float32
    assert low["mse"].dtype == torch.float32 and low["mse"] != ref["mse"]
    torch.testing.assert_close(low["mse"], ref["mse"], rtol=0.05, atol=1e-4)
    assert DistillConfig(precision="bf16").label == "cpd (bf16 training)"
    with pytest.raises(ValueError, match="precision"):
        tiny_config(precision="fp16")


def test_bf16_run_trains(tiny_run, tmp_path):
    """A bf16 run trains (finite, falling MSE), keeps float32 parameters and evaluates."""
    _, run_dir, _ = tiny_run
    cfg = tiny_config(precision="bf16", steps_per_stage=30, data_dir=str(run_dir / "datasets"),
                      eval_modes=("inferred",))  # fmt: skip
    r = run_distill(cfg, tmp_path / "bf16")
    assert r.method == "cpd (2 episodes/task, history 4, bf16 training)" and r.extra["complete"]
    lines = [json.loads(x) for x in open(tmp_path / "bf16" / "metrics.jsonl")]
    mse = [e["mse"] for e in lines if "mse" in e]
    assert mse and all(np.isfinite(mse)) and mse[-1] < mse[0]
    ckpt = sorted((tmp_path / "bf16" / "checkpoints").glob("*.pt"))[-1]
    state = torch.load(ckpt, weights_only=True)["student"]
    floats = {v.dtype for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert floats == {torch.float32}
    # the evaluations' env steps are counted: one episode per goal, each 1..eval_max_steps long
    timing = json.loads((tmp_path / "bf16" / "timing.json").read_text())
    episodes = (2 + 4) * cfg.eval_goals  # stage 0 evaluates its 2 tasks, stage 1 all 4
    assert episodes <= timing["eval_env_steps"] <= episodes * cfg.eval_max_steps
    assert r.extra["eval_env_steps"] == timing["eval_env_steps"]


def test_evaluation_in_worker_processes_gives_the_same_run(tiny_run, tmp_path):
    """eval_workers=2 (cpd_fast.evalpool) reproduces the in-process run's success matrices exactly."""
    from cpd_fast.metrics import RunResult

    _, run_dir, _ = tiny_run
    r = run_distill(tiny_config(eval_workers=2, data_dir=str(run_dir / "datasets")), tmp_path / "pool")
    ref = RunResult.load(run_dir)
    assert r.method == ref.method  # a runtime setting: same label, same config otherwise
    np.testing.assert_array_equal(np.array(r.R), np.array(ref.R))
    for mode, M in ref.extra["success_matrix_modes"].items():
        np.testing.assert_array_equal(
            np.array(r.extra["success_matrix_modes"][mode], float), np.array(M, float)
        )
