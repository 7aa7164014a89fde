"""The tests' shared harness: processes, kernels, devices, small models and their gradients.

* :func:`run_distributed` - run a function on N CPU processes joined by a gloo
  process group (a free port, a timeout, each worker's traceback re-raised in
  the parent); :func:`free_port`; :func:`remove_shared_memory`;
  :func:`shared_result` - a spawned session computed once per pytest run, also
  under pytest-xdist (:func:`shared_root`).
* :data:`KERNELS` - every SM3 kernel as the constructor flags that select it;
  :data:`DEVICES` - a device axis, ``cuda`` rows skipped where no GPU is present
  (:data:`NEEDS_CUDA`).
* :class:`TinyBlock`, :func:`make_model` - a transformer-like module whose
  dimensions shard unevenly (some shards empty at 3 and 4 ranks);
  :func:`seeded_grads`, :func:`global_grads` (by name), :func:`grads_like`, :func:`fill_grads` -
  the same seeded gradients on every rank; :func:`set_grads` sets them on plain
  or DTensor parameters; :func:`snapshot` - a model's parameters and its
  optimizer's state, by parameter name; :func:`train_with_reference` - a
  distributed optimizer and single-process SM3 stepped on the same gradients.
* :func:`wrap_fsdp1`, :func:`flat_pieces`, :func:`hull`, :func:`set_fsdp1_grads`,
  :func:`fsdp1_full_params` - FSDP1 units, the flat pieces of each original
  parameter a rank holds (read from FSDP's metadata), its gradients, its full parameters.
* :func:`random_blocks`, :func:`clone_blocks`, :func:`assert_same` - the dense
  blocks ``functional.sm3`` steps, and their bitwise comparison.

``run_distributed(fn, world_size, *args)`` calls ``fn(rank, world_size, *args)``
in each process after ``init_process_group("gloo")`` and returns the list of
each rank's return value (anything ``torch.save`` can write). ``fn`` must be a
module-level function (it is pickled by reference).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sm3_dist.integrations.shm import remove_deepspeed_shm
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from sm3_dist.comm import end_process, free_port

__all__ = [
    "DEVICES",
    "FSDP1_PREFIX",
    "KERNELS",
    "NEEDS_CUDA",
    "TinyBlock",
    "assert_same",
    "clone_blocks",
    "count_collectives",
    "counts_between",
    "fill_grads",
    "flat_pieces",
    "free_port",
    "fsdp1_full_params",
    "global_grads",
    "grads_like",
    "hull",
    "make_model",
    "named_shapes",
    "random_blocks",
    "remove_shared_memory",
    "run_distributed",
    "run_each",
    "run_interpreted",
    "same_bits",
    "seeded_grads",
    "set_fsdp1_grads",
    "set_grads",
    "shared_result",
    "shared_root",
    "snapshot",
    "train_with_reference",
    "wrap_fsdp1",
]

KERNELS: dict[str, dict[str, bool]] = {
    "eager": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True, fused=False),
    "fused": dict(foreach=False, fused=True),
}
"""Every kernel SM3 offers, as the ``SM3``/``functional.sm3`` flags that select it."""


def native_library() -> Any:
    """The native CPU kernel's library. The test is skipped only where there is no C++ compiler: where there is
    one, a library that fails to build fails it."""
    from sm3_dist.kernels.cpu import library

    if library._compiler() is None:
        pytest.skip("no C++ compiler for the native kernel")
    lib = library.load()
    assert lib is not None, "the native kernel failed to build (its logged warning says why)"
    return lib


SHARDED_HYPER = [dict(momentum=m, beta=b) for m in (0.0, 0.9) for b in (0.0, 0.9)]
"""The settings the FSDP1/FSDP2 exactness and checkpoint runs take: every momentum x beta combination."""
SHARDED_STEPS = 10
SHARDED_LR = 0.05

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
"""A device axis for ``pytest.mark.parametrize``: ``cpu``, and ``cuda`` rows that run where a GPU is present
(skipped with the reason elsewhere)."""


# ---------------------------------------------------------------------------------------------- processes


def _worker(
    rank: int, world_size: int, port: int, outdir: str, fn: Callable, args: tuple, env: dict, backend: str
) -> None:
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
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
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
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    env: dict | None = None,
    backend: str = "gloo",
) -> list[Any]:
    """Every rank's return value of ``fn(rank, world_size, *args)``; a worker's exception or a hang raises here.

    ``backend``: the process group's (``"nccl"`` for CUDA tensors, one GPU per rank).
    """
    port = free_port()
    try:
        return _run(fn, world_size, port, args, timeout, env, backend)
    finally:
        remove_shared_memory(port)


def remove_shared_memory(port: int) -> None:
    """Remove the /dev/shm buffers DeepSpeed's CPU communication backend leaves behind for this port (tens of MB
    each: a test suite would otherwise fill the machine's memory)."""
    remove_deepspeed_shm(port)


def _run(
    fn: Callable[..., Any], world_size: int, port: int, args: tuple, timeout: float, env: dict | None, backend: str
):
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, port, outdir, fn, args, dict(env or {}), backend),
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


_DIST_QUERIES = frozenset({"is_available", "is_initialized", "get_rank", "get_world_size", "get_backend"})
_REDUCE_OP_NAMES = ("SUM", "MAX", "MIN", "AVG", "PRODUCT")


class _CountingDist:
    """``torch.distributed`` as :mod:`sm3_dist.comm` sees it: every call other than a query or a type is counted as
    a collective, under ``"<comm function>: <collective>[ <op>]"``, with the bytes of its first tensor argument."""

    def __init__(self, real: Any, counts: dict[str, int]) -> None:
        self._real, self._counts = real, counts

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name in _DIST_QUERIES or isinstance(attr, type) or not callable(attr):
            return attr
        counts = self._counts

        def counted(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code.co_qualname
            kind = "all_gather" if name in ("all_gather_single", "all_gather_into_tensor") else name
            op = kwargs.get("op")
            if op is not None:
                kind += " " + next(n for n in _REDUCE_OP_NAMES if op == getattr(dist.ReduceOp, n))
            key = f"{caller}: {kind}"
            counts[key] = counts.get(key, 0) + 1
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if tensor is not None:
                counts[f"{key} bytes"] = counts.get(f"{key} bytes", 0) + tensor.numel() * tensor.element_size()
            return attr(*args, **kwargs)

        return counted


def count_collectives() -> dict[str, int]:
    """From now on in this process, count every collective that goes through :mod:`sm3_dist.comm` (the one module
    that calls ``torch.distributed`` collectives) in the returned dict, by the comm function that issued it and the
    collective (``"MaxReducer.launch: all_reduce MAX"``, ``"all_reduce_flag_: all_reduce MAX"``,
    ``"all_gather_flat: all_gather"``, ...), and ``"<that> bytes"``. A collective added anywhere in comm is counted,
    whichever function issues it. Call once per process (spawned workers)."""
    import sm3_dist.comm

    counts: dict[str, int] = {}
    if isinstance(sm3_dist.comm.dist, _CountingDist):
        raise RuntimeError("count_collectives() was already called in this process")
    sm3_dist.comm.dist = _CountingDist(dist, counts)
    return counts


def counts_between(before: dict[str, int], after: dict[str, int], per: int = 1) -> dict[str, float]:
    """The collectives counted after ``before`` was copied (``after`` minus ``before``), divided by ``per``."""
    return {k: (v - before.get(k, 0)) / per for k, v in after.items() if v != before.get(k, 0)}


def run_each(runs: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Each run's result by name, or ``dict(failure=<traceback>)``: one failing run in a spawned session does not
    hide the others' results (each test reports its own run's failure)."""
    out = {}
    for name, run in runs.items():
        try:
            out[name] = run()
        except Exception:
            out[name] = dict(failure=traceback.format_exc())
    return out


def shared_root(tmp_path_factory: Any) -> Path:
    """The temporary root every pytest-xdist worker of this run sees (the base temp without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") is not None else base


def shared_result(tmp_path_factory: Any, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per pytest run, also under pytest-xdist: the first worker computes and saves the result
    in :func:`shared_root`, the others wait on a file lock and load it."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return compute()
    path = shared_root(tmp_path_factory) / f"{key}.pt"
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            torch.save(compute(), path)
        return torch.load(path, weights_only=False)


# ---------------------------------------------------------------------------------------------- models and gradients


class TinyBlock(nn.Module):
    """Transformer-like shapes: dims not divisible by 2, 3 or 4, so shards are uneven and some empty."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 12)  # 4 ranks: rows 2, 2, 1, 0 -> an empty (0, 12) shard
        self.qkv = nn.Linear(12, 9)  # FSDP2 shards dims other than 0 evenly only: 12 columns
        self.mix = nn.Parameter(torch.randn(3, 4, 6) * 0.1)  # rank 3; 4 ranks: an empty (0, 4, 6) shard
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 4)  # 3 ranks: rows 2, 2, 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(idx))  # (batch, time, 12)
        q = self.qkv(h)
        mixed = torch.einsum("btc,kjc->btkj", h[..., :6], self.mix)
        return self.head(h).pow(2).mean() + q.pow(2).mean() + mixed.pow(2).mean()


def make_model(seed: int = 0) -> nn.Module:
    """A :class:`TinyBlock` with weights drawn from ``seed`` (the same on every rank)."""
    torch.manual_seed(seed)
    return TinyBlock()


def seeded_grads(
    shapes: Iterable[tuple[int, ...]], step: int, *, seed: int = 7919, zero_slice: bool = False
) -> list[torch.Tensor]:
    """Gradients of the given shapes, drawn in order from a generator seeded by ``seed`` and the step.

    With ``zero_slice``, step 0 zeroes the first slice of the last dimension of every
    matrix: accumulator entries whose ``nu`` stays 0 (the 0/0 = 0 convention with ``eps=0``).
    """
    gen = torch.Generator().manual_seed(seed * (step + 1))
    grads = []
    for shape in shapes:
        g = torch.randn(shape, generator=gen)
        if zero_slice and step == 0 and g.dim() >= 2:
            g[..., 0] = 0.0
        grads.append(g)
    return grads


def global_grads(
    named_shapes: Iterable[tuple[str, torch.Size]], step: int, *, seed: int = 7919, zero_slice: bool = True
) -> dict[str, torch.Tensor]:
    """:func:`seeded_grads` by parameter name: the same gradients on every rank."""
    names, shapes = zip(*named_shapes)
    return dict(zip(names, seeded_grads(shapes, step, seed=seed, zero_slice=zero_slice)))


def named_shapes(model: nn.Module) -> list[tuple[str, torch.Size]]:
    """``model``'s parameter names and shapes in its order, the order :func:`global_grads` draws them in."""
    return [(name, p.shape) for name, p in model.named_parameters()]


def grads_like(params: Iterable[torch.Tensor], step: int, *, seed: int = 7919) -> list[torch.Tensor]:
    """:func:`seeded_grads` of the parameters' shapes, on their devices and in their dtypes."""
    params = list(params)
    grads = seeded_grads([p.shape for p in params], step, seed=seed)
    return [g.to(device=p.device, dtype=p.dtype) for p, g in zip(params, grads)]


def fill_grads(params: Iterable[torch.Tensor], step: int, *, seed: int = 7919) -> None:
    """``p.grad`` = :func:`grads_like`, for plain (local) parameters."""
    params = list(params)
    for p, g in zip(params, grads_like(params, step, seed=seed)):
        p.grad = g


def set_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    """``param.grad = grads[name]`` for every parameter; a DTensor parameter gets its local part."""
    for name, p in model.named_parameters():
        g = grads[name].to(device=p.device, dtype=p.dtype)
        if isinstance(p, DTensor):
            g = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        p.grad = g


def train_with_reference(
    opt: torch.optim.Optimizer,
    set_local_grads: Callable[[dict[str, torch.Tensor]], None],
    ref_model: nn.Module,
    ref: torch.optim.Optimizer,
    steps: int,
) -> None:
    """``steps`` steps of a distributed ``opt`` (its gradients set by ``set_local_grads(global gradients)``) and of
    single-process ``ref`` on ``ref_model``, both fed the same :func:`global_grads`."""
    shapes = named_shapes(ref_model)
    for step in range(steps):
        grads = global_grads(shapes, step)
        set_local_grads(grads)
        set_grads(ref_model, {n: g.clone() for n, g in grads.items()})
        opt.step()
        ref.step()


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Copies of ``model``'s parameters and ``optimizer``'s state, keyed by parameter name."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {
        n: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
        for n, p in model.named_parameters()
    }
    return params, state


# ---------------------------------------------------------------------------------------------- FSDP1's flat shards


FSDP1_PREFIX = "_fsdp_wrapped_module."
"""What FSDP1 puts before a wrapped module's parameter names."""


def wrap_fsdp1(model: nn.Module, device: str | torch.device = "cpu", **kwargs) -> nn.Module:
    """``model`` under FSDP1, each ``nn.Linear`` its own unit: several flat parameters share one process group."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FSDP(model, device_id=torch.device(device), auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), **kwargs)


def flat_pieces(fsdp_model: nn.Module) -> list[tuple]:
    """(flat parameter, original parameter or None, full name, global shape, start, stop, offset in the flat shard)
    of every original parameter, read from FSDP's metadata."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    rows = []
    for prefix, module in fsdp_model.named_modules():
        if not isinstance(module, FSDP) or module._handle is None:
            continue
        prefix = prefix.replace(FSDP1_PREFIX, "")
        flat = module._handle.flat_param
        params = flat._params or [None] * len(flat._shapes)
        for param, info, shape, fqn in zip(params, flat._shard_param_infos, flat._shapes, flat._fqns):
            name = f"{prefix}.{fqn}" if prefix else fqn
            if info.in_shard:
                start, stop, offset = info.intra_param_start_idx, info.intra_param_end_idx + 1, info.offset_in_shard
            else:
                start = stop = offset = 0
            rows.append((flat, param, name, tuple(shape), start, stop, offset))
    return rows


def set_fsdp1_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    """Each rank's pieces of the same global gradients, on original (``use_orig_params``) or flat parameters."""
    flats = {}
    for flat, param, name, _, start, stop, offset in flat_pieces(model):
        piece = grads[name].to(flat.device).flatten()[start:stop]
        if param is not None:  # a 1-D view of its piece when sharded, the whole parameter under NO_SHARD
            param.grad = piece.reshape(param.shape).clone()
        else:
            g = flats.setdefault(id(flat), (flat, torch.zeros_like(flat)))[1]
            g[offset : offset + stop - start] = piece
    for flat, g in flats.values():
        flat.grad = g


def fsdp1_full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """An FSDP1 model's full parameters by their unwrapped names (gathered on every rank)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        return {name.replace(FSDP1_PREFIX, ""): p.detach().clone() for name, p in model.named_parameters()}


def hull(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[int, int]]:
    """Per dimension, the range of indices that flat elements [start, stop) touch."""
    if start == stop:
        return [(0, 0)] * len(shape)
    idx = torch.unravel_index(torch.arange(start, stop), shape)
    return [(int(i.min()), int(i.max()) + 1) for i in idx]


# ---------------------------------------------------------------------------------------------- kernels' blocks

Blocks = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]]
"""What ``functional.sm3`` steps: parameters, gradients, momentum buffers, and each block's accumulators."""


def random_blocks(seed: int = 0, shapes: Iterable[tuple[int, ...]] = ((1,), (37,), (13, 11), (5, 7, 9))) -> Blocks:
    """Dense blocks of the given shapes with random parameters, gradients, momentum and accumulators."""
    shapes = list(shapes)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    bufs = [torch.randn(s, generator=gen) for s in shapes]
    accs = [[torch.rand(n, generator=gen) for n in (s or (1,))] for s in shapes]
    return params, grads, bufs, accs


def clone_blocks(blocks: Blocks) -> Blocks:
    """An independent copy of :func:`random_blocks`' result."""
    params, grads, bufs, accs = blocks
    return (
        [p.clone() for p in params],
        [g.clone() for g in grads],
        [b.clone() for b in bufs],
        [[a.clone() for a in acc] for acc in accs],
    )


def assert_same(a: Any, b: Any) -> None:
    """Nested lists/tuples of tensors equal element by element (``torch.equal``)."""
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (type(b), len(b))
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- Triton's interpreter

_SAME_WIDTH_INTS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal (the sign of zero included), NaN payloads apart (NaN at the same places)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    ints = _SAME_WIDTH_INTS[a.dtype]
    return torch.equal(nan_a, nan_b) and torch.equal(a.view(ints)[~nan_a], b.view(ints)[~nan_b])


def run_interpreted(module: str, out_dir: Path) -> Any:
    """``python -m <module> OUT`` under Triton's interpreter, and what it saved to OUT.

    ``TRITON_INTERPRET=1`` must be set before triton is imported, so the cases run in a process of their own.
    """
    out = out_dir / "results.pt"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", module, str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)
