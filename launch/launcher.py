"""Starting a run: this machine's processes for ``sm3-dist train``, and ``--compare``'s runs one after another.

Under torchrun, ``accelerate launch`` or ``deepspeed`` the launcher has started
the processes already and :func:`sm3_dist.launch.loop.run` is called directly.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch.multiprocessing as mp
from sm3_dist.launch import loop
from sm3_dist.launch.config import Plan, optimizer_names, validate
from sm3_dist.launch.metrics import fmt_bytes, last_summary
from sm3_dist.launch.plot import plot_compare

from sm3_dist.comm import free_port

__all__ = ["compare", "compare_plans", "spawn"]


def spawn(plan: Plan) -> int:
    """Start ``world_size`` processes on this machine (gloo on CPU, NCCL on CUDA) and wait for them."""
    base = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(plan.world_size),
        "LOCAL_WORLD_SIZE": str(plan.world_size),
        "LOCAL_SIZE": str(plan.world_size),
    }
    if plan.world_size == 1:
        os.environ.update(base, RANK="0", LOCAL_RANK="0")
        return loop.run(plan)
    ctx = mp.start_processes(_rank, args=(plan, base), nprocs=plan.world_size, join=False, start_method="spawn")
    try:
        while not ctx.join():
            pass
    except mp.ProcessRaisedException as e:
        print(f"sm3-dist train: a worker failed:\n{e}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as e:
        print(f"sm3-dist train: a worker exited: {e}", file=sys.stderr)
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    except KeyboardInterrupt:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        return 130
    return 0


def _rank(rank: int, plan: Plan, base: dict[str, str]) -> None:
    os.environ.update(base, RANK=str(rank), LOCAL_RANK=str(rank))
    loop.run(plan, exit_after=True)


def compare_plans(args: argparse.Namespace, plan: Plan) -> list[Plan]:
    """One plan per optimizer of ``--compare``, each validated as if run alone into ``OUT/<name>``.

    ``args`` is the command line as parsed: an option given there (``--lr``
    among them) holds for every run; one left out takes each optimizer's default.
    """
    plans = []
    for name in optimizer_names(plan.args):
        sub = argparse.Namespace(**vars(args))
        sub.compare, sub.optimizer, sub.resume = None, name, None
        sub.out = str(Path(plan.args.out) / name)
        sub.checkpoint_dir = None
        plans.append(replace(validate(sub, env={}), world_size=plan.world_size))
    return plans


def compare(args: argparse.Namespace, plan: Plan) -> int:
    """Run every optimizer of ``--compare`` for the same steps, then plot them in one PNG and print a table."""
    runs = []
    for sub in compare_plans(args, plan):
        name, lr = sub.args.optimizer, sub.args.lr
        print(f"=== {name} (lr {lr}) -> {sub.args.out}", flush=True)
        rc = spawn(sub)
        if rc:
            return rc
        runs.append((f"{name} (lr {lr:g})", Path(sub.args.out) / "metrics.jsonl", describe(sub.args)))
    a = plan.args
    title = (f"GPT-2 {a.model_size}, {a.setup}, {plan.world_size} processes, batch {a.batch_size} x {a.seq_len} "
             f"bytes, {a.steps} steps")  # fmt: skip
    labelled = []
    for label, path, settings in runs:
        summary = last_summary(path)
        state = fmt_bytes(max(summary["optimizer_state_bytes"]))
        print(
            f"{label:24s} final train loss {summary['final_loss']:.4f}  held-out {summary['eval_loss']:.4f}  "
            f"optimizer state/rank {state}  ({settings})"
        )
        labelled.append((f"{label}: {summary['eval_loss']:.3f}, {state}/rank", path))
    png = plot_compare(labelled, Path(a.out) / "compare.png", title=title)
    print(f"wrote {png}")
    return 0


def describe(args: argparse.Namespace) -> str:
    """An optimizer's settings as a run used them (SM3's form, the schedule)."""
    parts = []
    if args.optimizer == "sm3":
        form = "running sum (paper)" if args.beta == 0 else f"beta {args.beta:g}"
        if args.beta > 0 and args.bias_correction:
            form += " + bias correction"
        parts += [form, f"momentum {args.momentum:g}"]
        if args.update_clip > 0:
            parts.append(f"update clip {args.update_clip:g}")
    parts.append(f"warm-up {args.warmup_fraction:g}, cool-down {args.cooldown_fraction:g}")
    return ", ".join(parts)
