"""Teachers: policies whose action means the student is distilled from (scripted experts, PPO, a zoo).

A run gets its teachers one way, :func:`cpd_fast.teachers.provide.provide` (``from cpd_fast.teachers.provide
import provide``). This package file imports nothing, so that a module needing one teacher module (the
fidelity check runs :mod:`cpd_fast.teachers.scripted`) does not load every teacher source with it.
"""
