"""Student: shapes, causality, padding, contrastive task embedding, growth, freezing, checkpoints."""

import io

import pytest
import torch

from cpd_fast.student import GROUPS, HistoryBuffer, Student, StudentConfig, routing, supcon_loss

H, OBS, ACT = 6, 39, 4


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: with 2 threads on a shared 2-core machine, thread contention made steps ~100x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_config(**kw) -> StudentConfig:
    base = dict(history=H, d_model=32, n_heads=2, n_layers=2, d_ff=64, expert_hidden=48,
                task_embed_dim=16, task_encoder_hidden=32, moe_backend="torch")  # fmt: skip
    base.update(kw)
    return StudentConfig(**base)


def make_student(num_tasks=2, seed=0, **kw) -> Student:
    torch.manual_seed(seed)
    return Student(small_config(**kw), num_tasks=num_tasks)


def synthetic_tasks(n_tasks: int, seed: int = 0) -> torch.Tensor:
    """Per-task observation means [n_tasks, OBS]: each synthetic task is a Gaussian around its mean."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_tasks, OBS, generator=g)


def sample_windows(means: torch.Tensor, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % means.shape[0]
    drift = torch.randn(n, 1, OBS, generator=g) * 0.3  # episode-level variation
    obs = means[labels][:, None, :] + drift + 0.5 * torch.randn(n, H, OBS, generator=g)
    return obs, labels


def test_shapes_and_tanh_range():
    s = make_student(num_tasks=3)
    x = torch.randn(5, H, OBS) * 50  # large inputs saturate the head but never leave [-1, 1]
    y = s(x)
    assert y.shape == (5, ACT)
    assert bool((y.abs() <= 1).all())
    assert s.forward_sequence(x).shape == (5, H, ACT)
    assert s.task_embedding(x).shape == (5, 16)
    torch.testing.assert_close(s.task_embedding(x).norm(dim=-1), torch.ones(5))
    assert s.num_experts == 3 and s.num_tasks == 3
    assert Student(small_config(), num_tasks=1).num_experts == 2  # top-2 needs two experts


def test_default_config_builds():
    s = Student(StudentConfig(), num_tasks=5)
    assert s.num_experts == 5
    assert s(torch.randn(2, 8, 39)).shape == (2, 4)


def test_causal_per_position_outputs_and_last_position():
    s = make_student()
    x = torch.randn(4, H, OBS)
    y = s.forward_sequence(x)
    x2 = x.clone()
    x2[:, 3] += 5.0  # change a later observation
    y2 = s.forward_sequence(x2)
    torch.testing.assert_close(y2[:, :3], y[:, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(y2[:, 3:], y[:, 3:])
    torch.testing.assert_close(s(x), y[:, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task_id", [True, False])
def test_last_position_forward_equals_the_sequence_with_adapters_and_task_routing(task_id):
    """``forward`` computes the final block at the last position only; with per-task adapters, task-routed
    experts and task conditioning (each token's inferred task without an id) it still equals the last
    position of ``forward_sequence``."""
    s = make_student(num_tasks=3, adapter_rank=4, expert_routing="task", task_conditioning="task")
    x = torch.randn(6, H, OBS)
    x[:, -2:] += 3.0  # the windows' last tokens look like another task than their first ones
    mask = torch.ones(6, H, dtype=torch.bool)
    mask[:2, :3] = False
    with torch.no_grad():
        for p in s.parameter_group("adapters"):
            p.normal_()
        z = s.task_encoder(x, mask)
        s.prototypes.copy_(torch.stack([z[2:, 0].mean(0), z[2:, -1].mean(0), torch.randn(16)]))
        s.prototype_count.fill_(1)
        s.conditioning.normal_()
    routed = routing.token_tasks(s, z, None)
    assert bool((routed[2:, 0] != routed[2:, -1]).any())  # tokens of one window use different tasks
    ids = torch.tensor([0, 1, 2, 0, 1, 2]) if task_id else None
    torch.testing.assert_close(s(x, ids, mask), s.forward_sequence(x, ids, mask)[:, -1], rtol=1e-5, atol=1e-6)


def test_act_on_some_rows_equals_the_same_rows_of_every_env():
    s = make_student()
    a, b = HistoryBuffer.for_student(s, 4), HistoryBuffer.for_student(s, 4)
    rows = torch.tensor([3, 1])
    for t in range(H + 1):
        obs = torch.randn(4, OBS)
        every = s.act(obs, a, reset_mask=torch.tensor([t == 2, False, False, False]))
        some = s.act(obs, b, reset_mask=torch.tensor([t == 2, False, False, False]), rows=rows)
        assert some.shape == (2, ACT)
        torch.testing.assert_close(some, every[rows], rtol=1e-5, atol=1e-6)


def test_padding_mask_ignores_padded_values():
    s = make_student()
    x = torch.randn(3, H, OBS)
    mask = torch.ones(3, H, dtype=torch.bool)
    mask[:, :4] = False  # episode start: only the last 2 observations are real
    mask[2] = True  # a full window in the same batch
    x2 = x.clone()
    x2[:2, :4] = torch.randn(2, 4, OBS) * 10
    torch.testing.assert_close(s(x, mask=mask), s(x2, mask=mask))
    assert torch.isfinite(s.forward_sequence(x, mask=mask)).all()


def test_history_buffer_left_pads_and_resets_individual_envs():
    buf = HistoryBuffer(num_envs=2, history=3, obs_dim=2)
    w, m = buf.push(torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    assert w[0].tolist() == [[1, 1]] * 3 and m[0].tolist() == [False, False, True]
    w, m = buf.push(torch.tensor([[3.0, 3.0], [4.0, 4.0]]))
    assert w[1].tolist() == [[2, 2], [2, 2], [4, 4]] and m[1].tolist() == [False, True, True]
    w, m = buf.push(torch.tensor([[5.0, 5.0], [6.0, 6.0]]), reset_mask=torch.tensor([False, True]))
    assert w[0].tolist() == [[1, 1], [3, 3], [5, 5]] and m[0].all()
    assert w[1].tolist() == [[6, 6]] * 3 and m[1].tolist() == [False, False, True]
    buf.reset([0])
    w, m = buf.push(torch.tensor([[7.0, 7.0], [8.0, 8.0]]))
    assert m[0].tolist() == [False, False, True] and m[1].tolist() == [False, True, True]
    with pytest.raises(ValueError, match="shape"):
        buf.push(torch.zeros(3, 2))


def test_act_runs_rollout_steps_in_eval_mode():
    s = make_student()
    s.train()
    buf = HistoryBuffer.for_student(s, num_envs=3)
    for t in range(H + 2):
        a = s.act(torch.randn(3, OBS).numpy(), buf, reset_mask=torch.tensor([t == 4, False, False]))
        assert a.shape == (3, ACT) and bool((a.abs() <= 1).all())
    assert s.training  # mode restored


def test_supcon_loss_values():
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]]), dim=-1)
    good = supcon_loss(z, torch.tensor([0, 0, 1, 1]), 0.1)
    bad = supcon_loss(z, torch.tensor([0, 1, 0, 1]), 0.1)
    assert float(good) < 0.01 < 5 < float(bad)
    assert float(supcon_loss(z, torch.tensor([0, 1, 2, 3]))) == 0.0  # no positives


def test_contrastive_embedding_clusters_synthetic_tasks():
    s = make_student(num_tasks=3)
    means = synthetic_tasks(3)
    opt = torch.optim.Adam(s.parameter_group("task_encoder"), lr=3e-3)
    # SupCon's floor (perfect clusters): log(positives per anchor) = log(15) for 48 windows of 3 tasks
    floor = torch.log(torch.tensor(15.0)).item()
    first = None
    for step in range(200):
        obs, labels = sample_windows(means, 48, seed=step)
        z = s.task_encoder(obs, torch.ones(obs.shape[:2], dtype=torch.bool))[:, -1]
        loss = supcon_loss(z, labels, s.config.contrastive_temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        s.update_prototypes(z.detach(), labels)
        first = loss.item() if first is None else first
    assert loss.item() - floor < 0.1 * (first - floor)
    obs, labels = sample_windows(means, 90, seed=10_000)
    with torch.no_grad():
        z = s.task_embedding(obs)
        sim = z @ z.T
    same = labels[:, None] == labels[None, :]
    assert float(sim[same].mean()) > float(sim[~same].mean()) + 0.5
    assert float((s.infer_task(obs) == labels).float().mean()) > 0.95


def test_losses_train_all_terms_and_prototype_vs_inferred():
    s = make_student(num_tasks=2)
    means = synthetic_tasks(2, seed=1)
    w_true = torch.randn(OBS, ACT) * 0.1
    opt = torch.optim.Adam(s.parameters(), lr=2e-3)
    hist = []
    for step in range(60):
        obs, labels = sample_windows(means, 32, seed=step)
        target = torch.tanh(obs[:, -1] @ w_true)
        out = s.losses(obs, target, labels)
        assert set(out) == {"mse", "contrastive", "aux", "total"}
        torch.testing.assert_close(out["total"], out["mse"] + out["aux"] + 0.1 * out["contrastive"])
        opt.zero_grad()
        out["total"].backward()
        opt.step()
        hist.append((out["mse"].item(), out["contrastive"].item()))
    assert hist[-1][0] < hist[0][0] and hist[-1][1] < hist[0][1]
    assert bool((s.prototype_count > 0).all())
    obs, labels = sample_windows(means, 16, seed=999)
    s.eval()
    inferred, proto = s(obs), s(obs, task_ids=labels)
    assert inferred.shape == proto.shape == (16, ACT)
    assert (inferred - proto).abs().max().item() < 0.5  # tight clusters: both conditionings agree roughly
    # per-position targets
    out = s.losses(obs, torch.zeros(16, H, ACT), labels, update_prototypes=False)
    assert torch.isfinite(out["total"])
    # use_prototype picks the conditioning per window: all False = inferred, all True = prototype
    target = torch.zeros(16, ACT)
    for flag, ref in ((False, inferred), (True, proto)):
        use = torch.full((16,), flag)
        out = s.losses(obs, target, labels, update_prototypes=False, use_prototype=use)
        torch.testing.assert_close(out["mse"], ((ref - target) ** 2).mean())
    mixed = torch.arange(16) % 2 == 0
    out = s.losses(obs, target, labels, update_prototypes=False, use_prototype=mixed)
    both = torch.where(mixed[:, None], proto, inferred)
    torch.testing.assert_close(out["mse"], ((both - target) ** 2).mean())


def test_prototype_requires_seen_task():
    s = make_student(num_tasks=2)
    with pytest.raises(ValueError, match="no prototype"):
        s(torch.randn(2, H, OBS), task_ids=torch.tensor([0, 1]))


def test_add_task_grows_one_dormant_expert_and_keeps_output():
    s = make_student(num_tasks=2)
    x = torch.randn(64, H, OBS)
    before = s(x)
    E = s.num_experts
    new = s.add_task()
    assert new == [E] and s.num_experts == E + 1 and s.num_tasks == 3
    assert s.moe.gate.bias[E].item() == -5.0 and s.moe.gate.weight[E].abs().sum().item() == 0.0
    assert s.prototypes.shape == (3, 16) and int(s.prototype_count[2]) == 0
    after = s(x)
    torch.testing.assert_close(after, before, rtol=0, atol=2e-2)
    assert int(s.moe.tokens_per_expert[E]) == 0  # dormant at birth
    assert s.add_task(n_new_experts=2) == [E + 1, E + 2] and s.num_tasks == 4


def test_freeze_shared_and_old_experts_bit_identical_under_adamw():
    s = make_student(num_tasks=2)
    means = synthetic_tasks(3, seed=2)
    opt = torch.optim.AdamW(s.parameters(), lr=1e-2, weight_decay=0.1)

    def step(n, tasks):
        for i in range(n):
            obs, labels = sample_windows(means[:tasks], 24, seed=100 + i)
            opt.zero_grad()
            s.losses(obs, torch.rand(24, ACT) * 2 - 1, labels)["total"].backward()
            opt.step()

    step(3, 2)  # stage 1: momentum and second moments everywhere
    old = list(range(s.num_experts))
    s.add_task()
    s.moe.update_optimizer(opt)
    s.set_frozen({"shared": None, "experts": old})
    assert s.moe.frozen_mask.tolist() == [True] * len(old) + [False]
    shared = [p.detach().clone() for p in s.parameter_group("shared")]
    w1 = s.moe.w1.detach().clone()
    enc = [p.detach().clone() for p in s.parameter_group("task_encoder")]
    step(3, 3)
    for a, p in zip(shared, s.parameter_group("shared"), strict=True):
        assert torch.equal(a, p)
    assert torch.equal(s.moe.w1[old], w1[old])
    assert not torch.equal(s.moe.w1[-1], w1[-1])  # the new expert trains
    assert any(not torch.equal(a, p) for a, p in zip(enc, s.parameter_group("task_encoder"), strict=True))
    s.set_frozen({})  # everything trains again
    assert all(p.requires_grad for p in s.parameters()) and not bool(s.moe.frozen_mask.any())


@pytest.mark.parametrize("adapter_rank", [None, 4])
def test_parameter_groups_partition_the_parameters(adapter_rank):
    s = make_student(num_tasks=2, adapter_rank=adapter_rank)
    groups = [{id(p) for p in s.parameter_group(name)} for name in GROUPS]
    assert sum(len(g) for g in groups) == len({id(p) for p in s.parameters()})
    assert len(set().union(*groups)) == len({id(p) for p in s.parameters()})
    assert {id(p) for p in s.parameter_group("shared")}.isdisjoint(id(p) for p in s.moe.parameters())
    per_task = [{id(p) for p in s.parameter_group("adapters", [t])} for t in (0, 1)]
    assert per_task[0].isdisjoint(per_task[1]) and len(per_task[0]) == (8 * 2 if adapter_rank else 0)


def test_set_frozen_freezes_exactly_the_named_groups():
    s = make_student(num_tasks=3, adapter_rank=4)
    s.set_frozen({"head": None, "gate": None, "adapters": [0, 2], "experts": [1], "prototypes": [2],
                  "conditioning": None})  # fmt: skip
    frozen = {id(p) for name in ("head", "gate") for p in s.parameter_group(name)}
    frozen |= {id(p) for p in s.parameter_group("adapters", [0, 2])}
    assert all(p.requires_grad == (id(p) not in frozen) for p in s.parameters())
    assert s.moe.frozen_mask.tolist() == [False, True, False]
    assert s.frozen_prototypes == {2} and s.frozen_conditioning == {0, 1, 2}
    s.set_frozen({"shared": None})  # idempotent: the previous set is forgotten
    assert not s.moe.frozen_mask.any() and not s.frozen_prototypes and not s.frozen_conditioning
    frozen = {id(p) for p in s.parameters() if not p.requires_grad}
    assert frozen == {id(p) for p in s.parameter_group("shared")}
    with pytest.raises(ValueError, match="unknown parameter group"):
        s.set_frozen({"trunk": None})
    with pytest.raises(ValueError, match="takes no index"):
        s.set_frozen({"experts": None, "head": [0]})
    assert frozen == {id(p) for p in s.parameters() if not p.requires_grad}  # a refused set changes nothing
    assert not s.moe.frozen_mask.any()


def test_state_dict_round_trip_across_growth():
    s = make_student(num_tasks=2)
    obs, labels = sample_windows(synthetic_tasks(2), 16, seed=0)
    s.losses(obs, torch.zeros(16, ACT), labels)  # fills prototypes
    s.add_task()
    s.add_task(n_new_experts=2)
    s.eval()
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    r = Student.from_state_dict(sd)
    r.eval()
    assert r.num_experts == s.num_experts == 5 and r.num_tasks == 4
    assert r.config == s.config
    torch.testing.assert_close(r(obs), s(obs))
    torch.testing.assert_close(r(obs, task_ids=labels), s(obs, task_ids=labels))
    assert torch.equal(r.prototype_count, s.prototype_count)
    # loading into a freshly built (smaller) student resizes it
    fresh = make_student(num_tasks=2, seed=5)
    fresh.load_state_dict(sd)
    fresh.eval()
    torch.testing.assert_close(fresh(obs), s(obs))


def test_bad_inputs_raise_clear_errors():
    s = make_student(num_tasks=2)
    x = torch.randn(2, H, OBS)
    with pytest.raises(ValueError, match="shape"):
        s(torch.randn(2, H + 1, OBS))
    with pytest.raises(ValueError, match="shape"):
        s(torch.randn(2, OBS))
    with pytest.raises(TypeError, match="floating"):
        s(torch.zeros(2, H, OBS, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        s(x.numpy())
    with pytest.raises(TypeError, match="task_ids"):
        s(x, task_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="task_ids"):
        s(x, task_ids=torch.tensor([0, 7]))
    bad_mask = torch.ones(2, H, dtype=torch.bool)
    bad_mask[:, -1] = False
    with pytest.raises(ValueError, match="last position"):
        s(x, mask=bad_mask)
    with pytest.raises(TypeError, match="mask"):
        s(x, mask=torch.ones(2, H))
    with pytest.raises(ValueError, match="teacher_action_mean"):
        s.losses(x, torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="task_ids"):
        s.losses(x, torch.zeros(2, ACT), None)
    with pytest.raises(ValueError, match="divisible"):
        StudentConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="history"):
        StudentConfig(history=0)
    with pytest.raises(TypeError, match="StudentConfig"):
        Student({"d_model": 8})
    with pytest.raises(ValueError, match="n_new_experts"):
        s.add_task(-1)
