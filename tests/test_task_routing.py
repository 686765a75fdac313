"""Task-routed experts (``StudentConfig.expert_routing="task"``): the MoE layer's caller-chosen routing
against a per-token reference, the student's token-to-expert map, a stage that trains only the new task's
expert while every old task's output stays bit for bit, the one-phase schedule, the label and bad input;
and task conditioning (``task_conditioning="task"``): the encoder goes on learning while old tasks stay."""

import pytest
import torch
import torch.nn.functional as F
from test_distill import TINY, _one_thread, synthetic_data, tiny_config  # noqa: F401  (_one_thread: autouse)

from cpd_fast.distill import DistillConfig, TaskSampler, configure_phase, train_phase
from cpd_fast.distill.methods import phases_of
from cpd_fast.distill.rows import frozen_rows, squared_error_of_trained_rows
from cpd_fast.distill.windows import full_pool
from cpd_fast.moe import MoELayer, fixed_route
from cpd_fast.student import Student, StudentConfig, routing
from cpd_fast.student.loss import squared_error


def _expert(layer, e, v):
    """Expert ``e`` of ``layer`` on one token ``v``, written out (the reference)."""
    h = F.gelu(layer.w1[e] @ v + layer.b1[e])
    return layer.w2[e] @ h + layer.b2[e]


@pytest.mark.parametrize("k", [1, 2])
def test_caller_routing_matches_the_per_token_reference_and_bypasses_the_gate(k):
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 5, top_k=2, backend="torch")
    x = torch.randn(3, 7, 8, requires_grad=True)
    experts = torch.randint(-1, 5, (3, 7, k))
    y = layer(x, experts)
    rows = zip(x.reshape(-1, 8), experts.reshape(-1, k), strict=True)
    want = torch.stack(
        [sum((_expert(layer, int(e), v) / k for e in ids if e >= 0), torch.zeros(8)) for v, ids in rows]
    )
    torch.testing.assert_close(y, want.reshape(3, 7, 8), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert layer.gate.weight.grad is None and float(layer.aux_loss) == 0.0  # the gate took no part
    used = set(experts[experts >= 0].tolist())
    for e in range(5):  # an expert no token was routed to gets exactly zero gradient
        assert bool(layer.w1.grad[e].abs().sum() > 0) == (e in used)
    assert torch.equal(layer.tokens_per_expert, torch.bincount(experts[experts >= 0], minlength=5))


def test_caller_routing_bad_input():
    layer = MoELayer(8, 16, 3, top_k=1, backend="torch")
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="out of range for 3 experts"):
        layer(x, torch.tensor([[0], [1], [2], [3]]))
    with pytest.raises(ValueError, match="leading dims of x"):
        layer(x, torch.zeros(5, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        fixed_route(torch.zeros(4, 1, dtype=torch.int32), 3, torch.float32)


def _routed(num_tasks=2, k=1, rank=None, seed=0):
    torch.manual_seed(seed)
    cfg = StudentConfig(**TINY, expert_routing="task", experts_per_task=k, adapter_rank=rank)
    return Student(cfg, num_tasks=num_tasks)


def test_a_token_uses_its_tasks_experts_given_or_inferred():
    s = _routed(num_tasks=3, k=2)
    assert s.num_experts == 6
    ids = torch.tensor([[0, 2, -1], [1, 1, 0]])
    assert torch.equal(s.task_experts(ids, "all")[0], torch.tensor([[0, 1], [4, 5], [-1, -1]]))
    assert torch.equal(s.task_experts(ids, "last"), torch.tensor([[-1, -1], [0, 1]]))
    assert torch.equal(s.task_experts(torch.tensor([2]), "all"), torch.tensor([[[4, 5]] * TINY["history"]]))
    # the output follows the task: changing task 1's experts moves task 1's windows only
    obs = torch.randn(4, TINY["history"], 39)
    for t in range(3):
        s.update_prototypes(F.normalize(torch.randn(2, 16), dim=-1), torch.full((2,), t))
    t0, t1 = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    before0, before1 = s(obs, task_ids=t0), s(obs, task_ids=t1)
    with torch.no_grad():
        s.moe.w2[2:4].add_(0.5)
    assert torch.equal(s(obs, task_ids=t0), before0) and not torch.equal(s(obs, task_ids=t1), before1)
    # without a task id each token uses the experts of its nearest prototype
    z = s.task_encoder(obs, torch.ones(4, TINY["history"], dtype=torch.bool))
    ids = routing.token_tasks(s, z, None)
    s(obs)
    want = torch.bincount(s.task_experts(ids, "last").flatten(), minlength=6)
    assert torch.equal(s.moe.tokens_per_expert, want)


def test_a_stage_trains_only_the_new_tasks_expert_and_keeps_old_tasks_bit_for_bit():
    data = synthetic_data()
    cfg = tiny_config(student=StudentConfig(**TINY, expert_routing="task", adapter_rank=4))
    assert phases_of(cfg, 0) == [("train", 40)] and phases_of(cfg, 1) == [("train", 40)]  # no gate: one phase
    assert [p for p, _ in phases_of(tiny_config(), 1)] == ["phase1", "phase2"]  # the paper's cpd
    torch.manual_seed(0)
    s = Student(cfg.student, num_tasks=1)
    new = s.add_task()  # one task, yet top_k = 2 experts: expert 0 is nobody's, task 0 owns 1, task 1 owns 2
    assert new == [2] and torch.equal(s.task_experts(torch.tensor([0, 1]), "last"), torch.tensor([[1], [2]]))
    for t in (0, 1):
        s.update_prototypes(F.normalize(torch.randn(3, 16), dim=-1), torch.full((3,), t))
    configure_phase(s, cfg, 1, "train", new, new_tasks=[1])
    assert s.moe.frozen_mask.tolist() == [True, True, False] and s.moe.gate_frozen
    obs = torch.randn(6, TINY["history"], 39)
    t0, t1 = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)
    before0, before1 = s(obs, task_ids=t0), s(obs, task_ids=t1)
    w1, protos = s.moe.w1.detach().clone(), s.prototypes.clone()
    assert not any(p.requires_grad for p in s.parameter_group("task_encoder")) and s.frozen_prototypes == {0}
    train_phase(s, data, TaskSampler({t: full_pool(data, t) for t in (0, 1)}), 5, cfg, torch.Generator())
    assert torch.equal(s.moe.w1[:2], w1[:2]) and not torch.equal(s.moe.w1[2], w1[2])
    assert torch.equal(s.prototypes[0], protos[0]) and not torch.equal(s.prototypes[1], protos[1])
    assert torch.equal(s(obs, task_ids=t0), before0)  # replayed windows of task 0 moved nothing of it
    assert not torch.equal(s(obs, task_ids=t1), before1)
    configure_phase(s, cfg, 0, "train", [0, 1])  # stage 0 trains everything
    assert all(p.requires_grad for p in s.parameter_group("task_encoder")) and not s.frozen_prototypes


def test_checkpoint_label_and_bad_input():
    s = _routed(num_tasks=1)
    s.add_task()
    obs = torch.randn(2, TINY["history"], 39)
    ids = torch.tensor([0, 1])
    s.update_prototypes(F.normalize(torch.randn(2, 16), dim=-1), ids)
    back = Student.from_state_dict(s.state_dict())
    assert back.config.expert_routing == "task" and torch.equal(back(obs, task_ids=ids), s(obs, task_ids=ids))
    assert StudentConfig().expert_routing == "gate"
    label = DistillConfig(student=StudentConfig(expert_routing="task", adapter_rank=8)).label
    assert label == "cpd (adapter rank 8, task-routed experts)"
    with pytest.raises(ValueError, match="expert_routing must be one of"):
        StudentConfig(expert_routing="hash")
    with pytest.raises(ValueError, match="needs experts_per_task=1 experts for each of 3 tasks"):
        Student(StudentConfig(**TINY, expert_routing="task"), num_tasks=3, num_experts=2)
    with pytest.raises(ValueError, match="expert_routing"):
        tiny_config(student={"expert_routing": "topk"})


def _conditioned(seed=0):
    torch.manual_seed(seed)
    cfg = StudentConfig(**TINY, expert_routing="task", adapter_rank=4, task_conditioning="task")
    return Student(cfg, num_tasks=1)


def test_task_conditioning_acts_as_the_inferred_task_would_with_its_id():
    """Without a task id each token is conditioned on (and routed to) its nearest prototype's task, so a
    window whose tokens all classify as task t gets exactly task t's actions."""
    s = _conditioned()
    s.add_task()
    obs = torch.randn(64, TINY["history"], 39)
    mask = torch.ones(64, TINY["history"], dtype=torch.bool)
    z = s.task_encoder(obs, mask)
    for t in (0, 1):  # two prototypes, each the mean of half the tokens
        s.update_prototypes(F.normalize(z[t::2, -1].mean(0, keepdim=True), dim=-1), torch.tensor([t]))
    ids = routing.token_tasks(s, z, None)
    whole = (ids == ids[:, :1]).all(1)
    assert whole.any()
    inferred = s(obs[whole])
    given = s(obs[whole], task_ids=ids[whole, -1])
    torch.testing.assert_close(inferred, given)  # per-token vs per-window matmuls: rounding only
    # the conditioning vector is the task's, not the window's embedding: other windows of the same task
    # with another embedding get the same conditioning
    assert torch.equal(s.task_vectors(torch.tensor([1, 1])), F.normalize(s.conditioning[[1, 1]], dim=-1))
    assert torch.equal(s.task_vectors(torch.tensor([-1])), torch.zeros(1, 16))


def test_task_conditioning_stage_trains_the_encoder_and_keeps_old_tasks_bit_for_bit():
    data = synthetic_data()
    cfg = tiny_config(student=StudentConfig(**TINY, expert_routing="task", adapter_rank=4,
                                            task_conditioning="task"))  # fmt: skip
    s = _conditioned()
    new = s.add_task()
    for t in (0, 1):
        s.update_prototypes(F.normalize(torch.randn(3, 16), dim=-1), torch.full((3,), t))
    configure_phase(s, cfg, 1, "train", new, new_tasks=[1])
    assert all(p.requires_grad for p in s.parameter_group("task_encoder"))  # the classifier keeps learning
    assert s.frozen_conditioning == {0} and not s.frozen_prototypes
    obs = torch.randn(6, TINY["history"], 39)
    t0 = torch.zeros(6, dtype=torch.long)
    before0 = s(obs, task_ids=t0)
    enc = [p.detach().clone() for p in s.parameter_group("task_encoder")]
    protos, cond = s.prototypes.clone(), s.conditioning.clone()
    train_phase(s, data, TaskSampler({t: full_pool(data, t) for t in (0, 1)}), 5, cfg, torch.Generator())
    assert any(not torch.equal(a, b) for a, b in zip(enc, s.parameter_group("task_encoder"), strict=True))
    assert not torch.equal(s.prototypes[0], protos[0])  # task 0's prototype follows the encoder ...
    assert torch.equal(s.conditioning[0], cond[0])  # ... its conditioning does not
    assert torch.equal(s.conditioning[1], s.prototypes[1])  # the new task's is its live prototype
    assert torch.equal(s(obs, task_ids=t0), before0)
    configure_phase(s, cfg, 0, "train", [0, 1])
    assert not s.frozen_conditioning


@pytest.mark.parametrize("conditioning", ["embedding", "task"])
def test_windows_that_train_nothing_are_left_out_with_the_same_gradient(conditioning):
    """Under parameter isolation an old task's replayed window reads only frozen tensors: training's loss
    (:mod:`cpd_fast.distill.rows`) leaves it out of the forward pass. The gradient equals running every
    window (the reference, ``student.losses``); ``mse`` is that of the new task's windows."""
    cfg = tiny_config(student=StudentConfig(**TINY, expert_routing="task", adapter_rank=4,
                                            task_conditioning=conditioning))  # fmt: skip
    torch.manual_seed(0)
    s = Student(cfg.student, num_tasks=2)
    new = s.add_task()
    for t in (0, 1, 2):
        s.update_prototypes(F.normalize(torch.randn(3, 16), dim=-1), torch.full((3,), t))
    g = torch.Generator().manual_seed(1)
    H = TINY["history"]
    obs, target = torch.randn(12, H, 39, generator=g), torch.rand(12, H, 4, generator=g) * 2 - 1
    ids, mask = torch.tensor([0, 1, 2] * 4), torch.ones(12, H, dtype=torch.bool)
    mask[:3, :2] = False
    use = torch.rand(12, generator=g) < 0.5
    assert frozen_rows(s, ids) is None  # stage 0: everything trains
    configure_phase(s, cfg, 1, "train", new, new_tasks=[2])
    assert frozen_rows(s, ids).tolist() == [True, True, False] * 4
    with torch.no_grad():
        assert frozen_rows(s, ids) is None  # nothing trains without autograd

    def grads(skip: bool):
        s.zero_grad(set_to_none=True)
        fn = squared_error_of_trained_rows if skip else squared_error
        out = s.losses(obs, target, ids, mask, False, use, squared_error_fn=fn)
        out["total"].backward()
        return out, {n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None}

    (out, got), (_, want) = grads(True), grads(False)
    assert got.keys() == want.keys() and "moe.w1" in got
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    old = s.losses(obs[~(ids == 2)], target[~(ids == 2)], ids[~(ids == 2)], mask[~(ids == 2)],
                   squared_error_fn=squared_error_of_trained_rows)  # fmt: skip
    assert float(old["mse"]) == 0.0 and old["total"].requires_grad  # replay only: zero, still a loss
    live = ids == 2  # the reported MSE: the new task's windows', written out
    z = s.task_encoder(obs[live], mask[live])
    pred, _ = s.predict(obs[live], mask[live], ids[live], use[live], True, z)
    w = mask[live].unsqueeze(-1).float()
    torch.testing.assert_close(out["mse"], ((pred - target[live]) ** 2 * w).sum() / (w.sum() * 4))


def test_task_conditioning_checkpoint_label_and_bad_input():
    s = _conditioned()
    s.add_task()
    ids = torch.tensor([0, 1])
    s.update_prototypes(F.normalize(torch.randn(2, 16), dim=-1), ids)
    s.set_frozen({"conditioning": [0]})
    s.update_prototypes(F.normalize(torch.randn(2, 16), dim=-1), ids)
    obs = torch.randn(2, TINY["history"], 39)
    back = Student.from_state_dict(s.state_dict())
    assert torch.equal(back.conditioning, s.conditioning)
    assert not torch.equal(back.conditioning, back.prototypes)
    assert torch.equal(back(obs), s(obs)) and torch.equal(back(obs, task_ids=ids), s(obs, task_ids=ids))
    old = {k: v for k, v in s.state_dict().items() if k != "conditioning"}  # a checkpoint from before
    assert torch.equal(Student.from_state_dict(old).conditioning, s.prototypes)
    label = DistillConfig(student=StudentConfig(expert_routing="task", task_conditioning="task")).label
    assert label == "cpd (task-routed experts, task conditioning)"
    with pytest.raises(ValueError, match="task_conditioning must be one of"):
        StudentConfig(task_conditioning="onehot")
    with pytest.raises(ValueError, match="needs expert_routing='task'"):
        StudentConfig(task_conditioning="task")
