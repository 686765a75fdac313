"""The student policy: a causal Transformer over the observation history, conditioned on a contrastive
task embedding, with a growable Mixture-of-Experts layer and a tanh action-mean head.

Data flow for one window of the last H observations (``obs_window [B, H, obs_dim]``)::

    obs ──► task encoder (causal prefix mean of per-step features) ──► unit embedding z_t [B, H, E_dim]
    obs ──► input projection + position + proj(z_t) ──► shared causal Transformer blocks ──► x [B, H, d]
    x ──► x + MoE(LN(x)) ──► head: LN → Linear → tanh ──► action mean in [-1, 1]

Design decisions (the protocol relies on them):

* **Conditioning.** The task embedding is projected to ``d_model`` and *added to every position*
  rather than prepended as an extra token. The MoE gate routes each token on its own, so the task
  identity must sit in the residual stream of the token the gate sees; an extra token would reach it
  only through attention, which is frozen after stage 1. Adding also keeps the sequence length H.
* **Causal task embedding.** Position t's embedding comes from observations ≤ t only (a running mean of
  per-step features, then an MLP), so per-position outputs are strictly causal and the embedding of the
  last position summarises the whole window. That last embedding is the one the contrastive loss uses.
* **Stop-gradient.** By default (``StudentConfig.detach_task_embedding``) the policy sees the embedding
  through a stop-gradient: the encoder is shaped by the contrastive loss alone, so its space (and the
  prototypes kept in it) means "which task", and the distillation loss cannot pull it around.
* **Inferred or prototype embedding.** ``student(obs, task_ids=None)`` infers the embedding from the
  window (evaluation without task ids). ``student(obs, task_ids)`` uses the task's prototype instead: an
  EMA of the normalised last-position embeddings of that task's training windows, kept in the buffer
  ``prototypes [num_tasks, task_embed_dim]`` (in the state dict; it grows with :meth:`Student.add_task`).
  Training (:meth:`Student.losses`) conditions a share ``prototype_conditioning`` of the windows on
  their task's prototype and the rest on the inferred embedding, so both modes are trained: on MT25 the
  inferred mode cannot tell reach from pick-place in the first steps (same initial state distribution),
  the prototype mode can.
* **Parameter groups.** ``shared_parameters()`` = input projection, position embedding, task-embedding
  projection, the causal Transformer blocks and the MoE's input norm: the feature extractor the paper
  freezes after stage 1 (``freeze_shared``). The **task encoder is not shared**: it must keep learning
  to separate tasks that arrive later (a frozen encoder may map a new task onto an old task's cluster,
  and the gate would then route it to the old experts); replayed windows in the contrastive loss hold
  old clusters in place, and ``freeze_task_encoder`` is there if measurement says otherwise. ``moe``
  (experts and gate, frozen with its own machinery) and ``head`` are separate groups.
* **Per-task adapters** (``adapter_rank``, :mod:`cpd_fast.adapters`; off by default). Every task gets a
  low-rank update of each shared block's linear maps. A token uses its task's adapter: the given task id,
  in training the window's true task, and without a task id the task of the nearest prototype to the
  token's inferred embedding. A frozen trunk then stays plastic for new tasks while an old task's
  features stay bit for bit what they were (its adapter is frozen with it; ``adapter_parameters``).
* **Task-routed experts** (``expert_routing="task"``; default ``"gate"``, the paper's learned top-k router).
  A token goes to its own task's experts (the task its adapters use), each weighted 1/``experts_per_task``,
  and the gate is not consulted. The paper's gate routes an old task's tokens through every expert whose
  logit wins, so any expert that trains later (Phase 1's gate, Phase 2's fine-tuning) moves old tasks too;
  routed by task, an old task's experts serve it alone and can stay frozen (:mod:`cpd_fast.distill.methods`
  then freezes everything an old task's output depends on: its experts, adapters and prototype, and the task
  encoder with the shared layers). Without a task id the routing is as good as the nearest-prototype
  inference.
* **Task conditioning** (``task_conditioning="task"``, with task-routed experts; default ``"embedding"``).
  The trunk is conditioned on a task's own vector, never on the inferred embedding itself: the given
  task's, in training the window's true task's, and without a task id the task of each token's nearest
  prototype. The policy is then a function of (window, task), and the task encoder only *classifies*: it
  can keep learning on every task's (replayed) windows while each old task's vector, a copy of its
  prototype taken when the task freezes (``conditioning``, :meth:`freeze_conditioning`), keeps its
  actions bit for bit. The prototypes go on following the encoder for classification.
* **Padding at episode start.** Fewer than H observations: the window is left-padded and ``mask``
  (``[B, H]`` bool, True = real observation, the last position always real) marks the real ones; padded
  positions are ignored by attention and by the task encoder, so their values do not matter.
  :class:`HistoryBuffer` left-pads by repeating the first observation (Meta-World's own convention at
  reset: the observation's "previous frame" half equals the current one) and returns the mask too, so a
  window is sensible even for a caller that drops the mask.
* **Targets.** PPO teachers' Gaussian means are unbounded but the env clips actions to [-1, 1], so the
  MSE target is clipped to [-1, 1] (the tanh head cannot reach beyond it anyway).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cpd_fast.adapters import BlockAdapters, TaskRows
from cpd_fast.errors import require_int
from cpd_fast.moe import MoELayer

__all__ = [
    "EXPERT_ROUTINGS",
    "TASK_CONDITIONINGS",
    "HistoryBuffer",
    "Student",
    "StudentConfig",
    "supcon_loss",
]

EXPERT_ROUTINGS = ("gate", "task")
TASK_CONDITIONINGS = ("embedding", "task")


@dataclass
class StudentConfig:
    """Hyper-parameters of :class:`Student` (sizes in features; defaults sized for Meta-World MT25)."""

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
    # per-task low-rank adapters on the shared blocks (cpd_fast.adapters): None = none; r > 0 gives every
    # task its own rank-r update of each block's qkv, proj and FFN maps (a frozen trunk stays plastic)
    adapter_rank: int | None = None
    # which experts a token uses: "gate", the paper's learned top-k router; "task", the experts of the
    # token's task (the one its adapters use), each weighted 1/experts_per_task: no gate moves old tasks
    expert_routing: str = "gate"
    # what conditions the trunk: "embedding", the task's prototype (task id given) or the inferred embedding
    # (none); "task" (needs expert_routing="task"), always a task's own conditioning vector, of the given
    # task or of each token's nearest prototype, so that the encoder can keep learning without moving
    # an old task's actions (module docstring)
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


# ----------------------------------------------------------------------------- losses


ROW_BUCKET = 16  # Student.squared_error runs the windows that train in multiples of this


def _full_precision(y: torch.Tensor) -> torch.Tensor:
    """``y`` in float32 if mixed-precision training (``torch.autocast``) made it bf16/fp16, else itself:
    the loss compares the actions with the teachers' in full precision."""
    return y.float() if y.dtype in (torch.bfloat16, torch.float16) else y


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "L_out") on unit embeddings.

    z ``[B, D]`` (L2-normalised), labels ``[B]`` int. For each anchor i with at least one other window
    of its task: ``−mean_{p: y_p = y_i, p ≠ i} log softmax_{a ≠ i}(z_i·z_a / τ)[p]``, averaged over such
    anchors. Returns 0 (with a graph) when no anchor has a positive, e.g. a batch of one task-window each.
    """
    B = z.shape[0]
    sim = (z @ z.T) / temperature
    self_mask = torch.eye(B, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return z.sum() * 0.0
    # masked_fill, not multiply: the diagonal of log_prob is -inf and -inf * 0 is NaN
    per_anchor = log_prob.masked_fill(~pos, 0.0).sum(1) / n_pos.clamp(min=1)
    return -(per_anchor[has]).mean()


# ----------------------------------------------------------------------------- modules


class TaskEncoder(nn.Module):
    """Causal task encoder: obs ``[B, H, obs_dim]`` (+ mask ``[B, H]``) → unit embeddings ``[B, H, D]``.

    Per-step features f(o_t) are averaged over the real observations up to t (a running mean, so the
    encoder is causal and permutation-free within the prefix), then an MLP maps the mean to the
    embedding, which is L2-normalised. Meta-World tasks differ mainly in which objects and goals appear
    in the observation, which a per-step feature mean captures well.
    """

    def __init__(self, obs_dim: int, hidden: int, embed_dim: int):
        super().__init__()
        self.step = nn.Sequential(nn.Linear(obs_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.out = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))

    def forward(self, obs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(obs.dtype)
        f = self.step(obs) * m
        prefix_mean = f.cumsum(1) / m.cumsum(1).clamp(min=1.0)
        return F.normalize(self.out(prefix_mean), dim=-1)


class CausalBlock(nn.Module):
    """Pre-norm Transformer block with causal, padding-aware self-attention. ``[B, H, d]`` → same."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor,
        adapters: BlockAdapters | None = None,
        ids: torch.Tensor | TaskRows | None = None,
        last: bool = False,
    ) -> torch.Tensor:
        """``adapters`` (with ``ids``: each window's task ``[B]`` or each token's ``[B, H]``, or their
        :class:`~cpd_fast.adapters.TaskRows`) add the task's low-rank update to the four linear maps.
        ``last``: only the last position's output, ``[B, 1, d]`` (the keys and values still come from
        every position): a final block whose other positions nobody reads."""

        def linear(layer: nn.Linear, name: str, h: torch.Tensor, ids) -> torch.Tensor:
            y = layer(h)
            return y if adapters is None else y + getattr(adapters, name)(h, ids)

        B, H, d = x.shape
        qkv = linear(self.qkv, "qkv", self.ln1(x), ids)
        q, k, v = qkv.view(B, H, 3, self.n_heads, d // self.n_heads).unbind(2)
        if last:  # queries, residual stream and the maps after attention: the last position only
            q, x, attn_mask, H = q[:, -1:], x[:, -1:], attn_mask[..., -1:, :], 1
            if isinstance(ids, TaskRows):
                ids = ids.last()
            elif ids is not None and ids.dim() == 2:
                ids = ids[:, -1:]
        p = self.dropout if self.training else 0.0
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            # mixed precision on CPU: at H = 8 positions the flash kernel is ~2x slower than the math one
            with sdpa_kernel(SDPBackend.MATH):
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        a = a.transpose(1, 2).reshape(B, H, d)
        x = x + F.dropout(linear(self.proj, "proj", a, ids), p, self.training)
        u = self.ff[1](linear(self.ff[0], "ff1", self.ln2(x), ids))
        return x + F.dropout(linear(self.ff[2], "ff2", u, ids), p, self.training)


class Student(nn.Module):
    """Continual-distillation student. See the module docstring for the design.

    Args:
        config: :class:`StudentConfig`.
        num_tasks: tasks known at construction (prototype rows); later tasks come via :meth:`add_task`.
        num_experts: MoE experts; default ``max(num_tasks · experts_per_task, top_k)`` (top-k routing
            needs at least k experts).
    """

    def __init__(
        self, config: StudentConfig | None = None, num_tasks: int = 1, num_experts: int | None = None
    ):
        super().__init__()
        cfg = config if config is not None else StudentConfig()
        if not isinstance(cfg, StudentConfig):
            raise TypeError(f"config must be a StudentConfig, got {type(cfg).__name__}")
        require_int("num_tasks", num_tasks, 0)
        if num_experts is None:
            num_experts = max(num_tasks * cfg.experts_per_task, cfg.top_k)
        if cfg.expert_routing == "task" and num_experts < num_tasks * cfg.experts_per_task:
            raise ValueError(
                f"expert_routing='task' needs experts_per_task={cfg.experts_per_task} experts for each of "
                f"{num_tasks} tasks, got num_experts={num_experts}"
            )
        self.config = cfg
        d = cfg.d_model
        # -- shared (frozen after stage 1)
        self.obs_proj = nn.Linear(cfg.obs_dim, d)
        self.pos_emb = nn.Parameter(torch.randn(cfg.history, d) * 0.02)
        self.task_proj = nn.Linear(cfg.task_embed_dim, d)
        self.blocks = nn.ModuleList(
            CausalBlock(d, cfg.n_heads, cfg.d_ff, cfg.dropout) for _ in range(cfg.n_layers)
        )
        self.moe_norm = nn.LayerNorm(d)
        # -- task encoder (own group)
        self.task_encoder = TaskEncoder(cfg.obs_dim, cfg.task_encoder_hidden, cfg.task_embed_dim)
        # -- MoE (own freezing machinery) and head
        self.moe = MoELayer(
            d, cfg.expert_hidden, num_experts, top_k=cfg.top_k,
            new_expert_gate_bias=cfg.new_expert_gate_bias, aux_loss_weight=cfg.aux_loss_weight,
            backend=cfg.moe_backend,
        )  # fmt: skip
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.act_dim))
        # -- per-task adapters on the shared blocks (own group; none without adapter_rank)
        self.adapters = nn.ModuleList(
            BlockAdapters(d, cfg.d_ff, cfg.adapter_rank, num_tasks) for _ in range(cfg.n_layers)
        ) if cfg.adapter_rank else nn.ModuleList()  # fmt: skip
        # prototypes: EMA of normalised embeddings per task; count 0 = no window of the task seen yet
        self.register_buffer("prototypes", torch.zeros(num_tasks, cfg.task_embed_dim))
        self.register_buffer("prototype_count", torch.zeros(num_tasks, dtype=torch.int64))
        self.frozen_prototypes: set[int] = set()  # tasks whose prototype training leaves as it is
        # task_conditioning="task": each task's conditioning vector, its prototype until the task freezes
        self.register_buffer("conditioning", torch.zeros(num_tasks, cfg.task_embed_dim))
        self.frozen_conditioning: set[int] = set()

    # -- sizes -----------------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return self.prototypes.shape[0]

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    # -- input checks ----------------------------------------------------------------------------

    def _check(self, obs: torch.Tensor, mask: torch.Tensor | None, task_ids: torch.Tensor | None):
        cfg = self.config
        if not isinstance(obs, torch.Tensor):
            raise TypeError(f"obs_window must be a torch.Tensor, got {type(obs).__name__}")
        if obs.dim() != 3 or obs.shape[1] != cfg.history or obs.shape[2] != cfg.obs_dim:
            raise ValueError(
                f"obs_window must have shape [B, {cfg.history}, {cfg.obs_dim}], got {tuple(obs.shape)}"
            )
        if not obs.is_floating_point():
            raise TypeError(f"obs_window must be a floating tensor, got {obs.dtype}")
        if mask is None:
            mask = torch.ones(obs.shape[:2], dtype=torch.bool, device=obs.device)
        else:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError("mask must be a bool torch.Tensor [B, H] (True = real observation)")
            if mask.shape != obs.shape[:2]:
                raise ValueError(f"mask must have shape {tuple(obs.shape[:2])}, got {tuple(mask.shape)}")
            if not bool(mask[:, -1].all()):
                raise ValueError("mask[:, -1] must be True: the last position is the current observation")
        if task_ids is not None:
            if not isinstance(task_ids, torch.Tensor) or task_ids.dtype != torch.int64:
                raise TypeError("task_ids must be a LongTensor [B] or None")
            if task_ids.shape != obs.shape[:1]:
                raise ValueError(f"task_ids must have shape [{obs.shape[0]}], got {tuple(task_ids.shape)}")
            if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= self.num_tasks):
                raise ValueError(f"task_ids must lie in [0, {self.num_tasks}), got {task_ids.tolist()}")
        return mask

    # -- forward ---------------------------------------------------------------------------------

    def task_embedding(self, obs_window: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Inferred unit task embedding of each window (from its last position): ``[B, task_embed_dim]``."""
        mask = self._check(obs_window, mask, None)
        return self.task_encoder(obs_window, mask)[:, -1]

    def prototype(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Unit prototype embeddings ``[B, task_embed_dim]``; raises if a task has no prototype yet."""
        if bool((self.prototype_count[task_ids] == 0).any()):
            missing = sorted(set(task_ids[self.prototype_count[task_ids] == 0].tolist()))
            raise ValueError(f"no prototype yet for task ids {missing}: train on their windows first")
        return F.normalize(self.prototypes[task_ids], dim=-1)

    def _nearest_prototype(self, z: torch.Tensor) -> torch.Tensor | None:
        """The task whose prototype is nearest (cosine) to each unit embedding ``z [..., D]``: LongTensor
        ``[...]``; None before any prototype exists."""
        seen = (self.prototype_count > 0).nonzero().squeeze(1)
        if seen.numel() == 0:
            return None
        return seen[(z @ F.normalize(self.prototypes[seen], dim=-1).T).argmax(-1)]

    def infer_task(self, obs_window: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest prototype (cosine) to each window's inferred embedding: LongTensor ``[B]``."""
        if not bool((self.prototype_count > 0).any()):
            raise ValueError("no prototypes yet: train on some windows first")
        return self._nearest_prototype(self.task_embedding(obs_window, mask))

    def adapter_route(self, z: torch.Tensor, tasks: torch.Tensor | None) -> torch.Tensor:
        """The task whose adapters (and, with ``expert_routing="task"``, experts) a token uses: ``tasks [B]``
        (one per window) when given, else each token's, LongTensor ``[B, H]``: the task whose prototype is
        nearest (cosine) to the token's inferred embedding ``z [B, H, D]`` (−1, none, before any prototype
        exists)."""
        if tasks is not None:
            return tasks
        ids = self._nearest_prototype(z)
        return torch.full(z.shape[:2], -1, dtype=torch.long, device=z.device) if ids is None else ids

    def _trunk(
        self,
        obs,
        mask,
        task_ids,
        positions: str,
        use_prototype: torch.Tensor | None = None,
        adapter_tasks: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
    ):
        """Shared trunk; returns (features before the head, per-position embeddings [B, H, D]).

        ``task_ids`` given: condition on the prototypes, or only the rows where ``use_prototype [B]`` is set.
        Adapters (if any) follow ``adapter_tasks [B]``, else ``task_ids``, else the inferred task. ``z``:
        the task encoder's output on these windows, when the caller has computed it already.
        """
        z = self.task_encoder(obs, mask) if z is None else z  # [B, H, D]
        by_task = self.config.expert_routing == "task"
        ids = None
        if len(self.adapters) or by_task:
            ids = self.adapter_route(z.detach(), adapter_tasks if adapter_tasks is not None else task_ids)
        if self.config.task_conditioning == "task":  # the routed task's own vector, per window or token
            cond = self.task_vectors(ids)
            cond = cond[:, None, :].expand_as(z) if cond.dim() == 2 else cond
        else:
            cond = z
            if task_ids is not None:
                proto = self.prototype(task_ids)[:, None, :].expand_as(z)
                cond = proto if use_prototype is None else torch.where(use_prototype[:, None, None], proto, z)
            if self.config.detach_task_embedding:
                cond = cond.detach()
        x = self.obs_proj(obs) + self.pos_emb + self.task_proj(cond)
        H = obs.shape[1]
        causal = torch.ones(H, H, dtype=torch.bool, device=obs.device).tril()
        # a position attends to earlier real positions and always to itself (so padded rows are not NaN)
        attn = (causal & mask[:, None, :]) | torch.eye(H, dtype=torch.bool, device=obs.device)
        attn = attn[:, None]  # [B, 1, H, H], broadcast over heads
        rows = TaskRows(ids, x.shape) if len(self.adapters) else None  # each task's tokens, found once
        adapters = self.adapters if len(self.adapters) else [None] * len(self.blocks)
        for i, (block, adapt) in enumerate(zip(self.blocks, adapters, strict=True)):
            # only the last position leaves the trunk: the final block computes nothing else
            x = block(x, attn, adapt, rows, last=positions == "last" and i == len(self.blocks) - 1)
        if positions == "last":
            x = x[:, -1]
        experts = self.task_experts(ids, positions) if by_task else None
        return x + self.moe(self.moe_norm(x), experts), z

    def task_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Unit conditioning vectors of tasks ``ids`` (any shape; < 0, no task yet: zero) → ``[*ids, D]``."""
        v = F.normalize(self.conditioning, dim=-1)[ids.clamp(min=0)]
        return torch.where(ids[..., None] >= 0, v, 0.0)

    def task_experts(self, ids: torch.Tensor, positions: str) -> torch.Tensor:
        """Expert ids of each token under task routing. The tasks own the last ``num_tasks · k`` experts in
        task order, k each (k = ``experts_per_task``; :meth:`add_task` appends a task's k experts with it;
        experts before them, such as the ``top_k`` minimum of a one-task student, are nobody's): task t
        owns ``o + t·k … o + t·k + k − 1`` with ``o = num_experts − num_tasks · k``. ``ids`` ``[B]`` or
        ``[B, H]`` → ``[B, k]`` (``positions="last"``) or ``[B, H, k]``; a task id < 0 gives empty slots
        (−1)."""
        k = self.config.experts_per_task
        first = self.num_experts - self.num_tasks * k
        if ids.dim() == 2 and positions == "last":
            ids = ids[:, -1]
        elif ids.dim() == 1 and positions == "all":
            ids = ids[:, None].expand(-1, self.config.history)
        slots = first + ids[..., None] * k + torch.arange(k, device=ids.device)
        return torch.where(ids[..., None] >= 0, slots, -1)

    def forward(
        self,
        obs_window: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Action mean of each window's last observation: ``[B, H, obs_dim]`` → ``[B, act_dim]`` in [-1, 1].

        ``task_ids=None`` infers the task embedding from the window; a LongTensor ``[B]`` uses the tasks'
        prototypes. ``mask [B, H]`` marks real observations (default: all real).
        """
        mask = self._check(obs_window, mask, task_ids)
        h, _ = self._trunk(obs_window, mask, task_ids, "last")
        return torch.tanh(self.head(h))

    def forward_sequence(
        self,
        obs_window: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-position action means ``[B, H, act_dim]``; position t depends on observations ≤ t only."""
        mask = self._check(obs_window, mask, task_ids)
        h, _ = self._trunk(obs_window, mask, task_ids, "all")
        return torch.tanh(self.head(h))

    def check_loss_inputs(
        self,
        obs_window: torch.Tensor,
        teacher_action_mean: torch.Tensor,
        task_ids: torch.Tensor | None,
        mask: torch.Tensor | None,
        use_prototype: torch.Tensor | None,
    ) -> tuple[torch.Tensor, bool]:
        """Validate a training batch (see :meth:`losses`); returns ``(mask, per_position)``."""
        cfg = self.config
        if task_ids is None:
            raise ValueError("losses() needs task_ids (contrastive labels)")
        mask = self._check(obs_window, mask, task_ids)
        if not isinstance(teacher_action_mean, torch.Tensor):
            raise TypeError("teacher_action_mean must be a torch.Tensor")
        B, H = obs_window.shape[:2]
        if teacher_action_mean.shape not in ((B, cfg.act_dim), (B, H, cfg.act_dim)):
            raise ValueError(
                f"teacher_action_mean must have shape [{B}, {cfg.act_dim}] or [{B}, {H}, {cfg.act_dim}], "
                f"got {tuple(teacher_action_mean.shape)}"
            )
        if use_prototype is not None and (
            not isinstance(use_prototype, torch.Tensor) or use_prototype.shape != (B,)
        ):
            raise ValueError(f"use_prototype must be a bool tensor of shape [{B}]")
        return mask, teacher_action_mean.dim() == 3

    def predict(
        self,
        obs_window: torch.Tensor,
        mask: torch.Tensor,
        task_ids: torch.Tensor,
        use_prototype: torch.Tensor | None,
        per_position: bool,
        z: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time prediction on checked inputs: ``(action means [B, act_dim] or [B, H, act_dim],
        last-position inferred embeddings [B, task_embed_dim])``. Rows with ``use_prototype`` are conditioned
        on their task's prototype, the others on the inferred embedding. ``z``: the task encoder's output
        ``[B, H, D]`` if already computed."""
        h, z = self._trunk(
            obs_window, mask, task_ids if use_prototype is not None else None,
            "all" if per_position else "last", use_prototype, adapter_tasks=task_ids, z=z,
        )  # fmt: skip
        return torch.tanh(_full_precision(self.head(h))), z[:, -1]

    def frozen_rows(self, task_ids: torch.Tensor) -> torch.Tensor | None:
        """Training windows whose prediction reads no trainable parameter: bool ``[B]``, or None when every
        window's may (the common case: a gate routes, or a shared layer or the head trains).

        With task-routed experts, frozen shared layers and head, and conditioning that carries no gradient,
        a window of task t reads only t's experts and adapters besides frozen tensors: it is idle when those
        are frozen too (an old task's replayed window under parameter isolation). Its MSE gradient is then
        exactly zero, and :meth:`losses` leaves it out of the forward pass.
        """
        cfg = self.config
        if not torch.is_grad_enabled() or cfg.expert_routing != "task":
            return None
        if any(p.requires_grad for p in (*self.shared_parameters(), *self.head_parameters())):
            return None
        if cfg.task_conditioning == "embedding" and not cfg.detach_task_embedding:
            if any(p.requires_grad for p in self.task_encoder_parameters()):
                return None
        moe = self.moe
        experts_trainable = moe.w1.requires_grad and (moe.b1 is None or moe.b1.requires_grad)
        tasks = torch.arange(self.num_tasks, device=moe.frozen_mask.device)
        own = self.task_experts(tasks, "last")  # [T, k], -1: an empty slot
        trained = ~(moe.frozen_mask[own.clamp(min=0)] | (own < 0)).all(-1) if experts_trainable else (
            torch.zeros(self.num_tasks, dtype=torch.bool, device=tasks.device))  # fmt: skip
        if len(self.adapters):
            adapted = [any(p.requires_grad for p in self.adapter_parameters([t])) for t in tasks.tolist()]
            trained = trained | torch.tensor(adapted, device=tasks.device)
        return ~trained.to(task_ids.device)[task_ids]

    def losses(
        self,
        obs_window: torch.Tensor,
        teacher_action_mean: torch.Tensor,
        task_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        update_prototypes: bool | None = None,
        use_prototype: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Distillation losses on a batch of windows.

        Args:
            obs_window: ``[B, H, obs_dim]``.
            teacher_action_mean: ``[B, act_dim]`` (target for the last position) or ``[B, H, act_dim]``
                (a target per position; padded positions are ignored). Clipped to [-1, 1].
            task_ids: LongTensor ``[B]``: labels for the contrastive loss and the prototype update. The
                policy is conditioned on the *inferred* embedding, as at evaluation without task ids.
            update_prototypes: EMA-update the prototypes from this batch (default: ``self.training``).
            use_prototype: bool ``[B]``: windows conditioned on their task's prototype (the others on the
                inferred embedding); default none. The prototypes are updated from this batch first.

        Returns ``dict(mse, contrastive, aux, total)`` of scalars with
        ``total = mse + aux + contrastive_weight · contrastive`` (aux already carries its weight; under
        parameter isolation, :meth:`frozen_rows`, ``mse`` is that of the windows that train and ``total``
        counts it by their share of the batch, so its gradient is the whole batch's MSE gradient). A
        data-parallel trainer computes the same losses over a global batch from :meth:`predict`
        (:class:`cpd_fast.distill.train.DistillLoss`).
        """
        cfg = self.config
        mask, per_position = self.check_loss_inputs(
            obs_window, teacher_action_mean, task_ids, mask, use_prototype
        )
        update = update_prototypes if update_prototypes is not None else self.training
        z = self.task_encoder(obs_window, mask)
        if use_prototype is not None and update:  # every task of the batch has a prototype before it is used
            self.update_prototypes(z[:, -1].detach(), task_ids)
            update = False
        sq, n_trained, n_all = self.squared_error(
            obs_window, teacher_action_mean, task_ids, mask, use_prototype, per_position, z
        )
        z_last = z[:, -1]
        contrastive = supcon_loss(z_last, task_ids, cfg.contrastive_temperature)
        aux = self.moe.aux_loss
        if update:
            self.update_prototypes(z_last.detach(), task_ids)
        total = sq / n_all + aux + cfg.contrastive_weight * contrastive
        mse = sq.detach() / n_trained.clamp(min=1)
        return {"mse": mse, "contrastive": contrastive, "aux": aux, "total": total}

    def squared_error(
        self,
        obs_window: torch.Tensor,
        teacher_action_mean: torch.Tensor,
        task_ids: torch.Tensor,
        mask: torch.Tensor,
        use_prototype: torch.Tensor | None,
        per_position: bool,
        z: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MSE's parts on checked inputs: ``(sum of squared errors over the windows that train, their
        number of target entries, the batch's number)``. ``sum / batch's number`` is the batch's MSE as a
        loss: windows of :meth:`frozen_rows` are not run, because their gradient is exactly zero (their
        error is fixed, so ``sum / their number`` is the MSE of the windows that train, which is what
        :meth:`losses` reports as ``mse``). ``z``: the task encoder's output on the batch."""
        idle = self.frozen_rows(task_ids)
        B, act_dim = obs_window.shape[0], self.config.act_dim
        n_all = (mask.sum() if per_position else torch.tensor(B)) * act_dim
        if idle is not None and bool(idle.any()):
            live = (~idle).nonzero().squeeze(1)
            if live.numel() == 0:  # no window here trains: a zero loss on the trainable parameters
                zero = obs_window.new_zeros(())
                return self.zero_on_trainable(), zero, n_all.to(zero.dtype)
            # rows in whole buckets (copies of live rows, weight 0, make up the last): a batch's shapes then
            # take a few values, not one per live count (a new shape costs CPU kernels ~25% of a step)
            n = live.numel()
            m = -(-n // ROW_BUCKET) * ROW_BUCKET
            rows = live.repeat(-(-m // n))[:m]
            obs_window, teacher_action_mean, task_ids, mask, z = (
                t.index_select(0, rows) for t in (obs_window, teacher_action_mean, task_ids, mask, z)
            )
            use_prototype = None if use_prototype is None else use_prototype.index_select(0, rows)
            weight = (torch.arange(rows.numel(), device=rows.device) < n).to(z.dtype)
        else:
            weight = None
        pred, _ = self.predict(obs_window, mask, task_ids, use_prototype, per_position, z)
        err = (pred - teacher_action_mean.to(pred.dtype).clamp(-1.0, 1.0)) ** 2  # [B, (H,) act_dim]
        # each prediction's weight: its position is real (per position), its row is no bucket filler
        w = mask.to(pred.dtype) if per_position else pred.new_ones(pred.shape[0])
        if weight is not None:
            w = w * (weight[:, None] if per_position else weight).to(pred.dtype)
        return (err * w.unsqueeze(-1)).sum(), w.sum() * act_dim, n_all.to(pred.dtype)

    def zero_on_trainable(self) -> torch.Tensor:
        """A zero scalar on every trainable parameter: each gets a (zero) gradient from its backward."""
        return sum((p.view(-1)[0] for p in self.parameters() if p.requires_grad), torch.zeros(())) * 0.0

    @torch.no_grad()
    def update_prototypes(self, z: torch.Tensor, task_ids: torch.Tensor) -> None:
        """EMA update: for each task in the batch, proto ← m·proto + (1−m)·mean(z of its windows).

        A task's first update sets its prototype to the batch mean (no bias towards zero). Tasks in
        ``frozen_prototypes`` (:meth:`freeze_prototypes`) keep theirs.
        """
        m = self.config.prototype_momentum
        for t in task_ids.unique().tolist():
            if t in self.frozen_prototypes:
                continue
            mean = z[task_ids == t].mean(0)
            if int(self.prototype_count[t]) == 0:
                self.prototypes[t] = mean
            else:
                self.prototypes[t].mul_(m).add_(mean, alpha=1.0 - m)
            self.prototype_count[t] += int((task_ids == t).sum())
            if t not in self.frozen_conditioning:
                self.conditioning[t] = self.prototypes[t]

    # -- rollouts --------------------------------------------------------------------------------

    @torch.no_grad()
    def act(
        self,
        obs: torch.Tensor | np.ndarray,
        history: HistoryBuffer,
        reset_mask: torch.Tensor | np.ndarray | None = None,
        task_ids: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One batched rollout step: push ``obs [N, obs_dim]`` into ``history`` and return ``[N, act_dim]``.

        ``reset_mask [N]`` (bool) marks envs whose ``obs`` starts a new episode (their history restarts).
        ``rows`` (LongTensor ``[n]``): the actions of these envs only, ``[n, act_dim]`` (every history still
        advances; ``task_ids``, if given, is then ``[n]``): a rollout whose other envs are idle skips them.
        Runs in eval mode (restores the previous mode) and on the parameters' device.
        """
        window, mask = history.push(obs, reset_mask)
        if rows is not None:
            window, mask = window[rows], mask[rows]
        if not self.training:  # switching modes walks every submodule: not on each step of an evaluation
            return self(window, task_ids=task_ids, mask=mask)
        self.eval()
        try:
            return self(window, task_ids=task_ids, mask=mask)
        finally:
            self.train()

    # -- growth ----------------------------------------------------------------------------------

    @torch.no_grad()
    def add_task(self, n_new_experts: int | None = None) -> list[int]:
        """Make room for one more task: a prototype row and ``n_new_experts`` (default
        ``experts_per_task``) dormant experts (gate bias ``new_expert_gate_bias``, zero gate weights).

        Returns the new experts' indices; the new task id is ``num_tasks - 1``. The MoE's parameters
        are replaced by bigger ones: call ``student.moe.update_optimizer(opt)`` or rebuild the optimizer.
        """
        n = self.config.experts_per_task if n_new_experts is None else n_new_experts
        require_int("n_new_experts", n, 0)
        new = self.moe.add_experts(n) if n > 0 else []
        for adapters in self.adapters:
            adapters.add_task()
        self.prototypes = torch.cat([self.prototypes, self.prototypes.new_zeros(1, self.prototypes.shape[1])])
        self.prototype_count = torch.cat([self.prototype_count, self.prototype_count.new_zeros(1)])
        self.conditioning = torch.cat(
            [self.conditioning, self.conditioning.new_zeros(1, self.config.task_embed_dim)]
        )
        return new

    # -- parameter groups and freezing -------------------------------------------------------------

    def shared_modules(self) -> list[nn.Module]:
        return [self.obs_proj, self.task_proj, *self.blocks, self.moe_norm]

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Input projection, position embedding, task-embedding projection, Transformer blocks, MoE norm."""
        yield self.pos_emb
        for m in self.shared_modules():
            yield from m.parameters()

    def task_encoder_parameters(self) -> Iterator[nn.Parameter]:
        return self.task_encoder.parameters()

    def adapter_parameters(self, tasks: list[int] | None = None) -> Iterator[nn.Parameter]:
        """The adapters of ``tasks`` (default: every task); none without ``adapter_rank``."""
        for adapters in self.adapters:
            for t in range(self.num_tasks) if tasks is None else tasks:
                yield from adapters.task_parameters(t)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.head.parameters()

    @staticmethod
    def _set_trainable(params, flag: bool) -> None:
        # requires_grad=False plus grad=None: torch optimizers skip parameters whose grad is None, so no
        # weight decay or stale momentum moves them (bit-identical across steps)
        for p in params:
            p.requires_grad_(flag)
            if not flag:
                p.grad = None

    def freeze_shared(self) -> None:
        self._set_trainable(self.shared_parameters(), False)

    def unfreeze_shared(self) -> None:
        self._set_trainable(self.shared_parameters(), True)

    def freeze_task_encoder(self) -> None:
        self._set_trainable(self.task_encoder_parameters(), False)

    def unfreeze_task_encoder(self) -> None:
        self._set_trainable(self.task_encoder_parameters(), True)

    def freeze_adapters(self, tasks: list[int] | None = None) -> None:
        self._set_trainable(self.adapter_parameters(tasks), False)

    def unfreeze_adapters(self, tasks: list[int] | None = None) -> None:
        self._set_trainable(self.adapter_parameters(tasks), True)

    def freeze_prototypes(self, tasks: list[int]) -> None:
        """Training stops updating these tasks' prototypes (their task-id conditioning stays as it is)."""
        self.frozen_prototypes |= {int(t) for t in tasks}

    def unfreeze_prototypes(self) -> None:
        self.frozen_prototypes = set()

    def freeze_conditioning(self, tasks: list[int]) -> None:
        """These tasks' conditioning vectors stay as they are (their prototypes may go on moving)."""
        self.frozen_conditioning |= {int(t) for t in tasks}

    def unfreeze_conditioning(self) -> None:
        self.frozen_conditioning = set()

    def freeze_head(self) -> None:
        self._set_trainable(self.head_parameters(), False)

    def unfreeze_head(self) -> None:
        self._set_trainable(self.head_parameters(), True)

    # -- checkpoints -----------------------------------------------------------------------------

    def get_extra_state(self) -> dict:
        return {"config": asdict(self.config)}

    def set_extra_state(self, state: Any) -> None:
        pass  # the constructor's config wins; from_state_dict reads it

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        protos = state_dict.get(prefix + "prototypes")
        if isinstance(protos, torch.Tensor) and protos.shape[0] != self.num_tasks:
            # a checkpoint taken after growth: match its task count (the MoE resizes itself)
            self.prototypes = self.prototypes.new_zeros(protos.shape)
            self.prototype_count = self.prototype_count.new_zeros(protos.shape[0])
            self.conditioning = self.conditioning.new_zeros(protos.shape)
            for adapters in self.adapters:  # one adapter per task
                while adapters.qkv.num_tasks < protos.shape[0]:
                    adapters.add_task()
        if isinstance(protos, torch.Tensor) and prefix + "conditioning" not in state_dict:
            # a checkpoint from before task conditioning: every vector was its prototype
            state_dict[prefix + "conditioning"] = protos.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_state_dict(cls, state_dict: dict, **config_overrides) -> Student:
        """Build a student sized from ``state_dict`` (tasks, experts) with its saved config, and load it."""
        extra = state_dict.get("_extra_state") or {}
        fields = {f.name for f in dataclasses.fields(StudentConfig)}
        saved = {k: v for k, v in dict(extra.get("config", {})).items() if k in fields}
        cfg = StudentConfig(**{**saved, **config_overrides})
        student = cls(
            cfg, num_tasks=state_dict["prototypes"].shape[0], num_experts=state_dict["moe.w1"].shape[0]
        )
        student.load_state_dict(state_dict)
        return student


# ----------------------------------------------------------------------------- rollout history


class HistoryBuffer:
    """Per-env history of the last H observations for batched rollouts.

    :meth:`push` appends one observation per env and returns ``(window [N, H, obs_dim], mask [N, H])``.
    An env whose episode (re)starts has its history cleared: the window is left-padded by repeating its
    first observation and the mask marks only the real observations.
    """

    def __init__(self, num_envs: int, history: int, obs_dim: int, device: torch.device | str = "cpu"):
        if num_envs < 1 or history < 1 or obs_dim < 1:
            raise ValueError("num_envs, history and obs_dim must be positive")
        self.num_envs, self.history, self.obs_dim = num_envs, history, obs_dim
        self.obs = torch.zeros(num_envs, history, obs_dim, device=device)
        self.mask = torch.zeros(num_envs, history, dtype=torch.bool, device=device)
        self.started = torch.zeros(num_envs, dtype=torch.bool, device=device)

    @classmethod
    def for_student(cls, student: Student, num_envs: int) -> HistoryBuffer:
        cfg = student.config
        return cls(num_envs, cfg.history, cfg.obs_dim, device=student.prototypes.device)

    def reset(self, env_ids=None) -> None:
        """Forget the history of ``env_ids`` (all envs if None); their next push starts an episode."""
        idx = slice(None) if env_ids is None else torch.as_tensor(env_ids, device=self.obs.device)
        self.started[idx] = False
        self.mask[idx] = False

    def push(self, obs, reset_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``obs [N, obs_dim]``; envs with ``reset_mask`` True (or never pushed) start an episode."""
        obs = torch.as_tensor(obs, dtype=self.obs.dtype, device=self.obs.device)
        if obs.shape != (self.num_envs, self.obs_dim):
            raise ValueError(f"obs must have shape [{self.num_envs}, {self.obs_dim}], got {tuple(obs.shape)}")
        fresh = ~self.started
        if reset_mask is not None:
            fresh = fresh | torch.as_tensor(reset_mask, dtype=torch.bool, device=self.obs.device)
        self.obs = torch.roll(self.obs, -1, dims=1)
        self.mask = torch.roll(self.mask, -1, dims=1)
        self.obs[:, -1] = obs
        self.mask[:, -1] = True
        if bool(fresh.any()):
            self.obs[fresh] = obs[fresh, None, :].expand(-1, self.history, -1)
            self.mask[fresh] = False
            self.mask[fresh, -1] = True
        self.started[:] = True
        return self.obs.clone(), self.mask.clone()
