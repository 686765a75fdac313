"""The MT25 study's claims (issue 29), each judged on the committed report with its 90% CI over seeds:

    cpd report bench/mt25_study/runs/* --out bench/mt25_study
    python bench/mt25_study/claims.py bench/mt25_study/summary.json --out bench/mt25_study/claims.md

A claim **holds** when the whole CI is on its side of the bound, **fails** when the whole CI is on the other
side, and is **not settled** when the CI straddles it. Fewer than three seeds of a row it needs: **not yet
judged** (the figures are shown, one seed is an anecdote). A row that has not run: **not measured yet**.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

PAPER = "cpd (bf16 training)"  # the paper's protocol, as the study runs it (bf16 training)
PLUS = ("cpd (replay 5%, 40 episodes/task, adapter rank 8, task-routed experts, task conditioning, bf16 "
        "training)")  # fmt: skip  # --preset mt25-plus
# --preset mt25-task-free: mt25-plus with a behaviour per ambiguity group; "ours" is judged on it once it ran
TASK_FREE = PLUS[:-1] + (", behaviours reach→pick-place, pick-place-wall→pick-place, "
                         "button-press-topdown-wall→button-press-topdown)")  # fmt: skip
TASK_ID, ORACLE = " [task id]", " [oracle task id (isolation)]"
MIN_SEEDS = 3


def _pct(stat: dict, n: int) -> str:
    ci = f" [{100 * stat['low']:.1f}, {100 * stat['high']:.1f}]" if n > 1 else ""
    return f"{100 * stat['mean']:.1f}{ci}"


def _side(stat: dict, bound: float, above: bool) -> str:
    """Whether the CI lies above (``above``) / below the bound."""
    lo, hi = stat["low"], stat["high"]
    good, bad = (lo > bound, hi <= bound) if above else (hi < bound, lo >= bound)
    return "holds" if good else "fails" if bad else "not settled"


def _verdict(rows: list[dict], sides: list[str]) -> str:
    if any(r["n"] < MIN_SEEDS for r in rows):
        n = min(r["n"] for r in rows)
        return f"not yet judged ({n} seed{'s' if n > 1 else ''})"
    return "fails" if "fails" in sides else "not settled" if "not settled" in sides else "holds"


def _beats(a: dict, b: dict, margin: float = 0.0) -> str:
    """``a``'s relative performance exceeds ``b``'s by more than ``margin``: CI of a vs CI of b + margin."""
    a_lo, a_hi = a["relative_performance"]["low"], a["relative_performance"]["high"]
    b_lo, b_hi = b["relative_performance"]["low"], b["relative_performance"]["high"]
    return "holds" if a_lo > b_hi + margin else "fails" if a_hi <= b_lo + margin else "not settled"


def claims(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``[(claim, measured, verdict)]`` from a report's ``summary.json`` (the mt25 suite)."""
    rows = {r["method"]: r for r in summary["mt25"]}
    out = []

    def fig(name: str) -> str:
        r, n = rows[name], rows[name]["n"]
        short = {PAPER: "paper's cpd, task-free", PAPER + TASK_ID: "paper's cpd, task id",
                 PLUS: "mt25-plus, task-free",
                 TASK_FREE: "mt25-task-free, task-free"}.get(name, name)  # fmt: skip
        return (f"{short}: {_pct(r['relative_performance'], n)}% / {_pct(r['mean_forgetting'], n)}% "
                f"forgetting ({n} seed{'s' if n > 1 else ''})")  # fmt: skip

    for mode in ("", TASK_ID):
        name = PAPER + mode
        claim = ("paper: its protocol reaches > 85% of teacher performance with < 10% forgetting "
                 f"({'task id' if mode else 'task-free'})")  # fmt: skip
        if name not in rows:
            out.append((claim, "–", "not measured yet"))
            continue
        r = rows[name]
        sides = [_side(r["relative_performance"], 0.85, True), _side(r["mean_forgetting"], 0.10, False)]
        out.append((claim, fig(name), _verdict([r], sides)))
    ewcs = [r for m, r in rows.items() if m.split(" ")[0] in ("ewc", "online-ewc")]
    best_ewc = max(ewcs, key=lambda r: r["relative_performance"]["mean"]) if ewcs else None
    claim = "paper: its protocol beats EWC and online EWC (tuned; same mode)"
    if not ewcs or PAPER not in rows:
        out.append((claim, "–", "not measured yet"))
    else:
        pairs = [(rows[PAPER + (TASK_ID if e["method"].endswith(TASK_ID) else "")], e) for e in ewcs]
        sides = [_beats(c, e) for c, e in pairs if c is not None]
        out.append(
            (claim, "; ".join(fig(e["method"]) for e in ewcs), _verdict([r for p in pairs for r in p], sides))
        )
    ours = TASK_FREE if TASK_FREE in rows else PLUS  # the best task-free configuration that ran
    claim = "ours: task-free >= 95% of teacher performance with <= 3% forgetting at <= 5% replay"
    if ours in rows:
        r = rows[ours]
        sides = [_side(r["relative_performance"], 0.95, True), _side(r["mean_forgetting"], 0.03, False)]
        out.append((claim, fig(ours) + " (5% replay)", _verdict([r], sides)))
    else:
        out.append((claim, "–", "not measured yet"))
    claim = "ours: task-free >= 30 points over the best tuned EWC variant"
    if ours in rows and best_ewc is not None:
        out.append((claim, f"{fig(ours)}; best: {fig(best_ewc['method'])}",
                    _verdict([rows[ours], best_ewc], [_beats(rows[ours], best_ewc, 0.30)])))  # fmt: skip
    else:
        out.append((claim, "–", "not measured yet"))
    packnet = [r for m, r in rows.items() if m.startswith("packnet")]
    claim = "ours: task-free ahead of PackNet (which needs the task id)"
    if ours in rows and packnet:
        p = packnet[0]
        out.append(
            (claim, f"{fig(ours)}; {fig(p['method'])}", _verdict([rows[ours], p], [_beats(rows[ours], p)]))
        )
    else:
        out.append((claim, "–", "not measured yet"))
    return out


def markdown(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| claim | measured: relative performance / forgetting, mean [90% CI over seeds] | verdict |",
             "|---|---|---|"]  # fmt: skip
    lines += [f"| {c} | {m} | **{v}** |" for c, m, v in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("summary", help="a cpd report's summary.json")
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    args = ap.parse_args()
    with open(args.summary) as f:
        text = markdown(claims(json.load(f)))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
