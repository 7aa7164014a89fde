"""Run a function on N CPU processes joined by a gloo process group, for tests.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes on a
free port, calls ``fn(rank, world_size, *args)`` in each after
``init_process_group("gloo")``, and returns the list of each rank's return
value (anything ``torch.save`` can write). A worker's exception is re-raised in
the parent with the worker's traceback; a hang ends in a ``TimeoutError``.
``fn`` must be a module-level function (it is pickled by reference).
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sm3_dist.comm import end_process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, outdir: str, fn: Callable, args: tuple, env: dict) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        LOCAL_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    path = os.path.join(outdir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "value": result}, path)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    end_process(0)


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0, env: dict | None = None
) -> list[Any]:
    port = free_port()
    try:
        return _run(fn, world_size, port, args, timeout, env)
    finally:
        remove_shared_memory(port)


def remove_shared_memory(port: int) -> None:
    """Remove the /dev/shm buffers DeepSpeed's CPU communication backend leaves behind for this port.

    DeepSpeed names them ``deepspeed_allreduce_buffer_<n>_<addr>_<port>_<k>`` and never unlinks them;
    each is tens of MB, so a test suite would otherwise fill the machine's memory.
    """
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        with contextlib.suppress(OSError):
            os.unlink(path)


def _run(fn: Callable[..., Any], world_size: int, port: int, args: tuple, timeout: float, env: dict | None):
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, port, outdir, fn, args, dict(env or {})),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        end = time.monotonic() + timeout
        timed_out = True
        try:
            while time.monotonic() < end:
                if ctx.join(timeout=1.0):
                    timed_out = False
                    break
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            timed_out = False
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        if timed_out:
            raise TimeoutError(f"distributed test did not finish within {timeout:.0f} s (a hung collective?)")
        results = []
        errors = []
        for rank in range(world_size):
            path = os.path.join(outdir, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: exited without a result (exit code {ctx.processes[rank].exitcode})")
                continue
            out = torch.load(path, weights_only=False)
            if out["ok"]:
                results.append(out["value"])
            else:
                errors.append(f"rank {rank} raised:\n{out['error']}")
        if errors:
            raise RuntimeError("distributed test failed\n" + "\n".join(errors))
        return results
