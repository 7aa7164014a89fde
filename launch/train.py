"""``sm3-dist train``: a GPT-2 language model trained with SM3 (or a baseline) on byte-level text.

With no arguments it starts 2 CPU processes (gloo), trains a tiny GPT-2 on
``pydoc_data.topics`` with plain DDP and prints its metrics. The same module is
a script for the usual launchers, which it detects from ``RANK``/``WORLD_SIZE``
(it then starts no processes of its own)::

    sm3-dist train                                         # 2 CPU processes, DDP, SM3
    sm3-dist train --compare sm3,adamw                     # both at equal steps, one PNG
    torchrun --nproc-per-node 2 launch/train.py --setup fsdp2
    deepspeed --num_gpus 2 launch/train.py --setup deepspeed --deepspeed-config launch/deepspeed/zero2.json
    accelerate launch --config_file launch/accelerate/deepspeed_zero2.yaml launch/train.py

Setups: ``ddp`` (torch DDP, the optimizer on every rank), ``sharded``
(``sm3_dist.ShardedSM3`` under DDP: each rank keeps and updates a part of the
state), ``fsdp2`` (``fully_shard`` per block and the root, on a 1-D mesh),
``deepspeed`` (``deepspeed.initialize`` with a JSON config, or accelerate's
DeepSpeed plugin when started by ``accelerate launch``).

Every run writes ``metrics.jsonl`` (one JSON record a line: ``config``,
``train`` per step, ``eval``, ``summary``) and ``loss.png`` into ``--out``.
Bad input is reported before any process group starts, with exit code 2.

Reliability: ``--checkpoint-every N`` writes a checkpoint every N steps,
atomically and with a manifest (:mod:`sm3_dist.launch.checkpoint`), keeping the
newest ``--keep-checkpoints``; a job killed at any point (SIGKILL included)
restarts with ``--resume auto`` from the newest checkpoint that verifies, and
ends bitwise where an uninterrupted run ends. A corrupted, truncated or foreign
checkpoint is refused before anything is loaded (exit code 2; ``auto`` falls
back to an older one and says so). ``--pg-timeout`` bounds every collective, so
a dead or hung rank stops the job with an error naming the timeout instead of
hanging it; a watchdog (``--step-timeout``) ends a rank whose step, evaluation
or checkpoint makes no progress, for waits that no process-group timeout covers
(DeepSpeed's CPU shared-memory all-reduce spins without one). Each ``train``
record carries the optimizer's ``skipped_steps`` (steps skipped together for a
non-finite gradient).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import resource
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sm3_dist.launch import checkpoint

OPTIMIZERS = ("sm3", "adamw", "adagrad", "adafactor")
SETUPS = ("ddp", "sharded", "fsdp2", "deepspeed")
DEFAULT_LR = {"sm3": 0.1, "adamw": 3e-3, "adagrad": 0.05, "adafactor": 1e-2}
"""Learning rates used when ``--lr`` is not given (tuned on the default tiny model)."""
DEFAULT_BATCH_SIZE = 16
DS_OPTIMIZER_TYPES = {"sm3": "SM3", "adamw": "AdamW", "adagrad": "Adagrad", "adafactor": "Adafactor"}
CHECKPOINT_PREFIX = checkpoint.PREFIX
META_FILE = checkpoint.MANIFEST_FILE
TRAINER_FILE = "trainer.pt"
DONE_FILE = checkpoint.DONE_FILE
DEFAULT_PG_TIMEOUT_S = 600.0
STARTUP_TIMEOUT_S = 1800.0
"""The watchdog's allowance for startup (imports, DeepSpeed's op builds, loading a checkpoint), if above
``--step-timeout``."""

__all__ = ["OPTIMIZERS", "SETUPS", "UsageError", "build_parser", "main"]


class UsageError(Exception):
    """Bad input found before any process group starts: printed, exit code 2."""


# ---------------------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sm3-dist train",
        description="Train a GPT-2 language model on byte-level text with SM3 or a baseline optimizer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--optimizer", default="sm3", help=f"one of {', '.join(OPTIMIZERS)}")
    p.add_argument(
        "--compare",
        default=None,
        metavar="OPT,OPT",
        help="run each listed optimizer at the same steps (into OUT/<name>) and plot all in OUT/compare.png",
    )
    p.add_argument(
        "--setup",
        default=None,
        choices=SETUPS,
        help="how the model and optimizer are distributed (default ddp; deepspeed under accelerate's DeepSpeed plugin)",
    )
    p.add_argument("--deepspeed-config", default=None, help="DeepSpeed JSON config for --setup deepspeed")
    p.add_argument("--model-size", default="tiny", help="tiny, small, gpt2 (=124M), medium, large, xl")
    p.add_argument("--data", default=None, help="a text file to train on instead of pydoc_data.topics")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch (sequences per step, all ranks); default 16, or what a DeepSpeed config fixes")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default per optimizer: {DEFAULT_LR})")
    p.add_argument("--momentum", type=float, default=0.9, help="SM3 momentum (0 keeps no momentum buffer)")
    p.add_argument("--momentum-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="SM3 momentum storage: bfloat16 halves it (computed in fp32)")  # fmt: skip
    p.add_argument("--beta", type=float, default=0.0, help="SM3 beta: 0 running sum, (0, 1) moving average")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-fraction", type=float, default=0.05, help="quadratic warm-up over this part of the run")
    p.add_argument("--cooldown-fraction", type=float, default=0.0, help="linear decay to 0 over this final part")
    p.add_argument("--polyak", type=float, nargs="?", const=0.999, default=None, metavar="DECAY",
                   help="also evaluate an EMA of the weights (decay 0.999 if no value is given)")  # fmt: skip
    p.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (and at the end); 0: end only")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows of --seq-len tokens per evaluation")
    p.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default OUT/checkpoints)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save every N steps (and at the end); 0: never")
    p.add_argument("--keep-checkpoints", type=int, default=3, metavar="K",
                   help="keep the newest K checkpoints (0: keep all)")  # fmt: skip
    p.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="a checkpoint (step directory, or a checkpoint dir: its latest), which must verify; auto: "
                   "the newest in --checkpoint-dir that verifies (older ones if newer are damaged), if any")  # fmt: skip
    p.add_argument("--pg-timeout", type=float, default=DEFAULT_PG_TIMEOUT_S, metavar="SECONDS",
                   help="process-group timeout: a collective that a dead or hung rank never joins fails after this")  # fmt: skip
    p.add_argument("--step-timeout", type=float, default=None, metavar="SECONDS",
                   help="watchdog: end a rank whose training step, evaluation or checkpoint makes no progress for "
                   "this long (default 2 x --pg-timeout)")  # fmt: skip
    p.add_argument("--final-weights", default=None, metavar="FILE",
                   help="at the end, write the full model state dict (torch.save, from rank 0) to FILE")  # fmt: skip
    p.add_argument("--out", default=None, help="output directory (default runs/<timestamp>)")
    p.add_argument("--nproc", type=int, default=2, help="processes to start when no launcher started this one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="progress-bar and stdout update interval (steps)")
    p.add_argument("--no-plot", action="store_true", help="do not write loss.png")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _env_flag(env: dict[str, str], name: str) -> bool:
    return env.get(name, "").lower() in ("1", "true", "yes")


def _launched(env: dict[str, str]) -> bool:
    return "RANK" in env and "WORLD_SIZE" in env


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True, slots=True)
class Plan:
    """What a validated command line runs."""

    args: argparse.Namespace
    """The parsed options, with defaults filled in (setup, lr, out, checkpoint dir)."""
    world_size: int
    """Processes of the run (from the launcher's environment, or ``--nproc``)."""
    launched: bool
    """Started by torchrun/accelerate/deepspeed (``RANK``/``WORLD_SIZE`` set): start no processes."""
    accelerate: str | None
    """``"deepspeed"`` or ``"fsdp"`` when accelerate's plugin configures the run."""
    deepspeed_config: dict | None
    """The DeepSpeed config this run passes on (``--setup deepspeed`` only)."""
    resume: Path | None
    """The checkpoint to resume from."""
    skipped: tuple[tuple[str, str], ...] = ()
    """Newer checkpoints that ``--resume auto`` passed over: (path, why)."""


def _ds_config_from_file(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"DeepSpeed config {path!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"DeepSpeed config {path!r} is not valid JSON: {e}") from None


DEFAULT_DEEPSPEED_CONFIG = {"zero_optimization": {"stage": 2}, "zero_force_ds_cpu_optimizer": False}
"""Used by ``--setup deepspeed`` without ``--deepspeed-config``."""


def validate(args: argparse.Namespace, env: dict[str, str] | None = None) -> Plan:
    """Check the command line against the environment; raise :class:`UsageError` on bad input."""
    env = dict(os.environ if env is None else env)
    args = argparse.Namespace(**vars(args))
    names = [n.strip() for n in args.compare.split(",")] if args.compare else [args.optimizer]
    for name in names:
        if name not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {name!r}: choose from {', '.join(OPTIMIZERS)}")
    if args.compare and len(names) < 2:
        raise UsageError("--compare needs at least two optimizers, e.g. --compare sm3,adamw")
    launched = _launched(env)
    if args.compare and launched:
        raise UsageError(
            "--compare starts its own runs: run it as `sm3-dist train --compare ...`, not under a launcher"
        )
    world_size = int(env["WORLD_SIZE"]) if launched else args.nproc
    if world_size < 1:
        raise UsageError(f"--nproc must be at least 1, got {world_size}")
    batch_given, lr_given = args.batch_size is not None, args.lr is not None
    if not batch_given:
        args.batch_size = DEFAULT_BATCH_SIZE
    for name in ("steps", "batch_size", "seq_len", "eval_windows", "log_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("eval_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    from sm3_dist.launch.model import SIZES

    if args.model_size not in SIZES:
        raise UsageError(f"unknown model size {args.model_size!r}: choose from {', '.join(SIZES)}")
    if args.data is not None and not Path(args.data).is_file():
        raise UsageError(f"--data {args.data!r} is not a file")
    if not (args.pg_timeout > 0 and math.isfinite(args.pg_timeout)):
        raise UsageError(f"--pg-timeout must be a positive number of seconds, got {args.pg_timeout}")
    if args.step_timeout is None:
        args.step_timeout = 2.0 * args.pg_timeout
    if not (args.step_timeout > 0 and math.isfinite(args.step_timeout)):
        raise UsageError(f"--step-timeout must be a positive number of seconds, got {args.step_timeout}")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if not 0.0 <= args.momentum < 1.0:
        raise UsageError(f"--momentum must be in [0, 1), got {args.momentum}")
    if not 0.0 <= args.beta < 1.0:
        raise UsageError(f"--beta must be in [0, 1), got {args.beta}")
    if args.polyak is not None and not 0.0 <= args.polyak < 1.0:
        raise UsageError(f"--polyak decay must be in [0, 1), got {args.polyak}")
    for name in ("warmup_fraction", "cooldown_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.warmup_fraction + args.cooldown_fraction > 1.0:
        raise UsageError("--warmup-fraction + --cooldown-fraction exceeds the whole run")

    accelerate = None
    if _env_flag(env, "ACCELERATE_USE_FSDP"):
        if not _cuda_available():
            raise UsageError(
                "this accelerate config asks for FSDP, but accelerate's FSDP plugin does not shard on CPU "
                "(no CUDA device here). On CPU run FSDP2 under torchrun: "
                "`torchrun --nproc-per-node 2 launch/train.py --setup fsdp2`"
            )
        if args.setup not in (None, "fsdp2"):
            raise UsageError(f"accelerate's FSDP plugin configures this run; --setup {args.setup} conflicts")
        args.setup = "fsdp2"
        accelerate = "fsdp"
    elif _env_flag(env, "ACCELERATE_USE_DEEPSPEED"):
        if args.setup not in (None, "deepspeed"):
            raise UsageError(f"accelerate's DeepSpeed plugin configures this run; --setup {args.setup} conflicts")
        if args.deepspeed_config is not None:
            raise UsageError("accelerate's DeepSpeed plugin configures this run: put the JSON in its YAML instead")
        args.setup = "deepspeed"
        accelerate = "deepspeed"
    args.setup = args.setup or "ddp"

    if args.setup == "fsdp2" and accelerate is None and not launched and args.nproc > 0:
        pass  # fully_shard runs in the processes this command starts, as under torchrun
    if args.setup == "sharded":
        import sm3_dist

        if not hasattr(sm3_dist, "ShardedSM3"):
            raise UsageError("--setup sharded needs sm3_dist.ShardedSM3, which this installation lacks")
        if any(n != "sm3" for n in names):
            raise UsageError("--setup sharded shards SM3's state: use --optimizer sm3 (or --setup ddp for baselines)")

    deepspeed_config = None
    if args.setup == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise UsageError(
                f"--setup deepspeed needs DeepSpeed installed (pip install sm3-dist[deepspeed]): {e}"
            ) from None
        if accelerate == "deepspeed":
            path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
            deepspeed_config = None if path in ("", "none", "None") else _ds_config_from_file(path)
        else:
            deepspeed_config = (
                _ds_config_from_file(args.deepspeed_config)
                if args.deepspeed_config
                else json.loads(json.dumps(DEFAULT_DEEPSPEED_CONFIG))
            )
        if deepspeed_config is not None:
            stage = int(deepspeed_config.get("zero_optimization", {}).get("stage", 0) or 0)
            if stage > 0 and "adafactor" in names:
                raise UsageError(
                    "Adafactor under ZeRO would see flat partitions, not matrices (no factored state): "
                    "compare it under --setup ddp or fsdp2"
                )
            if stage == 3 and args.polyak is not None:
                raise UsageError("--polyak is not supported with ZeRO-3 (the weights are partitioned)")
            for key in ("train_batch_size", "train_micro_batch_size_per_gpu"):
                value = deepspeed_config.get(key, "auto")
                per = world_size if key == "train_micro_batch_size_per_gpu" else 1
                if value != "auto" and not batch_given:
                    args.batch_size = int(value) * per
                    batch_given = True
                if value != "auto" and int(value) * per != args.batch_size:
                    raise UsageError(
                        f"the DeepSpeed config sets {key}={value}, which disagrees with --batch-size "
                        f'{args.batch_size} over {world_size} processes: set it to "auto"'
                    )
            section = deepspeed_config.get("optimizer") or {}
            lr = section.get("params", {}).get("lr")
            if not lr_given and section.get("type") == DS_OPTIMIZER_TYPES[names[0]] and isinstance(lr, (int, float)):
                args.lr = float(lr)
    elif args.deepspeed_config is not None:
        raise UsageError("--deepspeed-config is only used with --setup deepspeed")
    if args.batch_size % world_size:
        raise UsageError(
            f"the global batch size {args.batch_size} is not divisible by the {world_size} processes: "
            f"choose a multiple of {world_size}"
        )

    if args.out is None:
        args.out = str(Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if args.checkpoint_dir is None:
        args.checkpoint_dir = str(Path(args.out) / "checkpoints")
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    resume, skipped = None, ()
    if args.resume is not None and not args.compare:
        expected = expected_checkpoint(args, world_size, deepspeed_config, env)
        try:
            resume, passed_over = checkpoint.resolve(args.resume, Path(args.checkpoint_dir), expected)
        except checkpoint.CheckpointError as e:
            raise UsageError(str(e)) from None
        skipped = tuple((str(path), reason) for path, reason in passed_over)
        if resume is not None:
            step = checkpoint.step_of(resume)
            step = json.loads((resume / META_FILE).read_text())["step"] if step is None else step
            if step >= args.steps:
                raise UsageError(f"checkpoint {resume} is at step {step}, not before --steps {args.steps}")
        if env.get("RANK", "0") == "0":
            for path, reason in skipped:
                print(f"sm3-dist train: skipping checkpoint {path}: {reason}", file=sys.stderr, flush=True)
            if skipped:
                where = f"the older checkpoint {resume}" if resume is not None else "no checkpoint"
                print(f"sm3-dist train: resuming from {where}", file=sys.stderr, flush=True)
    return Plan(args, world_size, launched, accelerate, deepspeed_config, resume, skipped)


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The model's shape as a checkpoint's manifest records it."""
    from sm3_dist.launch.data import VOCAB_SIZE
    from sm3_dist.launch.model import SIZES

    shape = SIZES[args.model_size]
    return {
        "n_layer": shape.n_layer,
        "n_embd": shape.n_embd,
        "n_head": shape.n_head,
        "vocab_size": VOCAB_SIZE,
        "n_positions": args.seq_len,
    }


def optimizer_config(args: argparse.Namespace, deepspeed_config: dict | None) -> dict[str, Any]:
    """The optimizer's hyperparameters and learning-rate schedule (a checkpoint records their hash)."""
    config: dict[str, Any] = {
        "optimizer": args.optimizer,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "steps": args.steps,
        "warmup_fraction": args.warmup_fraction,
        "cooldown_fraction": args.cooldown_fraction,
    }
    if args.optimizer == "sm3":
        config.update(momentum=args.momentum, beta=args.beta, momentum_dtype=args.momentum_dtype)
    section = (deepspeed_config or {}).get("optimizer") or {}
    if isinstance(section, dict) and str(section.get("type", "")).lower() == DS_OPTIMIZER_TYPES[args.optimizer].lower():
        fixed = {"lr", "weight_decay", "momentum", "beta", "momentum_dtype"}
        extra = {k: v for k, v in (section.get("params") or {}).items() if k not in fixed and v != "auto"}
        if extra:
            config["deepspeed_params"] = extra
    if deepspeed_config is not None and deepspeed_config.get("gradient_clipping", "auto") != "auto":
        config["gradient_clipping"] = deepspeed_config["gradient_clipping"]
    return config


def expected_checkpoint(
    args: argparse.Namespace, world_size: int, deepspeed_config: dict | None, env: dict[str, str] | None = None
) -> checkpoint.Expected:
    """What this run writes into a checkpoint's manifest, and what it needs from one to resume."""
    stage = None
    if args.setup == "deepspeed":
        if deepspeed_config is not None:
            stage = int(deepspeed_config.get("zero_optimization", {}).get("stage", 0) or 0)
        elif (env or {}).get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").isdigit():
            stage = int((env or {})["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    return checkpoint.Expected(
        setup=args.setup,
        optimizer=args.optimizer,
        model_size=args.model_size,
        model=model_config(args),
        optimizer_config=optimizer_config(args, deepspeed_config),
        world_size=world_size,
        reshardable=args.setup != "deepspeed",
        zero_stage=stage,
    )


# ---------------------------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        plan = validate(args)
    except UsageError as e:
        print(f"sm3-dist train: error: {e}", file=sys.stderr)
        return 2
    if plan.args.compare:
        return _compare(plan, argv)
    if plan.launched:
        return _run(plan)
    return _spawn(plan)


def _compare(plan: Plan, argv: list[str]) -> int:
    from sm3_dist.launch.plot import plot_runs

    args = plan.args
    names = [n.strip() for n in args.compare.split(",")]
    runs = []
    for name in names:
        sub = argparse.Namespace(**vars(args))
        sub.compare = None
        sub.optimizer = name
        sub.lr = DEFAULT_LR[name] if "--lr" not in argv else args.lr
        sub.out = str(Path(args.out) / name)
        sub.checkpoint_dir = str(Path(sub.out) / "checkpoints")
        print(f"=== {name} (lr {sub.lr}) -> {sub.out}", flush=True)
        rc = _spawn(Plan(sub, plan.world_size, False, None, plan.deepspeed_config, None))
        if rc:
            return rc
        runs.append((f"{name} (lr {sub.lr:g})", Path(sub.out) / "metrics.jsonl"))
    title = (
        f"GPT-2 {args.model_size}, {args.setup}, {plan.world_size} processes, batch {args.batch_size} x "
        f"{args.seq_len} bytes, {args.steps} steps"
    )
    png = plot_runs(runs, Path(args.out) / "compare.png", title=title)
    for label, path in runs:
        summary = _last_summary(path)
        print(
            f"{label:24s} final train loss {summary['final_loss']:.4f}  held-out {summary['eval_loss']:.4f}  "
            f"optimizer state/rank {_fmt_bytes(max(summary['optimizer_state_bytes']))}"
        )
    print(f"wrote {png}")
    return 0


def _last_summary(path: Path) -> dict:
    summary = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("kind") == "summary":
                summary = record
    return summary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(plan: Plan) -> int:
    """Start ``world_size`` processes on this machine (gloo on CPU, NCCL on CUDA) and wait for them."""
    import torch.multiprocessing as mp

    port = free_port()
    base = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(plan.world_size),
        "LOCAL_WORLD_SIZE": str(plan.world_size),
        "LOCAL_SIZE": str(plan.world_size),
    }
    if plan.world_size == 1:
        os.environ.update(base, RANK="0", LOCAL_RANK="0")
        return _run(plan)
    ctx = mp.start_processes(_spawned, args=(plan, base), nprocs=plan.world_size, join=False, start_method="spawn")
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


def _spawned(rank: int, plan: Plan, base: dict[str, str]) -> None:
    from sm3_dist.comm import end_process

    os.environ.update(base, RANK=str(rank), LOCAL_RANK=str(rank))
    end_process(_run(plan))


# ---------------------------------------------------------------------------------------------- one rank


def _peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _make_optimizer(name: str, params, args: argparse.Namespace, *, sharded: bool):
    import torch

    if name == "sm3":
        import sm3_dist

        kwargs = dict(
            lr=args.lr,
            momentum=args.momentum,
            beta=args.beta,
            weight_decay=args.weight_decay,
            momentum_dtype=getattr(torch, args.momentum_dtype),
        )
        if sharded:
            return sm3_dist.ShardedSM3(params, **kwargs)
        return sm3_dist.SM3(params, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=args.lr, weight_decay=args.weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=args.lr, weight_decay=args.weight_decay)
    raise AssertionError(name)


class Watchdog:
    """Ends this process when the job makes no progress for ``timeout`` seconds after a :meth:`beat`.

    A daemon thread waits for the deadline; when it passes, it prints which phase
    stalled and the stack of every thread, then exits the process (code 3), so the
    launcher stops the other ranks. Process-group collectives fail on their own
    after ``--pg-timeout``; this covers waits without a timeout. If native code
    holds the GIL, ``faulthandler``'s C-level timer ends the process 10 s later.
    """

    def __init__(self, timeout: float, rank: int) -> None:
        import atexit

        self.timeout = timeout
        self.rank = rank
        self._label = ""
        self._allowed = timeout
        self._deadline: float | None = None
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._watch, name="sm3-dist-watchdog", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def beat(self, label: str, timeout: float | None = None) -> None:
        """Progress: ``label`` (what runs now) has ``timeout`` seconds (default: the watchdog's) to the next beat."""
        import faulthandler

        timeout = self.timeout if timeout is None else timeout
        with self._cond:
            self._label = label
            self._allowed = timeout
            self._deadline = time.monotonic() + timeout
            self._cond.notify()
        faulthandler.dump_traceback_later(timeout + 10.0, exit=True)

    def stop(self) -> None:
        """End the watch and its thread (a daemon thread still waiting at interpreter exit can abort it)."""
        import faulthandler

        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()
        faulthandler.cancel_dump_traceback_later()

    def _watch(self) -> None:
        import faulthandler

        with self._cond:
            while not self._stopped:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                print(
                    f"sm3-dist train: rank {self.rank}: {self._label} made no progress for {self._allowed:g} s "
                    f"(--step-timeout {self.timeout:g} s): another rank died or hung, or a collective waits "
                    "without a timeout. Stacks of this rank follow; it exits with code 3.",
                    file=sys.stderr,
                    flush=True,
                )
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                os._exit(3)


class Trainer:
    """One rank of a run: builds the process group, model, optimizer and schedule; trains, evaluates, saves."""

    def __init__(self, plan: Plan) -> None:
        import torch
        import torch.distributed as dist
        from sm3_dist.launch.data import load_corpus
        from sm3_dist.launch.model import build_model

        self.plan = plan
        self.args = args = plan.args
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        else:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        self.accelerator = None
        if plan.accelerate is not None:
            self._init_accelerate_plugin()
        elif not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.pg_timeout))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.watchdog = Watchdog(args.step_timeout, self.rank)
        self.watchdog.beat("startup", timeout=max(args.step_timeout, STARTUP_TIMEOUT_S))
        self.out = Path(args.out)
        self.checkpoint_dir = Path(args.checkpoint_dir)
        self.expected = expected_checkpoint(args, self.world, plan.deepspeed_config, dict(os.environ))
        self.writer = checkpoint.CheckpointWriter(
            self.checkpoint_dir, rank=self.rank, world_size=self.world, keep=args.keep_checkpoints
        )
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.corpus = load_corpus(args.data)
        model = build_model(args.model_size, n_positions=args.seq_len, seed=args.seed).to(self.device)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.engine = None
        self.ema = None
        build = {
            "ddp": self._build_ddp,
            "sharded": self._build_ddp,
            "fsdp2": self._build_fsdp2,
            "deepspeed": self._build_deepspeed,
        }[args.setup]
        build(model)
        if args.polyak is not None and self.ema is None:
            from sm3_dist.averaging import polyak

            self.ema = polyak(self.raw_model, decay=args.polyak)
        self.start_step = 0
        if plan.resume is not None:
            self._load(plan.resume)
        self.metrics = open(self.out / "metrics.jsonl", "a") if self.rank == 0 else None  # noqa: SIM115

    # ------------------------------------------------------------------ setups

    def _init_accelerate_plugin(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=self.args.pg_timeout))
        self.accelerator = Accelerator(kwargs_handlers=[timeout])

    def _schedule(self, optimizer) -> None:
        from sm3_dist.schedules import warmup_cooldown

        self.scheduler = warmup_cooldown(
            optimizer,
            self.args.steps,
            warmup_fraction=self.args.warmup_fraction,
            cooldown_fraction=self.args.cooldown_fraction,
        )

    def _build_ddp(self, model) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.raw_model = model
        self.model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = _make_optimizer(
            self.args.optimizer, self.model.parameters(), self.args, sharded=self.args.setup == "sharded"
        )
        self.state_optimizer = self.optimizer
        self._schedule(self.optimizer)

    def _build_fsdp2(self, model) -> None:
        if self.accelerator is not None:
            optimizer = _make_optimizer(self.args.optimizer, model.parameters(), self.args, sharded=False)
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
            self.raw_model = self.model
            self.state_optimizer = optimizer
            self._schedule(optimizer)
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        if self.args.polyak is not None:
            # FSDP modules cannot be deep-copied: average a copy made before sharding, sharded the same way
            from sm3_dist.averaging import polyak

            self.ema = polyak(model, decay=self.args.polyak)
            for m in (self.ema.module, model):
                for block in m.transformer.h:
                    fully_shard(block, mesh=mesh)
                fully_shard(m, mesh=mesh)
        else:
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        self.raw_model = self.model = model
        self.optimizer = _make_optimizer(self.args.optimizer, model.parameters(), self.args, sharded=False)
        self.state_optimizer = self.optimizer
        self._schedule(self.optimizer)

    def _build_deepspeed(self, model) -> None:
        import deepspeed
        import sm3_dist.integrations.deepspeed  # noqa: F401  (registers "type": "SM3")

        args = self.args
        if self.accelerator is not None:
            plugin = self.accelerator.state.deepspeed_plugin
            config, from_config = _fill_deepspeed_config(plugin.deepspeed_config, args, self.world)
            plugin.deepspeed_config.clear()
            plugin.deepspeed_config.update(config)
            if from_config:
                from accelerate.utils import DummyOptim

                optimizer = DummyOptim(model.parameters(), lr=args.lr)
            else:
                optimizer = _make_optimizer(args.optimizer, model.parameters(), args, sharded=False)
            engine, self.optimizer = self.accelerator.prepare(model, optimizer)
        else:
            config, from_config = _fill_deepspeed_config(self.plan.deepspeed_config, args, self.world)
            client = None if from_config else _make_optimizer(args.optimizer, model.parameters(), args, sharded=False)
            engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, model_parameters=list(model.parameters()), optimizer=client, config=config
            )
        self.engine = self.model = engine
        self.raw_model = engine.module
        self.state_optimizer = engine.basic_optimizer
        self._release_deepspeed_shm()
        if args.optimizer == "sm3":
            from sm3_dist.integrations.deepspeed import check_engine

            check_engine(engine)
        self._schedule(engine.basic_optimizer)

    def _release_deepspeed_shm(self) -> None:
        """Unlink this rank's DeepSpeed CPU all-reduce buffer from ``/dev/shm`` once every rank has mapped it.

        DeepSpeed's CPU communication (``DS_ACCELERATOR=cpu``, all ranks on one host)
        creates a 66 MB ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
        per rank and never removes it: every run, and every killed one, would leave
        them behind and fill the host's shared memory. The mappings stay valid after
        the unlink.
        """
        import torch.distributed as dist

        if self.device.type != "cpu":
            return
        dist.barrier()  # every rank has opened every other rank's buffer in deepspeed.initialize
        addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
        path = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{self.rank}"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    # ------------------------------------------------------------------ steps

    def _loss(self, windows, *, reduction: str = "mean"):
        import torch.nn.functional as F

        windows = windows.to(self.device, non_blocking=True)
        logits = self.model(input_ids=windows[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten(), reduction=reduction)

    def _lr(self) -> float:
        return float(self.state_optimizer.param_groups[0]["lr"])

    def train_step(self, step: int) -> float:
        import torch
        import torch.distributed as dist
        from sm3_dist.launch.data import train_batch

        args = self.args
        batch = train_batch(
            self.corpus.train,
            step=step,
            global_batch=args.batch_size,
            seq_len=args.seq_len,
            seed=args.seed,
            rank=self.rank,
            world_size=self.world,
        )
        checkpoint.fault("step", step, self.rank)
        loss = self._loss(batch)
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            if self.accelerator is not None:
                self.accelerator.backward(loss)
            else:
                loss.backward()
            if checkpoint.fault("grad", step, self.rank):
                self._poison_gradients()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.raw_model)
        value = loss.detach().float().reshape(1)
        dist.all_reduce(value)
        return float(value.item()) / self.world if torch.isfinite(value).all() else float("nan")

    def _poison_gradients(self) -> None:
        """Test-only (``SM3_DIST_TEST_FAULT=nan@grad:STEP:RANK``): NaN in this rank's local gradients."""
        from sm3_dist.placement import to_local

        for p in self.raw_model.parameters():
            if p.grad is not None:
                to_local(p.grad).fill_(float("nan"))

    def skipped_steps(self) -> int | None:
        """The optimizer's count of steps skipped for a non-finite gradient (``None`` if it keeps none)."""
        value = getattr(self.state_optimizer, "skipped_steps", None)
        return int(value) if value is not None else None

    def evaluate(self) -> float:
        import torch
        import torch.distributed as dist
        from sm3_dist.launch.data import eval_windows

        args = self.args
        windows = eval_windows(
            self.corpus.held_out,
            seq_len=args.seq_len,
            max_windows=args.eval_windows,
            rank=self.rank,
            world_size=self.world,
        )
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for chunk in windows.split(max(1, args.batch_size // self.world)):
                total[0] += self._loss(chunk, reduction="sum").double()
                total[1] += chunk[:, 1:].numel()
        self.model.train()
        if self.args.setup == "fsdp2" and self.accelerator is None:
            self.model.reshard()  # the root keeps its parameters unsharded after a forward with no backward
        dist.all_reduce(total)
        return float(total[0] / total[1])

    def evaluate_polyak(self) -> float | None:
        if self.ema is None:
            return None
        from sm3_dist.averaging import averaged_weights

        with averaged_weights(self.raw_model, self.ema):
            return self.evaluate()

    # ------------------------------------------------------------------ checkpoints

    def _dcp_state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.ema is not None:
            state["polyak"] = self.ema.state_dict()
        return state

    def save(self, step: int) -> Path:
        """A checkpoint of ``step``, written atomically with a manifest (collective)."""
        return self.writer.save(step, lambda staging: self._write_checkpoint(staging, step), self.expected)

    def _write_checkpoint(self, path: Path, step: int) -> None:
        import torch

        extra: dict[str, Any] = {}
        if self.engine is not None:
            if self.ema is not None:
                extra["polyak"] = self.ema.state_dict()
            self.engine.save_checkpoint(str(path), tag="deepspeed", client_state={}, save_latest=False)
        elif self.accelerator is not None:
            self.accelerator.save_state(str(path / "accelerate"))
        else:
            import torch.distributed.checkpoint as dcp

            dcp.save(self._dcp_state(), checkpoint_id=str(path / "dcp"))
        if self.rank == 0:
            torch.save({"step": step, "scheduler": self.scheduler.state_dict(), **extra}, path / TRAINER_FILE)

    def save_final_weights(self, path: Path) -> None:
        """The full model state dict, written by rank 0 (collective: FSDP2 and ZeRO-3 gather their shards)."""
        import torch

        if self.accelerator is not None:
            state = self.accelerator.get_state_dict(self.model)
        elif self.args.setup == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(self.model, options=options)
        elif self.engine is not None and self.engine.zero_optimization_stage() == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.raw_model.state_dict()
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, path)

    def _load(self, path: Path) -> None:
        import torch

        trainer = torch.load(path / TRAINER_FILE, weights_only=False, map_location="cpu")
        if self.engine is not None:
            load_path, _ = self.engine.load_checkpoint(str(path), tag="deepspeed")
            if load_path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint in {path}")
        elif self.accelerator is not None:
            self.accelerator.load_state(str(path / "accelerate"))
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict

            state = self._dcp_state()
            dcp.load(state, checkpoint_id=str(path / "dcp"))
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            if self.ema is not None:
                self.ema.load_state_dict(state["polyak"])
        if self.ema is not None and "polyak" in trainer:
            self.ema.load_state_dict(trainer["polyak"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.start_step = int(trainer["step"])

    # ------------------------------------------------------------------ the loop

    def _write(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def train(self) -> None:
        import torch.distributed as dist
        from tqdm import tqdm

        import sm3_dist

        args = self.args
        tokens_per_step = args.batch_size * args.seq_len
        pids: list[Any] = [None] * self.world
        dist.all_gather_object(pids, os.getpid())
        if self.start_step == 0:
            record = {"kind": "config", "world_size": self.world, "n_params": self.n_params, **vars(args)}
        else:
            record = {"kind": "resume", "step": self.start_step, "from": str(self.plan.resume)}
            record["skipped"] = [{"path": path, "reason": reason} for path, reason in self.plan.skipped]
        self._write({**record, "pids": pids})
        # a thread lock: tqdm's default also makes a multiprocessing lock, a named semaphore that a rank ending
        # with os._exit would leave behind ("resource_tracker: ... leaked semaphore objects")
        tqdm.set_lock(threading.RLock())
        bar = tqdm(
            total=args.steps,
            initial=self.start_step,
            disable=self.rank != 0,
            desc=f"{args.optimizer}/{args.setup}",
            unit="step",
            mininterval=1.0,
            dynamic_ncols=True,
        )
        if self.rank == 0 and self.start_step == 0:
            bar.write(
                f"GPT-2 {args.model_size} ({self.n_params / 1e6:.2f}M params), {args.setup}, {self.world} "
                f"processes on {self.device.type}, {args.optimizer} lr {args.lr:g}, batch {args.batch_size} x "
                f"{args.seq_len}, {args.steps} steps, corpus {self.corpus.name} "
                f"({self.corpus.train.numel()} train / {self.corpus.held_out.numel()} held-out bytes) -> {self.out}"
            )
        started = time.perf_counter()
        recent: list[float] = []
        loss = eval_loss = eval_polyak = float("nan")
        measured_tokens, measured_time = 0, 0.0
        for step in range(self.start_step + 1, args.steps + 1):
            self.watchdog.beat(f"step {step}")
            t0 = time.perf_counter()
            lr = self._lr()
            with self._collectives(step, "training step"):
                loss = self.train_step(step)
            dt = time.perf_counter() - t0
            if step > self.start_step + 1:  # the first step pays for warm-up work
                measured_tokens += tokens_per_step
                measured_time += dt
            recent = [*recent[-(args.log_every - 1) :], dt] if args.log_every > 1 else [dt]
            tps = tokens_per_step * len(recent) / sum(recent)
            record = {"kind": "train", "step": step, "loss": loss, "lr": lr, "tokens_per_s": tps, "step_s": dt}
            record["skipped_steps"] = self.skipped_steps()
            if self.engine is not None:
                record["overflow_skipped_steps"] = int(getattr(self.engine, "skipped_steps", 0))
            record["elapsed_s"] = time.perf_counter() - started
            self._write(record)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss} at step {step}")
            bar.update(1)
            if step % args.log_every == 0 or step == args.steps:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", tok_s=f"{tps:.0f}")
            if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
                self.watchdog.beat(f"evaluation at step {step}")
                with self._collectives(step, "evaluation"):
                    eval_loss = self.evaluate()
                    eval_polyak = self.evaluate_polyak()
                self._write({"kind": "eval", "step": step, "eval_loss": eval_loss, "eval_loss_polyak": eval_polyak})
                if self.rank == 0:
                    extra = f", Polyak {eval_polyak:.4f}" if eval_polyak is not None else ""
                    bar.write(f"step {step}: train loss {loss:.4f}, held-out loss {eval_loss:.4f}{extra}")
            if args.checkpoint_every and (step % args.checkpoint_every == 0 or step == args.steps):
                self.watchdog.beat(f"checkpoint of step {step}")
                with self._collectives(step, "checkpoint"):
                    saved = self.save(step)
                if self.rank == 0:
                    bar.write(f"step {step}: checkpoint {saved}")
        bar.close()
        self.watchdog.beat("the end of the run")
        if args.final_weights:
            with self._collectives(args.steps, "final weights"):
                self.save_final_weights(Path(args.final_weights))
        wall = time.perf_counter() - started
        per_rank = [None] * self.world
        mine = (sm3_dist.local_state_bytes(self.state_optimizer), _peak_memory_bytes(self.device))
        dist.all_gather_object(per_rank, mine)
        summary = {
            "kind": "summary",
            "steps": args.steps,
            "final_loss": loss,
            "eval_loss": eval_loss,
            "eval_loss_polyak": eval_polyak,
            "tokens_per_s": measured_tokens / measured_time if measured_time else None,
            "wall_s": wall,
            "optimizer_state_bytes": [s for s, _ in per_rank],
            "peak_memory_bytes": [m for _, m in per_rank],
            "peak_memory_kind": "cuda_max_memory_allocated" if self.device.type == "cuda" else "max_rss",
            "skipped_steps": self.skipped_steps(),
        }
        self._write(summary)
        if self.rank == 0:
            self._print_summary(summary)
            if not args.no_plot:
                from sm3_dist.launch.plot import plot_runs

                plot_runs([(args.optimizer, self.out / "metrics.jsonl")], self.out / "loss.png")
                print(f"wrote {self.out / 'metrics.jsonl'} and {self.out / 'loss.png'}", flush=True)

    @contextlib.contextmanager
    def _collectives(self, step: int, what: str):
        """Re-raise a failed or timed-out collective with the step, the rank and ``--pg-timeout``."""
        try:
            yield
        except RuntimeError as e:
            kind = _comm_failure(e)
            if kind is None:
                raise
            timeout = f"--pg-timeout {self.args.pg_timeout:g} s"
            if kind == "timeout":
                why = f"a collective did not complete within the process-group timeout ({timeout})"
                why += ": another rank hung or died"
            else:
                why = f"a collective lost its connection to another rank, which died or was killed ({timeout})"
            raise RuntimeError(f"rank {self.rank}, step {step} ({what}): {why}. Cause: {e}") from e

    def _print_summary(self, s: dict) -> None:
        lines = [
            f"final train loss   {s['final_loss']:.4f}",
            f"held-out loss      {s['eval_loss']:.4f}"
            + (f" (Polyak {s['eval_loss_polyak']:.4f})" if s["eval_loss_polyak"] is not None else ""),
            f"tokens/s           {s['tokens_per_s']:.0f}" if s["tokens_per_s"] else "tokens/s           -",
            f"wall time          {s['wall_s']:.1f} s",
        ]
        for r, (state, peak) in enumerate(zip(s["optimizer_state_bytes"], s["peak_memory_bytes"])):
            kind = "peak RSS" if s["peak_memory_kind"] == "max_rss" else "peak CUDA"
            lines.append(f"rank {r}: optimizer state {_fmt_bytes(state)}, {kind} {_fmt_bytes(peak)}")
        print("\n".join(lines), flush=True)

    def close(self) -> None:
        import torch.distributed as dist

        self.watchdog.stop()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if dist.is_initialized():
            dist.destroy_process_group()


_TIMEOUT_MARKS = ("timed out", "timeout", "deadline exceeded")
_CONNECTION_MARKS = ("connection reset", "connection closed", "connection refused", "broken pipe", "read error",
                     "nccl error", "remote worker", "peer")  # fmt: skip


def _comm_failure(e: BaseException) -> str | None:
    """``"timeout"`` or ``"connection"`` when ``e`` is a failed collective (gloo/NCCL), else ``None``."""
    import torch.distributed as dist

    text = str(e).lower()
    if any(mark in text for mark in _TIMEOUT_MARKS):
        return "timeout"
    if isinstance(e, dist.DistError) or any(mark in text for mark in _CONNECTION_MARKS):
        return "connection"
    return None


def _fill_deepspeed_config(config: dict, args: argparse.Namespace, world_size: int) -> tuple[dict, bool]:
    """The config with this run's batch sizes and optimizer; True if DeepSpeed builds the optimizer from it."""
    config = json.loads(json.dumps(config))
    config["train_batch_size"] = args.batch_size
    config["train_micro_batch_size_per_gpu"] = args.batch_size // world_size
    config["gradient_accumulation_steps"] = 1
    for key in ("bf16", "fp16"):
        section = config.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = False
    if config.get("gradient_clipping") == "auto":
        config.pop("gradient_clipping")
    config.pop("scheduler", None)  # the job's own warm-up schedule drives the learning rate
    section = config.get("optimizer")
    wanted = DS_OPTIMIZER_TYPES[args.optimizer]
    if args.optimizer == "sm3" and not (isinstance(section, dict) and section.get("type") == wanted):
        section = config["optimizer"] = {"type": wanted, "params": {}}
    from_config = isinstance(section, dict) and str(section.get("type", "")).lower() == wanted.lower()
    if from_config:
        params = section.setdefault("params", {})
        params["lr"] = args.lr
        if "weight_decay" in params or args.weight_decay:
            params["weight_decay"] = args.weight_decay
        if args.optimizer == "sm3":
            params["momentum"] = args.momentum
            params["beta"] = args.beta
            if args.momentum_dtype != "float32":
                params["momentum_dtype"] = args.momentum_dtype
        for key in [k for k, v in params.items() if v == "auto"]:
            params.pop(key)
    else:
        config.pop("optimizer", None)
        if args.optimizer in ("adagrad", "adafactor"):
            config["zero_allow_untested_optimizer"] = True
    return config, from_config


def _run(plan: Plan) -> int:
    trainer = Trainer(plan)
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    code = main()
    if _launched(dict(os.environ)):
        from sm3_dist.comm import end_process

        end_process(code)
    sys.exit(code)
