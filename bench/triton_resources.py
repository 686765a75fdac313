"""Registers, spills and shared memory of every MoE Triton kernel launch, compiled for GPUs on a CPU machine.

Each launch the experts make (forward fwd1/fwd2, input gradient bwd_h/bwd_x, weight gradients
wgrad2/wgrad1) is compiled for every configuration its autotuner may pick on a GPU, per dtype path (fp32
with IEEE dots, fp32 with TF32 dots, bf16) and target (sm_90, sm_80), by ``cpd_fast.kernels.compile_check``
(no GPU needed: Triton's bundled ptxas and cuobjdump).

    python bench/triton_resources.py                          # everything (the table in bench/README.md)
    python bench/triton_resources.py --launch bwd_h --target sm_90 --dtype bf16

Prints a markdown table, one row per compiled kernel: registers per thread (cuobjdump, equal to ptxas's
report), spill stores/loads per thread in bytes (ptxas), shared memory per block (Triton's dynamic request
plus the cubin's static part) against the target's per-block limit. Exits with status 1 when a row has a
problem (a spill, shared memory over the limit, the readers disagreeing).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import triton

from cpd_fast.kernels import compile_check


def table(rows: list[compile_check.Resources]) -> str:
    head = (
        "| launch | target | dtype | config | registers | spill st/ld B | smem B (dyn + static) | limit B |"
    )
    lines = [head, "|" + " --- |" * 8]
    for r in rows:
        spills = f"{r.ptxas['spill_stores']}/{r.ptxas['spill_loads']}" if r.ptxas else f"stack {r.stack}"
        smem = f"{r.smem} ({r.smem_dynamic} + {r.smem_static})"
        flag = " **!**" if r.problems() else ""
        cells = [
            r.launch,
            r.target.name,
            r.dtype,
            r.config,
            r.registers,
            spills + flag,
            smem,
            r.target.smem_limit,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    names = [launch.name for launch in compile_check.launches()]
    targets = {t.name: t for t in compile_check.TARGETS}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launch", nargs="+", choices=names, default=names)
    p.add_argument("--target", nargs="+", choices=list(targets), default=list(targets))
    p.add_argument(
        "--dtype", nargs="+", choices=list(compile_check.DTYPES), default=list(compile_check.DTYPES)
    )
    p.add_argument("--d-model", type=int, default=256, help="model width d (the shapes' divisibility)")
    p.add_argument("--d-hidden", type=int, default=1024, help="expert hidden size h")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    args = p.parse_args(argv)
    if reason := compile_check.missing_tools():
        sys.exit(f"cannot compile here: {reason}")
    start = time.perf_counter()
    rows = compile_check.check_all(
        tuple(args.launch), tuple(args.dtype), tuple(targets[t] for t in args.target), jobs=args.jobs,
        d_model=args.d_model, d_hidden=args.d_hidden,
    )  # fmt: skip
    wall = time.perf_counter() - start
    print(table(rows))
    busy = sum(r.seconds for r in rows)
    driver = (
        "filled" if any(r.triton_regs is not None for r in rows) else "not available without a GPU driver"
    )
    print(f"\n{len(rows)} kernels, Triton {triton.__version__}, {datetime.date.today()}: {wall:.0f} s wall")
    print(f"with {args.jobs} processes ({busy:.0f} s compiling). Triton's n_regs/n_spills: {driver}")
    problems = [p for r in rows for p in r.problems()]
    print("\n".join(["", *problems]) if problems else "\nno spills, shared memory within every limit")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
