"""Compare what two runs wrote, file by file: torch files tensor by tensor (``torch.equal``, same keys in the
same order) and byte for byte, JSON files by value. Used to show a change computes exactly what the code
before it did (e.g. the issue-31 restructuring, bench/README.md):

    python bench/compare_runs.py RUN_A RUN_B [--files checkpoints/stage2-phase1.pt eval/stage2.json ...]

Without ``--files`` every ``*.pt`` and ``eval/*.json`` file of RUN_A is compared. Exit status 1 if any differ.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from typing import Any

import torch


def leaves(x: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(x, dict):
        return [kv for k in x for kv in leaves(x[k], f"{path}/{k}")]
    if isinstance(x, list | tuple):
        return [kv for i, v in enumerate(x) for kv in leaves(v, f"{path}/{i}")]
    return [(path, x)]


def same(a: Any, b: Any) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b


def compare(a: str, b: str) -> tuple[bool, str]:
    if a.endswith(".json"):
        equal = json.load(open(a)) == json.load(open(b))
        return equal, "values equal" if equal else "values differ"
    digest = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (a, b)]
    la, lb = leaves(torch.load(a, weights_only=True)), leaves(torch.load(b, weights_only=True))
    if [k for k, _ in la] != [k for k, _ in lb]:
        return False, "different keys"
    bad = sum(not same(x, y) for (_, x), (_, y) in zip(la, lb, strict=True))
    bytes_note = "bytes identical" if digest[0] == digest[1] else "bytes differ"
    return bad == 0, f"{len(la)} leaves, {bad} differ, {bytes_note} (sha256 {digest[0][:12]})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--files", nargs="+", default=None, help="paths relative to the run directories")
    args = ap.parse_args()
    files = args.files or sorted(
        os.path.relpath(p, args.run_a)
        for p in glob.glob(os.path.join(args.run_a, "**", "*.pt"), recursive=True)
        + glob.glob(os.path.join(args.run_a, "eval", "*.json"))
    )
    ok = True
    for f in files:
        equal, note = compare(os.path.join(args.run_a, f), os.path.join(args.run_b, f))
        ok &= equal
        print(f"{'EQUAL' if equal else 'DIFF '}  {f}  ({note})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
