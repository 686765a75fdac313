"""Per-task low-rank adapters (cpd_fast.student.adapters) in the student: off by default, a fresh adapter
changes nothing, a frozen task keeps its outputs bit for bit while a new task's adapter trains, routing,
errors."""

import pytest
import torch
from test_distill import TINY, _one_thread, synthetic_data, tiny_config  # noqa: F401  (_one_thread: autouse)

from cpd_fast.distill import DistillConfig, TaskSampler, configure_phase, train_phase
from cpd_fast.distill.windows import full_pool
from cpd_fast.student import Student, StudentConfig, adapters, routing
from cpd_fast.student.adapters import TaskLoRA


def _student(rank, num_tasks=2, seed=0):
    torch.manual_seed(seed)
    return Student(StudentConfig(**{**TINY, "n_layers": 2}, adapter_rank=rank), num_tasks=num_tasks)


def _batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, TINY["history"], 39, generator=g), torch.arange(n) % 2


def test_off_by_default_and_fresh_adapters_change_nothing():
    plain, adapted = _student(None), _student(4)
    assert StudentConfig().adapter_rank is None
    assert not plain.parameter_group("adapters") and not any("adapters" in k for k in plain.state_dict())
    # rank r per map: A [r, in] + B [out, r] for qkv, proj, ff1, ff2 of each of the 2 blocks, per task
    d, f, r = TINY["d_model"], TINY["d_ff"], 4
    per_block = r * ((d + 3 * d) + (d + d) + (d + f) + (f + d))
    assert sum(p.numel() for p in adapted.parameter_group("adapters", [1])) == 2 * per_block
    obs, ids = _batch()
    plain.update_prototypes(torch.nn.functional.normalize(torch.randn(6, 16), dim=-1), ids)
    adapted.update_prototypes(plain.prototypes[ids].clone(), ids)
    adapted.prototypes.copy_(plain.prototypes)
    # the other parameters are drawn first, so both students hold the same weights; B = 0: no update
    for mode in (None, ids):
        assert torch.equal(plain(obs, task_ids=mode), adapted(obs, task_ids=mode))


def test_frozen_task_keeps_outputs_bit_for_bit_while_new_task_adapter_trains():
    data = synthetic_data()
    cfg = tiny_config(student=StudentConfig(**TINY, adapter_rank=4))
    torch.manual_seed(0)
    s = Student(cfg.student, num_tasks=1)
    new = s.add_task()  # task 1 arrives with its expert and its adapter
    configure_phase(s, cfg, 1, "phase1", new, new_tasks=[1])
    assert all(p.requires_grad for p in s.parameter_group("adapters", [1]))
    assert not any(p.requires_grad for p in s.parameter_group("adapters", [0]))
    # everything but task 1's adapter frozen: task 0's outputs cannot move, task 1's must
    s.set_frozen({**dict.fromkeys(("shared", "task_encoder", "head", "gate", "experts")), "adapters": [0]})
    trainable = {id(p) for p in s.parameters() if p.requires_grad}
    # task 1's adapters, and the experts' stacked weights (every row frozen by the MoE's mask)
    assert trainable == {id(p) for p in (*s.parameter_group("adapters", [1]), *s.parameter_group("experts"))}
    assert bool(s.moe.frozen_mask.all())
    obs, _ = _batch()
    for t in (0, 1):
        s.update_prototypes(torch.nn.functional.normalize(torch.randn(3, 16), dim=-1), torch.full((3,), t))
    t0, t1 = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)
    before0, before1 = s(obs, task_ids=t0), s(obs, task_ids=t1)
    protos = s.prototypes.clone()
    train_phase(s, data, TaskSampler({t: full_pool(data, t) for t in (0, 1)}), 5, cfg, torch.Generator())
    s.prototypes.copy_(protos)  # training moves the prototypes (EMA); the parameters are what is tested
    assert torch.equal(s(obs, task_ids=t0), before0)
    assert not torch.equal(s(obs, task_ids=t1), before1)
    # stage 0 trains every adapter
    configure_phase(s, cfg, 0, "train", [0])
    assert all(p.requires_grad for p in s.parameter_group("adapters"))


def test_route_follows_task_id_else_nearest_prototype():
    s = _student(2, num_tasks=3)
    z = torch.nn.functional.normalize(torch.randn(2, 4, 16), dim=-1)
    no_prototype_yet = routing.token_tasks(s, z, None)
    assert torch.equal(no_prototype_yet, torch.full((2, 4), -1))  # no adapter
    s.prototypes[1] = z[0, 0]
    s.prototypes[2] = -z[0, 0]
    s.prototype_count[1:] = 1
    ids = routing.token_tasks(s, z, None)
    sims = z @ torch.nn.functional.normalize(s.prototypes[1:], dim=-1).T
    assert torch.equal(ids, 1 + sims.argmax(-1)) and int(ids[0, 0]) == 1  # task 0 (unseen) never chosen
    given = torch.tensor([2, 0])
    assert routing.token_tasks(s, z, given) is given  # one id per window


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("per_token", [False, True])
def test_update_matches_the_per_token_reference(per_token, grad):
    """Reference: each token's ``B_t A_t x``, one token at a time (zero for id -1); gathered under autograd,
    grouped by task without it."""
    lora = TaskLoRA(8, 5, 3, num_tasks=4)
    with torch.no_grad():
        for b in lora.B:
            b.normal_()
    x = torch.randn(3, 7, 8)
    ids = torch.randint(-1, 4, (3, 7) if per_token else (3,))
    tok = ids if per_token else ids[:, None].expand(3, 7)
    rows = zip(x.reshape(-1, 8), tok.reshape(-1), strict=True)
    want = torch.stack([torch.zeros(5) if t < 0 else lora.B[t] @ (lora.A[t] @ v) for v, t in rows])
    want = want.reshape(3, 7, 5)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(lora(x, ids), want)
        one = torch.full_like(ids, 2)  # one task owns every token: two plain matmuls
        torch.testing.assert_close(lora(x, one), x @ lora.A[2].T @ lora.B[2].T)
        torch.testing.assert_close(lora(x, torch.full_like(ids, -1)), torch.zeros(3, 7, 5))


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("per_token", [False, True])
def test_gradients_match_the_per_token_reference(per_token, masked, monkeypatch):
    """Under autograd (the masked matmuls over the tasks present, or the gathered per-row matrices when
    more tasks than ``MASKED_MAX_TASKS`` are present) the gradients of x and of every present task's A and
    B equal autograd's through the per-token reference; absent tasks get none."""
    monkeypatch.setattr(adapters, "MASKED_MAX_TASKS", 4 if masked else 1)
    lora = TaskLoRA(8, 5, 3, num_tasks=4)
    with torch.no_grad():
        for b in lora.B:
            b.normal_()
    x = torch.randn(3, 7, 8, requires_grad=True)
    ids = torch.tensor([[0, 2, -1, 2, 0, 0, 2]] * 3) if per_token else torch.tensor([2, -1, 0])
    tok = ids if per_token else ids[:, None].expand(3, 7)
    w = torch.randn(3, 7, 5)
    params = [x, *lora.A, *lora.B]

    def grads(y):
        return torch.autograd.grad((y * w).sum(), params, allow_unused=True)

    rows = zip(x.reshape(-1, 8), tok.reshape(-1), strict=True)
    ref = torch.stack([torch.zeros(5) if t < 0 else lora.B[t] @ (lora.A[t] @ v) for v, t in rows])
    for got, want in zip(grads(lora(x, ids)), grads(ref.reshape(3, 7, 5)), strict=True):
        if want is None:  # tasks 1 and 3 are absent
            assert got is None or not bool(got.any())
        else:
            torch.testing.assert_close(got, want)


def test_checkpoint_after_growth_round_trips():
    s = _student(4, num_tasks=1)
    s.add_task()
    s.add_task()
    with torch.no_grad():
        for p in s.parameter_group("adapters"):
            p.add_(0.01)
    obs, _ = _batch()
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    s.update_prototypes(torch.nn.functional.normalize(torch.randn(6, 16), dim=-1), ids)
    sd = s.state_dict()
    assert torch.equal(Student.from_state_dict(sd)(obs, task_ids=ids), s(obs, task_ids=ids))
    small = _student(4, num_tasks=1, seed=3)  # a resumed run's student before its growth
    small.load_state_dict(sd)
    assert torch.equal(small(obs), s(obs))


def test_label_and_bad_input():
    assert DistillConfig(student=StudentConfig(adapter_rank=8)).label == "cpd (adapter rank 8)"
    assert DistillConfig(student=StudentConfig(experts_per_task=2)).label == "cpd (experts/task 2)"
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="adapter_rank"):
            StudentConfig(adapter_rank=bad)
    lora = TaskLoRA(8, 4, 2, num_tasks=3)
    with pytest.raises(ValueError, match="task 3 has no adapter"):
        lora(torch.randn(5, 2, 8), torch.tensor([0, 1, 2, 3, -1]))
    with pytest.raises(ValueError, match="ids must be a LongTensor"):
        lora(torch.randn(5, 2, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="adapter rank"):
        TaskLoRA(8, 4, 0)
