"""Report: figures and the markdown results table from fake runs (two seeds of one method)."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from cpd_fast.cli.report import add_cli
from cpd_fast.metrics import RunResult, bootstrap_ci, compute_metrics
from cpd_fast.report import write_report
from cpd_fast.tasks import stages

TASKS = [t for stage in stages("mt10", 5) for t in stage]  # 2 stages x 5 tasks
STAGE = [0] * 5 + [1] * 5
TEACHER = [1.0, 0.9, 1.0, 0.0, 0.8, 1.0, 1.0, 0.6, 1.0, 1.0]


def fake_R(seed: int) -> np.ndarray:
    R = np.full((2, 10), math.nan)
    R[0, :5] = [0.9, 0.8, 1.0, 0.0, 0.7]
    R[1] = [0.8 - 0.1 * seed, 0.8, 0.9, 0.0, 0.7, 1.0, 0.9, 0.5, 0.8 + 0.1 * seed, 1.0]
    return R


def write_runs(tmp_path, cpu=(None, None)):
    paths = []
    for seed in (0, 1):
        run_dir = tmp_path / f"run{seed}"
        RunResult(
            suite="mt10", method="cpd", seed=seed, tasks=TASKS, task_stage=STAGE,
            success_matrix=fake_R(seed).tolist(), teacher_success=TEACHER, wall_time_s=600.0 * (seed + 1),
            extra={"cpu_time_s": cpu[seed]},
        ).save(run_dir / "results.json")  # fmt: skip
        paths.append(run_dir)
    return paths


def test_write_report_from_two_seeds(tmp_path):
    out = tmp_path / "report"
    paths = write_report(write_runs(tmp_path), out)
    names = sorted(p.name for p in paths)
    assert names == sorted([
        "mt10_cpd_success_matrix.png", "mt10_teacher_vs_student.png", "mt10_forgetting.png",
        "mt10_stage_curve.png",
        "results.md", "summary.json",
    ])  # fmt: skip
    for p in paths:
        assert p.exists() and p.parent == out
        if p.suffix == ".png":
            assert p.stat().st_size > 10_000
            with Image.open(p) as im:
                im.verify()
            with Image.open(p) as im:
                assert im.format == "PNG" and im.size[0] > 500 and im.size[1] > 250
    md = (out / "results.md").read_text()
    m = [compute_metrics(fake_R(s), TEACHER, STAGE) for s in (0, 1)]
    acc_mean, acc_lo, acc_hi = bootstrap_ci([x.acc for x in m])
    rel_mean = np.mean([x.relative_performance for x in m])
    bwt_mean = np.mean([x.bwt for x in m])
    assert "| method | seeds | relative performance (%) | ACC (%)" in md
    row = next(line for line in md.splitlines() if line.startswith("| cpd |"))
    assert f"{100 * acc_mean:.1f} [{100 * acc_lo:.1f}, {100 * acc_hi:.1f}]" in row
    assert f"{100 * rel_mean:.1f} [" in row and f"{100 * bwt_mean:.1f} [" in row
    assert "| 2 |" in row and "15.0 [10.0, 20.0]" in row  # wall time 10 and 20 min
    assert row.endswith("| – |")  # no CPU time recorded


@pytest.mark.parametrize("cpu", [(1200.0, 2400.0), (1200.0, None)])
def test_cpu_time_column(tmp_path, cpu):
    write_report(write_runs(tmp_path, cpu), tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| cpd |"))
    # both seeds recorded it: mean and CI; one did not: unknown, not the other seed's figure as a mean of 2
    assert row.endswith("| 30.0 [20.0, 40.0] |" if cpu[1] else "| – |")
    # hand check of ACC: seed 0 final row mean = 7.4 / 10; seed 1 the same (−0.1 and +0.1 cancel)
    assert f"{100 * 0.74:.1f} [" in row


def test_single_seed_has_no_ci_and_cli_registers(tmp_path):
    import argparse

    run = write_runs(tmp_path)[0]
    parser = argparse.ArgumentParser(prog="cpd")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(run)])
    assert args.func(args) == 0
    md = (run / "report" / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| cpd |"))
    assert "[" not in row and "| 1 |" in row
    from cpd_fast.cli import main  # a missing run: one line on stderr, exit status 2

    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2


def test_missing_results_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_report([tmp_path], tmp_path / "out")
    with pytest.raises(ValueError, match="at least one"):
        write_report([], tmp_path / "out")


def test_first_stages_sets_a_long_run_beside_prefix_runs(tmp_path):
    nan = float("nan")
    run = RunResult(
        suite="mt25", method="cpd", seed=0, tasks=["a", "b", "c"], task_stage=[0, 1, 2],
        success_matrix=[[1.0, nan, nan], [0.5, 1.0, nan], [0.2, 0.8, 1.0]], teacher_success=[1.0] * 3,
        wall_time_s=60.0, extra={"success_matrix_modes": {"prototype": [[0.9, None, None]] * 3}},
    )  # fmt: skip
    two = run.first_stages(2)
    assert (two.suite, two.tasks, two.task_stage) == ("mt25[:2]", ["a", "b"], [0, 1])
    np.testing.assert_array_equal(two.R, [[1.0, nan], [0.5, 1.0]])
    assert two.metrics().mean_forgetting == pytest.approx(0.5)
    assert two.extra["success_matrix_modes"]["prototype"] == [[0.9, None], [0.9, None]]
    assert run.first_stages(3) is run
    run.save(tmp_path / "r.json")
    written = write_report([tmp_path / "r.json"], tmp_path / "rep", stages=2)
    md = (tmp_path / "rep" / "results.md").read_text()
    assert "## mt25[:2]" in md and "| cpd [task id] |" in md and len(written) >= 4


@pytest.mark.parametrize(
    ("routing", "method", "label"),
    [
        ("task", "cpd", "oracle task id (isolation)"),
        ("gate", "cpd", "task id"),
        ("task", "finetune", "task id"),
    ],
)
def test_task_id_rows_of_isolating_configurations_are_labelled_oracle(tmp_path, routing, method, label):
    """Task-routed cpd (frozen shared layers) cannot change an old task given its id: its task-id row is an
    oracle's, labelled so; the label is derived from the saved config when the run did not record it."""
    config = {"method": method, "freeze_shared": True, "student": {"expert_routing": routing}}
    R = fake_R(0).tolist()
    for recorded in (True, False):
        extra = {"eval_mode": "inferred", "success_matrix_modes": {"prototype": R}, "config": config}
        if recorded:
            extra["isolates_tasks"] = routing == "task" and method == "cpd"
        run = tmp_path / f"{recorded}" / "run"
        RunResult(
            suite="mt10", method=method, seed=0, tasks=TASKS, task_stage=STAGE, success_matrix=R,
            teacher_success=TEACHER, wall_time_s=1.0, extra=extra,
        ).save(run / "results.json")  # fmt: skip
        write_report([run], tmp_path / f"{recorded}" / "out")
        md = (tmp_path / f"{recorded}" / "out" / "results.md").read_text()
        assert f"| {method} [{label}] |" in md


def test_seen_success_curve_is_the_mean_over_tasks_seen_so_far_with_a_ci_over_seeds(tmp_path):
    paths, per_seed = [], []
    for seed in (0, 1, 2):
        R = fake_R(0)
        R[1, 5:] -= 0.1 * seed  # the second stage's tasks: lower in later seeds
        per_seed.append([np.mean(R[0, :5]), np.mean(R[1])])
        RunResult(
            suite="mt10", method="cpd", seed=seed, tasks=TASKS, task_stage=STAGE, success_matrix=R.tolist(),
            teacher_success=TEACHER, wall_time_s=1.0,
        ).save(tmp_path / f"r{seed}" / "results.json")  # fmt: skip
        paths.append(tmp_path / f"r{seed}")
    write_report(paths, tmp_path / "out")
    curve = json.loads((tmp_path / "out" / "summary.json").read_text())["mt10"][0]["seen_success_by_stage"]
    np.testing.assert_allclose(curve["mean"], np.mean(per_seed, axis=0))
    assert curve["low"][0] == curve["high"][0] == curve["mean"][0]  # stage 0: the same in every seed
    assert curve["low"][1] < curve["mean"][1] < curve["high"][1]
