"""Every committed bench report regenerates from its committed runs: ``cpd report`` over
``bench/<dir>/runs/*`` gives the committed ``bench/<dir>/summary.json`` (the numbers README quotes)."""

from __future__ import annotations

import glob
import json
import os

import pytest

from cpd_fast.report import write_report

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
DIRS = sorted(  # bench/<dir>, and nested report directories such as bench/mt25_study/ewc_grid/lambda
    os.path.dirname(p)
    for p in glob.glob(os.path.join(BENCH, "**", "summary.json"), recursive=True)
    if glob.glob(os.path.join(os.path.dirname(p), "runs", "*", "results.json"))
)


def test_there_are_committed_bench_runs():
    assert DIRS, "no bench/<dir>/runs/*/results.json committed beside a summary.json"


@pytest.mark.parametrize("bench_dir", DIRS, ids=lambda d: os.path.relpath(d, BENCH))
def test_report_regenerates_the_committed_summary(bench_dir, tmp_path):
    runs = sorted(glob.glob(os.path.join(bench_dir, "runs", "*")))
    options = {}
    extra = os.path.join(bench_dir, "report_options.json")  # e.g. {"stages": 2}
    if os.path.isfile(extra):
        options = json.load(open(extra))
    write_report(runs, tmp_path, **options)
    assert json.load(open(tmp_path / "summary.json")) == json.load(
        open(os.path.join(bench_dir, "summary.json"))
    )
