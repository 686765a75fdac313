"""Student training speed against a plain Transformer of the same size, by threads (ratios, one run).

    python bench/bench_student.py [--experts 5 25] [--threads 1 2] [--precision fp32 bf16] [--plus]
                                  [--batch 256] [--iters 20] [--rounds 3] [--stages 0 1 4]

One training step as :func:`cpd_fast.distill.train.train_phase` takes it: ``Student.losses`` (MSE on the
teacher's action means, contrastive task-embedding loss, MoE load-balancing loss) on ``--batch`` windows
of the default CPU student (``DistillConfig().student``), backward, fused AdamW step, in each
``--precision`` (``bf16``: under ``torch.autocast`` as ``DistillConfig.precision="bf16"`` trains).
``--plus``: the student of ``cpd run --preset mt25-plus`` (rank-8 adapters, task-routed experts; with
``--stages`` also its task conditioning). Arms:

* ``student E=N``: the student grown to N experts (one per task, cpd's growth), every parameter trainable;
* ``--stages``: instead of the above, MT25's phases as a run trains them (``configure_phase``: what is
  frozen, Phase 1's always-routed new experts, the parameter isolation of ``--plus``), the batch's
  windows task-balanced over the seen tasks as ``TaskSampler`` draws them, gradient clipping as
  ``train_phase``: ``stage S phase`` at the stages ``--stages`` lists;
* ``plain``: ``nn.TransformerEncoder`` with the student's width, depth, heads and FFN size (causal mask),
  then one dense FFN of ``top_k x expert_hidden`` hidden units (the MoE's active width), the same head
  and MSE loss: the baseline the student's extra machinery (routing, task encoder, losses) is measured by.

Each arm at each thread count, interleaved over ``--rounds`` (the best round kept); prints windows/s and
the ratios. Nothing else heavy should run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from torch import nn

from cpd_fast.distill import DistillConfig
from cpd_fast.distill.rows import squared_error_of_trained_rows
from cpd_fast.student import Student


class Plain(nn.Module):
    """The baseline: the student's trunk sizes as a stock ``nn.TransformerEncoder`` and a dense FFN."""

    def __init__(self, cfg) -> None:
        super().__init__()
        d = cfg.d_model
        self.inp = nn.Linear(cfg.obs_dim, d)
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, cfg.d_ff, dropout=0.0, batch_first=True,
                                           activation="gelu", norm_first=True)  # fmt: skip
        self.trunk = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.ffn = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.top_k * cfg.expert_hidden), nn.GELU(),
                                 nn.Linear(cfg.top_k * cfg.expert_hidden, d))  # fmt: skip
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.act_dim))
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(cfg.history))

    def loss(self, obs, target):
        h = self.trunk(self.inp(obs), mask=self.causal, is_causal=True)
        h = h + self.ffn(h)
        return ((torch.tanh(self.head(h)) - target) ** 2).mean()


def student_step(s: Student, batch: tuple, use_prototype=None, clip: float | None = None):
    """One training step of ``s`` on ``batch`` (obs, target, task ids, mask) as ``train_phase`` takes it:
    fused AdamW over the trainable parameters (frozen expert rows held by ``moe.attach``), gradient
    clipping at ``clip`` if given; with ``use_prototype`` the prototypes stay as they are (a phase's
    state, step after step)."""
    params = [p for p in s.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    s.moe.attach(opt)
    # as train_phase computes it: the windows that train nothing are left out of the forward pass
    kw = {"squared_error_fn": squared_error_of_trained_rows}
    if use_prototype is not None:
        kw.update(update_prototypes=False, use_prototype=use_prototype)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = s.losses(*batch, **kw)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    return step


def make_arms(experts: list[int], batch: int, plus: bool = False):
    cfg = DistillConfig().student
    if plus:
        cfg = replace(cfg, adapter_rank=8, expert_routing="task")
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(batch, cfg.history, cfg.obs_dim, generator=g)
    target = torch.rand(batch, cfg.history, cfg.act_dim, generator=g) * 2 - 1
    mask = torch.ones(batch, cfg.history, dtype=torch.bool)
    arms = {}
    for e in experts:
        torch.manual_seed(0)
        s = Student(cfg, num_tasks=min(e, 5))
        while s.num_experts < e:
            s.add_task()
        ids = torch.randint(s.num_tasks, (batch,), generator=g)
        arms[f"student E={e}"] = student_step(s, (obs, target, ids, mask))
    torch.manual_seed(0)
    p = Plain(cfg)
    popt = torch.optim.AdamW(p.parameters(), lr=1e-4, fused=True)

    def plain_step(bf16: bool):
        popt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = p.loss(obs, target)
        loss.backward()
        popt.step()

    arms["plain"] = plain_step
    return arms


def stage_arms(stages: list[int], batch: int, plus: bool = False):
    """One arm per phase of each MT25 stage in ``stages`` (5 tasks per stage), set up as a run does."""
    from cpd_fast.distill.methods import configure_phase, phases_of

    cfg = DistillConfig()
    if plus:
        cfg = replace(cfg, student=replace(cfg.student, adapter_rank=8, expert_routing="task",
                                           task_conditioning="task"))  # fmt: skip
    scfg = cfg.student
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(batch, scfg.history, scfg.obs_dim, generator=g)
    target = torch.rand(batch, scfg.history, scfg.act_dim, generator=g) * 2 - 1
    mask = torch.ones(batch, scfg.history, dtype=torch.bool)
    arms = {}
    for stage in stages:
        for phase, _ in phases_of(cfg, stage):
            torch.manual_seed(0)
            s = Student(scfg, num_tasks=5)
            new = list(range(s.num_experts))
            for _ in range(stage):
                new = [e for _ in range(5) for e in s.add_task()]
            with torch.no_grad():  # every seen task has a prototype, as after its first batches
                s.prototypes.normal_(generator=g)
                s.prototype_count.fill_(1)
                s.conditioning.copy_(s.prototypes)
            configure_phase(s, cfg, stage, phase, new, list(range(s.num_tasks - 5, s.num_tasks)))
            ids = torch.randint(s.num_tasks, (batch,), generator=g)  # task-balanced over the seen tasks
            use = torch.rand(batch, generator=g) < scfg.prototype_conditioning
            s.train()
            step = student_step(s, (obs, target, ids, mask), use_prototype=use, clip=cfg.grad_clip)
            arms[f"stage {stage} {phase} (E={s.num_experts})"] = step
    arms["plain"] = make_arms([], batch)["plain"]
    return arms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[5, 25])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--plus", action="store_true", help="the mt25-plus student (adapters, task routing)")
    ap.add_argument("--stages", type=int, nargs="+", help="MT25 stages' phases as a run trains them")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.stages:
        arms = stage_arms(args.stages, args.batch, args.plus)
    else:
        arms = make_arms(args.experts, args.batch, args.plus)
    best: dict[tuple[str, str, int], float] = {}
    for _ in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for prec in args.precision:
                for name, step in arms.items():
                    step(prec == "bf16")  # warm
                    t0 = time.perf_counter()
                    for _ in range(args.iters):
                        step(prec == "bf16")
                    ms = (time.perf_counter() - t0) / args.iters * 1e3
                    key = (name, prec, threads)
                    best[key] = min(best.get(key, float("inf")), ms)
    p0, t0 = args.precision[0], args.threads[0]
    print(f"batch {args.batch} windows, best of {args.rounds} rounds x {args.iters} steps"
          f"{' (mt25-plus student)' if args.plus else ''}")  # fmt: skip
    print(f"| arm | precision | threads | ms/step | windows/s | vs plain (same precision, threads) | "
          f"vs {t0} thread(s) | vs {p0} (same threads) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in arms:
        for prec in args.precision:
            for threads in args.threads:
                ms = best[(name, prec, threads)]
                plain, one = best[("plain", prec, threads)], best[(name, prec, t0)]
                base = best[(name, p0, threads)]
                print(f"| {name} | {prec} | {threads} | {ms:.1f} | {args.batch / ms * 1e3:,.0f} | "
                      f"{ms / plain:.2f}x | {one / ms:.2f}x | {base / ms:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
