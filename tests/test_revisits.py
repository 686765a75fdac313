"""A stream that revisits a task (Continual World's CW20 is CW10 twice): one column per distinct task, no
growth on a revisit, the revisited task trains its own parameters on all its data, the others stay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_distill import TINY, _one_thread, tiny_config  # noqa: F401  (_one_thread: autouse)

from cpd_fast.distill import run_distill
from cpd_fast.distill.methods import PackNetHook
from cpd_fast.distill.run import phase_seed
from cpd_fast.metrics import RunResult, compute_metrics, forward_transfer, stage_of_tasks, summarize
from cpd_fast.report import write_report
from cpd_fast.student import Student, StudentConfig
from cpd_fast.tasks import CW10, CW20, resolve_tasks, stages

STREAM = ["reach-v3", "drawer-close-v3", "reach-v3"]  # reach, then drawer-close, then reach again


def test_cw20_is_cw10_twice_and_stages_may_revisit_but_not_repeat_within_one():
    assert CW20 == CW10 + CW10
    assert resolve_tasks("cw20") == list(CW10)  # what teachers and datasets are made for
    assert resolve_tasks("cw20", repeats=True) == list(CW20)
    assert [s[0] for s in stages("cw20", 1)] == list(CW20)
    assert stages(STREAM, 1) == [[t] for t in STREAM]
    with pytest.raises(ValueError, match="duplicate tasks"):
        resolve_tasks(STREAM)
    with pytest.raises(ValueError, match="stage 0 holds reach-v3 twice"):
        stages(["reach-v3", "reach-v3"], 2)
    assert stage_of_tasks(stages(STREAM, 1)) == {"reach-v3": 2, "drawer-close-v3": 1}  # its last training


def test_metrics_of_a_revisit_count_forgetting_from_the_last_training():
    R = np.array([[0.9, np.nan], [0.2, 0.8], [1.0, 0.6]])  # reach forgotten at stage 1, relearned at 2
    m = compute_metrics(R, [1.0, 1.0], [2, 1])
    assert m.forgetting[0] != m.forgetting[0]  # NaN: reach's last training is the last stage
    assert m.forgetting[1] == pytest.approx(0.2) and m.bwt == pytest.approx(-0.2)


def _run(tmp_path, **kw):
    cfg = tiny_config(tasks=STREAM, tasks_per_stage=1, steps_per_stage=20, **kw)
    return run_distill(cfg, tmp_path / "run"), tmp_path / "run"


def test_a_revisit_trains_its_own_expert_and_keeps_the_others_bit_for_bit(tmp_path):
    routed = StudentConfig(**TINY, expert_routing="task", adapter_rank=4)
    result, run_dir = _run(tmp_path, student=routed)
    assert result.tasks == ["reach-v3", "drawer-close-v3"] and result.task_stage == [2, 1]
    assert result.extra["stages"] == [[t] for t in STREAM]
    R = np.array(result.R)
    assert R.shape == (3, 2) and np.isnan(R[0, 1]) and not np.isnan(R[1:]).any()
    assert result.extra["num_experts"] == 3  # the top-k minimum's spare, reach's, drawer-close's: no growth
    before = torch.load(run_dir / "checkpoints" / "stage1-train.pt", weights_only=True)["student"]
    after = torch.load(run_dir / "checkpoints" / "stage2-train.pt", weights_only=True)["student"]
    reach, drawer = 1, 2  # the experts each task owns (Student.experts_of_task)
    for key in ("moe.w1", "moe.w2", "moe.b1", "moe.b2"):
        torch.testing.assert_close(after[key][drawer], before[key][drawer], rtol=0, atol=0)
        assert not torch.equal(after[key][reach], before[key][reach]), key
    adapters = [k for k in after if k.startswith("adapters.")]  # adapters.<layer>.<proj>.<A|B>.<task>
    assert adapters
    for key in (k for k in adapters if k.endswith(".1")):  # drawer-close's stay as they were
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    assert any(not torch.equal(after[k], before[k]) for k in adapters if k.endswith(".0"))  # reach's train
    assert RunResult.load(run_dir).task_stage == [2, 1]


def test_packnet_evaluates_a_task_with_the_network_of_its_latest_training_so_far(tmp_path, monkeypatch):
    used: list[int] = []
    original = PackNetHook.stage_student

    def spy(self, student, stage):
        used.append(stage)
        return original(self, student, stage)

    monkeypatch.setattr(PackNetHook, "stage_student", spy)
    result, _ = _run(tmp_path, method="packnet", eval_modes=["prototype"])
    # after stage 0: reach with stage 0's; after 1: reach with 0's, drawer-close with 1's; after 2: reach
    # with 2's (its revisit), drawer-close with 1's. Before the fix, stage 1 asked for reach's stage 2.
    assert sorted(used) == [0, 0, 1, 1, 2]
    assert np.array(result.R).shape == (3, 2)


# ----------------------------------------------------------------------------- forward transfer


def _result(method, R, seed=0, mode="inferred", **extra):
    tasks = ["reach-v3", "drawer-close-v3"]
    return RunResult(
        suite="s", method=method, seed=seed, tasks=tasks, task_stage=[0, 1], success_matrix=R,
        teacher_success=[1.0, 1.0], wall_time_s=1.0, extra={"eval_mode": mode, **extra},
    )  # fmt: skip


def test_forward_transfer_against_the_scratch_reference_and_its_report_column(tmp_path):
    nan = float("nan")
    run = _result("cpd", [[0.8, nan], [0.7, 0.9]])
    ref = _result("scratch", [[0.6, nan], [nan, 0.5]], reference="scratch")
    np.testing.assert_allclose(forward_transfer(run.R, run.introduced, ref.R, ref.introduced), [0.2, 0.4])
    s = summarize([run], reference=[ref])
    assert s["forward_transfer"]["mean"] == pytest.approx(0.3)
    assert "forward_transfer" not in summarize([run])  # no reference, no column
    # seeds: each run against the reference of its own seed
    run1, ref1 = (
        _result("cpd", [[0.8, nan], [0.7, 0.7]], seed=1),
        _result("scratch", [[0.8, nan], [nan, 0.7]], seed=1, reference="scratch"),
    )
    s = summarize([run, run1], reference=[ref, ref1])
    assert s["forward_transfer"]["values"] == pytest.approx([0.3, 0.0])

    paths = []
    for i, r in enumerate((run, ref)):
        paths.append(tmp_path / f"r{i}.json")
        r.save(paths[-1])
    write_report(paths, tmp_path / "report")
    table = (tmp_path / "report" / "results.md").read_text()
    assert "| forward transfer (%) |" in table and "| cpd | 1 |" in table
    assert "| scratch |" not in table  # the reference is no row of its own
    assert "30.0" in table.split("| cpd | 1 |")[1].splitlines()[0]


def test_scratch_starts_every_stage_afresh_and_evaluates_only_its_stage(tmp_path):
    cfg = tiny_config(tasks=["reach-v3", "drawer-close-v3"], tasks_per_stage=1, steps_per_stage=10,
                      method="scratch")  # fmt: skip
    result = run_distill(cfg, tmp_path / "run")
    R = np.array(result.R)
    assert result.extra["reference"] == "scratch" and R.shape == (2, 2)
    assert not np.isnan(R[0, 0]) and not np.isnan(R[1, 1]) and np.isnan(R[0, 1]) and np.isnan(R[1, 0])
    stage0 = torch.load(tmp_path / "run" / "checkpoints" / "stage0-train.pt", weights_only=True)["student"]
    torch.manual_seed(phase_seed(cfg.seed, 1, "init"))
    fresh = Student(cfg.student, num_tasks=2).state_dict()
    stage1 = torch.load(tmp_path / "run" / "checkpoints" / "stage1-train.pt", weights_only=True)["student"]
    # stage 1 trained from the fresh initialisation, not from stage 0's weights: its encoder's first
    # weights moved less from the fresh ones than from stage 0's
    key = next(k for k in stage1 if k.endswith("weight") and stage1[k].dim() == 2)
    assert (stage1[key] - fresh[key]).norm() < (stage1[key] - stage0[key]).norm()
