"""Meta-World's hand-written expert policies, batched.

Meta-World ships one scripted policy per task (``metaworld.policies.ENV_POLICY_MAP``) that maps one
unbatched 39-d observation to one 4-d action. They are deterministic and stateless, so a batch is
just a loop over rows. They serve as reference teachers and as the probe of the env fidelity gate.
"""

from __future__ import annotations

import warnings

import numpy as np
from metaworld.policies import ENV_POLICY_MAP

from cpd_fast.envs import ACT_DIM, OBS_DIM

__all__ = ["ScriptedExpert"]


class ScriptedExpert:
    """Batched wrapper around ``metaworld.policies.ENV_POLICY_MAP[task]()``.

    Args:
        task: Meta-World v3 task name, e.g. ``"reach-v3"`` (validated by the caller: :func:`cpd_fast.tasks.
            validate_task`; a name Meta-World has no expert for is refused here).
    """

    def __init__(self, task: str) -> None:
        self.task = task
        if self.task not in ENV_POLICY_MAP:
            raise ValueError(f"metaworld has no scripted policy for {self.task!r}")
        self._policy = ENV_POLICY_MAP[self.task]()

    def action_mean(self, obs: np.ndarray) -> np.ndarray:
        """Expert actions for a batch of observations.

        Args:
            obs: ``[B, 39]`` observations (any float dtype; goal must be visible, i.e. the
                environment is built with ``partially_observable=False``).

        Returns:
            ``[B, 4]`` float32 actions in ``[-1, 1]`` (xyz end-effector delta, gripper).
        """
        obs = np.asarray(obs)
        if obs.ndim != 2 or obs.shape[1] != OBS_DIM:
            raise ValueError(f"obs must have shape [B, {OBS_DIM}], got {obs.shape}")
        out = np.empty((obs.shape[0], ACT_DIM), dtype=np.float32)
        # The policies warn "Constant(s) may be too high" on most steps; the env clips anyway.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            obs64 = obs.astype(np.float64, copy=False)
            for i in range(obs.shape[0]):
                out[i] = self._policy.get_action(obs64[i])
        return np.clip(out, -1.0, 1.0, out=out)

    __call__ = action_mean

    def __repr__(self) -> str:
        return f"ScriptedExpert({self.task!r})"
