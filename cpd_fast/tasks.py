"""Meta-World task suites and their split into continual-learning stages.

A *task* is a Meta-World v3 task name such as ``"reach-v3"``. A *suite* is an ordered list of tasks:
``mt10``, ``mt25`` (Meta-World's own ``MT10_V3`` / ``MT25_V3`` order), ``mt50`` (all 50 as a stream: MT25,
then the other 25 in ``MT50_V3``'s order, :data:`MT50_STREAM`), ``cw10`` (Continual World's CW10 sequence
renamed to v3) and ``cw20`` (CW10 twice: every task revisited), or any explicit list of task names.
:data:`MT50` is Meta-World's own ``MT50_V3`` order (the task index of datasets).

The lists are hard-coded so that importing this module (and so the ``cpd`` CLI) never imports
metaworld; ``tests/test_tasks.py`` checks them against metaworld's own dictionaries.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from cpd_fast.errors import require_int

__all__ = [
    "CW10",
    "CW20",
    "MT10",
    "MT25",
    "MT50",
    "MT50_STREAM",
    "SUITES",
    "resolve_tasks",
    "stages",
    "validate_task",
]

# Meta-World 3.1.1 ``metaworld.env_dict.ALL_V3_ENVIRONMENTS`` (== MT50_V3), in its order.
MT50: tuple[str, ...] = (
    "assembly-v3",
    "basketball-v3",
    "bin-picking-v3",
    "box-close-v3",
    "button-press-topdown-v3",
    "button-press-topdown-wall-v3",
    "button-press-v3",
    "button-press-wall-v3",
    "coffee-button-v3",
    "coffee-pull-v3",
    "coffee-push-v3",
    "dial-turn-v3",
    "disassemble-v3",
    "door-close-v3",
    "door-lock-v3",
    "door-open-v3",
    "door-unlock-v3",
    "hand-insert-v3",
    "drawer-close-v3",
    "drawer-open-v3",
    "faucet-open-v3",
    "faucet-close-v3",
    "hammer-v3",
    "handle-press-side-v3",
    "handle-press-v3",
    "handle-pull-side-v3",
    "handle-pull-v3",
    "lever-pull-v3",
    "pick-place-wall-v3",
    "pick-out-of-hole-v3",
    "pick-place-v3",
    "plate-slide-v3",
    "plate-slide-side-v3",
    "plate-slide-back-v3",
    "plate-slide-back-side-v3",
    "peg-insert-side-v3",
    "peg-unplug-side-v3",
    "soccer-v3",
    "stick-push-v3",
    "stick-pull-v3",
    "push-v3",
    "push-wall-v3",
    "push-back-v3",
    "reach-v3",
    "reach-wall-v3",
    "shelf-place-v3",
    "sweep-into-v3",
    "sweep-v3",
    "window-open-v3",
    "window-close-v3",
)

# ``metaworld.env_dict.MT10_V3``.
MT10: tuple[str, ...] = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)

# ``metaworld.env_dict.MT25_V3``: MT10 followed by 15 more tasks; stage s = tasks 5s..5s+4.
MT25: tuple[str, ...] = (
    *MT10,
    "coffee-pull-v3",
    "pick-out-of-hole-v3",
    "disassemble-v3",
    "pick-place-wall-v3",
    "basketball-v3",
    "stick-pull-v3",
    "button-press-wall-v3",
    "faucet-open-v3",
    "door-lock-v3",
    "lever-pull-v3",
    "sweep-into-v3",
    "faucet-close-v3",
    "coffee-button-v3",
    "button-press-topdown-wall-v3",
    "dial-turn-v3",
)

# Continual World CW10 (Wołczyk et al. 2021, defined on v1/v2), same order, v3 names.
CW10: tuple[str, ...] = (
    "hammer-v3",
    "push-wall-v3",
    "faucet-close-v3",
    "push-back-v3",
    "stick-pull-v3",
    "handle-press-side-v3",
    "push-v3",
    "shelf-place-v3",
    "window-close-v3",
    "peg-unplug-side-v3",
)

# All 50 as a continual stream (``mt50``, 10 stages × 5): MT25 in its own order first (stages 0-4 are the
# MT25 study), then the other 25 in MT50_V3's order (stages 5-9): an order nobody chose by hand, and one in
# which MT50's first half is exactly MT25, so the two streams share their first five stages.
MT50_STREAM: tuple[str, ...] = (*MT25, *(t for t in MT50 if t not in MT25))

# Continual World CW20: CW10, then CW10 again (each task revisited once, in the same order).
CW20: tuple[str, ...] = CW10 + CW10

SUITES: dict[str, tuple[str, ...]] = {
    "mt10": MT10, "mt25": MT25, "mt50": MT50_STREAM, "cw10": CW10, "cw20": CW20,
}  # fmt: skip

_KNOWN_TASKS = frozenset(MT50)


def _close_matches(name: str, candidates: Sequence[str]) -> str:
    matches = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(matches)}?" if matches else ""


def validate_task(name: str) -> str:
    """Return ``name`` if it is a Meta-World v3 task, else raise ``ValueError`` naming close matches.

    A name without the ``-v3`` suffix (``"reach"``) is rejected too, but its suggestion is the v3 name.
    """
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str, got {type(name).__name__}")
    if name in _KNOWN_TASKS:
        return name
    hint = _close_matches(name, MT50) or _close_matches(f"{name}-v3", MT50)
    raise ValueError(f"unknown Meta-World v3 task {name!r}.{hint} (see cpd_fast.tasks.MT50 for all 50)")


def resolve_tasks(suite: str | Sequence[str], repeats: bool = False) -> list[str]:
    """Turn a suite name (``"mt25"``, case-insensitive) or an explicit list of task names into tasks.

    A single task name (``"reach-v3"``) is accepted as a one-task suite. By default the result is the
    suite's distinct tasks in order of first appearance (what teachers, datasets and environments are made
    for: ``cw20`` gives CW10's ten), and an explicit list naming a task twice is refused. With ``repeats``
    the result is the stream as trained, revisits included (``cw20``: CW10 twice; an explicit list may
    revisit a task too).
    """
    if isinstance(suite, str):
        key = suite.lower()
        if key in SUITES:
            tasks = list(SUITES[key])
            return tasks if repeats else list(dict.fromkeys(tasks))
        if suite in _KNOWN_TASKS:
            return [suite]
        hint = _close_matches(key, list(SUITES)) or _close_matches(suite, MT50)
        raise ValueError(
            f"unknown suite or task {suite!r}.{hint} Suites: {', '.join(SUITES)}; "
            "or pass a list of -v3 task names."
        )
    tasks = [validate_task(t) for t in suite]
    if not tasks:
        raise ValueError("a suite needs at least one task")
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates and not repeats:
        raise ValueError(f"duplicate tasks in suite: {', '.join(duplicates)}")
    return tasks


def stages(suite: str | Sequence[str], tasks_per_stage: int) -> list[list[str]]:
    """Split a suite into consecutive stages of ``tasks_per_stage`` tasks, keeping the suite's order.

    ``stages("mt25", 5)`` gives 5 stages of 5 tasks (stage s = tasks 5s..5s+4). The suite length must
    be a multiple of ``tasks_per_stage`` so that every stage has the same size. A task may return in a later
    stage (``stages("cw20", 1)``: CW10, then CW10 again), not twice in one.
    """
    tasks = resolve_tasks(suite, repeats=True)
    require_int("tasks_per_stage", tasks_per_stage)
    if len(tasks) % tasks_per_stage:
        raise ValueError(
            f"suite of {len(tasks)} tasks does not split into stages of {tasks_per_stage}; "
            f"choose a divisor of {len(tasks)}"
        )
    out = [tasks[i : i + tasks_per_stage] for i in range(0, len(tasks), tasks_per_stage)]
    for s, stage in enumerate(out):
        twice = sorted({t for t in stage if stage.count(t) > 1})
        if twice:
            raise ValueError(
                f"stage {s} holds {', '.join(twice)} twice; a task may return in a later stage only"
            )
    return out
