"""``cpd_fast.MoELayer`` as a drop-in FFN (issue 33): everything an ``nn.Module`` FFN user relies on.

Copies (deepcopy, pickle) at any time, autocast dtypes, ``torch.compile(fullgraph=True)`` before and after
growth, ``torch.func.functional_call``, module hooks, DDP, state-dict round trips across growth, meta-device
init, and frozen experts that stay frozen under an optimizer nobody attached.
"""

from __future__ import annotations

import copy
import gc
import io
import pickle
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel as DDP

from cpd_fast import MoELayer
from cpd_fast.moe import load_balancing_loss

D, H, E = 16, 32, 4
EXPERT_SLOTS = ("w1", "b1", "w2", "b2")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers on busy cores run faster single-threaded
    yield
    torch.set_num_threads(n)


class Block(nn.Module):
    """A nanoGPT-style pre-norm block whose FFN is an MoE layer or the Linear-GELU-Linear it replaces."""

    def __init__(self, moe: bool = True, d: int = D, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        dense = nn.Sequential(nn.Linear(d, H), nn.GELU(), nn.Linear(H, d))
        self.ffn = MoELayer(d, H, E, top_k=2, backend="torch") if moe else dense

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.ffn(self.ln2(x))


def _layer(seed: int = 0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(D, H, E, **{"top_k": 2, "backend": "torch", **kw})


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _train_steps(layer: MoELayer, opt: torch.optim.Optimizer, x: torch.Tensor, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        (layer(x).pow(2).mean() + layer.aux_loss).backward()
        opt.step()


# ----------------------------------------------------------------------------- copies


def _in_state(state: str) -> tuple[MoELayer, torch.optim.Optimizer | None]:
    """A layer after: nothing, a forward, a backward, growth (and a forward), training with an attached
    optimizer and frozen experts."""
    layer = _layer(1, new_expert_gate_bias=3.0)  # newborn experts get routed: growth changes the output
    x = torch.randn(24, D)
    opt = None
    if state in ("forward", "backward"):
        y = layer(x)
        if state == "backward":
            (y.sum() + layer.aux_loss).backward()
    elif state == "growth":
        layer.add_experts(2)
        layer(x).sum().backward()
    elif state == "attached":
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
        layer.attach(opt)
        _train_steps(layer, opt, x, 2)
        layer.freeze_experts([0])
        layer.always_route([3])
        _train_steps(layer, opt, x, 1)
        layer(x)  # a graph again
    return layer, opt


def _copies(layer: MoELayer) -> dict[str, MoELayer]:
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    return {
        "deepcopy": copy.deepcopy(layer),
        "pickle": pickle.loads(pickle.dumps(layer)),
        "torch.save": torch.load(buf, weights_only=False),
    }


@pytest.mark.parametrize("state", ["fresh", "forward", "backward", "growth", "attached"])
def test_deepcopy_and_pickle_at_any_time_and_the_copy_computes_the_same(state):
    layer, opt = _in_state(state)
    had_graph = layer.aux_loss is not None and layer.aux_loss.grad_fn is not None
    assert had_graph == (state != "fresh")  # the graph deepcopy used to refuse
    x = torch.randn(3, 7, D)
    for how, c in _copies(layer).items():
        assert c.aux_loss is None and c.router_stats is None, how  # a copy has not run forward
        assert c.num_experts == layer.num_experts and c.always_routed == layer.always_routed, how
        assert torch.equal(c.frozen_mask, layer.frozen_mask), how
        for (n, p), q in zip(layer.named_parameters(), c.parameters(), strict=True):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), (how, n)
        assert c.attached_optimizers == [], how  # copies start unattached
        assert torch.equal(c(x), layer(x)), how
        assert c.aux_loss is not None and torch.equal(c.aux_loss, layer.aux_loss), how
        (c(x).sum() + c.aux_loss).backward()
        assert c.w1.grad is not None and c.gate.bias.grad is not None, how
    if opt is not None:
        assert layer.attached_optimizers == [opt]  # the original keeps its optimizer


def test_aux_loss_is_still_read_after_forward_and_trains_the_gate():
    layer = _layer(2)
    x = torch.randn(40, D)
    layer(x)
    r = layer.router_stats
    want = load_balancing_loss(r.counts, r.probs.mean(0), 40, 2, layer.aux_loss_weight)
    assert torch.equal(layer.aux_loss, want) and float(layer.aux_loss.detach()) > 0
    layer.aux_loss.backward()
    assert float(layer.gate.weight.grad.abs().sum()) > 0


def test_ema_and_target_network_copies_of_a_trained_block():
    """The issue's case: a deep copy of a model mid-training (EMA, target network), then EMA updates."""
    torch.manual_seed(3)
    model = Block()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(2, 6, D)
    loss = model(x).pow(2).mean() + model.ffn.aux_loss
    loss.backward()
    opt.step()
    ema = copy.deepcopy(model)
    target = pickle.loads(pickle.dumps(model))
    assert torch.equal(ema(x), model(x)) and torch.equal(target(x), model(x))
    opt.zero_grad()
    (model(x).pow(2).mean() + model.ffn.aux_loss).backward()
    opt.step()
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(p, 0.5)
    w = ema.ffn.w1.detach()
    assert not torch.equal(w, model.ffn.w1) and not torch.equal(w, target.ffn.w1)
    torch.testing.assert_close(w, 0.5 * (model.ffn.w1 + target.ffn.w1).detach())


# ----------------------------------------------------------------------------- autocast


def test_autocast_cpu_bf16_output_and_compute_dtype_follow_nn_linear():
    torch.manual_seed(4)
    moe, dense = Block(moe=True), Block(moe=False)
    x = torch.randn(2, 6, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dense.ffn(x).dtype == torch.bfloat16  # what the replaced FFN gives
        assert moe.ffn(x).dtype == torch.bfloat16
        assert moe(x).dtype == dense(x).dtype
    layer = _layer(5)
    x = torch.randn(50, D)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_bf16_in = layer(x.bfloat16())  # bf16 input is accepted under autocast, as nn.Linear does
    # computed in bf16: exactly what a bf16 copy of the layer computes on bf16 input
    low = copy.deepcopy(layer).to(torch.bfloat16)
    assert torch.equal(y, low(x.bfloat16())) and torch.equal(y_bf16_in, y)
    # close to float32, but for the few tokens near a top-k tie that pick another expert in bf16
    assert not torch.equal(y.float(), ref)
    close = ((y.float() - ref).abs() <= 0.02 + 0.05 * ref.abs()).all(-1)
    assert float(close.float().mean()) >= 0.9
    y.float().pow(2).sum().backward()
    assert {p.grad.dtype for p in layer.parameters()} == {torch.float32}


def test_autocast_fp16_and_float64_like_nn_linear():
    layer, lin = _layer(6), nn.Linear(D, D)
    x = torch.randn(9, D)
    with torch.autocast("cpu", dtype=torch.float16):
        assert layer(x).dtype == lin(x).dtype == torch.float16
    layer64, lin64 = copy.deepcopy(layer).double(), copy.deepcopy(lin).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 alone
        y = layer64(x.double())
        assert y.dtype == lin64(x.double()).dtype == torch.float64
    assert torch.equal(y, layer64(x.double()))  # the same float64 arithmetic as without autocast
    with pytest.raises(TypeError, match="dtype"):  # outside autocast a dtype mismatch is an error
        layer(x.bfloat16())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cuda_output_dtype_and_values(backend, dtype):
    layer = _layer(7, backend=backend).cuda()
    layer.freeze_experts([1])
    x = torch.randn(300, D, device="cuda")
    ref = layer(x)
    with torch.autocast("cuda", dtype=dtype):
        y = layer(x)
        assert y.dtype == dtype == nn.Linear(D, D).cuda()(x).dtype
    assert not torch.equal(y.float(), ref)
    close = ((y.float() - ref).abs() <= 0.02 + 0.05 * ref.abs()).all(-1)
    assert float(close.float().mean()) >= 0.9  # but for tokens near a top-k tie
    y.float().pow(2).sum().backward()
    assert {p.grad.dtype for p in layer.parameters()} == {torch.float32}
    assert float(layer.w1.grad[1].abs().sum()) == 0.0 and float(layer.b2.grad[1].abs().sum()) == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_freezing_and_routing_follow_the_layer_to_cuda():
    layer = _layer(8, new_expert_gate_bias=3.0)
    layer.freeze_experts([0])
    layer.always_route([3])
    layer.cuda()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.5)
    w = layer.w1.detach().clone()
    _train_steps(layer, opt, torch.randn(64, D, device="cuda"), 2)
    assert torch.equal(layer.w1[0], w[0]) and not torch.equal(layer.w1[1], w[1])
    assert int(layer.tokens_per_expert[3]) == 64


# ----------------------------------------------------------------------------- torch.compile


def _compiled_matches_eager(compiled, layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    y = compiled(x)
    aux = layer.aux_loss  # set by the compiled forward
    (y.pow(2).sum() + aux).backward()
    grads_c = _grads(layer)
    layer.zero_grad(set_to_none=True)
    ref = layer(x)
    (ref.pow(2).sum() + layer.aux_loss).backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux, layer.aux_loss)
    grads = _grads(layer)
    assert grads_c.keys() == grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(grads_c[n], g, rtol=1e-4, atol=1e-5)
    layer.zero_grad(set_to_none=True)
    return grads_c


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)  # aot_eager: dynamo's one graph and AOT autograd, without inductor's slow C++ code generation
def test_torch_compile_fullgraph_float32_before_and_after_growth(backend):
    torch._dynamo.reset()
    layer = _layer(9, new_expert_gate_bias=3.0)
    layer.freeze_experts([0])
    compiled = torch.compile(layer, fullgraph=True, backend=backend)  # fullgraph: a graph break is an error
    x = torch.randn(2, 12, D)
    grads = _compiled_matches_eager(compiled, layer, x)
    assert all(torch.count_nonzero(grads[n][0]) == 0 for n in EXPERT_SLOTS)  # frozen under compile
    before = compiled(x).detach()
    new = layer.add_experts(2)  # replaced parameters: a recompile, and the right output
    y = compiled(x)
    assert not torch.allclose(y, before)  # the newborn experts (gate bias +3) take part
    grads = _compiled_matches_eager(compiled, layer, x)
    assert float(grads["w1"][new].abs().sum()) > 0


@pytest.mark.slow
def test_torch_compile_fullgraph_under_bf16_autocast():
    torch._dynamo.reset()
    layer = _layer(10)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(64, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = compiled(x), layer(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=0.02, atol=0.02)


# ----------------------------------------------------------------------------- functional_call, hooks


def test_functional_call_uses_the_given_parameters():
    layer = _layer(11)
    x = torch.randn(30, D)
    params = {n: (p * 1.5).detach().requires_grad_() for n, p in layer.named_parameters()}
    y = functional_call(layer, params, (x,))
    other = copy.deepcopy(layer)
    other.load_state_dict({**params, "_extra_state": layer.get_extra_state()})
    assert torch.equal(y, other(x)) and not torch.equal(y, layer(x))
    g = torch.autograd.grad(y.sum(), list(params.values()))
    other(x).sum().backward()
    for gi, p in zip(g, other.parameters(), strict=True):
        torch.testing.assert_close(gi, p.grad)
    assert all(p.grad is None for p in layer.parameters())  # the module's own parameters untouched


def test_forward_and_backward_hooks():
    layer = _layer(12)
    x = torch.randn(20, D)
    want_y = layer(2 * x) + 1
    seen = {}

    def backward_hook(m, gin, gout):
        seen["gin"], seen["gout"] = gin[0], gout[0]

    handles = [
        layer.register_forward_pre_hook(lambda m, args: (2 * args[0],)),
        layer.register_forward_hook(lambda m, args, out: out + 1),
        layer.register_full_backward_pre_hook(lambda m, gout: (3 * gout[0],)),
        layer.register_full_backward_hook(backward_hook),
    ]
    xg = x.clone().requires_grad_()
    y = layer(xg)
    assert torch.equal(y, want_y)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(seen["gout"], 3 * g)
    ref = x.clone().requires_grad_()
    for h in handles:
        h.remove()
    layer(2 * ref).backward(3 * g)
    torch.testing.assert_close(xg.grad, ref.grad)
    torch.testing.assert_close(seen["gin"], ref.grad / 2)  # the layer's own input is 2x


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, state: dict, x: torch.Tensor, g: torch.Tensor) -> dict:
    """One rank's gradients (DDP-averaged) on its share of the batch, and its parameters after a step of an
    AdamW nobody attached, with expert 2 frozen."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        layer = MoELayer(D, H, E, top_k=2, backend="torch")
        layer.load_state_dict(state)
        layer.freeze_experts([2])
        model = DDP(layer)
        # DDP averages the ranks' gradients: each rank's sum × world gives the global batch's sum
        (model(x.chunk(world)[rank]) * g.chunk(world)[rank]).sum().mul(world).backward()
        grads = _grads(layer)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
        opt.step()
        out = {"grads": grads, "params": {n: p.detach().clone() for n, p in layer.named_parameters()}}
        # The DDP reducer goes while the process group still has its registry's reference: dropped after
        # destroy_process_group, the reducer's release was the group's last, and its destructor joined a gloo
        # thread that waited for the GIL the releasing thread held (a deadlock seen once in CI)
        del model, opt
        gc.collect()
        return out
    finally:
        dist.destroy_process_group()


def _ddp_worker(rank: int, world: int, port: int, state: dict, x, g, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.save(_ddp_rank(rank, world, port, state, x, g), f"{out_dir}/{rank}.pt")


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_ddp_averages_to_the_global_batch_gradient(world, tmp_path):
    """World size 1 in this process; 2: two spawned gloo processes (slow: each starts torch)."""
    layer = _layer(13)
    state = layer.state_dict()
    layer.freeze_experts([2])  # as the ranks do
    x, g = torch.randn(40, D), torch.randn(40, D)
    (layer(x) * g).sum().backward()
    want = _grads(layer)
    if world == 1:
        ranks = [_ddp_rank(0, 1, _free_port(), state, x, g)]
    else:
        mp.spawn(_ddp_worker, args=(2, _free_port(), state, x, g, str(tmp_path)), nprocs=2, join=True)
        ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for r in ranks:
        for n, w in want.items():
            torch.testing.assert_close(r["grads"][n], w, rtol=1e-5, atol=1e-6)
        for n in EXPERT_SLOTS:
            assert torch.count_nonzero(r["grads"][n][2]) == 0
            assert torch.equal(r["params"][n][2], state[n][2]), n  # frozen under a plain AdamW
            assert not torch.equal(r["params"][n][1], state[n][1]), n
    for n, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[-1]["params"][n]), n  # the ranks stay in step


# ----------------------------------------------------------------------------- checkpoints, meta init


def test_state_dict_round_trips_across_growth_in_a_model():
    torch.manual_seed(14)
    model = Block()
    model.ffn.add_experts(3, gate_bias=2.0)
    x = torch.randn(2, 5, D)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = Block()  # born with E experts: loading grows it
    assert fresh.ffn.num_experts == E
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.ffn.num_experts == E + 3 and torch.equal(fresh(x), model(x))
    small = Block().state_dict()  # and back: a grown layer loads a smaller checkpoint
    fresh.load_state_dict(small)
    assert fresh.ffn.num_experts == E and torch.equal(fresh.ffn.w1, small["ffn.w1"])
    built = MoELayer.from_state_dict(state, prefix="ffn.")
    assert torch.equal(built(x), model.ffn(x))


def test_meta_device_init_then_load_or_reset():
    torch.manual_seed(15)
    src = Block()
    src.ffn.add_experts(1)
    x = torch.randn(2, 5, D)
    with torch.device("meta"):
        model = Block()
        model.ffn.always_route([1])
    assert model.ffn.w1.is_meta
    model.to_empty(device="cpu")
    ffn = model.ffn
    assert not bool(ffn.frozen_mask.any()) and int(ffn.tokens_per_expert.abs().sum()) == 0
    assert ffn.always_routed == [1] and ffn._always.device.type == "cpu"
    ffn.always_route([])
    model.load_state_dict(src.state_dict())
    assert torch.equal(model(x), src(x))
    ffn.freeze_experts([1])
    assert ffn.frozen_mask.tolist() == [False, True, False, False, False]  # only what was asked
    with torch.device("meta"):
        other = Block()
    other.to_empty(device="cpu")
    for m in other.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    w1 = other.ffn.w1.detach()
    assert bool(torch.isfinite(other(x)).all()) and float(w1.abs().max()) <= D**-0.5
    assert float(w1.std()) > 0.5 * D**-0.5 / 3**0.5  # U(-b, b) has std b/sqrt(3)


# ----------------------------------------------------------------------------- freezing


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, weight_decay=0.1),
    ],
    ids=["AdamW", "Adam", "SGD-momentum"],
)
def test_frozen_experts_stay_frozen_under_an_optimizer_nobody_attached(make):
    model = Block()
    layer = model.ffn
    opt = make(model.parameters())  # a plain optimizer over the whole model: never attached
    x = torch.randn(4, 8, D)

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            (model(x).pow(2).mean() + layer.aux_loss).backward()
            opt.step()

    steps(3)  # momentum from before the freeze: it must not move the frozen rows either
    layer.freeze_experts([0, 2])
    layer.freeze_gate()
    snap = {n: p.detach().clone() for n, p in layer.named_parameters()}
    steps(4)
    for n in EXPERT_SLOTS:
        p = getattr(layer, n)
        assert torch.equal(p[[0, 2]], snap[n][[0, 2]]), n
        assert not torch.equal(p[[1, 3]], snap[n][[1, 3]]), n
    assert torch.equal(layer.gate.weight, snap["gate.weight"]) and torch.equal(
        layer.gate.bias, snap["gate.bias"]
    )
    ema = copy.deepcopy(model)  # a copy keeps its frozen rows still under its own optimizer too
    opt = make(ema.parameters())
    model, layer = ema, ema.ffn
    steps(2)
    assert torch.equal(layer.w1[[0, 2]], snap["w1"][[0, 2]]) and not torch.equal(layer.w1[1], snap["w1"][1])
    layer.unfreeze_experts([0, 2])
    steps(1)
    assert not torch.equal(layer.w1[0], snap["w1"][0])  # unfrozen rows train again
