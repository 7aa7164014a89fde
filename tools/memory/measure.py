"""The model's optimizer-state bytes checked against real optimizer instances (fp32 parameters, CPU).

Single process: every optimizer on the config's parameters; SM3 on each rank's
local pieces of every sharded setup (the layouts handed to :class:`sm3_dist.SM3`
as the framework adapters hand them); :class:`sm3_dist.ShardedSM3` on 2 gloo
processes. Bytes are counted by :func:`sm3_dist.local_state_bytes`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sm3_dist.tools.memory.model import (
    OPTIMIZERS,
    SIZES,
    SM3_MOMENTUM,
    GPT2Config,
    flat_bounds,
    rank_counts,
    relative_error,
    state_bytes,
)

from sm3_dist import SM3, local_state_bytes
from sm3_dist.layout import box_piece, flat_range_piece

__all__ = [
    "Check",
    "make_optimizer",
    "measure_optimizer_state",
    "measure_sharded_sm3",
    "measure_sm3_on_layouts",
    "params_with_grads",
    "run_ranks",
    "sm3_kwargs",
    "validate",
]


def make_optimizer(name: str, params: list) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`~sm3_dist.tools.memory.model.OPTIMIZERS`) on ``params``."""
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=1e-2)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-2)
    if name.startswith("sm3"):
        return SM3(params, **sm3_kwargs(name))
    raise ValueError(f"unknown optimizer {name!r}: choose from {', '.join(OPTIMIZERS)}")


def params_with_grads(shapes: Iterable[Sequence[int]]) -> list:
    """fp32 parameters with gradients (their values do not change the state's size: filled, not sampled)."""
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.full(shape, 0.5)
        params.append(p)
    return params


def measure_optimizer_state(config: GPT2Config, optimizer: str, params: list | None = None) -> int:
    """Build ``optimizer`` on real fp32 parameters of ``config``, step once, return its state bytes.

    ``params`` (with gradients) may be passed to reuse one set of tensors across optimizers.
    """
    if params is None:
        params = params_with_grads(shape for _, shape in config.param_shapes())
    opt = make_optimizer(optimizer, params)
    opt.step()
    measured = local_state_bytes(opt)
    opt.state.clear()
    return measured


def measure_sm3_on_layouts(config: GPT2Config, setup: str, world: int, rank: int, optimizer: str) -> int:
    """SM3's state for one rank's local pieces under ``setup``, built in one process.

    The rank's local tensors (a ZeRO-1/2 flat partition, ZeRO-3 per-parameter
    partitions, FSDP2 dim-0 chunks) are real fp32 tensors; a shard resolver
    hands :class:`sm3_dist.SM3` their layouts, as the framework adapters do,
    with no process group (nothing is reduced). SM3 then allocates its state
    as it would on that rank, and this returns its bytes.
    """

    from sm3_dist.layout import TensorLayout
    from sm3_dist.placement import ShardSpec

    shapes = [shape for _, shape in config.param_shapes()]
    specs: list[tuple[int, ShardSpec]] = []
    if setup in ("zero1", "zero2", "ddp-sharded"):
        total = sum(math.prod(s) for s in shapes)
        bounds = flat_bounds(total, world, padded=setup != "ddp-sharded")
        lo, hi = bounds[rank], min(bounds[rank + 1], total)
        size = bounds[rank + 1] - bounds[rank]
        pieces, start = [], 0
        for tid, s in enumerate(shapes):
            n = math.prod(s)
            a, b = max(lo, start), min(hi, start + n)
            if b > a:
                pieces.append(flat_range_piece(s, a - start, b - start, tensor_id=tid, offset=a - lo))
            start += n
        specs.append((size, ShardSpec(TensorLayout(pieces=tuple(pieces), numel=size))))
    elif setup == "zero3":
        for tid, s in enumerate(shapes):
            n = math.prod(s)
            size = -(-n // world)
            a, b = min(rank * size, n), min((rank + 1) * size, n)
            piece = flat_range_piece(s, a, b, tensor_id=tid)
            specs.append((size, ShardSpec(TensorLayout(pieces=(piece,), numel=size))))
    elif setup == "fsdp2":
        for tid, s in enumerate(shapes):
            chunk = -(-s[0] // world)
            start = min(rank * chunk, s[0])
            rows = max(0, min((rank + 1) * chunk, s[0]) - start)
            piece = box_piece(s, (start, *(0,) * (len(s) - 1)), (rows, *s[1:]), tensor_id=tid)
            specs.append((piece.numel, ShardSpec(TensorLayout(pieces=(piece,), numel=piece.numel))))
    else:
        return measure_optimizer_state(config, optimizer)
    params = params_with_grads((numel,) for numel, _ in specs)
    by_tensor = {p: spec for p, (_, spec) in zip(params, specs)}
    opt = make_optimizer(optimizer, params)
    if not optimizer.startswith("sm3"):
        opt.step()
        return local_state_bytes(opt)
    opt = SM3(params, **sm3_kwargs(optimizer), shard_resolver=by_tensor.get)
    opt.step()
    return local_state_bytes(opt)


def sm3_kwargs(optimizer: str) -> dict[str, Any]:
    """Keyword arguments of :class:`sm3_dist.SM3` for an SM3 variant of the study."""
    if optimizer == "sm3":
        return dict(lr=0.1)
    if optimizer == "sm3-momentum":
        return dict(lr=0.1, momentum=SM3_MOMENTUM)
    if optimizer == "sm3-bf16-momentum":
        return dict(lr=0.1, momentum=SM3_MOMENTUM, momentum_dtype=torch.bfloat16)
    raise ValueError(f"{optimizer!r} is not an SM3 variant")


def _rank_worker(rank: int, world: int, port: int, out: str, fn: Callable, args: tuple, env: dict) -> None:
    import torch.distributed as dist

    from sm3_dist.comm import end_process

    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()
    end_process(0)


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, env: dict[str, str] | None = None) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` CPU processes in one gloo group; each rank's JSON-able result.

    ``fn`` must be importable by name (a module-level function); ``env`` is set in every process first.
    """
    import tempfile

    import torch.multiprocessing as mp
    from sm3_dist.integrations.shm import remove_deepspeed_shm

    from sm3_dist.comm import free_port

    port = free_port()
    try:
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(_rank_worker, args=(world, port, out, fn, args, dict(env or {})), nprocs=world, join=True)
            results = []
            for r in range(world):
                with open(os.path.join(out, f"rank{r}.json")) as f:
                    results.append(json.load(f))
        return results
    finally:  # DeepSpeed's CPU backend leaves shared-memory buffers named after the port
        remove_deepspeed_shm(port)


def _sharded_sm3_rank(rank: int, world: int, shapes: list, optimizers: list) -> dict[str, int]:
    from sm3_dist import ShardedSM3

    measured = {}
    for name in optimizers:
        params = params_with_grads(shapes)
        opt = ShardedSM3(params, **sm3_kwargs(name))
        opt.step()
        opt.state_dict()  # waits for the last all_reduce of maxima (a collective: every rank calls it)
        measured[name] = local_state_bytes(opt)
    return measured


def measure_sharded_sm3(config: GPT2Config, world: int, optimizers: Sequence[str]) -> list[dict[str, int]]:
    """State bytes of :class:`sm3_dist.ShardedSM3` on each of ``world`` CPU processes (gloo), per optimizer."""
    shapes = [list(shape) for _, shape in config.param_shapes()]
    names = [n for n in optimizers if n.startswith("sm3")]
    return run_ranks(_sharded_sm3_rank, world, shapes, names)


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One prediction of the model compared with a measurement."""

    what: str
    """What was measured (size, setup, world size, rank, optimizer)."""
    predicted: int
    """Optimizer-state bytes the model predicts."""
    measured: int
    """Optimizer-state bytes of the real optimizer instance."""

    @property
    def rel_error(self) -> float:
        return relative_error(self.predicted, self.measured)

    def ok(self, tolerance: float = 0.02) -> bool:
        return self.rel_error <= tolerance


def validate(
    level: str = "full", optimizers: Sequence[str] = OPTIMIZERS, progress: Callable[[str], None] | None = None
) -> list[Check]:
    """Measure real optimizer instances and compare with the model (fp32 parameters).

    ``tiny``: the tiny config, single process, every optimizer; SM3 (and
    Adam/Adagrad) on every rank's local pieces of each sharded setup at 2 and 3
    ranks; :class:`sm3_dist.ShardedSM3` on 2 processes. ``full`` adds GPT-2
    124M, single process, every optimizer.
    """
    checks: list[Check] = []
    tiny = SIZES["tiny"]

    def add(what: str, predicted: int, measure: Callable[[], int]) -> None:
        if progress is not None:
            progress(what)
        checks.append(Check(what=what, predicted=predicted, measured=measure()))

    configs = [tiny] + ([SIZES["124M"]] if level == "full" else [])
    for config in configs:
        counts = rank_counts(config, "ddp", 1)[0]
        params = params_with_grads(shape for _, shape in config.param_shapes())
        for name in optimizers:
            add(
                f"{config.name} single-process {name}",
                state_bytes(name, counts),
                lambda c=config, n=name, p=params: measure_optimizer_state(c, n, p),
            )
        del params
    sharded = [n for n in optimizers if n.startswith("sm3") or n in ("adam", "adagrad")]
    for world in (2, 3):
        for setup in ("ddp-sharded", "zero1", "zero2", "zero3", "fsdp2"):
            per_rank = rank_counts(tiny, setup, world)
            for rank in range(world):
                for name in sharded:
                    add(
                        f"tiny {setup} world {world} rank {rank} {name}",
                        state_bytes(name, per_rank[rank]),
                        lambda s=setup, w=world, r=rank, n=name: measure_sm3_on_layouts(tiny, s, w, r, n),
                    )
    if any(n.startswith("sm3") for n in optimizers):
        world = 2
        if progress is not None:
            progress(f"ShardedSM3 at {world} ranks")
        per_rank = rank_counts(tiny, "ddp-sharded", world)
        for rank, measured in enumerate(measure_sharded_sm3(tiny, world, optimizers)):
            for name, value in measured.items():
                checks.append(
                    Check(
                        what=f"tiny ShardedSM3 world {world} rank {rank} {name}",
                        predicted=state_bytes(name, per_rank[rank]),
                        measured=value,
                    )
                )
    return checks
