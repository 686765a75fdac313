"""Continual-learning metrics on hand-made success matrices, the results record and seed summaries."""

import math

import numpy as np
import pytest

from cpd_fast.metrics import (
    RunResult,
    acc,
    bootstrap_ci,
    bwt,
    compute_metrics,
    forgetting,
    relative_performance,
    stage_of_tasks,
    summarize,
)

nan = math.nan

# 3 stages x 2 tasks per stage = 6 tasks; task_stage = [0, 0, 1, 1, 2, 2]
R6 = np.array(
    [
        [0.8, 0.6, nan, nan, nan, nan],
        [0.7, 0.6, 1.0, 0.4, nan, nan],
        [0.5, 0.7, 0.9, 0.4, 0.2, 1.0],
    ]
)
STAGE6 = [0, 0, 1, 1, 2, 2]
TEACHER6 = [1.0, 0.7, 1.0, 0.0, 0.4, 1.0]


def test_acc_is_mean_of_last_row():
    assert acc(R6) == pytest.approx((0.5 + 0.7 + 0.9 + 0.4 + 0.2 + 1.0) / 6)
    assert acc([[0.5, nan]]) == 0.5  # tasks not measured after the last stage are ignored


def test_forgetting_per_task_uses_max_over_earlier_stages():
    f = forgetting(R6, STAGE6)
    # task 0: max(0.8, 0.7) - 0.5; task 1: max(0.6, 0.6) - 0.7 (improved: negative)
    # task 2: 1.0 - 0.9; task 3: 0.4 - 0.4; tasks 4, 5 introduced in the last stage: undefined
    np.testing.assert_allclose(f[:4], [0.3, -0.1, 0.1, 0.0], atol=1e-12)
    assert np.isnan(f[4:]).all()


def test_bwt_uses_the_stage_of_each_task_not_its_index():
    # R[T, j] - R[stage_j, j]: task 0: 0.5-0.8, task 1: 0.7-0.6, task 2: 0.9-1.0, task 3: 0.4-0.4
    assert bwt(R6, STAGE6) == pytest.approx((-0.3 + 0.1 - 0.1 + 0.0) / 4)
    # with R[j, j] (the wrong diagonal) task 1 would use R[1, 1] = 0.6 and task 2 R[2, 2] = 0.9: differs
    assert bwt(R6, STAGE6) != pytest.approx(np.mean([R6[2, j] - R6[j, j] for j in range(2)]))


def test_single_stage_has_no_forgetting_or_bwt():
    R = np.array([[0.5, 1.0]])
    assert np.isnan(forgetting(R, [0, 0])).all()
    assert math.isnan(bwt(R, [0, 0]))
    m = compute_metrics(R, [1.0, 1.0], [0, 0])
    assert m.acc == 0.75 and math.isnan(m.mean_forgetting) and m.relative_performance == 0.75


def test_relative_performance_excludes_teachers_with_zero_success():
    mean, ratios = relative_performance(R6[-1], TEACHER6)
    # task 3's teacher never succeeds: excluded (NaN ratio), not counted as 0 or as 1
    want = [0.5 / 1.0, 0.7 / 0.7, 0.9, 0.2 / 0.4, 1.0]
    assert mean == pytest.approx(np.mean(want))
    assert np.isnan(ratios[3]) and ratios[1] == pytest.approx(1.0)
    assert math.isnan(relative_performance([0.3, 0.1], [0.0, 0.0])[0])
    # a stricter threshold drops weak teachers too
    assert relative_performance([0.2, 0.5], [0.1, 1.0], min_teacher_success=0.2)[0] == pytest.approx(0.5)
    # a student better than its teacher is not capped
    assert relative_performance([0.8], [0.4])[0] == pytest.approx(2.0)


def test_compute_metrics_bundle():
    m = compute_metrics(R6, TEACHER6, STAGE6)
    assert m.acc == pytest.approx(acc(R6))
    assert m.bwt == pytest.approx(-0.075)
    assert m.mean_forgetting == pytest.approx((0.3 - 0.1 + 0.1 + 0.0) / 4)
    assert m.excluded_tasks == [3]
    assert len(m.forgetting) == len(m.relative_per_task) == len(m.final_success) == 6


def test_stage_of_tasks_map_from_stages():
    assert stage_of_tasks([["a", "b"], ["c"]]) == {"a": 0, "b": 0, "c": 1}
    assert stage_of_tasks([["a"], ["b"], ["a"]]) == {"a": 2, "b": 1}  # a revisit: its last training
    with pytest.raises(ValueError, match="stage 0 holds a task twice"):
        stage_of_tasks([["a", "a"]])
    from cpd_fast.tasks import stages

    m = stage_of_tasks(stages("mt25", 5))
    assert m["reach-v3"] == 0 and m["coffee-pull-v3"] == 2 and m["dial-turn-v3"] == 4


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    vals = [0.81, 0.86, 0.9, 0.77, 0.84]
    mean, lo, hi = bootstrap_ci(vals)
    assert mean == pytest.approx(np.mean(vals))
    assert lo <= mean <= hi and lo >= min(vals) and hi <= max(vals) and hi - lo > 0
    assert bootstrap_ci(vals) == (mean, lo, hi)
    lo99, hi99 = bootstrap_ci(vals, level=0.99)[1:]
    assert lo99 <= lo and hi99 >= hi
    assert bootstrap_ci([0.5]) == (0.5, 0.5, 0.5)
    assert bootstrap_ci([0.5, nan]) == (0.5, 0.5, 0.5)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(vals, level=90)


def make_run(seed, R, method="cpd"):
    return RunResult(
        suite="toy", method=method, seed=seed, tasks=[f"t{j}-v3" for j in range(6)], task_stage=STAGE6,
        success_matrix=np.asarray(R).tolist(), teacher_success=TEACHER6, wall_time_s=100.0 + seed,
    )  # fmt: skip


def test_results_json_round_trip_keeps_nans(tmp_path):
    run = make_run(0, R6)
    run.save(tmp_path / "results.json")
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "null" in text  # strict JSON
    back = RunResult.load(tmp_path)  # a run directory works too
    np.testing.assert_array_equal(back.R, run.R)
    np.testing.assert_array_equal(back.metrics().forgetting, run.metrics().forgetting)
    assert back.metrics().acc == run.metrics().acc


def test_summarize_over_seeds():
    R_b = R6.copy()
    R_b[2, 0] = 0.7  # seed 1 forgets task 0 less
    runs = [make_run(0, R6), make_run(1, R_b)]
    s = summarize(runs)
    assert s["n"] == 2 and s["seeds"] == [0, 1] and s["method"] == "cpd"
    a0, a1 = acc(R6), acc(R_b)
    assert s["acc"]["mean"] == pytest.approx((a0 + a1) / 2)
    assert s["acc"]["low"] <= s["acc"]["mean"] <= s["acc"]["high"]
    assert s["acc"]["values"] == pytest.approx([a0, a1])
    assert s["wall_time_s"]["mean"] == pytest.approx(100.5)
    assert s["final_success_mean"][0] == pytest.approx(0.6)
    assert math.isnan(s["forgetting_mean"][5]) and math.isnan(s["R_mean"][0][5])
    with pytest.raises(ValueError, match="differ"):
        summarize([make_run(0, R6), make_run(1, R6, method="ewc")])
    with pytest.raises(ValueError, match="at least one"):
        summarize([])
    # two runs of one seed under one label (another zoo, another gate) are not two seeds
    with pytest.raises(ValueError, match=r"seed\(s\) \[0\] more than once"):
        summarize([make_run(0, R6), make_run(0, R_b)])


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        acc([0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        acc([[1.5]])
    with pytest.raises(ValueError, match="task_stage"):
        bwt(R6, [0, 0, 1])
    with pytest.raises(ValueError, match="task_stage"):
        bwt(R6, [0, 0, 1, 1, 2, 3])
    with pytest.raises(ValueError, match="equal length"):
        relative_performance([0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match="teacher success"):
        RunResult("toy", "cpd", 0, ["a"], [0], [[0.5]], [1.0, 1.0], 1.0)
