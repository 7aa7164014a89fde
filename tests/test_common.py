"""The shared harness itself: results, a worker's traceback and a hang each come back to the test."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests.common import KERNELS, global_grads, make_model, run_distributed, set_grads, snapshot


def _sum_of_ranks(rank: int, world_size: int, scale: int) -> int:
    t = torch.tensor([rank * scale])
    dist.all_reduce(t)
    return int(t.item())


def _fails_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("the message from rank 1")
    dist.barrier()


def _hangs(rank: int, world_size: int) -> None:
    time.sleep(3600)


def test_results_come_back_in_rank_order():
    assert run_distributed(_sum_of_ranks, 3, 10) == [30, 30, 30]


def test_a_worker_exception_carries_its_traceback():
    with pytest.raises(RuntimeError, match=r"rank 1 raised:\n(.|\n)*ValueError: the message from rank 1"):
        run_distributed(_fails_on_rank_1, 2, timeout=120)


def test_a_hang_ends_in_a_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 3 s"):
        run_distributed(_hangs, 2, timeout=3)
    assert time.monotonic() - start < 60


def test_seeded_gradients_and_snapshot():
    from sm3_dist import SM3

    model = make_model(seed=3)
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    a, b = global_grads(shapes, 0), global_grads(shapes, 0)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(global_grads(shapes, 1)["qkv.weight"], a["qkv.weight"])
    assert (a["qkv.weight"][..., 0] == 0).all() and (global_grads(shapes, 1)["qkv.weight"][..., 0] != 0).any()
    set_grads(model, a)
    opt = SM3(model.parameters(), lr=0.1, momentum=0.9, **KERNELS["eager"])
    before, _ = snapshot(model, opt)
    opt.step()
    after, state = snapshot(model, opt)
    assert not torch.equal(before["qkv.weight"], after["qkv.weight"])
    assert state["qkv.weight"] and all(k in state for k in before)


def test_seeded_grads_by_shape_and_on_parameters():
    from tests.common import fill_grads, grads_like, seeded_grads

    shapes = [(3, 4), (5,)]
    a, b = seeded_grads(shapes, 2, seed=11), seeded_grads(shapes, 2, seed=11)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and [tuple(x.shape) for x in a] == shapes
    assert not torch.equal(seeded_grads(shapes, 2, seed=12)[0], a[0])
    assert (seeded_grads(shapes, 0, zero_slice=True)[0][..., 0] == 0).all()
    assert (seeded_grads(shapes, 1, zero_slice=True)[0][..., 0] != 0).any()  # step 0 only
    params = [torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.bfloat16)), torch.nn.Parameter(torch.zeros(5))]
    fill_grads(params, 2, seed=11)
    assert params[0].grad.dtype == torch.bfloat16 and torch.equal(params[1].grad, a[1])
    assert torch.equal(grads_like(params, 2, seed=11)[0], a[0].bfloat16())


def test_random_blocks_and_assert_same():
    from tests.common import assert_same, clone_blocks, random_blocks

    blocks = random_blocks(3, [(2, 3), ()])
    copy = clone_blocks(blocks)
    assert_same(blocks, copy)
    assert [len(a) for a in blocks[3]] == [2, 1]  # an accumulator per dimension, one for a scalar
    copy[3][0][1][0] += 1.0
    with pytest.raises(AssertionError):
        assert_same(blocks, copy)
