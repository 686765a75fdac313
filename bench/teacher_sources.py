"""Per-task effect of the teachers (or of a method's settings) on a distilled student: two committed
``cpd report`` summaries of the same suite (e.g. scripted-expert teachers vs the RL teacher zoo, or the
paper's cpd vs a lever of it), side by side.

    python bench/teacher_sources.py bench/mt25_default/summary.json bench/mt25_zoo/summary.json \
        --method "cpd [task id]" --labels scripted zoo
    python bench/teacher_sources.py bench/mt25_zoo/summary.json bench/mt25_levers/summary.json \
        --method-b "cpd (adapter rank 8) [task id]" --labels cpd adapters

For each task: the teachers' official success, the student's final success and its forgetting under
each summary (n/a where undefined: the last stage's forgetting), and the change.
Reads only the summaries (``cpd report``'s ``summary.json``).
"""

from __future__ import annotations

import argparse
import json
import sys


def _row(summary_path: str, suite: str, method: str) -> dict:
    rows = json.load(open(summary_path)).get(suite, [])
    for r in rows:
        if r["method"] == method:
            return r
    methods = ", ".join(r["method"] for r in rows) or "none"
    raise SystemExit(f"{summary_path}: no {suite} row for method {method!r} (it has: {methods})")


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def table(a: dict, b: dict, labels: tuple[str, str]) -> str:
    if a["tasks"] != b["tasks"]:
        raise SystemExit("the two summaries cover different tasks (or a different order)")
    la, lb = labels
    head = (f"| stage | task | teacher {la} | teacher {lb} | student {la} | student {lb} | change "
            f"| forgetting {la} | forgetting {lb} |")  # fmt: skip
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i, task in enumerate(a["tasks"]):
        sa, sb = a["final_success_mean"][i], b["final_success_mean"][i]
        lines.append(
            f"| {a['task_stage'][i] + 1} | {task} | {_f(a['teacher_success_mean'][i])} "
            f"| {_f(b['teacher_success_mean'][i])} | {sa:.2f} | {sb:.2f} | {sb - sa:+.2f} "
            f"| {_f(a['forgetting_mean'][i])} | {_f(b['forgetting_mean'][i])} |"
        )

    def mean(r: dict, k: str) -> float | None:  # over the tasks where it is defined
        vals = [v for v in r[k] if v is not None]
        return sum(vals) / len(vals) if vals else None

    cells = [_f(mean(r, k), ".3f") for k in ("teacher_success_mean", "final_success_mean") for r in (a, b)]
    change = mean(b, "final_success_mean") - mean(a, "final_success_mean")
    forgot = [_f(mean(r, "forgetting_mean"), ".3f") for r in (a, b)]
    lines.append(f"| | **mean** | {' | '.join(cells)} | {change:+.3f} | {' | '.join(forgot)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("summary_a")
    p.add_argument("summary_b")
    p.add_argument("--suite", default="mt25")
    p.add_argument("--method", default="cpd [task id]")
    p.add_argument("--method-b", default=None, help="summary_b's method (default: --method)")
    p.add_argument("--labels", nargs=2, default=("A", "B"))
    args = p.parse_args(argv)
    method_b = args.method_b or args.method
    a, b = _row(args.summary_a, args.suite, args.method), _row(args.summary_b, args.suite, method_b)
    la, lb = args.labels
    shown = args.method if method_b == args.method else f"{args.method} vs {method_b}"
    print(f"{args.suite}, {shown}: {args.summary_a} ({la}) vs {args.summary_b} ({lb})\n")
    print(table(a, b, tuple(args.labels)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
