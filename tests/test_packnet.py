"""PackNet: each stage keeps its share of the weights, and its view reproduces the network it ended with."""

import pytest
import torch
from torch import nn

from cpd_fast.packnet import PackNet


def _model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # a fixed init without moving the global RNG for later tests
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))


def _train(model, packnet, stage, steps, x, y, weight_decay=0.1):
    packnet.set_trainable(model, stage)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=weight_decay)  # fmt: skip
    guard = packnet.attach(model, opt, stage)
    try:
        for _ in range(steps):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
    finally:
        guard.remove()


def _run_stages(model, packnet, n_stages, steps=30):
    """Train / prune / retrain each stage on its own regression task; returns each stage's outputs on x."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=gen)
    outputs = []
    for s in range(n_stages):
        y = torch.randn(64, 3, generator=gen)
        _train(model, packnet, s, steps, x, y)
        if s < n_stages - 1:
            packnet.prune(model, s)
            _train(model, packnet, s, steps // 2, x, y)
        with torch.no_grad():
            outputs.append(model(x).clone())
    return x, outputs


def test_each_stage_ends_with_an_equal_share_of_every_weight():
    model = _model()
    packnet = PackNet(model, num_stages=4)
    _run_stages(model, packnet, 4)
    for name, shares in packnet.shares().items():
        n = packnet.owner[name].numel()
        counts = [round(share * n) for share in shares]
        assert sum(counts) == n
        # floor at each pruning: the first stages may keep one entry more than n / 4
        assert max(counts) - min(counts) <= 2, (name, counts)
    assert set(packnet.shares()) == {"0.weight", "3.weight"}  # biases and the LayerNorm are not pruned


def test_a_stage_view_reproduces_the_network_the_stage_ended_with():
    model = _model()
    packnet = PackNet(model, num_stages=3)
    x, outputs = _run_stages(model, packnet, 3)
    probe = _model()
    for s, expected in enumerate(outputs):
        probe.load_state_dict(packnet.view(model, s))
        with torch.no_grad():
            assert torch.equal(probe(x), expected), f"stage {s} changed after it ended"
    # the views differ: later stages did learn something else
    assert not torch.equal(outputs[0], outputs[-1])


def test_released_entries_are_zero_until_the_next_stage_trains_them():
    model = _model()
    packnet = PackNet(model, num_stages=2)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 6, generator=gen), torch.randn(32, 3, generator=gen)
    _train(model, packnet, 0, 20, x, y)
    kept = packnet.prune(model, 0)
    w = model[0].weight.detach()
    released = packnet.owner["0.weight"] == 1
    assert kept["0.weight"] == w.numel() - int(w.numel() * 0.5)
    assert bool((w[released] == 0).all())
    # the kept entries are the largest in magnitude
    assert float(w[~released].abs().min()) >= float(w[released].abs().max())
    _train(model, packnet, 0, 10, x, y)  # retrain: the released entries stay zero
    assert bool((w[released] == 0).all())
    bias = model[0].bias.detach().clone()
    _train(model, packnet, 1, 10, x, y)
    assert bool((w[released] != 0).any())
    assert torch.equal(model[0].bias, bias), "biases train in stage 0 only"


def test_state_dict_round_trip_and_bad_input():
    model = _model()
    packnet = PackNet(model, num_stages=3)
    _run_stages(model, packnet, 2)
    again = PackNet(model, num_stages=3)
    again.load_state_dict(packnet.state_dict())
    assert all(torch.equal(again.owner[k], packnet.owner[k]) for k in packnet.owner)
    with pytest.raises(ValueError, match="another model or stage count"):
        PackNet(model, num_stages=4).load_state_dict(packnet.state_dict())
    with pytest.raises(ValueError, match="stage must be an int"):
        packnet.view(model, 3)
    with pytest.raises(ValueError, match="num_stages must be a positive int"):
        PackNet(model, num_stages=0)
    with pytest.raises(ValueError, match="at least one weight"):
        PackNet(nn.LayerNorm(4), num_stages=2)
    with pytest.raises(ValueError, match="has shape"):
        packnet.view(nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3)), 0)
