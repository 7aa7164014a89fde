"""``sm3-dist bench --distributed``: ShardedSM3 at several world sizes on CPU (gloo).

For each world size (default 1, 2, 4) the command spawns that many processes
joined by a gloo process group. Each builds the same GPT-style parameter set
(:func:`sm3_dist.tools.bench.shapes.gpt_shapes`; default ``small``, about 4.2M parameters)
with the same fixed gradients, steps :class:`sm3_dist.ShardedSM3` and reports:

* optimizer state bytes per rank (momentum for the owned elements plus the
  touched accumulator entries), largest rank and all ranks together;
* bytes of the ``all_reduce(MAX)`` of accumulator maxima per step (the reducer's
  fp32 buffer: 4 x the sum of every parameter's dimensions) next to the bytes of
  the gradient all-reduce DDP does anyway (4 x numel);
* bytes of the all-gather of updated parameters per step;
* the median step time (per step the slowest rank, then the median over steps)
  and, for scale, the median time of one gradient-sized ``all_reduce``.

The numbers are printed as a table and, with ``--json PATH``, written as JSON.
On one shared CPU the processes compete for cores, so step times at larger
world sizes measure contention as much as communication; the byte counts are
exact.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from sm3_dist.tools.bench.shapes import PRESETS, gpt_shapes, parse_size

from sm3_dist.comm import all_reduce_, barrier, end_process, free_port

__all__ = ["main", "run"]

DEFAULT_SIZE = "small"
DEFAULT_WORLD_SIZES = (1, 2, 4)


def _median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds) if seconds else 0.0


def _worker(rank: int, world_size: int, port: int, config: dict[str, Any], out_dir: str) -> None:
    import torch.distributed as dist

    from sm3_dist import MOMENTUM_KEY, STEP_KEY, ShardedSM3

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(config["threads"])
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=config["timeout"])
    )
    try:
        shapes = [tuple(s) for s in config["shapes"]]
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).mul_(0.02).requires_grad_() for s in shapes]
        grads = [torch.randn(s, generator=gen) for s in shapes]
        opt = ShardedSM3(params, lr=1e-3, momentum=config["momentum"], beta=config["beta"])
        steps = []
        for i in range(config["warmup"] + config["steps"]):
            for p, g in zip(params, grads):
                p.grad = g
            barrier()
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
            if i >= config["warmup"]:
                steps.append(elapsed)
        opt.state_dict()  # waits for the last all-reduce; a collective, as every rank calls it
        momentum_bytes = accumulator_bytes = 0
        for state in opt.state.values():
            for key, value in state.items():
                if not torch.is_tensor(value) or key == STEP_KEY:
                    continue
                size = value.numel() * value.element_size()
                if key == MOMENTUM_KEY:
                    momentum_bytes += size
                else:
                    accumulator_bytes += size
        grad_allreduce = []
        if world_size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            for _ in range(max(3, config["steps"] // 2)):
                barrier()
                start = time.perf_counter()
                all_reduce_(flat, "sum", None)
                grad_allreduce.append(time.perf_counter() - start)
        comm = opt.comm_volume()
        result = dict(
            rank=rank,
            owned_numel=sum(b - a for a, b in opt.owned_ranges()),
            momentum_bytes=momentum_bytes,
            accumulator_bytes=accumulator_bytes,
            allreduce_bytes=comm.allreduce_bytes,
            allreduce_calls=comm.allreduce_calls,
            allgather_bytes=comm.allgather_bytes,
            allgather_calls=comm.allgather_calls,
            step_seconds=steps,
            grad_allreduce_seconds=grad_allreduce,
        )
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()
    end_process(0)


def _spawn(world_size: int, config: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, free_port(), config, out_dir),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + config["timeout"]
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"world size {world_size}: no result within {config['timeout']} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                results.append(json.load(f))
        return results


def summarize(world_size: int, ranks: list[dict[str, Any]], numel: int) -> dict[str, Any]:
    """One table row from every rank's measurements."""
    first = ranks[0]
    per_step = [max(r["step_seconds"][i] for r in ranks) for i in range(len(first["step_seconds"]))]
    state = [r["momentum_bytes"] + r["accumulator_bytes"] for r in ranks]
    return dict(
        world_size=world_size,
        owned_numel=[r["owned_numel"] for r in ranks],
        momentum_bytes=[r["momentum_bytes"] for r in ranks],
        accumulator_bytes=[r["accumulator_bytes"] for r in ranks],
        state_bytes_max=max(state),
        state_bytes_total=sum(state),
        allreduce_bytes=first["allreduce_bytes"],
        allreduce_calls=first["allreduce_calls"],
        grad_allreduce_bytes=4 * numel,
        allgather_bytes=first["allgather_bytes"],
        allgather_calls=first["allgather_calls"],
        step_ms_median=_median_ms(per_step),
        step_ms_samples=[1e3 * s for s in per_step],
        grad_allreduce_ms_median=_median_ms(
            [max(r["grad_allreduce_seconds"][i] for r in ranks) for i in range(len(first["grad_allreduce_seconds"]))]
        ),
    )


def run(
    size: str = DEFAULT_SIZE,
    world_sizes: tuple[int, ...] = DEFAULT_WORLD_SIZES,
    *,
    steps: int = 10,
    warmup: int = 2,
    momentum: float = 0.9,
    beta: float = 0.0,
    threads: int = 1,
    timeout: float = 600.0,
    progress: Any = None,
) -> dict[str, Any]:
    """Measure every world size in turn; returns the JSON-ready result."""
    vocab, width, blocks = parse_size(size)
    shapes = gpt_shapes(vocab, width, blocks)
    numel = sum(math.prod(s) for s in shapes)
    config = dict(
        shapes=shapes,
        steps=steps,
        warmup=warmup,
        momentum=momentum,
        beta=beta,
        threads=threads,
        timeout=timeout,
    )
    rows = []
    for world_size in world_sizes:
        start = time.perf_counter()
        rows.append(summarize(world_size, _spawn(world_size, config), numel))
        if progress is not None:
            progress(f"world size {world_size}: {time.perf_counter() - start:.1f} s")
    return dict(
        size=size,
        vocab=vocab,
        width=width,
        blocks=blocks,
        numel=numel,
        num_tensors=len(shapes),
        sum_of_dims=sum(sum(s) for s in shapes),
        momentum=momentum,
        beta=beta,
        steps=steps,
        warmup=warmup,
        threads=threads,
        torch=torch.__version__,
        cpu_count=os.cpu_count(),
        rows=rows,
    )


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"ShardedSM3, GPT-style parameter set {result['size']!r} (vocab {result['vocab']}, width "
        f"{result['width']}, {result['blocks']} blocks): {result['numel']:,} parameters in "
        f"{result['num_tensors']} tensors, sum of dims {result['sum_of_dims']:,}; momentum {result['momentum']}, "
        f"beta {result['beta']}; gloo on CPU ({result['cpu_count']} cores, {result['threads']} thread(s) per "
        f"process), median of {result['steps']} steps",
        "",
        "| world | state/rank (max) | state (all ranks) | max all-reduce/step | grad all-reduce | ratio "
        "| all-gather/step | step ms | grad all-reduce ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        ratio = f"1/{r['grad_allreduce_bytes'] / r['allreduce_bytes']:.0f}" if r["allreduce_bytes"] else "-"
        grad_ms = f"{r['grad_allreduce_ms_median']:.2f}" if r["world_size"] > 1 else "-"
        lines.append(
            f"| {r['world_size']} | {_fmt_bytes(r['state_bytes_max'])} | {_fmt_bytes(r['state_bytes_total'])} "
            f"| {_fmt_bytes(r['allreduce_bytes'])} | {_fmt_bytes(r['grad_allreduce_bytes'])} | {ratio} "
            f"| {_fmt_bytes(r['allgather_bytes'])} | {r['step_ms_median']:.2f} | {grad_ms} |"
        )
    lines += [
        "",
        "state: momentum for the owned elements + the accumulator entries they touch; max all-reduce: the one "
        "all_reduce(MAX) of accumulator maxima (4 B x sum of dims); grad all-reduce: what DDP sends anyway "
        "(4 B x numel); all-gather: the updated slices, padded to equal size (world x ceil(numel/world) x 4 B).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="sm3-dist bench --distributed", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        default=DEFAULT_SIZE,
        help=f"parameter set: {', '.join(f'{k} {v}' for k, v in PRESETS.items())} as (vocab, width, blocks), "
        f"or VOCAB,WIDTH,BLOCKS (default {DEFAULT_SIZE})",
    )
    parser.add_argument(
        "--world-sizes", default=",".join(map(str, DEFAULT_WORLD_SIZES)), help="comma-separated (default 1,2,4)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SM3 momentum (default 0.9; 0: no buffer)")
    parser.add_argument("--beta", type=float, default=0.0, help="SM3 beta (default 0)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (default 1: rows differ only in world size)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per world size before giving up")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    try:
        parse_size(args.size)
        world_sizes = tuple(int(w) for w in args.world_sizes.split(","))
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc) if isinstance(exc, argparse.ArgumentTypeError) else f"--world-sizes: {exc}")
    if not world_sizes or min(world_sizes) < 1:
        parser.error("--world-sizes must list positive integers")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if not 0.0 <= args.momentum < 1.0 or not 0.0 <= args.beta < 1.0:
        parser.error("--momentum and --beta must be in [0, 1)")

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    result = run(
        args.size,
        world_sizes,
        steps=args.steps,
        warmup=args.warmup,
        momentum=args.momentum,
        beta=args.beta,
        threads=args.threads,
        timeout=args.timeout,
        progress=progress,
    )
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
