"""The ``cpd`` command line: every argparse parser of the package, one module per command.

``cpd dpp-demo`` (:mod:`.demo`), ``cpd envs check`` (:mod:`.envs`), ``cpd teachers ...`` (:mod:`.teachers`),
``cpd distill`` (:mod:`.distill`), ``cpd report`` (:mod:`.report`) and ``cpd run`` (:mod:`.run`). Each
module registers its command with ``add_cli(subparsers)`` and turns the parsed arguments into a call of
the library below it; :func:`main` turns what it raises into one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from cpd_fast import __version__
from cpd_fast.errors import UserError, format_error, printable, require_device

__all__ = ["RL_EXTRA", "build_parser", "main"]

# The pipeline's dependencies, by import name: the [rl] extra. A core install (torch, numpy, triton: the model
# and its kernels) lacks them; a command whose module needs one is still listed, and says what to install.
RL_EXTRA = frozenset({"gymnasium", "metaworld", "envpool", "minari", "mujoco", "h5py", "tensorboard",
                      "pydantic", "yaml", "rich", "tqdm", "matplotlib", "packaging"})  # fmt: skip
INSTALL_RL = 'pip install "cpd_fast[rl]"'


def _needs_rl(command: str, err: ModuleNotFoundError) -> Callable:
    """The ``add_cli`` of ``command``, whose module could not be imported for want of the [rl] extra: the
    command (with any arguments) fails with one line saying what to install. Any other missing module is
    re-raised."""
    if (err.name or "").split(".")[0] not in RL_EXTRA:
        raise err
    message = f"needs the pipeline's dependencies, not installed here (no module {err.name!r}): {INSTALL_RL}"

    def fail(args: argparse.Namespace) -> int:
        raise UserError(message)

    def add_cli(subparsers) -> None:
        # no options of its own ("\0" prefixes none): every argument after the command is taken as it is
        p = subparsers.add_parser(command, help=f"(needs {INSTALL_RL})", add_help=False, prefix_chars="\0")
        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(func=fail)

    return add_cli


# each command's module imports what it runs: under a core install those of the pipeline fail to import
try:
    from cpd_fast.cli.demo import add_cli as add_demo_cli
except ModuleNotFoundError as err:
    add_demo_cli = _needs_rl("dpp-demo", err)
try:
    from cpd_fast.cli.envs import add_cli as add_envs_cli
except ModuleNotFoundError as err:
    add_envs_cli = _needs_rl("envs", err)
try:
    from cpd_fast.cli.teachers import add_cli as add_teachers_cli
except ModuleNotFoundError as err:
    add_teachers_cli = _needs_rl("teachers", err)
try:
    from cpd_fast.cli.distill import add_cli as add_distill_cli
except ModuleNotFoundError as err:
    add_distill_cli = _needs_rl("distill", err)
try:
    from cpd_fast.cli.report import add_cli as add_report_cli
except ModuleNotFoundError as err:
    add_report_cli = _needs_rl("report", err)
try:
    from cpd_fast.cli.run import add_cli as add_run_cli
except ModuleNotFoundError as err:
    add_run_cli = _needs_rl("run", err)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (the full usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {printable(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cpd",
        description="Continual policy distillation from distributed RL teachers (cpd_fast).",
    )
    parser.add_argument("--version", action="version", version=f"cpd_fast {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error (for bug reports)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_demo_cli(sub)  # cpd dpp-demo
    add_envs_cli(sub)  # cpd envs check
    add_teachers_cli(sub)  # cpd teachers train|export|collect|eval
    add_distill_cli(sub)  # cpd distill
    add_report_cli(sub)  # cpd report RUN_DIR...
    add_run_cli(sub)  # cpd run --preset quick|mt10|mt25|mt25-plus
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``cpd``; returns the exit status.

    A user mistake (see :mod:`cpd_fast.errors`) prints one line on stderr and returns 2, a bug one line
    and 1; ``cpd --debug`` raises instead, showing the traceback. Usage errors exit 2 from argparse.
    """
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
