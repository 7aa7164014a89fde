"""sm3_dist.comm keeps the CPU tensors of its last collectives referenced, so that gloo's worker thread never
drops the last reference (which would need the GIL, and aborts the process once the interpreter finalizes)."""

from __future__ import annotations

import gc
import time
import weakref

import torch

from sm3_dist import comm
from tests.common import run_distributed

COLLECTIVES = {
    # name: one collective through comm on fresh tensors; returns the tensors handed to torch.distributed
    "all_gather_flat": lambda world: _gather(world),
    "all_reduce_": lambda world: (comm.all_reduce_(torch.ones(3), "sum", None),),
    "all_reduce_flag_": lambda world: (comm.all_reduce_flag_(torch.zeros(1), [None]),),
    "max_reducer": lambda world: _max_reduce(),
}


def _gather(world: int) -> tuple[torch.Tensor, ...]:
    local, output = torch.ones(5), torch.empty(5 * world)
    comm.all_gather_flat(local, output, None)
    return local, output


def _max_reduce() -> tuple[torch.Tensor, ...]:
    reducer = comm.MaxReducer(None, [(3, 2)], torch.device("cpu"))
    reducer.zero_()
    reducer.launch()
    reducer.wait()
    return (reducer.buffer,)


def _lifetimes(rank: int, world: int) -> dict[str, tuple[bool, bool]]:
    out = {}
    for name, collective in COLLECTIVES.items():
        refs = [weakref.ref(t) for t in collective(world)]
        gc.collect()
        time.sleep(0.05)  # gloo's worker has dropped its references by now
        held = all(r() is not None for r in refs)
        for _ in range(4):
            _gather(world)
        gc.collect()
        out[name] = (held, all(r() is None for r in refs))
    return out


def test_cpu_collective_tensors_outlive_the_call_then_are_released():
    for result in run_distributed(_lifetimes, 2):
        for name, (held, released) in result.items():
            assert held, f"{name}: its tensors were freed when the call returned (a gloo thread could free them last)"
            assert released, f"{name}: its tensors were still held after four more collectives"
