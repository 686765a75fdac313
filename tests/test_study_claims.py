"""bench/mt25_study/claims.py judges each claim by the whole 90% CI, and only with three seeds."""

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "claims", os.path.join(HERE, "..", "bench", "mt25_study", "claims.py")
)
claims = importlib.util.module_from_spec(spec)
spec.loader.exec_module(claims)


def row(method, rel, forget, n=3):
    stat = lambda lo, hi: {"mean": (lo + hi) / 2, "low": lo, "high": hi}
    return {"method": method, "n": n, "relative_performance": stat(*rel), "mean_forgetting": stat(*forget)}


@pytest.mark.parametrize(
    ("rel", "forget", "n", "verdict"),
    [
        ((0.86, 0.90), (0.02, 0.05), 3, "holds"),
        ((0.80, 0.84), (0.02, 0.05), 3, "fails"),
        ((0.83, 0.88), (0.02, 0.05), 3, "not settled"),  # the CI straddles 85%
        ((0.86, 0.90), (0.08, 0.12), 3, "not settled"),  # and here 10% forgetting
        ((0.86, 0.90), (0.02, 0.05), 1, "not yet judged (1 seed)"),
    ],
)
def test_paper_claim_verdicts(rel, forget, n, verdict):
    out = claims.claims({"mt25": [row(claims.PAPER, rel, forget, n)]})
    assert out[0][2] == verdict and out[1][2] == "not measured yet"  # no task-id row given


def test_margins_over_baselines():
    summary = {"mt25": [row(claims.PLUS, (0.90, 0.92), (0.02, 0.03)),
                        row("ewc (λ 100)", (0.55, 0.60), (0.3, 0.4)),
                        row("packnet [task id]", (0.90, 0.95), (0.0, 0.0))]}  # fmt: skip
    got = {c: v for c, _, v in claims.claims(summary)}
    assert got["ours: task-free >= 30 points over the best tuned EWC variant"] == "holds"  # 90 > 60 + 30
    assert got["ours: task-free ahead of PackNet (which needs the task id)"] == "not settled"  # CIs overlap
    assert (
        got["ours: task-free >= 95% of teacher performance with <= 3% forgetting at <= 5% replay"] == "fails"
    )


def test_ours_is_judged_on_the_task_free_preset_once_it_ran():
    """The rows are named as the presets' runs are labelled; "ours" moves to mt25-task-free once it ran."""
    from cpd_fast.pipeline import resolve_config

    assert resolve_config("mt25-plus").distill_config("cpd").label == claims.PLUS
    assert resolve_config("mt25-task-free").distill_config("cpd").label == claims.TASK_FREE
    summary = {"mt25": [row(claims.PLUS, (0.90, 0.92), (0.02, 0.03)),
                        row(claims.TASK_FREE, (0.96, 0.98), (0.0, 0.01))]}  # fmt: skip
    got = {c: (m, v) for c, m, v in claims.claims(summary)}
    measured, verdict = got[
        "ours: task-free >= 95% of teacher performance with <= 3% forgetting at <= 5% replay"
    ]
    assert measured.startswith("mt25-task-free, task-free") and verdict == "holds"
