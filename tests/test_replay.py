"""Replay selection: whole segments inside episodes, never more than the configured fraction."""

import pytest
import torch

from cpd_fast.replay import ReplaySet, segment_starts, select_replay


def _task_data(episodes=(37, 50, 23), seed=0):
    g = torch.Generator().manual_seed(seed)
    steps = torch.cat([torch.arange(n) for n in episodes])
    episode = torch.cat([torch.full((n,), i) for i, n in enumerate(episodes)])
    obs = torch.randn(steps.numel(), 39, generator=g)
    mean = torch.rand(steps.numel(), 4, generator=g) * 2 - 1
    return obs, mean, steps, episode


def test_segment_starts_are_whole_segments_inside_episodes():
    _, _, steps, episode = _task_data()
    starts = segment_starts(steps, episode, 10)
    assert (steps[starts] % 10 == 0).all()
    assert (episode[starts + 9] == episode[starts]).all()
    # 37 -> 3, 50 -> 5, 23 -> 2 whole segments
    assert starts.numel() == 10


@pytest.mark.parametrize("selection", ["dpp", "uniform"])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_selection_stays_within_fraction(selection, fraction):
    obs, mean, steps, episode = _task_data()
    offset = 1000
    r = select_replay(
        obs, mean, steps, episode, offset, fraction=fraction, segment_len=5, selection=selection
    )
    n = steps.numel()
    assert 0 < r.index.numel() <= fraction * n
    assert r.index.numel() == r.selected * 5
    assert ((r.index >= offset) & (r.index < offset + n)).all()
    assert len(set(r.index.tolist())) == r.index.numel()
    # every kept step looks back at most to its segment start, within its own episode
    assert (r.hist_start <= r.index).all() and (r.index - r.hist_start < 5).all()
    assert (episode[r.index - offset] == episode[r.hist_start - offset]).all()
    again = ReplaySet.from_dict(r.to_dict())
    assert torch.equal(again.index, r.index) and again.selected == r.selected


def test_dpp_spreads_over_the_state_space():
    # 90% of segments sit at one point (teacher holding still), 10% spread out: DPP takes the spread ones
    g = torch.Generator().manual_seed(0)
    n_seg, L = 100, 5
    obs = torch.zeros(n_seg * L, 39)
    spread = torch.arange(90, 100)
    obs.view(n_seg, L, 39)[spread] = torch.randn(10, 1, 39, generator=g) * 3
    steps = torch.arange(n_seg * L)
    episode = torch.zeros(n_seg * L, dtype=torch.int64)
    r = select_replay(obs, torch.zeros(n_seg * L, 4), steps, episode, 0, fraction=0.1, segment_len=L)
    seg = (r.index[::L] // L).tolist()
    assert len(seg) == 10 and sum(s >= 90 for s in seg) >= 9


def test_bad_arguments():
    obs, mean, steps, episode = _task_data()
    with pytest.raises(ValueError, match="fraction"):
        select_replay(obs, mean, steps, episode, 0, fraction=0.0, segment_len=5)
    with pytest.raises(ValueError, match="selection"):
        select_replay(obs, mean, steps, episode, 0, fraction=0.1, segment_len=5, selection="random")


def test_quality_weighted_dpp_leans_to_high_error_segments():
    """With the student's error as DPP quality, the kept segments have a higher mean error than the
    unweighted DPP's, and the set stays the same size; bad scores are refused."""
    from cpd_fast.replay import segment_quality

    g = torch.Generator().manual_seed(0)
    T, E = 50, 8
    obs = torch.randn(T * E, 39, generator=g)
    act = torch.rand(T * E, 4, generator=g) * 2 - 1
    steps = torch.arange(T).repeat(E)
    episode = torch.arange(E).repeat_interleave(T)
    err = torch.rand(T * E, generator=g) ** 4  # a few segments carry most of the error
    kw = dict(fraction=0.2, segment_len=5, selection="dpp")
    plain = select_replay(obs, act, steps, episode, 0, **kw)
    weighted = select_replay(obs, act, steps, episode, 0, quality=err, **kw)
    assert weighted.selected == plain.selected > 0
    assert err[weighted.index].mean() > err[plain.index].mean()
    starts = torch.arange(0, T * E, 5)
    q = segment_quality(err, starts, 5)
    assert q.shape == (starts.numel(),) and (q >= 0.1).all() and (q <= 10).all()
    with pytest.raises(ValueError, match="finite and >= 0"):
        segment_quality(-err, starts, 5)
