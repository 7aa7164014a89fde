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
