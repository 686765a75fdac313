"""Shared test helpers."""

from __future__ import annotations


def tiny_ppo_config(**overrides):
    """A PPOConfig small enough for CI: 8 envs x 16 steps, 20-step episodes, 16-16 MLPs."""
    from cpd_fast.teachers.ppo import PPOConfig

    base = dict(
        total_steps=256,
        num_envs=8,
        num_steps=16,
        num_minibatches=2,
        update_epochs=1,
        hidden_sizes=(16, 16),
        max_episode_steps=20,
        checkpoint_every=1,
    )
    base.update(overrides)
    return PPOConfig(**base)
