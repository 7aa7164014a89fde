"""``sm3-dist bench --zero-offload``: DeepSpeed's engine step under ZeRO-Offload, SM3 against DeepSpeedCPUAdam.

One process (world size 1: gloo on ``--device cpu``, which needs ``DS_ACCELERATOR=cpu``; nccl on
``--device cuda``) builds a module holding the bench's GPT-style parameter set (``--params``, default the
27.3M ``gpt`` set) and one DeepSpeed engine per optimizer, at ZeRO stage ``--stage`` (default 2) with
``"offload_optimizer": {"device": "cpu"}``:

* ``deepspeed cpu adam``: the config's ``{"type": "Adam"}``, which DeepSpeed runs as ``DeepSpeedCPUAdam``;
* ``sm3 m=0.9``: ``{"type": "SM3"}`` with momentum 0.9 (the default ``nonfinite="skip"``);
* ``sm3 recommended``: ``{"type": "SM3"}`` with ``launch/defaults.py``'s recommended setting.

Each step runs the backward of ``0.5 * sum(p^2)`` (the gradients are the parameters: finite, no data) and
``engine.step()``; the engines take turns round by round, so a drift in the machine's speed reaches every row
alike. The table gives the median ``engine.step()`` time (the CPU optimizer step plus, on a GPU, the copies of
the updated parameters back), against DeepSpeedCPUAdam's, and the median forward + backward (whose backward,
under ZeRO-2 offload, copies the gradients to the CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
from sm3_dist.integrations.shm import remove_deepspeed_shm_at_exit
from sm3_dist.tools.bench.shapes import parse_params
from sm3_dist.tools.bench.step import warn_of_stale_build_lock

from sm3_dist.comm import free_port

__all__ = ["ROWS", "main", "run"]

ADAM_ROW = "deepspeed cpu adam"
ROWS = (ADAM_ROW, "sm3 m=0.9", "sm3 recommended")
"""The engines, in the table's order."""


class _ParameterSet(torch.nn.Module):
    """A module that only holds parameters of the given shapes; its loss is ``0.5 * sum(p^2)``."""

    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02) for shape in shapes
        )

    def forward(self) -> torch.Tensor:
        return 0.5 * sum(w.float().square().sum() for w in self.weights)


def optimizer_entry(row: str, lr: float) -> dict[str, Any]:
    """The DeepSpeed config's ``"optimizer"`` entry of a row of :data:`ROWS`."""
    from sm3_dist.launch.defaults import SM3_RECOMMENDED

    if row == ADAM_ROW:
        return {"type": "Adam", "params": {"lr": lr}}
    if row == "sm3 m=0.9":
        return {"type": "SM3", "params": {"lr": lr, "momentum": 0.9}}
    if row == "sm3 recommended":
        return {"type": "SM3", "params": {"lr": lr, **SM3_RECOMMENDED}}
    raise ValueError(f"unknown row {row!r}: choose from {', '.join(ROWS)}")


def engine_config(row: str, stage: int, *, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config of one row: ZeRO ``stage`` with the optimizer offloaded to the CPU."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "optimizer": optimizer_entry(row, 1e-4),
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}},
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }


def _init_distributed(device: torch.device) -> None:
    import deepspeed

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    remove_deepspeed_shm_at_exit()  # DeepSpeed's CPU backend leaves its /dev/shm buffers behind otherwise
    deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl")


def run(
    shapes: list[tuple[int, ...]],
    *,
    device: torch.device,
    stage: int = 2,
    rounds: int = 10,
    warmup: int = 2,
    rows: tuple[str, ...] = ROWS,
    bf16: bool = False,
    progress=lambda msg: None,
) -> dict[str, Any]:
    """Time ``rounds`` steps of every row's engine, taking turns; returns the medians and every sample (ms)."""
    import deepspeed
    import sm3_dist.integrations.deepspeed  # noqa: F401  (registers "SM3" with DeepSpeed)

    if ADAM_ROW in rows:
        warn_of_stale_build_lock("cpu_adam", "[offload]")
    _init_distributed(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    engines = {}
    for row in rows:
        progress(f"building the ZeRO-{stage} offload engine of {row!r}")
        model = _ParameterSet(shapes).to(device)
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=engine_config(row, stage, bf16=bf16)
        )
        engines[row] = engine
    samples: dict[str, dict[str, list[float]]] = {row: {"step": [], "forward_backward": []} for row in rows}
    for turn in range(warmup + rounds):
        for row, engine in engines.items():
            sync()
            start = time.perf_counter()
            engine.backward(engine())
            sync()
            middle = time.perf_counter()
            engine.step()
            sync()
            end = time.perf_counter()
            if turn >= warmup:
                samples[row]["forward_backward"].append(1e3 * (middle - start))
                samples[row]["step"].append(1e3 * (end - middle))
        progress(f"round {turn + 1}/{warmup + rounds}" + (" (warm-up)" if turn < warmup else ""))
    kinds = {row: type(engine.basic_optimizer).__name__ for row, engine in engines.items()}
    for engine in engines.values():
        engine.destroy()
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    return {
        "device": str(device),
        "stage": stage,
        "numel": numel,
        "bf16": bf16,
        "rows": {
            row: {
                "optimizer": kinds[row],
                "step_ms": statistics.median(samples[row]["step"]),
                "forward_backward_ms": statistics.median(samples[row]["forward_backward"]),
                "samples": samples[row],
            }
            for row in rows
        },
    }


def format_table(result: dict[str, Any]) -> str:
    """The result as a markdown table, each row against DeepSpeedCPUAdam's where that row ran."""
    rows = result["rows"]
    base = rows.get(ADAM_ROW)
    lines = [
        f"ZeRO-{result['stage']} offload, {result['numel']:,} parameters, device {result['device']}"
        + (", bf16" if result["bf16"] else ", fp32"),
        "",
        "| engine | optimizer | engine.step() ms | vs DeepSpeedCPUAdam | forward + backward ms |",
        "|---|---|---:|---:|---:|",
    ]
    for name, row in rows.items():
        ratio = f"{row['step_ms'] / base['step_ms']:.2f}x" if base else "-"
        lines.append(
            f"| {name} | {row['optimizer']} | {row['step_ms']:.2f} | {ratio} | {row['forward_backward_ms']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sm3-dist bench --zero-offload", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="gpt", type=parse_params, help="gpt (default, ~27M), small, tiny, ...")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2, 3), help="ZeRO stage (default 2)")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps of every engine (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--only", nargs="+", choices=ROWS, help="only these engines")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (fp32 master weights on the CPU)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before timing")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1, --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    accelerator = os.environ.get("DS_ACCELERATOR")
    if device.type == "cpu" and accelerator not in (None, "cpu"):
        parser.error(f"--device cpu needs DeepSpeed's CPU accelerator, but DS_ACCELERATOR={accelerator}")
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # read when deepspeed is first imported
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[offload {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    rows = tuple(r for r in ROWS if not args.only or r in args.only)
    result = run(
        args.params,
        device=device,
        stage=args.stage,
        rounds=args.rounds,
        warmup=args.warmup,
        rows=rows,
        bf16=args.bf16,
        progress=progress,
    )
    print(format_table(result))
    return 0
