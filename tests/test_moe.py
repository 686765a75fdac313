"""MoELayer with the torch backend: oracle agreement, growth, freezing, optimizer attachment, the
router and its load-balancing loss, checkpoints, drop-in use."""

import copy
import gc
import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import cpd_fast
from cpd_fast.moe import (
    MoELayer,
    Router,
    RouterStats,
    Routing,
    SegmentExperts,
    experts_loop_reference,
    experts_torch,
    load_balancing_loss,
    route,
)


def grads_of(layer, x, y, g):
    (y * g).sum().backward()
    return [x.grad] + [p.grad for p in layer.parameters()]


def loop_output(layer, x2):
    r = route(layer.gate(x2), layer.top_k, layer.normalize_topk)
    return experts_loop_reference(
        x2, layer.w1, layer.b1, layer.w2, layer.b2, r.topk_p, r.topk_e, layer.activation
    )


@pytest.mark.parametrize(
    "lead,E,k,act,bias,norm",
    [
        ((37,), 5, 2, "gelu", True, False),
        ((4, 25), 3, 1, "relu", False, False),
        ((2, 3, 17), 8, 4, "silu", True, True),
        ((100,), 1, 1, "gelu", True, False),
        ((257,), 25, 2, "gelu", True, False),
    ],
)
def test_torch_backend_matches_loop(lead, E, k, act, bias, norm):
    torch.manual_seed(0)
    layer = MoELayer(16, 32, E, top_k=k, activation=act, bias=bias, backend="torch", normalize_topk=norm)
    x = torch.randn(*lead, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    g = torch.randn_like(y)
    got = grads_of(layer, x, y, g)
    layer.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    ref = loop_output(layer, x2.reshape(-1, 16)).reshape(x.shape)
    want = grads_of(layer, x2, ref, g)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int(layer.tokens_per_expert.sum()) == x2.numel() // 16 * k


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
def test_grouped_mm_impl_matches_segments():
    torch.manual_seed(1)
    layer = MoELayer(16, 32, 6, top_k=2, backend="torch")
    layer.gate.bias.data[3] = -30.0  # expert 3 gets no tokens
    x = torch.randn(101, 16)
    r = route(layer.gate(x), 2)
    assert int(r.counts[3]) == 0
    args = (x, layer.w1, layer.b1, layer.w2, layer.b2, r, "gelu")
    torch.testing.assert_close(
        experts_torch(*args, impl="grouped_mm"), experts_torch(*args, impl="segments"), rtol=1e-5, atol=1e-6
    )


def test_aux_loss_and_counts():
    torch.manual_seed(2)
    layer = MoELayer(16, 32, 4, top_k=2, backend="torch", aux_loss_weight=0.5)
    x = torch.randn(64, 16)
    layer(x)
    r = route(layer.gate(x), 2)
    f = r.counts.float() / (64 * 2)
    want = 0.5 * 4 * (f * r.probs.mean(0)).sum()
    torch.testing.assert_close(layer.aux_loss, want)
    assert layer.aux_loss.requires_grad
    assert torch.equal(layer.tokens_per_expert, r.counts)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(8, 16, 2, top_k=3)
    with pytest.raises(ValueError, match="activation"):
        MoELayer(8, 16, 2, activation="tanh")
    with pytest.raises(ValueError, match="backend"):
        MoELayer(8, 16, 2, backend="cuda")
    with pytest.raises(ValueError, match="num_experts"):
        MoELayer(8, 16, 0, top_k=1)
    layer = MoELayer(8, 16, 2, backend="torch")
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be"):
        layer([1.0] * 8)
    with pytest.raises(ValueError, match="NaN"):
        layer(torch.full((3, 8), float("nan")))
    with pytest.raises(IndexError):
        layer.freeze_experts([5])
    if "TRITON_INTERPRET" not in __import__("os").environ:
        with pytest.raises(RuntimeError, match="CUDA"):
            MoELayer(8, 16, 2, backend="triton")(torch.randn(3, 8))


def test_growth_cold_start_and_dormant():
    torch.manual_seed(3)
    layer = MoELayer(32, 64, 4, top_k=2, backend="torch")
    x = torch.randn(2048, 32)
    before = layer(x).detach()
    old = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    new = layer.add_experts(2)
    assert new == [4, 5] and layer.num_experts == 6
    assert layer.w1.shape == (6, 64, 32) and layer.b2.shape == (6, 32) and layer.gate.weight.shape == (6, 32)
    for k, v in old.items():  # existing parameters keep their values
        torch.testing.assert_close(layer.state_dict()[k][: v.shape[0]], v, rtol=0, atol=0)
    after = layer(x).detach()
    rel = (after - before).norm(dim=-1) / before.norm(dim=-1)
    assert float(rel.max()) < 0.01
    routed_new = float(layer.tokens_per_expert[4:].sum()) / x.shape[0]
    assert routed_new < 0.01


def test_growth_new_expert_gets_routed_after_training():
    torch.manual_seed(4)
    layer = MoELayer(16, 32, 3, top_k=1, backend="torch", aux_loss_weight=0.1)
    (e,) = layer.add_experts(1)
    layer.freeze_experts([0, 1, 2])
    x = torch.randn(512, 16)
    with torch.no_grad():  # data that needs the new expert: its own function
        target = experts_loop_reference(
            x, layer.w1, layer.b1, layer.w2, layer.b2, torch.ones(512, 1), torch.full((512, 1), e), "gelu"
        )
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    layer(x)
    assert int(layer.tokens_per_expert[e]) == 0
    for _ in range(40):
        loss = F.mse_loss(layer(x), target) + layer.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer(x)
    assert int(layer.tokens_per_expert[e]) > 0.1 * x.shape[0]


def test_update_optimizer_keeps_state_and_trains_new_rows():
    torch.manual_seed(5)
    layer = MoELayer(16, 32, 2, top_k=1, backend="torch")
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(64, 16)
    for _ in range(2):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()
    m_old = opt.state[layer.w1]["exp_avg"].clone()
    layer.add_experts(1)
    layer.add_experts(1)  # two growths before updating the optimizer
    layer.update_optimizer(opt)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in layer.parameters())
    assert opt.state[layer.w1]["exp_avg"].shape == (4, 32, 16)
    torch.testing.assert_close(opt.state[layer.w1]["exp_avg"][:2], m_old, rtol=0, atol=0)
    layer.gate.bias.data[2:] = 5.0  # route to the new experts so they get gradient
    w_new = layer.w1[2:].detach().clone()
    opt.zero_grad()
    layer(x).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(layer.w1[2:], w_new)


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_freezing_bit_identical_under_adam_with_weight_decay(opt_cls):
    torch.manual_seed(6)
    layer = MoELayer(16, 32, 4, top_k=2, backend="torch")
    opt = opt_cls(layer.parameters(), lr=1e-2, weight_decay=0.1)
    layer.attach(opt)
    x = torch.randn(128, 16)
    for _ in range(3):  # build momentum first: it must not leak into frozen rows either
        opt.zero_grad()
        (layer(x).pow(2).mean() + layer.aux_loss).backward()
        opt.step()
    frozen = [0, 2]
    layer.freeze_experts(frozen)
    layer.freeze_gate()
    snap = {n: p.detach().clone() for n, p in layer.named_parameters()}
    for _ in range(10):
        opt.zero_grad()
        (layer(x).pow(2).mean() + layer.aux_loss).backward()
        for name in ("w1", "b1", "w2", "b2"):
            g = getattr(layer, name).grad
            assert torch.count_nonzero(g[frozen]) == 0  # exactly zero
        assert layer.gate.weight.grad is None and layer.gate.bias.grad is None
        opt.step()
    for name in ("w1", "b1", "w2", "b2"):
        p = getattr(layer, name)
        assert torch.equal(p[frozen], snap[name][frozen]), name
        assert not torch.equal(p[[1, 3]], snap[name][[1, 3]]), name
    assert torch.equal(layer.gate.weight, snap["gate.weight"])
    assert torch.equal(layer.gate.bias, snap["gate.bias"])

    layer.unfreeze_experts(frozen)
    layer.unfreeze_gate()
    opt.zero_grad()
    (layer(x).pow(2).mean() + layer.aux_loss).backward()
    opt.step()
    assert not torch.equal(layer.w1[frozen], snap["w1"][frozen])
    assert not torch.equal(layer.gate.weight, snap["gate.weight"])


def test_freezing_does_not_touch_other_optimizers(monkeypatch):
    layer = MoELayer(8, 16, 2, top_k=1, backend="torch")
    mine = torch.optim.AdamW(layer.parameters(), weight_decay=0.1)
    layer.attach(mine)
    layer.freeze_experts([0])
    layer.freeze_gate()
    other = nn.Linear(4, 4)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks

    def boom(*args):
        raise AssertionError("the unrelated optimizer called into the layer")

    monkeypatch.setattr(layer, "_frozen_values", boom)
    other(torch.randn(2, 4)).sum().backward()
    w = other.weight.detach().clone()
    opt.step()
    assert not torch.equal(other.weight, w)
    with pytest.raises(AssertionError, match="unrelated"):  # control: the attached one does call in
        mine.step()


def test_global_optimizer_hooks_only_once_something_freezes():
    """Importing, building and attaching register no global optimizer hook; the first freeze registers the
    one pair that keeps frozen rows still under optimizers that are not attached (cpd_fast.moe.freezing),
    and later freezes, of this layer or others, add none."""
    code = (
        "import cpd_fast, cpd_fast.moe, torch\n"
        "from torch.optim import optimizer as o\n"
        "def n(): return len(o._global_optimizer_pre_hooks), len(o._global_optimizer_post_hooks)\n"
        "layer = cpd_fast.MoELayer(8, 16, 3, backend='torch')\n"
        "layer.attach(torch.optim.AdamW(layer.parameters()))\n"
        "assert n() == (0, 0), n()\n"
        "layer.freeze_experts([0]); layer.freeze_gate()\n"
        "assert n() == (1, 1), n()\n"
        "other = cpd_fast.MoELayer(8, 16, 3, backend='torch'); other.freeze_gate(); other.freeze_experts(1)\n"
        "assert n() == (1, 1), n()\n"
        "print('ONE-PAIR')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "ONE-PAIR" in proc.stdout, proc.stdout + proc.stderr


def test_attach_is_idempotent_removable_and_weak():
    layer = MoELayer(8, 16, 3, top_k=1, backend="torch")
    opt = torch.optim.AdamW(layer.parameters(), weight_decay=0.1)
    link = layer.attach(opt)
    assert layer.attach(opt) is link and layer.attached_optimizers == [opt]
    assert len(opt._optimizer_step_pre_hooks) == 1 and len(opt._optimizer_step_post_hooks) == 1
    link.remove()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert layer.attached_optimizers == []
    layer.update_optimizer(opt)  # also attaches
    assert layer.attached_optimizers == [opt]
    with pytest.raises(TypeError, match="optimizer"):
        layer.attach(layer.parameters())
    del opt, link
    gc.collect()
    assert layer.attached_optimizers == []  # the layer does not keep a discarded optimizer alive
    copied = copy.deepcopy(layer)  # copies start unattached
    assert copied.attached_optimizers == [] and copied.num_experts == 3


def test_without_attach_frozen_rows_still_get_exactly_zero_gradient():
    torch.manual_seed(13)
    layer = MoELayer(16, 32, 4, top_k=2, backend="torch")
    layer.freeze_experts([1, 2])
    layer(torch.randn(64, 16)).pow(2).sum().backward()
    for name in ("w1", "b1", "w2", "b2"):
        g = getattr(layer, name).grad
        assert torch.count_nonzero(g[[1, 2]]) == 0 and torch.count_nonzero(g[[0, 3]]) > 0


def test_attached_adamw_keeps_frozen_rows_bit_identical_across_growth():
    torch.manual_seed(14)
    layer = MoELayer(16, 32, 3, top_k=2, backend="torch")
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    layer.attach(opt)
    x = torch.randn(96, 16)

    def step():
        opt.zero_grad()
        (layer(x).pow(2).mean() + layer.aux_loss).backward()
        opt.step()

    for _ in range(3):  # momentum and second moments in every row first
        step()
    m_old = {n: opt.state[p]["exp_avg"].clone() for n, p in layer.named_parameters()}
    new = layer.add_experts(2, gate_bias=0.0)  # attached: the optimizer follows at once
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in layer.parameters())
    for n, p in layer.named_parameters():  # Adam moments of the old rows survive growth exactly
        st = opt.state[p]
        assert st["exp_avg"].shape == p.shape
        assert torch.equal(st["exp_avg"][:3], m_old[n]) and torch.count_nonzero(st["exp_avg"][3:]) == 0
    layer.freeze_experts([0, 1, 2])
    snap = {n: p.detach().clone() for n, p in layer.named_parameters()}
    for _ in range(4):
        step()
    for name in ("w1", "b1", "w2", "b2"):
        p = getattr(layer, name)
        assert torch.equal(p[:3], snap[name][:3]), name
        assert not torch.equal(p[new], snap[name][new]), name


def test_state_dict_round_trip_across_growth(tmp_path):
    torch.manual_seed(7)
    layer = MoELayer(16, 32, 3, top_k=2, activation="silu", backend="torch")
    layer.add_experts(2)
    x = torch.randn(2, 9, 16)
    y = layer(x)
    sd = layer.state_dict()
    fresh = MoELayer(16, 32, 5, top_k=2, activation="silu", backend="torch")
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    built = MoELayer.from_state_dict(torch.load(buf, weights_only=True))
    assert built.num_experts == 5 and built.activation == "silu" and built.top_k == 2
    torch.testing.assert_close(built(x), y, rtol=0, atol=0)
    small = MoELayer(16, 32, 3, top_k=2, activation="silu", backend="torch")
    small.load_state_dict(sd)  # resumes a grown checkpoint into a layer built at its initial size
    assert small.num_experts == 5
    torch.testing.assert_close(small(x), y, rtol=0, atol=0)


def test_expert_count_growing_1_to_25_matches_loop():
    torch.manual_seed(8)
    layer = MoELayer(16, 32, 1, top_k=1, backend="torch")
    x = torch.randn(3, 37, 16)
    while layer.num_experts < 25:
        layer.add_experts(min(6, 25 - layer.num_experts), gate_bias=0.0)
        y = layer(x)
        torch.testing.assert_close(
            y, loop_output(layer, x.reshape(-1, 16)).reshape(x.shape), rtol=1e-5, atol=1e-6
        )


class Block(nn.Module):
    """Pre-norm Transformer block whose FFN is an MoELayer."""

    def __init__(self, d=32, backend="torch"):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ffn = MoELayer(d, 4 * d, 4, top_k=2, backend=backend)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ffn(self.ln2(x))


def test_drop_in_transformer_block_trains():
    torch.manual_seed(9)
    block = Block()
    opt = torch.optim.Adam(block.parameters(), lr=3e-3)
    x = torch.randn(4, 12, 32)
    target = torch.randn(4, 12, 32)
    losses = []
    for _ in range(15):
        loss = F.mse_loss(block(x), target) + block.ffn.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert cpd_fast.MoELayer is MoELayer


def test_torch_compile_with_torch_backend():
    torch.manual_seed(10)
    block = Block()
    x = torch.randn(2, 8, 32)
    eager = block(x)
    compiled = torch.compile(block)
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert block.ffn.w1.grad is not None and block.ffn.gate.weight.grad is not None


def test_always_route_trains_a_dormant_expert_and_matches_the_loop():
    torch.manual_seed(7)
    layer = MoELayer(16, 32, 3, top_k=2, backend="torch")
    x = torch.randn(200, 16)
    before = layer(x).detach()
    (e,) = layer.add_experts(1)  # gate bias -5: outside every top-2
    layer(x)
    assert int(layer.tokens_per_expert[e]) == 0
    layer.always_route([e])
    y = layer(x)
    assert int(layer.tokens_per_expert[e]) == x.shape[0]
    assert float(((y - before).norm(dim=-1) / before.norm(dim=-1)).mean()) < 0.01
    assert layer.always_routed == [e]
    r = route(layer.gate(x), 2, False, torch.tensor(layer.always_routed))
    assert bool((r.topk_e[:, :2] != e).all())  # the top-2 is chosen among the others
    ref = experts_loop_reference(x, layer.w1, layer.b1, layer.w2, layer.b2, r.topk_p, r.topk_e, "gelu")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    y.pow(2).mean().backward()
    assert float(layer.w1.grad[e].abs().sum()) > 0 and float(layer.gate.bias.grad[e].abs()) > 0
    layer.always_route([])
    layer(x)
    assert int(layer.tokens_per_expert[e]) == 0
    with pytest.raises(ValueError, match="expert indices"):
        layer.always_route([9])
    with pytest.raises(ValueError, match="top_k"):
        layer.always_route([0, 1, 2])


def test_update_optimizer_after_growth_and_attached_follow_are_the_same():
    torch.manual_seed(15)
    x = torch.randn(64, 16)
    states = []
    for attached in (True, False):
        torch.manual_seed(16)
        layer = MoELayer(16, 32, 2, top_k=1, backend="torch")
        opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        if attached:
            layer.attach(opt)
        for _ in range(2):
            opt.zero_grad()
            layer(x).pow(2).mean().backward()
            opt.step()
        layer.add_experts(1)
        layer.add_experts(2)
        if not attached:
            layer.update_optimizer(opt)
        states.append({n: opt.state[p]["exp_avg"] for n, p in layer.named_parameters()})
    for n in states[0]:
        assert torch.equal(states[0][n], states[1][n]), n


def test_loading_a_grown_checkpoint_moves_an_attached_optimizer():
    big = MoELayer(8, 16, 2, top_k=1, backend="torch")
    big.add_experts(2)
    small = MoELayer(8, 16, 2, top_k=1, backend="torch")
    opt = torch.optim.Adam(small.parameters())
    small.attach(opt)
    small.load_state_dict(big.state_dict())
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in small.parameters()} and small.num_experts == 4


# ----------------------------------------------------------------------------- router


def test_router_is_the_linear_gate_and_state_dict_keys_are_unchanged():
    layer = MoELayer(8, 16, 3, top_k=2, backend="torch")
    assert isinstance(layer.gate, Router) and isinstance(layer.gate, nn.Linear)
    assert set(layer.state_dict()) == {"w1", "b1", "w2", "b2", "gate.weight", "gate.bias", "_extra_state"}
    assert layer.w1.shape == (3, 16, 8) and layer.w2.shape == (3, 8, 16) and layer.b2.shape == (3, 8)
    r = layer.gate.route(torch.randn(5, 8), 2)
    assert isinstance(r, Routing) and r.topk_e.shape == (5, 2)
    layer.add_experts(1)
    assert isinstance(layer.gate, Router) and layer.gate.out_features == 4


PROB_DTYPES = [
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]


@pytest.mark.parametrize("dtype,want", PROB_DTYPES)
def test_router_probabilities_are_at_least_float32(dtype, want):
    logits = torch.randn(7, 5).to(dtype)
    r = route(logits, 2)
    assert r.probs.dtype == want and r.topk_p.dtype == dtype
    if dtype == torch.float64:
        assert torch.equal(r.probs, torch.softmax(logits, -1))  # not a float32 round trip


def _float64_reference(layer, x, always=None):
    """Output of the layer's function computed independently in float64 (softmax, top-k, loop)."""
    x2 = x.reshape(-1, layer.d_model)
    probs = torch.softmax(x2 @ layer.gate.weight.T + layer.gate.bias, -1)
    if always is None:
        topk_p, topk_e = probs.topk(layer.top_k, -1)
    else:
        topk_e = probs.index_fill(1, always, -1.0).topk(layer.top_k, -1).indices
        topk_e = torch.cat([topk_e, always.expand(x2.shape[0], -1)], 1)
        topk_p = probs.gather(1, topk_e)
    if layer.normalize_topk:
        topk_p = topk_p / topk_p.sum(-1, keepdim=True)
    y = experts_loop_reference(x2, layer.w1, layer.b1, layer.w2, layer.b2, topk_p, topk_e, layer.activation)
    return y.reshape(x.shape)


def test_float64_layer_matches_a_float64_reference_to_1e12():
    torch.manual_seed(17)
    layer = MoELayer(16, 32, 6, top_k=2, backend="torch", dtype=torch.float64)
    x = torch.randn(3, 23, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    got = grads_of(layer, x, y, g)
    assert layer.router_stats.probs.dtype == torch.float64
    layer.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    ref = _float64_reference(layer, x2)
    want = grads_of(layer, x2, ref, g)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- load balancing


def test_aux_loss_is_load_balancing_loss_of_router_stats_bit_identically():
    torch.manual_seed(18)
    layer = MoELayer(16, 32, 5, top_k=2, backend="torch", aux_loss_weight=0.3)
    x = torch.randn(77, 16)
    layer(x)
    st = layer.router_stats
    assert isinstance(st, RouterStats) and st.counts.dtype == torch.int64 and st.probs.shape == (77, 5)
    assert st.probs.requires_grad
    want = load_balancing_loss(st.counts, st.probs.mean(0), 77, 2, 0.3)
    old = 0.3 * 5 * ((st.counts.to(st.probs.dtype) / (77 * 2)) * st.probs.mean(0)).sum()  # the former formula
    assert torch.equal(layer.aux_loss, want) and torch.equal(layer.aux_loss, old)
    (e,) = layer.add_experts(1)
    layer.always_route([e])
    layer(x)
    st = layer.router_stats
    assert int(st.counts[e]) == 0 and int(layer.tokens_per_expert[e]) == 77  # free top-k choice only
    assert int(st.counts.sum()) == 77 * 2
    assert torch.equal(layer.aux_loss, load_balancing_loss(st.counts, st.probs.mean(0), 77, 2, 0.3))
    layer(torch.randn(0, 16))
    assert layer.aux_loss.item() == 0.0 and layer.router_stats.probs.shape == (0, 6)
    with pytest.raises(ValueError, match="num_tokens"):
        load_balancing_loss(st.counts, st.probs.mean(0), 0, 2, 0.3)


def test_load_balancing_loss_sharded_like_data_parallel():
    torch.manual_seed(19)
    layer = MoELayer(16, 32, 4, top_k=2, backend="torch")
    x = torch.randn(60, 16)
    layer(x)
    full = layer.aux_loss
    shards = []
    for part in x.chunk(3):  # three "ranks": all-reduced counts, global N, local probability share
        layer(part)
        shards.append(layer.router_stats)
    counts = sum(s.counts for s in shards)
    n = torch.tensor(60)
    total = sum(load_balancing_loss(counts, s.probs.sum(0) / 60, n, 2, layer.aux_loss_weight) for s in shards)
    torch.testing.assert_close(total, full, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- experts Function


def _oracle_case(dtype, act, bias, norm, frozen=(), empty=(), always=(), n=41, E=6, k=2, seed=20):
    torch.manual_seed(seed)
    layer = MoELayer(16, 32, E, top_k=k, activation=act, bias=bias, normalize_topk=norm, dtype=dtype,
                     backend="torch")  # fmt: skip
    with torch.no_grad():
        for e in empty:
            layer.gate.bias[e] = -40.0
    if always:
        layer.always_route(list(always))
    if frozen:
        layer.freeze_experts(list(frozen))
    return layer, torch.randn(n, 16, dtype=dtype)


CASES = [  # act, bias, normalize_topk, frozen, empty, always, tokens
    ("gelu", True, False, (), (), (), 41),
    ("relu", False, False, (), (), (), 41),
    ("silu", True, True, (), (), (), 41),
    ("gelu", True, False, (0, 3), (), (), 41),
    ("relu", True, False, (), (1, 4), (), 41),
    ("silu", False, False, (2,), (5,), (5,), 41),
    ("gelu", True, True, (1,), (), (4, 5), 41),
    ("gelu", True, False, (), (), (), 0),
    ("gelu", True, False, (), (), (), 1),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("impl", ["segments", "segments_loop"])
@pytest.mark.parametrize("act,bias,norm,frozen,empty,always,n", CASES)
def test_segment_experts_match_the_loop(dtype, tol, impl, act, bias, norm, frozen, empty, always, n):
    layer, x = _oracle_case(dtype, act, bias, norm, frozen, empty, always, n=n)
    x = x.requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    mask = layer.frozen_mask if frozen else None
    alw = torch.tensor(always) if always else None
    results = []
    for xi, use in ((x, impl), (x2, "loop")):
        layer.zero_grad()
        r = route(layer.gate(xi), layer.top_k, norm, alw)
        if use == "loop":
            y = experts_loop_reference(xi, layer.w1, layer.b1, layer.w2, layer.b2, r.topk_p, r.topk_e, act)
        else:
            y = experts_torch(xi, layer.w1, layer.b1, layer.w2, layer.b2, r, act, impl=use, frozen=mask)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum()
        (loss + 0 * (xi.sum() + sum(p.sum() for p in layer.parameters()))).backward()  # all grads defined
        results.append((y.detach(), xi.grad, {nm: p.grad.clone() for nm, p in layer.named_parameters()}))
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, dx_ref, rtol=tol, atol=tol)
    for nm, g in grads.items():
        want = grads_ref[nm].clone()
        if frozen and nm in ("w1", "b1", "w2", "b2"):
            assert torch.count_nonzero(g[list(frozen)]) == 0, nm  # exact zeros
            want[list(frozen)] = 0
        torch.testing.assert_close(g, want, rtol=tol, atol=tol, msg=nm)
    for e in empty:
        if e not in always:
            assert torch.count_nonzero(grads["w1"][e]) == 0


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
@pytest.mark.parametrize("quantum", [1, 4, 64])
@pytest.mark.parametrize("need_x", [True, False])
@pytest.mark.parametrize("act,bias,norm,frozen,empty,always,n", CASES)
def test_padded_segments_and_input_free_backward_match_the_loop(
    quantum, need_x, act, bias, norm, frozen, empty, always, n
):
    """Segments padded to ``quantum`` rows (padding rows weigh 0) and a backward without dx (a frozen
    expert's rows dropped before the GEMMs) give the loop's outputs and gradients."""
    layer, x = _oracle_case(torch.float32, act, bias, norm, frozen, empty, always, n=n)
    alw = torch.tensor(always) if always else None
    mask = layer.frozen_mask if frozen else None
    x = x.requires_grad_(need_x)
    results = []
    for use in ("padded", "loop"):
        layer.zero_grad()
        xi = x.detach().clone().requires_grad_(need_x)
        r = route(layer.gate(xi), layer.top_k, norm, alw)
        if use == "loop":
            y = experts_loop_reference(xi, layer.w1, layer.b1, layer.w2, layer.b2, r.topk_p, r.topk_e, act)
        else:
            expert = r.topk_e.reshape(-1)[r.order]
            y = SegmentExperts.apply(xi, layer.w1, layer.b1, layer.w2, layer.b2, r.topk_p, r.order, r.offs,
                                     expert, mask, act, True, quantum)  # fmt: skip
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
        inputs = (xi.sum() if need_x else 0) + sum(p.sum() for p in layer.parameters())
        (loss + 0 * inputs).backward()  # all grads defined
        grads = {nm: p.grad for nm, p in layer.named_parameters()}
        results.append((y.detach(), xi.grad, grads))
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    if need_x:
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(grads_ref)
    for nm, g in grads.items():
        want = grads_ref[nm].clone()
        if frozen and nm in ("w1", "b1", "w2", "b2"):
            assert torch.count_nonzero(g[list(frozen)]) == 0, nm  # exact zeros
            want[list(frozen)] = 0
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5, msg=nm)


class _GroupSizes(TorchDispatchMode):
    """Records the group sizes of every ``_grouped_mm``."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ == "_grouped_mm":
            offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
            self.sizes.append(torch.diff(offs.long(), prepend=offs.new_zeros(1).long()).tolist())
        return func(*args, **kwargs)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
def test_bf16_segments_run_in_whole_quanta():
    """bf16 expert GEMMs on CPU see segment sizes in multiples of SEGMENT_QUANTUM only (a new size costs
    oneDNN a new kernel), and give what the unpadded layout gives."""
    from cpd_fast.moe.experts import SEGMENT_QUANTUM

    torch.manual_seed(23)
    layer = MoELayer(32, 64, 5, top_k=2, backend="torch", dtype=torch.bfloat16)
    layer.freeze_experts([1])
    x = torch.randn(300, 32, dtype=torch.bfloat16, requires_grad=True)
    with _GroupSizes() as mode:
        y = layer(x)
        y.float().square().sum().backward()
    assert len(mode.sizes) >= 5 and all(n % SEGMENT_QUANTUM == 0 for s in mode.sizes for n in s), mode.sizes
    r = route(layer.gate(x.detach()), 2)
    expert = r.topk_e.reshape(-1)[r.order]
    args = (layer.w1, layer.b1, layer.w2, layer.b2, r.topk_p, r.order, r.offs, expert, layer.frozen_mask)
    args = (*args, "gelu")
    torch.testing.assert_close(
        SegmentExperts.apply(x.detach(), *args, True, SEGMENT_QUANTUM),
        SegmentExperts.apply(x.detach(), *args, True, 1),
        rtol=0,
        atol=0,
    )


def test_layer_with_zero_tokens():
    layer = MoELayer(16, 32, 4, top_k=2, backend="torch")
    x = torch.randn(0, 3, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3, 16)
    (y.sum() + layer.aux_loss).backward()
    assert torch.count_nonzero(layer.w1.grad) == 0 and layer.tokens_per_expert.sum() == 0


def test_segment_experts_gradcheck_float64():
    torch.manual_seed(21)
    E, N, k, d, h = 4, 7, 2, 3, 5
    x = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    params = [
        torch.randn(*s, dtype=torch.float64, requires_grad=True)
        for s in ((E, h, d), (E, h), (E, d, h), (E, d))
    ]
    r = route(torch.randn(N, E, dtype=torch.float64), k)
    topk_p = r.topk_p.detach().requires_grad_()
    expert = r.topk_e.reshape(-1)[r.order]
    for act in ("gelu", "silu"):

        def f(x, w1, b1, w2, b2, p, act=act):
            return SegmentExperts.apply(x, w1, b1, w2, b2, p, r.order, r.offs, expert, None, act, False)

        assert torch.autograd.gradcheck(f, (x, *params, topk_p))


def test_experts_torch_bad_impl():
    layer = MoELayer(8, 16, 2, backend="torch")
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="impl"):
        experts_torch(x, layer.w1, layer.b1, layer.w2, layer.b2, route(layer.gate(x), 2), "gelu", impl="x")


def test_autograd_impl_is_the_former_formulation():
    torch.manual_seed(22)
    layer = MoELayer(16, 32, 5, top_k=2, backend="torch")
    x = torch.randn(40, 16)
    r = route(layer.gate(x), 2)
    args = (x, layer.w1, layer.b1, layer.w2, layer.b2, r, "gelu")
    torch.testing.assert_close(
        experts_torch(*args, impl="autograd"), experts_torch(*args), rtol=1e-5, atol=1e-6
    )


class _FullSizeWrites(TorchDispatchMode):
    """Counts fills and additions that produce a tensor as big as a stacked ``[E, …]`` weight."""

    OPS = frozenset({"fill_", "zero_", "zeros", "zeros_like", "new_zeros", "add", "add_"})

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (
            func.overloadpacket.__name__ in self.OPS
            and isinstance(out, torch.Tensor)
            and out.numel() >= self.numel
        ):
            self.count += 1
        return out


@pytest.mark.parametrize("impl,linear", [("segments", True), ("segments_loop", True), ("autograd", False)])
def test_backward_writes_each_weight_gradient_once(impl, linear):
    E = 12
    layer = MoELayer(16, 32, E, top_k=2, backend="torch")
    layer.freeze_experts([3])
    x = torch.randn(64, 16, requires_grad=True)
    r = route(layer.gate(x), 2)
    y = experts_torch(
        x, layer.w1, layer.b1, layer.w2, layer.b2, r, "gelu", impl=impl, frozen=layer.frozen_mask
    )
    with _FullSizeWrites(layer.w1.numel()) as mode:
        y.sum().backward()
    if linear:  # no full-size zero gradient per expert slice, no summing of them
        assert mode.count == 0, mode.count
    else:  # the former formulation: one full-size zero gradient per expert slice (quadratic in E)
        assert mode.count >= E, mode.count


def test_autocast_bf16_experts_compute_in_bf16_and_train_float32_parameters():
    """Under ``torch.autocast`` the experts run in bf16 and the output is bf16 (as with ``nn.Linear``),
    close to float32's; the parameters' gradients are float32 and close, and a frozen expert still gets
    exactly zero gradient."""
    torch.manual_seed(0)
    layer = MoELayer(32, 64, 4, top_k=2, backend="torch")
    layer.freeze_experts([1])
    x = torch.randn(64, 32)
    ref = layer(x)
    ref.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and not torch.equal(y.float(), ref)  # computed at lower precision
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    y.square().sum().backward()
    for n, p in layer.named_parameters():
        if n in grads:
            assert p.grad.dtype == torch.float32
            torch.testing.assert_close(p.grad, grads[n], rtol=0.1, atol=0.05 * float(grads[n].abs().max()))
    assert float(layer.w1.grad[1].abs().sum()) == 0.0 and float(layer.w2.grad[1].abs().sum()) == 0.0
