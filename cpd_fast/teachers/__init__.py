"""Teachers: policies whose action means the student is distilled from (scripted experts, PPO)."""
