"""A rank's part of ``tests/test_optim_contract.py::test_sharded_copy_across_ranks``.

Kept apart from the test module so that the spawned ranks import only torch and
``sm3_dist``, not torch's testing internals.
"""

from __future__ import annotations

import copy
import pickle

import torch
import torch.distributed as dist
from torch.nn import Parameter

from sm3_dist import ShardedSM3
from tests.common import fill_grads


def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a == b


def sharded_copy_worker(rank: int, world_size: int) -> dict:
    """Copy a two-rank ShardedSM3 (deepcopy, pickle) and step copy and original side by side."""
    torch.manual_seed(0)
    params = [Parameter(torch.randn(5, 3)), Parameter(torch.randn(7))]
    optimizer = ShardedSM3(params, lr=0.05, momentum=0.9, beta=0.5, ema_keeps_max=True, nonfinite="raise")
    step = 0
    for _ in range(2):
        fill_grads(params, step)
        optimizer.step()
        step += 1
    results = {}
    for how in ("deepcopy", "pickle"):
        copied = copy.deepcopy(optimizer) if how == "deepcopy" else pickle.loads(pickle.dumps(optimizer))
        copied_params = [p for group in copied.param_groups for p in group["params"]]
        for _ in range(2):
            fill_grads(params, step)
            fill_grads(copied_params, step)
            optimizer.step()
            copied.step()
            step += 1
        same = all(torch.equal(p, q) for p, q in zip(params, copied_params))
        same = _same_tree(optimizer.state_dict(), copied.state_dict()) and same  # collectives: same order on all
        inner = copied._inner
        results[how] = (
            same,
            copied.world_size,
            copied.rank,
            (inner.momentum_dtype, inner.ema_keeps_max, inner.nonfinite),
        )
    subgroup = dist.new_group(list(range(world_size)))  # the same ranks, but not the default group
    other = ShardedSM3([Parameter(torch.randn(3))], process_group=subgroup)
    try:
        copy.deepcopy(other)
        results["subgroup"] = "copied"
    except TypeError as err:
        results["subgroup"] = str(err)
    # no rank leaves (taking rank 0's store with it) while another is still connecting the subgroup through it
    dist.barrier(group=subgroup)
    return results
