"""``cpd report``: figures and the results table of finished runs (:mod:`cpd_fast.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cpd_fast.cli.checks import positive_int
from cpd_fast.report import write_report

__all__ = ["add_cli"]


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cpd report RUN_DIR... [--out DIR] [--stages N]`` on the top-level ``cpd`` subparsers."""
    p = subparsers.add_parser(
        "report",
        help="figures and the results table from finished runs",
        description="Aggregates runs (run directories with results.json, or results JSON files) by suite "
        "and method: success-matrix heatmaps, teacher-vs-student and forgetting bars (PNG), and a "
        "markdown results table with 90%% bootstrap CIs over seeds.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or results JSON files")
    p.add_argument(
        "--out", default=None, help="output directory (default: RUN_DIR/report for one run, else ./report)"
    )
    p.add_argument(
        "--stages", type=positive_int, default=None,
        help="report each run as of its first N stages (e.g. an MT25 run beside runs on its first 10 tasks)",
    )  # fmt: skip
    p.set_defaults(func=_cli_report)


def _cli_report(args: argparse.Namespace) -> int:
    out = args.out
    if out is None:
        one = Path(args.runs[0])
        out = one / "report" if len(args.runs) == 1 and one.is_dir() else Path("report")
    # a bad RUN_DIR: one-line error from cpd_fast.cli.main
    paths = write_report(args.runs, out, stages=args.stages)
    for p in paths:
        print(p)
    return 0
