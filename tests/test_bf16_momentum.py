"""bf16 momentum (``momentum_dtype=torch.bfloat16``): 2 bytes per parameter, exact under FSDP2 sharding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sm3_dist import MOMENTUM_KEY, SM3, accumulator_key, local_state_bytes
from tests.common import run_distributed

STEPS = 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(7, 10), nn.Linear(10, 9), nn.LayerNorm(9), nn.Linear(9, 5))


def _grads(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(31 + step)
    return {name: torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}


def _single_process(kernel: dict) -> tuple[dict, dict]:
    model = _model()
    opt = SM3(model.parameters(), lr=0.05, momentum=0.9, momentum_dtype=torch.bfloat16, **kernel)
    for step in range(STEPS):
        for name, p in model.named_parameters():
            p.grad = _grads(model, step)[name]
        opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    return params, state


def _fsdp2_worker(rank: int, world_size: int, kernel: dict) -> tuple[dict, dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    model = _model()
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = SM3(model.parameters(), lr=0.05, momentum=0.9, momentum_dtype=torch.bfloat16, **kernel)
    for step in range(STEPS):
        grads = _grads(model, step)
        for name, p in model.named_parameters():
            p.grad = distribute_tensor(grads[name], p.device_mesh, p.placements, src_data_rank=None)
        opt.step()
    opt.state_dict()  # waits for the last reduction
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    params = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    state = {n: {k: full(v).clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    return params, state


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("kernel", [dict(foreach=False), dict(fused=True)], ids=["eager", "fused"])
def test_fsdp2_bf16_momentum_bit_identical(world_size, kernel):
    ref_params, ref_state = _single_process(kernel)
    for params, state in run_distributed(_fsdp2_worker, world_size, kernel):
        for name, value in ref_params.items():
            assert torch.equal(params[name], value), name
            assert state[name][MOMENTUM_KEY].dtype == torch.bfloat16
            for key, ref in ref_state[name].items():
                assert torch.equal(state[name][key], ref), (name, key)


@pytest.mark.parametrize("kernel", [dict(foreach=False), dict(foreach=True), dict(fused=True)], ids=str)
def test_bf16_momentum_close_to_fp32(kernel):
    """Rounding the stored momentum to bf16 changes the trajectory only at bf16 precision."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _model()
        opt = SM3(model.parameters(), lr=0.05, momentum=0.9, momentum_dtype=dtype, **kernel)
        for step in range(STEPS):
            for name, p in model.named_parameters():
                p.grad = _grads(model, step)[name]
            opt.step()
        results[dtype] = [p.detach().clone() for p in model.parameters()]
        if dtype == torch.bfloat16:
            p0 = next(model.parameters())
            assert opt.state[p0][MOMENTUM_KEY].dtype == torch.bfloat16
            assert opt.state[p0][accumulator_key(0)].dtype == torch.float32
            numel = sum(p.numel() for p in model.parameters())
            acc = sum(sum(p.shape) if p.dim() >= 2 else p.numel() for p in model.parameters())
            assert local_state_bytes(opt) == 2 * numel + 4 * acc
    for a, b in zip(results[torch.float32], results[torch.bfloat16]):
        torch.testing.assert_close(a, b, rtol=0, atol=0.05 * STEPS * 0.01)
