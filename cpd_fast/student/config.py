"""The student's hyper-parameters (:class:`StudentConfig`) and the names of its routing and conditioning
modes (what each mode does: :mod:`cpd_fast.student.routing`)."""

from __future__ import annotations

from dataclasses import dataclass

from cpd_fast.errors import require_int

__all__ = ["EXPERT_ROUTINGS", "TASK_CONDITIONINGS", "StudentConfig"]

EXPERT_ROUTINGS = ("gate", "task")
TASK_CONDITIONINGS = ("embedding", "task")


@dataclass
class StudentConfig:
    """Hyper-parameters of :class:`~cpd_fast.student.model.Student` (sizes in features; defaults sized
    for Meta-World MT25)."""

    obs_dim: int = 39
    act_dim: int = 4
    history: int = 8  # H: observations per window (the current one last)
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 3  # shared causal Transformer blocks
    d_ff: int = 512  # hidden size of the shared blocks' FFN
    dropout: float = 0.0
    expert_hidden: int = 512  # d_hidden of each MoE expert
    top_k: int = 2
    experts_per_task: int = 1
    new_expert_gate_bias: float = -5.0  # cold start: a new expert's logit is -5 for every input
    aux_loss_weight: float = 0.01  # MoE load-balancing loss weight (inside MoELayer.aux_loss)
    moe_backend: str = "auto"
    task_embed_dim: int = 64
    task_encoder_hidden: int = 128
    contrastive_weight: float = 0.1
    contrastive_temperature: float = 0.1
    prototype_momentum: float = 0.99  # EMA: proto ← m·proto + (1 − m)·mean batch embedding
    detach_task_embedding: bool = True
    # share of training windows conditioned on their task's prototype instead of the inferred embedding,
    # so that both evaluation modes (no task id / task id → prototype) are in the training distribution
    prototype_conditioning: float = 0.5
    # per-task low-rank adapters on the shared blocks (cpd_fast.student.adapters): None = none; r > 0 gives
    # every task its own rank-r update of each block's qkv, proj and FFN maps (a frozen trunk stays plastic)
    adapter_rank: int | None = None
    # which experts a token uses: "gate", the paper's learned top-k router; "task", the experts of the
    # token's task (the one its adapters use), each weighted 1/experts_per_task: no gate moves old tasks
    expert_routing: str = "gate"
    # what conditions the trunk: "embedding", the task's prototype (task id given) or the inferred embedding
    # (none); "task" (needs expert_routing="task"), always a task's own conditioning vector, of the given
    # task or of each token's nearest prototype, so that the encoder can keep learning without moving
    # an old task's actions (cpd_fast.student.routing)
    task_conditioning: str = "embedding"

    def __post_init__(self) -> None:
        for name in ("obs_dim", "act_dim", "history", "d_model", "n_heads", "d_ff", "expert_hidden",
                     "top_k", "experts_per_task", "task_embed_dim", "task_encoder_hidden"):  # fmt: skip
            require_int(f"StudentConfig.{name}", getattr(self, name))
        require_int("StudentConfig.n_layers", self.n_layers, 0)
        if self.adapter_rank is not None:
            require_int("StudentConfig.adapter_rank", self.adapter_rank)
        if self.expert_routing not in EXPERT_ROUTINGS:
            raise ValueError(f"expert_routing must be one of {EXPERT_ROUTINGS}, got {self.expert_routing!r}")
        if self.task_conditioning not in TASK_CONDITIONINGS:
            raise ValueError(
                f"task_conditioning must be one of {TASK_CONDITIONINGS}, got {self.task_conditioning!r}"
            )
        if self.task_conditioning == "task" and self.expert_routing != "task":
            raise ValueError("task_conditioning='task' needs expert_routing='task' (a token's task picks its "
                             "experts, adapters and conditioning together)")  # fmt: skip
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.prototype_momentum < 1.0:
            raise ValueError(f"prototype_momentum must be in [0, 1), got {self.prototype_momentum!r}")
        if not 0.0 <= self.prototype_conditioning <= 1.0:
            raise ValueError(f"prototype_conditioning must be in [0, 1], got {self.prototype_conditioning!r}")
        if self.contrastive_temperature <= 0:
            raise ValueError(f"contrastive_temperature must be > 0, got {self.contrastive_temperature!r}")
