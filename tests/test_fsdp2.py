"""SM3 on FSDP2 (``fully_shard``) and other DTensor parameters, exact against single-process SM3.

Every rank feeds the sharded parameters the same global gradients (each
rank's ``Shard`` of one tensor computed identically everywhere), so the runs
test the optimizer, not FSDP's gradient reduction. After the steps every
rank's full parameters and accumulators are ``torch.equal`` to a plain
``sm3_dist.SM3`` on unsharded copies.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from sm3_dist import MOMENTUM_KEY, SM3, UnsupportedLayoutError, accumulator_key, local_state_bytes
from tests.common import (
    SHARDED_HYPER,
    SHARDED_LR,
    SHARDED_STEPS,
    count_collectives,
    counts_between,
    make_model,
    named_shapes,
    run_distributed,
    set_grads,
    train_with_reference,
)


def expected_accumulator_placements(param) -> list[tuple]:
    """DESIGN section 4: mu_d is Shard(0) on mesh axes that shard dim d, Replicate on the others."""
    from torch.distributed.tensor import Replicate, Shard

    ndim = max(param.dim(), 1)
    return [
        tuple(Shard(0) if isinstance(pl, Shard) and pl.dim == d else Replicate() for pl in param.placements)
        for d in range(ndim)
    ]


def expected_state_bytes(model: nn.Module, momentum: float) -> int:
    """Local momentum plus the accumulator entries the local box touches, from the local shapes alone."""
    from torch.distributed.tensor import Shard

    total = 0
    for p in model.parameters():
        local = p.to_local()
        if momentum > 0:
            total += local.numel() * 4
        sharded_dims = {pl.dim for pl in p.placements if isinstance(pl, Shard)}
        for d in range(max(p.dim(), 1)):
            total += 4 * (local.shape[d] if d in sharded_dims else (p.shape[d] if p.dim() else 1))
    return total


def compare_with_reference(model: nn.Module, opt: SM3, ref_model: nn.Module, ref: SM3, what: str) -> None:
    from torch.distributed.tensor import DTensor

    opt.state_dict()  # waits for the last all-reduce of maxima
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        r = ref_params[name]
        assert torch.equal(p.full_tensor(), r.detach()), f"{what}: parameter {name} differs"
        state, ref_state = opt.state[p], ref.state[r]
        for d, placements in enumerate(expected_accumulator_placements(p)):
            acc = state[accumulator_key(d)]
            assert isinstance(acc, DTensor), f"{what}: {name} mu_{d} is not a DTensor"
            assert tuple(acc.placements) == placements, f"{what}: {name} mu_{d} placements {acc.placements}"
            assert acc.device_mesh == p.device_mesh
            assert torch.equal(acc.full_tensor(), ref_state[accumulator_key(d)]), f"{what}: {name} mu_{d} differs"
        if MOMENTUM_KEY in ref_state:
            buf = state[MOMENTUM_KEY]
            assert isinstance(buf, DTensor) and tuple(buf.placements) == tuple(p.placements)
            assert torch.equal(buf.full_tensor(), ref_state[MOMENTUM_KEY]), f"{what}: {name} momentum differs"
        else:
            assert MOMENTUM_KEY not in state


def sm3_collectives_per_step() -> dict:
    """Every collective through sm3_dist.comm in one SM3 step on :func:`make_model` sharded by FSDP2 (construction
    and ``state_dict`` issue none): one MAX all-reduce of the accumulator maxima (fp32, the sum of the global
    dimensions) and one MAX all-reduce of the 4-byte non-finite flag (``nonfinite="skip"``, the default)."""
    return {
        "MaxReducer.launch: all_reduce MAX": 1,
        "MaxReducer.launch: all_reduce MAX bytes": 4 * sum(sum(s or (1,)) for _, s in named_shapes(make_model())),
        "all_reduce_flag_: all_reduce MAX": 1,
        "all_reduce_flag_: all_reduce MAX bytes": 4,
    }


def train_and_compare(model, ref_model, hyper, what, steps=SHARDED_STEPS) -> None:
    opt = SM3(model.parameters(), lr=SHARDED_LR, **hyper)
    ref = SM3(ref_model.parameters(), lr=SHARDED_LR, **hyper)
    train_with_reference(opt, functools.partial(set_grads, model), ref_model, ref, steps)
    compare_with_reference(model, opt, ref_model, ref, what)
    assert local_state_bytes(opt) == expected_state_bytes(model, hyper["momentum"]), what


# ---------------------------------------------------------------- fully_shard on a 1-D mesh


def _fully_shard_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    counts = count_collectives()
    mesh = init_device_mesh("cpu", (world_size,))
    local_shapes, comm = {}, []
    for hyper in SHARDED_HYPER:
        model = make_model()
        ref_model = copy.deepcopy(model)
        # the attention projection is sharded on dim 1 (as tensor parallel would), the rest on dim 0
        fully_shard(model.qkv, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
        fully_shard(model, mesh=mesh)
        before = dict(counts)
        train_and_compare(model, ref_model, hyper, f"world {world_size} {hyper}")  # construction, steps, state_dict
        comm.append(counts_between(before, counts, per=SHARDED_STEPS))
        local_shapes = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
    return dict(local_shapes=local_shapes, comm=comm)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_fully_shard_matches_single_process(world_size):
    results = run_distributed(_fully_shard_worker, world_size)
    local_shapes = [r["local_shapes"] for r in results]
    for rank, result in enumerate(results):
        for comm in result["comm"]:
            assert comm == sm3_collectives_per_step(), rank
    rows = [s["emb.weight"][0] for s in local_shapes]
    assert sum(rows) == 5 and len(set(rows)) > 1, f"the embedding must be sharded unevenly: {rows}"
    assert local_shapes[0]["qkv.weight"][0] == 9, "qkv.weight must be sharded on dim 1"
    if world_size >= 3:
        assert any(0 in s["head.weight"] or 0 in s["emb.weight"] for s in local_shapes), "no empty shard"


def _training_loop_worker(rank: int, world_size: int) -> None:
    """A real FSDP2 loop: forward, backward (FSDP reduce-scatters the gradients), SM3 step.

    Every rank runs the same batch; on two ranks the average of two equal
    gradients, (g + g) / 2, is g exactly, so the whole trajectory must match.
    (On three ranks (g + g + g) / 3 may round: that tests the gradient
    reduction, not the optimizer.)
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for hyper in SHARDED_HYPER[::3]:
        model = make_model(3)
        ref_model = copy.deepcopy(model)
        fully_shard(model.qkv, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = SM3(model.parameters(), lr=SHARDED_LR, **hyper)
        ref = SM3(ref_model.parameters(), lr=SHARDED_LR, **hyper)
        for step in range(SHARDED_STEPS):
            idx = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(step))
            for m, o in ((model, opt), (ref_model, ref)):
                o.zero_grad()
                m(idx).backward()
                o.step()
        compare_with_reference(model, opt, ref_model, ref, f"training loop, world {world_size} {hyper}")


def test_fully_shard_training_loop_matches_single_process():
    run_distributed(_training_loop_worker, 2)


# ---------------------------------------------------------------- 2-D meshes: HSDP and DP x TP


def _hsdp_worker(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard

    counts = count_collectives()
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    comm = []
    for hyper in SHARDED_HYPER[::3]:
        model = make_model(1)
        ref_model = copy.deepcopy(model)
        fully_shard(model, mesh=mesh)
        for p in model.parameters():
            assert tuple(p.placements) == (Replicate(), Shard(0))
        before = dict(counts)
        train_and_compare(model, ref_model, hyper, f"HSDP {hyper}")
        comm.append(counts_between(before, counts, per=SHARDED_STEPS))
    return comm


def test_hsdp_matches_single_process():
    """Also: HSDP's replicate axis holds the same gradients, so SM3 reduces over the shard axis only: per step one
    MAX all-reduce of the maxima and one of the non-finite flag, as on a 1-D mesh."""
    for rank, comm in enumerate(run_distributed(_hsdp_worker, 4)):
        assert comm == [sm3_collectives_per_step()] * len(SHARDED_HYPER[::3]), rank


class TPBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.col = nn.Parameter(torch.randn(5, 6))
        self.row = nn.Parameter(torch.randn(3, 7))
        self.cube = nn.Parameter(torch.randn(2, 3, 5))
        self.bias = nn.Parameter(torch.randn(6))
        self.nested = nn.Parameter(torch.randn(7, 3))


def _tp_worker(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    placements = {
        "col": (Shard(0), Shard(1)),  # both dims sharded, unevenly
        "row": (Replicate(), Shard(1)),  # tensor parallel on dim 1
        "cube": (Shard(2), Shard(0)),
        "bias": (Shard(0), Replicate()),
        "nested": (Shard(0), Shard(0)),  # one dim sharded over both mesh axes
    }
    for hyper in SHARDED_HYPER:
        torch.manual_seed(2)
        ref_model = TPBlock()
        model = copy.deepcopy(ref_model)
        for name, pl in placements.items():
            setattr(model, name, nn.Parameter(distribute_tensor(getattr(model, name).detach(), mesh, pl)))
        train_and_compare(model, ref_model, hyper, f"DP x TP {hyper}")


def test_tensor_parallel_2d_mesh_matches_single_process():
    run_distributed(_tp_worker, 4)


# ---------------------------------------------------------------- placements SM3 refuses


def _unsupported_worker(rank: int, world_size: int) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh1 = init_device_mesh("cpu", (world_size,))
    mesh2 = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
    messages = []
    cases = [
        (mesh1, (Partial(),), "Partial"),
        (mesh2, (_StridedShard(0, split_factor=2), Shard(0)), "strided shard"),
    ]
    for mesh, placements, expected in cases:
        good = nn.Parameter(DTensor.from_local(torch.randn(2, 3), mesh, (Replicate(),) * mesh.ndim))
        bad = nn.Parameter(DTensor.from_local(torch.randn(2, 3), mesh, placements, run_check=False))
        opt = SM3([good, bad], lr=0.1)
        good.grad = torch.zeros_like(good)
        bad.grad = torch.zeros_like(bad)
        with pytest.raises(UnsupportedLayoutError, match=expected) as info:
            opt.step()
        assert r"param_groups[0]['params'][1]" in str(info.value), str(info.value)
        messages.append(str(info.value))
    return messages


def test_partial_and_strided_shard_raise():
    messages = run_distributed(_unsupported_worker, 4)
    assert all(len(m) == 2 for m in messages)
