"""MoELayer with the torch backend: oracle agreement, growth, freezing, checkpoints, drop-in use."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cpd_fast
from cpd_fast.moe import MoELayer, experts_loop_reference, experts_torch, route


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


def test_freezing_does_not_touch_other_optimizers():
    layer = MoELayer(8, 16, 2, top_k=1, backend="torch")
    layer.freeze_experts([0])
    other = nn.Linear(4, 4)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    other(torch.randn(2, 4)).sum().backward()
    w = other.weight.detach().clone()
    opt.step()
    assert not torch.equal(other.weight, w)


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
    r = route(layer.gate(x), 2, False, layer._always)
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
