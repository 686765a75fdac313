"""The ``cpd`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (the full usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        from cpd_fast.errors import printable

        self.exit(2, f"{self.prog}: error: {printable(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from cpd_fast import __version__
    from cpd_fast.errors import positive_int, seed

    parser = _Parser(
        prog="cpd",
        description="Continual policy distillation from distributed RL teachers (cpd_fast).",
    )
    parser.add_argument("--version", action="version", version=f"cpd_fast {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error (for bug reports)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "dpp-demo",
        help="select a diverse replay set with the compiled greedy DPP and check it",
        description="Greedy DPP replay selection on synthetic trajectory features: the compiled "
        "selector against the plain-PyTorch reference and random subsets.",
    )
    demo.add_argument("--n", type=positive_int, default=20_000, help="number of candidate windows")
    demo.add_argument("--k", type=positive_int, default=1_000, help="replay budget (items to select)")
    demo.add_argument("--dim", type=positive_int, default=64, help="feature dimension")
    demo.add_argument("--seed", type=seed, default=0)
    demo.set_defaults(func=_dpp_demo)

    from cpd_fast.distill.cli import add_cli as add_distill_cli
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
    from cpd_fast.errors import UserError

    if args.k > args.n:
        raise UserError(f"--k {args.k} is more than --n {args.n} candidates; choose k <= n")
    dpp_demo(n=args.n, k=args.k, dim=args.dim, seed=args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``cpd``; returns the exit status.

    A user mistake (see :mod:`cpd_fast.errors`) prints one line on stderr and returns 2, a bug one line
    and 1; ``cpd --debug`` raises instead, showing the traceback. Usage errors exit 2 from argparse.
    """
    from cpd_fast.errors import format_error, require_device

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    sub = [v for k, v in vars(args).items() if k.endswith("_command") and isinstance(v, str)]
    prog = " ".join(["cpd", args.command, *sub])
    try:
        device = getattr(args, "device", None) or getattr(args, "cfg_device", None)
        if device is not None:  # every command with --device (cpd distill's comes from DistillConfig)
            require_device(device)
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        line, status = format_error(prog, err)
        print(line, file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
