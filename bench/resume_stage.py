"""Redo one stage of a finished (or running) distillation with the current code: copy the method directory
of run A, drop what stage S and later wrote, resume the copy until stage S is evaluated, then stop. With
``bench/compare_runs.py`` this shows that a code change computes exactly what the code that made run A did
on a real stage (its phases, replay selection and evaluation), at the cost of one stage:

    python bench/resume_stage.py RUN_A/methods/cpd COPY --stage 2
    python bench/compare_runs.py RUN_A/methods/cpd COPY --files checkpoints/stage2-phase1.pt \\
        checkpoints/stage2-phase2.pt replay/stage2.pt eval/stage2.json

The copy reads run A's teachers and datasets where its config.json says they are (read only) and uses the
same thread count, so float order is the same.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import threading
import time

from cpd_fast.distill.config import DistillConfig
from cpd_fast.distill.run import run_distill


def truncate(src: str, dst: str, stage: int) -> None:
    """``dst``: ``src`` as it was before stage ``stage`` began (later files and ledger entries dropped)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tb", ".lock"))

    def later(name: str) -> bool:
        m = re.match(r"stage(\d+)", name)
        return m is not None and int(m.group(1)) >= stage

    for sub in ("checkpoints", "replay", "eval"):
        for p in glob.glob(os.path.join(dst, sub, "*")):
            if later(os.path.basename(p)):
                os.remove(p)
    ledger = os.path.join(dst, "progress.json")
    if not os.path.isfile(ledger):  # nothing finished yet: the copy starts from the beginning
        return
    steps = json.load(open(ledger))["steps"]
    json.dump({"steps": {k: v for k, v in steps.items() if not later(k)}}, open(ledger, "w"), indent=2)


def stop_after(dst: str, stage: int) -> None:
    """Kill this process group once stage ``stage``'s evaluation is in the ledger."""
    ledger = os.path.join(dst, "progress.json")
    while True:
        with open(ledger) if os.path.isfile(ledger) else open(os.devnull) as f:
            if f"stage{stage}/eval" in (json.loads(f.read() or "{}").get("steps", {})):
                print(f"stage {stage} evaluated: stopping", flush=True)
                os.killpg(os.getpgid(0), signal.SIGKILL)
        time.sleep(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a method directory of the reference run (RUN/methods/METHOD)")
    ap.add_argument("dst", help="where the copy goes (must not exist)")
    ap.add_argument("--stage", type=int, required=True)
    args = ap.parse_args()
    truncate(args.src, args.dst, args.stage)
    cfg = DistillConfig.from_dict(json.load(open(os.path.join(args.dst, "config.json"))))
    if os.getpgid(0) != os.getpid():
        os.setpgrp()  # the evaluation workers go down with this process
    threading.Thread(target=stop_after, args=(args.dst, args.stage), daemon=True).start()
    run_distill(cfg, args.dst)


if __name__ == "__main__":
    main()
