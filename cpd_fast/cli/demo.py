"""``cpd dpp-demo``: the compiled greedy DPP replay selection on synthetic features (:mod:`cpd_fast.demo`)."""

from __future__ import annotations

import argparse

from cpd_fast.cli.checks import positive_int, seed
from cpd_fast.demo import dpp_demo
from cpd_fast.errors import UserError

__all__ = ["add_cli"]


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cpd dpp-demo`` on the top-level ``cpd`` subparsers."""
    demo = subparsers.add_parser(
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


def _dpp_demo(args: argparse.Namespace) -> int:
    if args.k > args.n:
        raise UserError(f"--k {args.k} is more than --n {args.n} candidates; choose k <= n")
    dpp_demo(n=args.n, k=args.k, dim=args.dim, seed=args.seed)
    return 0
