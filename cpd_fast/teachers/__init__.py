"""Teachers: policies whose action means the student is distilled from (scripted experts, PPO, a zoo).

:func:`provide` is the one way a run gets its teachers (:mod:`cpd_fast.teachers.provide`).
"""

from cpd_fast.teachers.provide import provide

__all__ = ["provide"]
