"""All communication of sm3-dist, in one module.

* :class:`MaxReducer` - the one bucketed, asynchronous ``all_reduce(MAX)`` per
  process group per step that turns every rank's partial accumulator maxima
  into the exact global accumulators.
* :func:`all_gather_flat` - the bucketed all-gather of updated parameters used
  by :class:`sm3_dist.ShardedSM3`.
* :func:`any_rank_true` - one tiny collective for decisions all ranks must share.
* :func:`all_reduce_flag_` - the same decision kept on the device: a flag tensor
  MAX-reduced in place, with no host synchronization on accelerators.
* :func:`all_reduce_` - one in-place ``all_reduce`` of a bucket (``"sum"`` or
  ``"max"``), for consolidating sharded state into a checkpoint.
* :func:`barrier`, :func:`all_gather_object`, :func:`broadcast_object` - what
  the training job's ranks agree on (a checkpoint's files, process ids, each
  rank's summary).
* :func:`free_port` - a rendezvous port for a process group on this machine.
* :func:`end_process` - how a process that ran gloo collectives ends.

The optimizers (``sm3_dist``), the framework adapters (``integrations/``), the
training job (``launch/``) and the studies (``tools/``) call collectives only
through these functions; no other module calls a ``torch.distributed``
collective directly. The frameworks' own communication (DDP, FSDP, DeepSpeed) is
theirs. ``tests/test_launch.py`` checks this paragraph against the source.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "MaxReducer",
    "all_gather_flat",
    "all_gather_object",
    "all_reduce_",
    "all_reduce_flag_",
    "any_rank_true",
    "barrier",
    "broadcast_object",
    "end_process",
    "free_port",
    "rank_suffix",
    "world_size",
]


_RELEASE_TIMEOUT_S = 5.0
_EXIT_DRAIN_S = 0.25
_exit_drain_registered = False


def _use_counts(tensors: Sequence[Tensor]) -> tuple[int, ...]:
    return tuple(t._use_count() for t in tensors)


def _await_release(tensors: Sequence[Tensor], before: tuple[int, ...]) -> None:
    """Return once gloo's worker threads hold no reference to ``tensors`` (CPU tensors only).

    A worker drops its references to a collective's tensors after the caller
    has woken up, and dropping a reference to a tensor that has a Python
    object takes the GIL (torch keeps the Python object alive while C++ holds
    the tensor). While the caller holds the GIL the worker waits; if the
    interpreter begins to finalize before it gets it (a script that ends right
    after a collective, on a loaded machine), the worker exits inside a C++
    destructor and the process aborts with "terminate called without an
    active exception" (SIGABRT; a core dump of ``examples/ddp_sharded.py``
    showed a gloo worker in ``~AsyncAllgatherWork`` taking the GIL during
    finalization, after ``ShardedSM3.state_dict()``'s all-gather; upstream:
    pytorch/pytorch#190489). Sleeping here lets the worker take the GIL until
    each tensor's use count is back to ``before``. Accelerator tensors are not
    waited for (that would synchronize the host).
    """
    pending = [(t, n) for t, n in zip(tensors, before) if t.device.type == "cpu"]
    if pending:
        _register_exit_drain()
    deadline = time.monotonic() + _RELEASE_TIMEOUT_S
    while any(t._use_count() > n for t, n in pending) and time.monotonic() < deadline:
        time.sleep(1e-4)


@contextlib.contextmanager
def _released(*tensors: Tensor) -> Iterator[None]:
    """Around a blocking collective on ``tensors``: leaves once gloo's workers hold none of them."""
    before = _use_counts(tensors)
    yield
    _await_release(tensors, before)


def _register_exit_drain() -> None:
    """Once per process that ran a CPU collective here: :func:`_drain_gloo_workers` at interpreter exit."""
    global _exit_drain_registered
    if not _exit_drain_registered:
        atexit.register(_drain_gloo_workers)
        _exit_drain_registered = True


def _drain_gloo_workers() -> None:
    """Offer the GIL to gloo's workers for a moment before the interpreter finalizes.

    :func:`_await_release` covers this module's collectives; the frameworks'
    (DeepSpeed's, accelerate's, a user's own) can still leave a worker waiting
    for the GIL to free a collective's tensors when the script ends, and the
    process then aborts during finalization (a core dump of
    ``examples/hf_trainer.py`` under DeepSpeed showed a list ``all_gather``'s
    work). ``atexit`` callbacks run before finalization begins: sleeping here
    lets such a worker finish. It costs ``_EXIT_DRAIN_S`` at exit, only in
    processes that ran a collective on CPU tensors through this module.
    """
    time.sleep(_EXIT_DRAIN_S)


def end_process(rc: int = 0) -> NoReturn:
    """End a worker process that ran gloo collectives now, skipping interpreter finalization.

    gloo's worker threads release the last collective's tensors on their own,
    and a release that needs the GIL after finalization has begun aborts the
    process ("terminate called without an active exception", SIGABRT), seen in
    about 1 run of 10. Call it once everything the process writes is closed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a process group's rendezvous (``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_suffix() -> str:
    """``" (rank N)"`` inside a process group, for error messages; ``""`` otherwise."""
    if dist.is_available() and dist.is_initialized():
        return f" (rank {dist.get_rank()})"
    return ""


def world_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class MaxReducer:
    """One fp32 buffer holding, back to back, every ``mu_d`` of every tensor in a plan.

    The plan (``shapes[tensor_id]`` = global shape) is the same on every rank of
    ``group``, so every rank's buffer has the same layout whatever it holds
    locally. Each step a rank zeroes the buffer, writes the partial maxima of
    the entries it touches (entries it does not touch stay 0, which a MAX over
    ``nu >= 0`` ignores), launches the all-reduce without waiting, and reads its
    own entries back once it has finished. The traffic is the sum of the
    dimensions of the plan's tensors: far below a gradient all-reduce.
    """

    def __init__(self, group: dist.ProcessGroup | None, shapes: Sequence[tuple[int, ...]], device: torch.device):
        self.group = group
        self.shapes = tuple(tuple(s) for s in shapes)
        offsets: list[tuple[int, ...]] = []
        total = 0
        for shape in self.shapes:
            starts = []
            for n in shape:
                starts.append(total)
                total += n
            offsets.append(tuple(starts))
        self._offsets = tuple(offsets)
        self.buffer = torch.zeros(total, dtype=torch.float32, device=device)
        self._work: dist.Work | None = None
        self._use_counts: tuple[int, ...] = ()

    @property
    def numel(self) -> int:
        return self.buffer.numel()

    def slot(self, tensor_id: int, dim: int) -> Tensor:
        """The buffer's view of ``mu_dim`` of tensor ``tensor_id`` (global indices)."""
        start = self._offsets[tensor_id][dim]
        return self.buffer[start : start + self.shapes[tensor_id][dim]]

    def zero_(self) -> None:
        if self._work is not None:
            raise RuntimeError("the previous all-reduce of accumulator maxima has not been waited for")
        self.buffer.zero_()

    def launch(self) -> None:
        """Start the all-reduce; returns at once."""
        self._use_counts = _use_counts((self.buffer,))
        self._work = dist.all_reduce(self.buffer, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

    @property
    def pending(self) -> bool:
        return self._work is not None

    def wait(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
            _await_release((self.buffer,), self._use_counts)


def all_gather_flat(local: Tensor, output: Tensor, group: dist.ProcessGroup | None) -> None:
    """Gather equally sized flat chunks from every rank of ``group`` into ``output``."""
    # torch >= 2.13 names it all_gather_single and deprecates all_gather_into_tensor
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with _released(local, output):
        gather(output, local, group=group)


def any_rank_true(flag: bool, group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank of ``group`` (a one-element MAX all-reduce)."""
    if world_size(group) == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    with _released(t):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item() > 0)


def all_reduce_flag_(flag: Tensor, groups: Sequence[dist.ProcessGroup | None]) -> Tensor:
    """``flag <- its MAX over every rank of every group``, in place, and return it.

    Each all-reduce is launched asynchronously and waited for with ``Work.wait()``,
    which on NCCL makes the current stream wait, not the host: the flag stays a
    device tensor the kernels read (a non-finite gradient on any rank skips the
    step on all of them). Groups of one rank are skipped.
    """
    for group in groups:
        if world_size(group) > 1:
            with _released(flag):
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group, async_op=True).wait()
    return flag


_REDUCE_OPS = {"sum": "SUM", "max": "MAX"}


def all_reduce_(bucket: Tensor, op: str, group: dist.ProcessGroup | None) -> Tensor:
    """Reduce ``bucket`` in place over ``group`` with ``op`` (``"sum"`` or ``"max"``) and return it."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"op must be one of {sorted(_REDUCE_OPS)}, got {op!r}")
    if world_size(group) > 1:
        with _released(bucket):
            dist.all_reduce(bucket, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]), group=group)
    return bucket


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait until every rank of ``group`` gets here (nothing to do in a single process)."""
    if world_size(group) > 1:
        dist.barrier(group=group)


def all_gather_object(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if world_size(group) == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; the others pass anything, e.g. None."""
    if world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
