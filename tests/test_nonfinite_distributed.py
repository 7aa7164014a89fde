"""Non-finite gradients on one rank's shard only: every rank skips together, or every rank raises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sm3_dist import SM3
from tests.common import run_distributed


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(7, 10), nn.Linear(10, 9), nn.Linear(9, 5))


def _grads(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(101 + step)
    return {name: torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}


def _snapshot(model, opt):
    from torch.distributed.tensor import DTensor

    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    params = [local(p.detach()).clone() for p in model.parameters()]
    opt.state_dict()  # completes the pending reduction
    state = [{k: local(v).clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    return params, state


def _fsdp2_worker(rank: int, world_size: int, bad: float, policy: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    model = _model()
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = SM3(model.parameters(), lr=0.05, momentum=0.9, nonfinite=policy)

    def set_grads(step, poison_rank=None):
        grads = _grads(model, step)
        for i, (name, p) in enumerate(model.named_parameters()):
            g = distribute_tensor(grads[name], p.device_mesh, p.placements, src_data_rank=None)
            if rank == poison_rank and i == 1:
                local = g.to_local().clone()
                local.view(-1)[0] = bad
                g = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            p.grad = g

    set_grads(0)
    opt.step()
    before = _snapshot(model, opt)
    set_grads(1, poison_rank=world_size - 1)
    try:
        opt.step()
    except FloatingPointError as err:
        return {"raised": str(err)}
    after = _snapshot(model, opt)
    unchanged = all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and all(
        torch.equal(sa[k], sb[k]) for sa, sb in zip(before[1], after[1]) for k in sa
    )
    skipped = opt.skipped_steps
    set_grads(2)
    opt.step()
    moved = not all(torch.equal(a, b) for a, b in zip(after[0], _snapshot(model, opt)[0]))
    return {"unchanged": unchanged, "skipped": skipped, "moved": moved}


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_fsdp2_skip_on_one_rank_is_skipped_everywhere(world_size, bad):
    for result in run_distributed(_fsdp2_worker, world_size, bad, "skip"):
        assert result == {"unchanged": True, "skipped": 1, "moved": True}


def test_fsdp2_raise_names_parameter_on_its_rank():
    results = run_distributed(_fsdp2_worker, 2, float("nan"), "raise")
    assert "param_groups[0]['params'][1] (shape (9, 10))" in results[1]["raised"]
    assert "(rank 1)" in results[1]["raised"]
    assert "another rank" in results[0]["raised"] and "(rank 0)" in results[0]["raised"]


def _sharded_worker(rank: int, world_size: int, bad: float, policy: str):
    from sm3_dist import ShardedSM3

    model = _model()
    opt = ShardedSM3(model.parameters(), lr=0.05, momentum=0.9, nonfinite=policy)
    params = list(model.parameters())
    last = len(params) - 1
    # the last parameter's last element lies in the last rank's slice
    assert opt.owned_ranges(world_size - 1)[last][1] == params[last].numel()

    def set_grads(step, poison=False):
        for name, p in model.named_parameters():
            p.grad = _grads(model, step)[name]
        if poison and rank == world_size - 1:
            params[last].grad.view(-1)[-1] = bad

    def snapshot():
        opt.state_dict()
        return [p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()} for p in params]

    set_grads(0)
    opt.step()
    before = snapshot()
    set_grads(1, poison=True)
    try:
        opt.step()
    except FloatingPointError as err:
        return {"raised": str(err)}
    after = snapshot()
    unchanged = all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and all(
        torch.equal(sa[k], sb[k]) for sa, sb in zip(before[1], after[1]) for k in sa
    )
    skipped = opt.skipped_steps
    set_grads(2)
    opt.step()
    moved = not all(torch.equal(a, b) for a, b in zip(after[0], snapshot()[0]))
    return {"unchanged": unchanged, "skipped": skipped, "moved": moved}


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_sharded_skip_on_one_rank_is_skipped_everywhere(world_size, bad):
    for result in run_distributed(_sharded_worker, world_size, bad, "skip"):
        assert result == {"unchanged": True, "skipped": 1, "moved": True}


def test_sharded_raise_names_parameter_on_its_rank():
    results = run_distributed(_sharded_worker, 2, float("inf"), "raise")
    assert "param_groups[0]['params'][4] (shape (5,))" in results[1]["raised"] and "(rank 1)" in results[1]["raised"]
    assert "another rank" in results[0]["raised"]
