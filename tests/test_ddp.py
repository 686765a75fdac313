"""Data-parallel distillation (cpd_fast.ddp) on CPU: 2 gloo processes equal one process, same global batch.

The DDP processes are plain subprocesses with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, LOCAL_RANK), so the test needs no launcher; ``test_cli_under_torchrun`` runs the real one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_distill import TINY, synthetic_data

from cpd_fast import ddp
from cpd_fast.distill import DistillConfig, DistillLoss, TaskSampler, configure_phase, train_phase
from cpd_fast.distill.windows import full_pool
from cpd_fast.student import Student, StudentConfig

HERE = Path(__file__).resolve().parent
# Float32 sums in another order (per-rank partial sums, DDP's all-reduce). One step's gradients agree to
# ~4e-6 of each tensor's largest entry (measured). After 11 AdamW steps most parameters agree to ~1e-7, but
# Adam divides each element by its own gradient scale, so an element whose true gradient is ~0 (the
# attention's key bias: softmax ignores it) follows its rounding noise with ±lr steps on either side:
# measured max |Δ| 2.9e-4 on 39 of 21k elements (lr 3e-3).
GRAD_RTOL = 1e-4  # of the tensor's largest gradient entry
PARAM_ATOL = 1e-5  # for all but PARAM_OUTLIERS of the elements
PARAM_OUTLIERS = 0.005
PARAM_MAX = 1e-3  # a third of one Adam step
LR = 3e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config() -> DistillConfig:
    return DistillConfig(tasks=["reach-v3", "push-v3"], tasks_per_stage=1, batch_size=16, lr=LR,
                         gate_bias=0.0, progress=False, tensorboard=False,
                         student=StudentConfig(**TINY))  # fmt: skip


def first_step_grads(dist: ddp.DistContext | None) -> dict[str, torch.Tensor]:
    """Gradients of one step on a 16-window batch, prototype conditioning included (DDP: averaged)."""
    cfg, data = _config(), synthetic_data()
    torch.manual_seed(0)
    s = Student(cfg.student, num_tasks=2)
    s.train()
    gen = torch.Generator().manual_seed(1)
    idx, start = TaskSampler({t: full_pool(data, t) for t in (0, 1)}).sample(cfg.batch_size, gen)
    use_proto = torch.rand(cfg.batch_size, generator=gen) < 0.5
    rows = ddp.rank_rows(cfg.batch_size, dist)
    idx, start, use_proto = idx[rows], start[rows], use_proto[rows]
    obs, target, mask = data.windows(idx, start)
    if dist is None:
        loss = s.losses(obs, target, data.task[idx], mask, use_prototype=use_proto)["total"]
    else:
        # held until after backward: the reducer lives with the wrapper
        model = ddp.wrap(DistillLoss(s, ddp.Collectives(dist)), dist)
        loss = model(obs, target, data.task[idx], mask, use_proto)["backward"]
    loss.backward()
    return {n: p.grad.clone() for n, p in s.named_parameters()}


def train_three_phases(dist: ddp.DistContext | None) -> dict:
    """cpd's first two stages on synthetic data: stage 0, growth, Phase 1 (old experts, shared layers and
    head frozen, newborn expert always routed), Phase 2 (gate frozen); DDP is rebuilt per phase."""
    cfg, data = _config(), synthetic_data()
    torch.manual_seed(0)
    s = Student(cfg.student, num_tasks=1)
    initial = {k: v.clone() for k, v in s.state_dict().items() if isinstance(v, torch.Tensor)}
    summaries = []
    phases = [(0, "train", [0], 4), (1, "phase1", [0, 1], 4), (1, "phase2", [0, 1], 3)]
    for stage, phase, tasks, steps in phases:
        new = s.add_task() if phase == "phase1" else list(range(s.num_experts))
        configure_phase(s, cfg, stage, phase, new)
        sampler = TaskSampler({t: full_pool(data, t) for t in tasks})
        gen = torch.Generator().manual_seed(stage * 10 + len(phase))
        summaries.append(train_phase(s, data, sampler, steps, cfg, gen, dist=dist))
    state = {k: v.clone() for k, v in s.state_dict().items() if isinstance(v, torch.Tensor)}
    return {"state": state, "summaries": summaries, "initial": initial}


def train_isolated_stages(dist: ddp.DistContext | None) -> dict:
    """The mt25-plus student (task-routed experts, per-task adapters, task conditioning) through two stages
    on 4-window batches: in stage 1 a rank's 2 windows are often all old-task replay, which trains nothing
    (``cpd_fast.distill.rows.frozen_rows``), and the new task's adapters then get no gradient on that rank."""
    cfg, data = _config(), synthetic_data()
    cfg = replace(cfg, batch_size=4, student=replace(cfg.student, expert_routing="task", adapter_rank=2,
                                                     task_conditioning="task"))  # fmt: skip
    torch.manual_seed(0)
    s = Student(cfg.student, num_tasks=1)
    idle_slices = 0
    for stage, tasks, steps in ((0, [0], 3), (1, [0, 1], 6)):
        new = s.add_task() if stage else list(range(s.num_experts))
        configure_phase(s, cfg, stage, "train", new, new_tasks=[stage])
        sampler = TaskSampler({t: full_pool(data, t) for t in tasks})
        gen = torch.Generator().manual_seed(7 + stage)
        probe = torch.Generator().manual_seed(7 + stage)
        for _ in range(steps):  # the draws train_phase makes: which rank slices hold no new-task window
            idx, _ = sampler.sample(cfg.batch_size, probe)
            torch.rand(cfg.batch_size, generator=probe)
            idle_slices += sum(stage > 0 and not bool((data.task[idx[2 * r:2 * r + 2]] == 1).any())
                               for r in range(2))  # fmt: skip
        train_phase(s, data, sampler, steps, cfg, gen, dist=dist)
    state = {k: v.clone() for k, v in s.state_dict().items() if isinstance(v, torch.Tensor)}
    return {"isolated_state": state, "idle_slices": idle_slices}


def run_cases(out: str | None = None) -> dict:
    """All cases, as one rank of a DDP group when launched with torchrun's environment, else alone."""
    torch.set_num_threads(1)
    dist = ddp.setup("cpu") if ddp.requested(None) else None
    result = {"grads": first_step_grads(dist), **train_three_phases(dist), **train_isolated_stages(dist)}
    result["world_size"] = 1 if dist is None else dist.world_size
    if out is not None and (dist is None or dist.is_main):
        torch.save(result, out)
    ddp.teardown(dist)
    return result


def _launch(n: int, code: str, tmp_path: Path, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Run ``python -c code`` as ``n`` ranks of one gloo group (torchrun's environment)."""
    port = _free_port()
    procs = []
    for rank in range(n):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n),
                   LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        cmd = [sys.executable, "-c", code]
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    for o in outs:
        assert o.returncode == 0, o.stdout[-3000:]
    return outs


def test_two_gloo_ranks_equal_one_process(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_ddp; test_ddp.run_cases('ddp.pt')"
    t0 = time.perf_counter()
    _launch(2, code, tmp_path)
    t_ddp = time.perf_counter() - t0
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert got["world_size"] == 2
    n = torch.get_num_threads()
    try:
        want = run_cases()
    finally:
        torch.set_num_threads(n)
    # 1. one step: the averaged DDP gradient is the single-process gradient of the global batch
    assert want["grads"].keys() == got["grads"].keys()
    grad_err = {k: ((want["grads"][k] - got["grads"][k]).abs().max() / want["grads"][k].abs().max()).item()
                for k in want["grads"]}  # fmt: skip
    assert max(grad_err.values()) <= GRAD_RTOL, grad_err
    # 2. three phases (growth, freezing, rebuilt wrapper): losses, prototypes and parameters
    for sa, sb in zip(want["summaries"], got["summaries"], strict=True):
        assert sa.keys() == sb.keys() == {"mse", "contrastive", "aux", "total"}
        for k in sa:
            assert sa[k] == pytest.approx(sb[k], rel=1e-5, abs=1e-7), k
    a, b = want["state"], got["state"]
    assert a.keys() == b.keys()
    assert torch.equal(a["prototype_count"], b["prototype_count"])
    assert torch.allclose(a["prototypes"], b["prototypes"], atol=1e-4)
    for k in ("moe.w1", "blocks.0.qkv.weight", "head.1.weight"):  # trained: moved from the initial weights
        n = want["initial"][k].shape[0]
        assert (a[k][:n] - want["initial"][k]).abs().max() > 1e-3, k
    floats = [k for k in a if a[k].is_floating_point()]
    delta = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in floats])
    outliers = (delta > PARAM_ATOL).float().mean().item()
    print(f"2 gloo ranks ({t_ddp:.1f} s) vs 1 process: grad max rel Δ {max(grad_err.values()):.1e}, "
          f"param max |Δ| {delta.max():.1e}, {outliers:.2%} of elements > {PARAM_ATOL:g}")  # fmt: skip
    assert outliers <= PARAM_OUTLIERS and delta.max() <= PARAM_MAX
    # 3. parameter isolation: ranks whose slice trains nothing (checked to happen) still all-reduce
    assert want["idle_slices"] > 0
    a, b = want["isolated_state"], got["isolated_state"]
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=PARAM_MAX), k


def test_batch_must_split_evenly():
    ctx = ddp.DistContext(rank=1, world_size=3, local_rank=1, device=torch.device("cpu"), backend="gloo",
                          owns_group=False)  # fmt: skip
    with pytest.raises(ValueError, match="divisible"):
        ddp.rank_rows(16, ctx)
    assert ddp.rank_rows(15, ctx) == slice(5, 10)
    assert ddp.rank_rows(16, None) == slice(None)


def test_ddp_without_torchrun_is_a_clear_error(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    assert not ddp.requested(None)
    with pytest.raises(ValueError, match="torchrun"):
        ddp.setup("cpu")


def test_cli_under_torchrun(tmp_path):
    """``torchrun -m cpd_fast.cli distill --ddp``: a 2-stage cpd run (collection, Phase 1/2, replay, eval)
    whose final checkpoint equals the single-process run's on the same data, written once by rank 0."""
    from cpd_fast import cli

    args = ["distill", "--tasks", "reach-v3", "drawer-close-v3", "--tasks-per-stage", "1", "--episodes", "1",
            "--steps-per-stage", "4", "--batch-size", "8", "--eval-goals", "1", "--eval-envs", "1",
            "--no-progress"]  # fmt: skip
    ddp_dir, one_dir = tmp_path / "ddp", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cpd_fast.cli", *args, "--out", str(ddp_dir), "--ddp"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.count("results.json: ACC") == 1  # rank 0 reports
    n = torch.get_num_threads()
    try:
        assert cli.main([*args, "--out", str(one_dir), "--data-dir", str(ddp_dir / "datasets")]) == 0
    finally:
        torch.set_num_threads(n)
    done = list(json.loads((ddp_dir / "progress.json").read_text())["steps"])
    assert done == list(json.loads((one_dir / "progress.json").read_text())["steps"])
    assert len(done) == len(set(done)) == 7  # 2 stages: train | phase1, phase2; replay and eval each
    assert json.loads((ddp_dir / "results.json").read_text())["extra"]["complete"]
    summaries = [json.loads(line) for line in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in summaries if "summary" in r]) == 3  # written once, not once per rank
    a = torch.load(one_dir / "checkpoints" / "stage1-phase2.pt", weights_only=True)["student"]
    b = torch.load(ddp_dir / "checkpoints" / "stage1-phase2.pt", weights_only=True)["student"]
    floats = [k for k in a if isinstance(a[k], torch.Tensor) and a[k].is_floating_point()]
    delta = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in floats])
    print(f"torchrun cpd distill --ddp vs 1 process: param max |Δ| {delta.max():.1e} over {delta.numel()}")
    assert (delta > PARAM_ATOL).float().mean() <= PARAM_OUTLIERS and delta.max() <= PARAM_MAX
