"""The ``sm3-dist bench`` command (``--distributed`` hands over to :mod:`sm3_dist.tools.bench.distributed`,
``--zero-offload`` to :mod:`sm3_dist.tools.bench.offload`)."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time

import torch
from sm3_dist.tools.bench.report import format_table, plot
from sm3_dist.tools.bench.shapes import parse_params
from sm3_dist.tools.bench.step import FSDP2_ROW, check, run

__all__ = ["main"]

HANDED_OVER = {"--distributed": "sm3_dist.tools.bench.distributed", "--zero-offload": "sm3_dist.tools.bench.offload"}
"""Flags that hand the whole command line (less the flag) over to another module's ``main``."""

DESCRIPTION = "time one optimizer step, side by side, against the memory-bandwidth bound"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag, module in HANDED_OVER.items():
        if flag in argv:
            rest = [a for a in argv if a != flag]
            return int(importlib.import_module(module).main(rest) or 0)
    parser = argparse.ArgumentParser(prog="sm3-dist bench", description=DESCRIPTION)
    parser.add_argument(
        "--params", default="gpt", type=parse_params, help="gpt (default, ~27M), small, tiny, or VOCAB,WIDTH,BLOCKS"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds; every optimizer steps in each")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per optimizer per round")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (the first fused step compiles)")
    parser.add_argument("--only", nargs="+", help="only optimizers whose name contains one of these")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before timing")
    parser.add_argument("--json", metavar="PATH", help="also write the results (with every sample) as JSON")
    parser.add_argument("--plot", metavar="PNG", help="also draw the step times against their bounds (matplotlib)")
    parser.add_argument("--distributed", action="store_true", help="run sm3_dist.tools.bench.distributed instead")
    parser.add_argument(
        "--zero-offload",
        action="store_true",
        help="run sm3_dist.tools.bench.offload instead: DeepSpeed's engine step under ZeRO-Offload, SM3 against "
        "DeepSpeedCPUAdam",
    )
    parser.add_argument(
        "--check", action="store_true", help="first compare the CUDA kernels with the eager CPU kernel (needs CUDA)"
    )
    parser.add_argument(
        "--sync-error",
        action="store_true",
        help='one more step of every SM3 row under torch.cuda.set_sync_debug_mode("error") (CUDA)',
    )
    parser.add_argument("--fsdp2", action="store_true", help=f"add the row {FSDP2_ROW!r}")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    shapes = args.params
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        parser.error("--rounds and --steps must be >= 1, --warmup >= 0")
    start = time.perf_counter()

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[bench {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    status = 0
    if args.check:
        status = check(device, progress)
    result = run(
        shapes,
        device=device,
        rounds=args.rounds,
        steps_per_round=args.steps,
        warmup=args.warmup,
        only=args.only,
        fsdp2=args.fsdp2,
        check_syncs=args.sync_error,
        progress=progress,
    )
    result["command"] = "sm3-dist bench " + " ".join(argv)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    if any(r.get("sync_error") not in (None, "ok") for r in result["rows"]):
        status = 1
    return status if all(math.isfinite(r["median_ms"]) for r in result["rows"]) else 1
