"""The student model: a causal Transformer over the observation history, conditioned on a task embedding,
with a growable Mixture-of-Experts layer and a tanh action-mean head. Tensors in, tensors out: the losses
are :mod:`cpd_fast.student.loss`, what trains when is :mod:`cpd_fast.distill.methods`.

Data flow for one window of the last H observations (``obs_window [B, H, obs_dim]``)::

    obs ──► task encoder (causal prefix mean of per-step features) ──► unit embedding z_t [B, H, E_dim]
    z_t ──► routing: each token's task (given, or nearest prototype) ──► conditioning, adapters, experts
    obs ──► input projection + position + proj(conditioning) ──► shared causal Transformer blocks ──► x
    x ──► x + MoE(LN(x)) ──► head: LN → Linear → tanh ──► action mean in [-1, 1]

* **Causal task embedding.** Position t's embedding comes from observations ≤ t only (a running mean of
  per-step features, then an MLP), so per-position outputs are strictly causal and the embedding of the
  last position summarises the whole window. That last embedding is the one the contrastive loss uses.
* **Inferred or prototype embedding.** ``student(obs, task_ids=None)`` infers the task from the window
  (evaluation without task ids); ``student(obs, task_ids)`` uses the given tasks' prototypes or vectors
  (:mod:`cpd_fast.student.routing`, :mod:`cpd_fast.student.prototypes`).
* **Growth** (:meth:`Student.add_task`): a prototype row, the task's adapters and ``experts_per_task``
  dormant experts; checkpoints taken after growth load into a student of the birth size
  (:meth:`Student.from_state_dict` sizes it from the checkpoint).
* **Parameter groups**: :mod:`cpd_fast.student.groups`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cpd_fast.errors import require_int
from cpd_fast.moe import MoELayer
from cpd_fast.student import groups, loss, rollout, routing
from cpd_fast.student.adapters import BlockAdapters, TaskRows
from cpd_fast.student.config import StudentConfig
from cpd_fast.student.prototypes import PrototypeBank

__all__ = ["CausalBlock", "Student", "TaskEncoder"]


def _full_precision(y: torch.Tensor) -> torch.Tensor:
    """``y`` in float32 if mixed-precision training (``torch.autocast``) made it bf16/fp16, else itself:
    the loss compares the actions with the teachers' in full precision."""
    return y.float() if y.dtype in (torch.bfloat16, torch.float16) else y


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
        :class:`~cpd_fast.student.adapters.TaskRows`) add the task's low-rank update to the four linear maps.
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
            # mixed precision on CPU: at a few positions the flash kernel is slower than the math one
            # (bench/README.md, bf16 training)
            with sdpa_kernel(SDPBackend.MATH):
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        a = a.transpose(1, 2).reshape(B, H, d)
        x = x + F.dropout(linear(self.proj, "proj", a, ids), p, self.training)
        u = self.ff[1](linear(self.ff[0], "ff1", self.ln2(x), ids))
        return x + F.dropout(linear(self.ff[2], "ff2", u, ids), p, self.training)


class Student(PrototypeBank):
    """Continual-distillation student (module docstring); its prototype bank is its base class.

    Args:
        config: :class:`~cpd_fast.student.config.StudentConfig`.
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
        # the creation order below is the order of the initial random draws: changing it changes every run
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
        self.init_bank(num_tasks, cfg.task_embed_dim, cfg.prototype_momentum)

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    # the functions that take the student first, as methods (each has one definition, in its module)
    act = rollout.act  # student.act(obs, history, reset_mask, task_ids, rows): one rollout step
    losses = loss.distill_losses  # student.losses(obs, target, task_ids, mask, ...): the training loss
    parameter_group = groups.parameter_group  # student.parameter_group("shared"), ("adapters", [t])
    set_frozen = groups.set_frozen  # student.set_frozen({"shared": None, "experts": [0, 1], ...})

    # -- input checks ----------------------------------------------------------------------------

    def check_inputs(self, obs: torch.Tensor, mask: torch.Tensor | None, task_ids: torch.Tensor | None):
        """Validate a batch of windows; returns the mask (all real when None)."""
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
        mask = self.check_inputs(obs_window, mask, None)
        return self.task_encoder(obs_window, mask)[:, -1]

    def infer_task(self, obs_window: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest prototype (cosine) to each window's inferred embedding: LongTensor ``[B]``."""
        if not bool((self.prototype_count > 0).any()):
            raise ValueError("no prototypes yet: train on some windows first")
        return self.nearest_prototype(self.task_embedding(obs_window, mask))

    def task_experts(self, ids: torch.Tensor, positions: str) -> torch.Tensor:
        """Each token's experts under task routing (:func:`cpd_fast.student.routing.task_experts`)."""
        return routing.task_experts(ids, positions, self.num_experts, self.num_tasks, self.config)

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
            given = adapter_tasks if adapter_tasks is not None else task_ids
            ids = routing.token_tasks(self, z.detach(), given)
        cond = routing.conditioning_input(self, self.config, z, ids, task_ids, use_prototype)
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
        mask = self.check_inputs(obs_window, mask, task_ids)
        h, _ = self._trunk(obs_window, mask, task_ids, "last")
        return torch.tanh(self.head(h))

    def forward_sequence(
        self,
        obs_window: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-position action means ``[B, H, act_dim]``; position t depends on observations ≤ t only."""
        mask = self.check_inputs(obs_window, mask, task_ids)
        h, _ = self._trunk(obs_window, mask, task_ids, "all")
        return torch.tanh(self.head(h))

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
        on their task's prototype, the others on the inferred embedding; adapters and experts follow
        ``task_ids``. ``z``: the task encoder's output ``[B, H, D]`` if already computed."""
        h, z = self._trunk(
            obs_window, mask, task_ids if use_prototype is not None else None,
            "all" if per_position else "last", use_prototype, adapter_tasks=task_ids, z=z,
        )  # fmt: skip
        return torch.tanh(_full_precision(self.head(h))), z[:, -1]

    def experts_of_task(self, task: int) -> list[int]:
        """The experts task ``task`` owns (the layout of :func:`cpd_fast.student.routing.task_experts`)."""
        require_int("task", task, 0)
        if task >= self.num_tasks:
            raise ValueError(f"task {task} is not one of this student's {self.num_tasks} tasks")
        return self.task_experts(torch.tensor([task]), "last")[0].tolist()

    # -- growth ----------------------------------------------------------------------------------

    @torch.no_grad()
    def add_task(self, n_new_experts: int | None = None) -> list[int]:
        """Make room for one more task: a prototype row, its adapters and ``n_new_experts`` (default
        ``experts_per_task``) dormant experts (gate bias ``new_expert_gate_bias``, zero gate weights).

        Returns the new experts' indices; the new task id is ``num_tasks - 1``. The MoE's parameters
        are replaced by bigger ones: call ``student.moe.update_optimizer(opt)`` or rebuild the optimizer.
        """
        n = self.config.experts_per_task if n_new_experts is None else n_new_experts
        require_int("n_new_experts", n, 0)
        new = self.moe.add_experts(n) if n > 0 else []
        for adapters in self.adapters:
            adapters.add_task()
        self.add_bank_task()
        return new

    # -- checkpoints -----------------------------------------------------------------------------

    def get_extra_state(self) -> dict:
        return {"config": asdict(self.config)}

    def set_extra_state(self, state: Any) -> None:
        pass  # the constructor's config wins; from_state_dict reads it

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.resize_bank(state_dict, prefix)  # a checkpoint taken after growth: match its task count
        for adapters in self.adapters:  # one adapter per task
            while adapters.qkv.num_tasks < self.num_tasks:
                adapters.add_task()
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
