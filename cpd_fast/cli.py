"""The ``cpd`` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from cpd_fast import __version__

    parser = argparse.ArgumentParser(
        prog="cpd",
        description="Continual policy distillation from distributed RL teachers (cpd_fast).",
    )
    parser.add_argument("--version", action="version", version=f"cpd_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "dpp-demo",
        help="select a diverse replay set with the compiled greedy DPP and check it",
        description="Greedy DPP replay selection on synthetic trajectory features: the compiled "
        "selector against the plain-PyTorch reference and random subsets.",
    )
    demo.add_argument("--n", type=int, default=20_000, help="number of candidate windows")
    demo.add_argument("--k", type=int, default=1_000, help="replay budget (items to select)")
    demo.add_argument("--dim", type=int, default=64, help="feature dimension")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_dpp_demo)

    from cpd_fast.continual_cli import add_cli as add_distill_cli
    from cpd_fast.fidelity import add_cli as add_envs_cli
    from cpd_fast.report import add_cli as add_report_cli
    from cpd_fast.teachers.cli import add_cli as add_teachers_cli

    add_envs_cli(sub)  # cpd envs check
    add_teachers_cli(sub)  # cpd teachers train|collect|eval
    add_distill_cli(sub)  # cpd distill
    add_report_cli(sub)  # cpd report RUN_DIR...
    from cpd_fast.pipeline import add_cli as add_run_cli

    add_run_cli(sub)  # cpd run --preset quick|mt10|mt25
    return parser


def _dpp_demo(args: argparse.Namespace) -> int:
    from cpd_fast.demo import dpp_demo

    dpp_demo(n=args.n, k=args.k, dim=args.dim, seed=args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
