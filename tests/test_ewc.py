"""EWC / Online-EWC penalty and the Gaussian-policy diagonal Fisher."""

import pytest
import torch
from torch import nn

from cpd_fast.ewc import EWCPenalty, diagonal_fisher


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _fisher(model, value):
    return {n: torch.full_like(p, value) for n, p in model.named_parameters()}


@pytest.mark.parametrize("online", [False, True])
def test_penalty_zero_at_anchor_positive_away(online):
    m = _model()
    pen = EWCPenalty(lam=10.0, online=online, gamma=0.5)
    assert float(pen.penalty(m).detach()) == 0.0  # nothing consolidated yet
    pen.consolidate(m, _fisher(m, 1.0))
    assert float(pen.penalty(m).detach()) == 0.0
    with torch.no_grad():
        m[0].weight[0, 0] += 0.5
    # lam * F * delta^2 = 10 * 1 * 0.25
    assert float(pen.penalty(m).detach()) == pytest.approx(2.5)
    pen.penalty(m).backward()
    assert m[0].weight.grad[0, 0] > 0 and m[2].weight.grad.abs().sum() == 0


def test_online_fisher_accumulates_with_gamma_and_ewc_keeps_every_stage():
    m = _model()
    online = EWCPenalty(lam=1.0, online=True, gamma=0.5)
    online.consolidate(m, _fisher(m, 2.0))
    online.consolidate(m, _fisher(m, 1.0))
    assert len(online.terms) == 1
    f, _ = online.terms[0]
    assert all(torch.allclose(v, torch.full_like(v, 0.5 * 2.0 + 1.0)) for v in f.values())
    ewc = EWCPenalty(lam=1.0)
    ewc.consolidate(m, _fisher(m, 2.0))
    with torch.no_grad():
        m[2].bias += 1.0
    ewc.consolidate(m, _fisher(m, 1.0))
    assert len(ewc.terms) == 2
    # the first anchor is 1 away on 3 bias entries with F=2; the second anchor is the current point
    assert float(ewc.penalty(m).detach()) == pytest.approx(2.0 * 3)
    state = ewc.state_dict()
    again = EWCPenalty(lam=0.0)
    again.load_state_dict(state)
    assert float(again.penalty(m).detach()) == pytest.approx(6.0)


def test_penalty_on_grown_parameter_uses_old_rows():
    m = nn.Linear(4, 2)
    pen = EWCPenalty(lam=1.0)
    pen.consolidate(m, _fisher(m, 1.0))
    with torch.no_grad():
        m.weight = nn.Parameter(torch.cat([m.weight, torch.randn(3, 4)]))  # 3 new rows: not penalised
        m.bias = nn.Parameter(torch.cat([m.bias, torch.randn(3)]))
    assert float(pen.penalty(m).detach()) == 0.0


def test_diagonal_fisher_matches_jacobian_square_for_linear_policy():
    # mu = W x: d mu_j / d W_jk = x_k, so diag F[W_jk] = E[x_k^2] for every j; bias: 1
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    # the sign trick's relative noise is ~sqrt(2 / batches), whatever the batch size
    x = torch.randn(4000, 3) * torch.tensor([1.0, 2.0, 0.5])
    batches = [(x[i : i + 4],) for i in range(0, 4000, 4)]
    f = diagonal_fisher(lin, batches, lambda b: lin(b), generator=torch.Generator().manual_seed(1))
    expect = (x**2).mean(0)
    assert torch.allclose(f["weight"], expect.expand(2, 3), rtol=0.2)
    assert torch.allclose(f["bias"], torch.ones(2), rtol=0.2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="lambda"):
        EWCPenalty(lam=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        EWCPenalty(lam=1.0, online=True, gamma=0.0)
