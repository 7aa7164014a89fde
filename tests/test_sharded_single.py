"""ShardedSM3 in one process: plain SM3 with the torch.optim contract, its partition geometry, and bad input.

At world size 1 (no process group) ShardedSM3 is single-process SM3, bit for bit, with schedulers,
closures and state_dict hooks; misuse (sparse gradients, changed parameters, another model's state,
bad hyperparameters) is refused with an error naming the problem.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sm3_dist import MOMENTUM_KEY, SM3, STEP_KEY, ShardedSM3, accumulator_key, local_state_bytes
from sm3_dist.sharded import FlatPartition
from tests.sharded_cases import (
    HYPER,
    LR,
    STEPS,
    assert_state_equal,
    expected_local_bytes,
    make_sharded_model,
    param_groups,
    reference_run,
    sharded_grads,
    train,
)

# ---------------------------------------------------------------------- single process: the torch.optim contract


def test_single_process_is_plain_sm3_with_schedulers_and_zero_grad():
    for momentum, beta in HYPER:
        ref_params, ref_state = reference_run("transformer", momentum, beta)
        model = make_sharded_model()
        opt = ShardedSM3(param_groups(model), lr=LR, momentum=momentum, beta=beta)
        assert isinstance(opt, torch.optim.Optimizer)
        assert opt.param_groups[0]["params"][0] is next(model.parameters())
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        train(opt, list(model.parameters()), STEPS, scheduler=scheduler)
        assert opt.param_groups[0]["lr"] == LR * 0.25
        assert all(torch.equal(p.detach(), r) for p, r in zip(model.parameters(), ref_params))
        assert_state_equal(opt.state_dict(), ref_state)
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        assert local_state_bytes(opt) == expected_local_bytes(
            [tuple(p.shape) for p in model.parameters()], opt.owned_ranges(), momentum > 0
        )


def test_closure_and_state_keys():
    model = make_sharded_model()
    opt = ShardedSM3(model.parameters(), lr=LR, momentum=0.9)
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))

    def closure():
        opt.zero_grad()
        loss = model(tokens)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.dim() == 0
    state = opt.state[model.attn.qkv]
    assert set(state) == {STEP_KEY, MOMENTUM_KEY, *(accumulator_key(d) for d in range(3))}


def test_state_dict_hooks_run():
    model = make_sharded_model()
    opt = ShardedSM3(model.parameters(), lr=LR, momentum=0.9)
    train(opt, list(model.parameters()), 2)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    state = opt.state_dict()
    assert state["extra"] == 1
    opt.load_state_dict(state)
    assert calls == ["pre", "load-post"]


def test_flat_partition_geometry():
    part = FlatPartition(numels=(3, 100, 2, 0, 1), world_size=4)
    assert part.bounds() == (0, 26, 53, 79, 106)
    assert part.owned(0) == ((0, 3), (0, 23), (0, 0), (0, 0), (0, 0))
    assert part.owned(1) == ((3, 3), (23, 50), (0, 0), (0, 0), (0, 0))  # only the middle of one parameter
    assert part.owned(3) == ((3, 3), (76, 100), (0, 2), (0, 0), (0, 1))
    with pytest.raises(ValueError, match="rank 4 is outside"):
        part.owned(4)


# ---------------------------------------------------------------------- bad input


def _sparse_grad(opt, model):
    emb = nn.Embedding(4, 3, sparse=True)
    opt = ShardedSM3(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()


def _add_group(opt, model):
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


def _append_param(opt, model):
    opt.param_groups[0]["params"].append(nn.Parameter(torch.zeros(3)))
    opt.step()


def _drop_param(opt, model):
    opt.param_groups[0]["params"].pop()
    opt.step()


def _replace_storage(opt, model):
    model.head.weight.data = torch.zeros_like(model.head.weight)
    opt.step()


def _other_model_state(opt, model):
    other = nn.Linear(3, 2)
    src = SM3(other.parameters())
    other.weight.grad = torch.ones_like(other.weight)
    other.bias.grad = torch.ones_like(other.bias)
    src.step()
    opt.load_state_dict(src.state_dict())


def _wrong_accumulator_shape(opt, model):
    state = opt.state_dict()
    k = 2
    state["state"][k] = {STEP_KEY: torch.tensor(1.0), "mu_0": torch.zeros(3), "mu_1": torch.zeros(6)}
    opt.load_state_dict(state)


BAD_USE = [
    (_sparse_grad, TypeError, "sparse gradients"),
    (_add_group, ValueError, "partitions its parameters once"),
    (_append_param, ValueError, "param_groups' parameters changed"),
    (_drop_param, ValueError, "param_groups' parameters changed"),
    (_replace_storage, RuntimeError, r"param_groups\[0\]\['params'\]\[13\].*storage was replaced"),
    (_other_model_state, ValueError, "another model"),
    (_wrong_accumulator_shape, ValueError, r"param_groups\[0\]\['params'\]\[2\].*'mu_0' has shape \(3,\)"),
]


@pytest.mark.parametrize(("use", "error", "match"), BAD_USE, ids=lambda v: getattr(v, "__name__", None))
def test_bad_use(use, error, match):
    model = make_sharded_model()
    opt = ShardedSM3(model.parameters(), lr=LR)
    for p, g in zip(model.parameters(), sharded_grads(list(model.parameters()), 0)):
        p.grad = g
    opt.step()
    with pytest.raises(error, match=match):
        use(opt, model)


BAD_CONSTRUCTION = [
    (lambda: ShardedSM3([torch.zeros(3, dtype=torch.float64, requires_grad=True)]), TypeError, "float32, bfloat16"),
    (lambda: ShardedSM3([torch.zeros(4, 3).t().requires_grad_()]), ValueError, r"\(shape \(3, 4\).*contiguous"),
    (lambda: ShardedSM3([torch.zeros(3, requires_grad=True)], lr=-1.0), ValueError, "Invalid lr"),
    (lambda: ShardedSM3([torch.zeros(3, requires_grad=True)], momentum=1.0), ValueError, "Invalid momentum"),
    (lambda: ShardedSM3([torch.zeros(3, requires_grad=True)], shard_resolver=None), TypeError, "no shard_resolver"),
    (lambda: ShardedSM3([torch.zeros(3, requires_grad=True)], process_group=object()), ValueError, "not initialized"),
    (lambda: ShardedSM3([]), ValueError, "empty parameter list"),
]


@pytest.mark.parametrize(("build", "error", "match"), BAD_CONSTRUCTION)
def test_bad_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()
