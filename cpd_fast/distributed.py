"""Moved: teacher jobs are :mod:`cpd_fast.teachers.jobs`, training a suite's teachers is
:func:`cpd_fast.teachers.provide.train_teachers`. This re-export goes once every caller uses the new paths."""

from cpd_fast.teachers.jobs import (
    BACKENDS,
    RAY_CONNECT_TIMEOUT_S,
    _run_local,
    _run_ray,
    check_ray_address,
    run_jobs,
    run_teacher_job,
)
from cpd_fast.teachers.provide import train_teachers

__all__ = ["BACKENDS", "check_ray_address", "run_jobs", "run_teacher_job", "train_teachers"]
__all__ += ["RAY_CONNECT_TIMEOUT_S", "_run_local", "_run_ray"]
