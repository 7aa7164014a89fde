"""The training job's command line: parsing, validation against the environment, and what a run records.

Nothing here starts a process or a process group, and nothing uses torch beyond
asking whether CUDA exists: :func:`validate` runs in the launching process (and
again in each rank started by a launcher) and turns a command line into a
:class:`Plan`, or raises :class:`UsageError` naming the problem, which the
entry point prints with exit code 2 before any process group starts.

The setups and what each asks of the command line are the table
:data:`SETUPS`; the backend classes that run them are in
:mod:`sm3_dist.launch.backends`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sm3_dist.launch import checkpoint
from sm3_dist.launch.data import STDLIB, VOCAB_SIZE
from sm3_dist.launch.defaults import SCHEDULE, SM3_RECOMMENDED, default_lr
from sm3_dist.launch.model import SIZES

__all__ = [
    "OPTIMIZERS",
    "SETUPS",
    "Plan",
    "UsageError",
    "build_parser",
    "expected_checkpoint",
    "launched",
    "optimizer_config",
    "validate",
]

OPTIMIZERS = ("sm3", "adamw", "adagrad", "adafactor")
DEFAULT_BATCH_SIZE = 16
DEFAULT_PG_TIMEOUT_S = 600.0
DS_OPTIMIZER_TYPES = {"sm3": "SM3", "adamw": "AdamW", "adagrad": "Adagrad", "adafactor": "Adafactor"}
"""The ``"optimizer": {"type": ...}`` name of each optimizer in a DeepSpeed config."""
DEFAULT_DEEPSPEED_CONFIG = {"zero_optimization": {"stage": 2}, "zero_force_ds_cpu_optimizer": False}
"""Used by ``--setup deepspeed`` without ``--deepspeed-config``."""


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
    p.add_argument("--compare", default=None, metavar="OPT,OPT",
                   help="run each listed optimizer at the same steps (into OUT/<name>) and plot all in OUT/compare.png")  # fmt: skip
    p.add_argument("--setup", default=None, choices=tuple(SETUPS),
                   help="how the model and optimizer are distributed (default ddp; deepspeed under accelerate's DeepSpeed plugin)")  # fmt: skip
    p.add_argument("--deepspeed-config", default=None, help="DeepSpeed JSON config for --setup deepspeed")
    p.add_argument("--model-size", default="tiny", help="tiny, small, gpt2 (=124M), medium, large, xl")
    p.add_argument("--data", default=None,
                   help=f"a text file to train on instead of pydoc_data.topics; {STDLIB}: the Python standard "
                   "library's source")  # fmt: skip
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch (sequences per step, all ranks); default 16, or what a DeepSpeed config fixes")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: per optimizer, model size and SM3's beta, launch/defaults.py)",
    )
    p.add_argument("--momentum", type=float, default=SM3_RECOMMENDED["momentum"],
                   help="SM3 momentum (0 keeps no momentum buffer)")  # fmt: skip
    p.add_argument("--momentum-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="SM3 momentum storage: bfloat16 halves it (computed in fp32)")  # fmt: skip
    p.add_argument("--beta", type=float, default=SM3_RECOMMENDED["beta"],
                   help="SM3 beta: (0, 1) moving average of squared gradients (the measured best form); 0: the "
                   "paper's running sum (SM3-II), which takes a larger default rate")  # fmt: skip
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction,
                   default=SM3_RECOMMENDED["bias_correction"],
                   help="SM3 with beta > 0: divide the average by 1 - beta^t in the update, as Adam does "
                   "(no effect with --beta 0)")  # fmt: skip
    p.add_argument("--update-clip", type=float, default=SM3_RECOMMENDED["update_clip"], metavar="C",
                   help="SM3: clip each coordinate of the preconditioned update to [-C, C] before momentum "
                   "(0: the paper's unclipped rule)")  # fmt: skip
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-grad-norm", type=float, default=0.0, metavar="NORM",
                   help="clip the gradients' global L2 norm to NORM before each step, every optimizer (0: no clip; "
                   "under DeepSpeed the config's gradient_clipping)")  # fmt: skip
    p.add_argument("--warmup-fraction", type=float, default=SCHEDULE["warmup_fraction"],
                   help="quadratic warm-up over this part of the run (every optimizer)")  # fmt: skip
    p.add_argument("--cooldown-fraction", type=float, default=SCHEDULE["cooldown_fraction"],
                   help="linear decay to 0 over this final part (every optimizer; 0: none)")  # fmt: skip
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


def launched(env: Mapping[str, str]) -> bool:
    """Whether a launcher (torchrun, accelerate, deepspeed) started this process: ``RANK`` and ``WORLD_SIZE`` set."""
    return "RANK" in env and "WORLD_SIZE" in env


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").lower() in ("1", "true", "yes")


def _cuda_available() -> bool:
    import torch  # only asked when an accelerate FSDP config is used

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True, slots=True)
class Plan:
    """What a validated command line runs."""

    args: argparse.Namespace
    """The parsed options, with defaults filled in (setup, lr, batch size, out, checkpoint dir)."""
    world_size: int
    """Processes of the run (from the launcher's environment, or ``--nproc``)."""
    launched: bool
    """Started by torchrun/accelerate/deepspeed (``RANK``/``WORLD_SIZE`` set): start no processes."""
    accelerate: str | None
    """``"deepspeed"`` or ``"fsdp"`` when accelerate's plugin configures the run."""
    deepspeed_config: dict | None
    """The DeepSpeed config this run passes on (``--setup deepspeed`` only)."""
    zero_stage: int | None
    """DeepSpeed's ZeRO stage, where the config or accelerate's environment says it."""
    resume: Path | None
    """The checkpoint to resume from."""
    skipped: tuple[tuple[str, str], ...] = ()
    """Newer checkpoints that ``--resume auto`` passed over: (path, why)."""

    @property
    def backend(self) -> tuple[str, str | None]:
        """The key of :data:`sm3_dist.launch.backends.BACKENDS` that runs this plan: (setup, accelerate plugin)."""
        return self.args.setup, self.accelerate


@dataclass
class _Draft:
    """A plan in the making, handed to a setup's check."""

    args: argparse.Namespace
    env: dict[str, str]
    names: list[str]
    world_size: int
    accelerate: str | None
    batch_given: bool
    lr_given: bool
    deepspeed_config: dict | None = None
    zero_stage: int | None = None


@dataclass(frozen=True, slots=True)
class Setup:
    """A value of ``--setup``: what it asks of the command line, and how its checkpoints behave."""

    reshardable: bool
    """Its checkpoints load at another world size (DCP: yes; DeepSpeed's own format: no)."""
    sm3_only: bool = False
    """It shards SM3's state itself, so baselines cannot run under it."""
    check: Callable[[_Draft], None] | None = None
    """Further checks (and defaults) of this setup's options."""


def _ds_config_from_file(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"DeepSpeed config {path!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"DeepSpeed config {path!r} is not valid JSON: {e}") from None


def _check_deepspeed(d: _Draft) -> None:
    args = d.args
    try:
        import deepspeed  # noqa: F401  (only whether it is installed)
    except ImportError as e:
        raise UsageError(
            f"--setup deepspeed needs DeepSpeed installed (pip install sm3-dist[deepspeed]): {e}"
        ) from None
    if d.accelerate == "deepspeed":
        path = d.env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        config = None if path in ("", "none", "None") else _ds_config_from_file(path)
        if d.env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").isdigit():
            d.zero_stage = int(d.env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    elif args.deepspeed_config:
        config = _ds_config_from_file(args.deepspeed_config)
    else:
        config = json.loads(json.dumps(DEFAULT_DEEPSPEED_CONFIG))
    d.deepspeed_config = config
    if config is None:
        return
    stage = d.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0) or 0)
    if stage > 0 and "adafactor" in d.names:
        raise UsageError(
            "Adafactor under ZeRO would see flat partitions, not matrices (no factored state): "
            "compare it under --setup ddp or fsdp2"
        )
    if stage == 3 and args.polyak is not None:
        raise UsageError("--polyak is not supported with ZeRO-3 (the weights are partitioned)")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu"):
        value = config.get(key, "auto")
        per = d.world_size if key == "train_micro_batch_size_per_gpu" else 1
        if value != "auto" and not d.batch_given:
            args.batch_size = int(value) * per
            d.batch_given = True
        if value != "auto" and int(value) * per != args.batch_size:
            raise UsageError(
                f"the DeepSpeed config sets {key}={value}, which disagrees with --batch-size "
                f'{args.batch_size} over {d.world_size} processes: set it to "auto"'
            )
    section = config.get("optimizer") or {}
    lr = section.get("params", {}).get("lr")
    if not d.lr_given and section.get("type") == DS_OPTIMIZER_TYPES[d.names[0]] and isinstance(lr, (int, float)):
        args.lr = float(lr)


SETUPS: dict[str, Setup] = {
    "ddp": Setup(reshardable=True),
    "sharded": Setup(reshardable=True, sm3_only=True),
    "fsdp2": Setup(reshardable=True),
    "deepspeed": Setup(reshardable=False, check=_check_deepspeed),
}
"""``--setup`` values: ``ddp`` (torch DDP, the optimizer on every rank), ``sharded`` (``ShardedSM3`` under DDP),
``fsdp2`` (``fully_shard`` per block and the root), ``deepspeed`` (``deepspeed.initialize``, or accelerate's
DeepSpeed plugin)."""


def _accelerate_plugin(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    """The accelerate plugin that configures this run (``"fsdp"``, ``"deepspeed"`` or None); sets ``args.setup``."""
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
        return "fsdp"
    if _env_flag(env, "ACCELERATE_USE_DEEPSPEED"):
        if args.setup not in (None, "deepspeed"):
            raise UsageError(f"accelerate's DeepSpeed plugin configures this run; --setup {args.setup} conflicts")
        if args.deepspeed_config is not None:
            raise UsageError("accelerate's DeepSpeed plugin configures this run: put the JSON in its YAML instead")
        args.setup = "deepspeed"
        return "deepspeed"
    return None


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "seq_len", "eval_windows", "log_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("eval_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
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
    if not (args.update_clip >= 0 and math.isfinite(args.update_clip)):
        raise UsageError(f"--update-clip must be >= 0 (0: no clip), got {args.update_clip}")
    if not (args.clip_grad_norm >= 0 and math.isfinite(args.clip_grad_norm)):
        raise UsageError(f"--clip-grad-norm must be >= 0, got {args.clip_grad_norm}")
    if args.polyak is not None and not 0.0 <= args.polyak < 1.0:
        raise UsageError(f"--polyak decay must be in [0, 1), got {args.polyak}")
    for name in ("warmup_fraction", "cooldown_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.warmup_fraction + args.cooldown_fraction > 1.0:
        raise UsageError("--warmup-fraction + --cooldown-fraction exceeds the whole run")


def optimizer_names(args: argparse.Namespace) -> list[str]:
    """The optimizers a command line runs: those of ``--compare``, else ``--optimizer``."""
    return [n.strip() for n in args.compare.split(",")] if args.compare else [args.optimizer]


def validate(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Plan:
    """Check the command line against the environment; raise :class:`UsageError` on bad input.

    ``args`` is left as parsed; the plan holds a copy with every default filled in.
    """
    env = dict(os.environ if env is None else env)
    args = argparse.Namespace(**vars(args))
    names = optimizer_names(args)
    for name in names:
        if name not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {name!r}: choose from {', '.join(OPTIMIZERS)}")
    if args.compare and len(names) < 2:
        raise UsageError("--compare needs at least two optimizers, e.g. --compare sm3,adamw")
    is_launched = launched(env)
    if args.compare and is_launched:
        raise UsageError(
            "--compare starts its own runs: run it as `sm3-dist train --compare ...`, not under a launcher"
        )
    world_size = int(env["WORLD_SIZE"]) if is_launched else args.nproc
    if world_size < 1:
        raise UsageError(f"--nproc must be at least 1, got {world_size}")
    batch_given, lr_given = args.batch_size is not None, args.lr is not None
    if not batch_given:
        args.batch_size = DEFAULT_BATCH_SIZE
    _check_numbers(args)
    if args.model_size not in SIZES:
        raise UsageError(f"unknown model size {args.model_size!r}: choose from {', '.join(SIZES)}")
    if args.data is not None and args.data != STDLIB and not Path(args.data).is_file():
        raise UsageError(f"--data {args.data!r} is not a file (nor {STDLIB!r})")

    accelerate = _accelerate_plugin(args, env)
    args.setup = args.setup or "ddp"
    setup = SETUPS[args.setup]
    if setup.sm3_only and any(n != "sm3" for n in names):
        raise UsageError(f"--setup {args.setup} shards SM3's state: use --optimizer sm3 (or --setup ddp for baselines)")
    if args.deepspeed_config is not None and args.setup != "deepspeed":
        raise UsageError("--deepspeed-config is only used with --setup deepspeed")
    draft = _Draft(args, env, names, world_size, accelerate, batch_given, lr_given)
    if setup.check is not None:
        setup.check(draft)
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
        args.lr = default_lr(args.optimizer, args.model_size, beta=args.beta)
    plan = Plan(args, world_size, is_launched, accelerate, draft.deepspeed_config, draft.zero_stage, None)
    if args.resume is None or args.compare:
        return plan
    return _with_resume(plan, env)


def _with_resume(plan: Plan, env: Mapping[str, str]) -> Plan:
    args = plan.args
    try:
        resume, passed_over = checkpoint.resolve(args.resume, Path(args.checkpoint_dir), expected_checkpoint(plan))
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    skipped = tuple((str(path), reason) for path, reason in passed_over)
    if resume is not None:
        step = checkpoint.step_of(resume)
        step = json.loads((resume / checkpoint.MANIFEST_FILE).read_text())["step"] if step is None else step
        if step >= args.steps:
            raise UsageError(f"checkpoint {resume} is at step {step}, not before --steps {args.steps}")
    if env.get("RANK", "0") == "0":
        for path, reason in skipped:
            print(f"sm3-dist train: skipping checkpoint {path}: {reason}", file=sys.stderr, flush=True)
        if skipped:
            where = f"the older checkpoint {resume}" if resume is not None else "no checkpoint"
            print(f"sm3-dist train: resuming from {where}", file=sys.stderr, flush=True)
    return replace(plan, resume=resume, skipped=skipped)


# ---------------------------------------------------------------------------------------------- what a run records


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The model's shape as a checkpoint's manifest records it."""
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
    if args.clip_grad_norm > 0:
        config["clip_grad_norm"] = args.clip_grad_norm
    if args.optimizer == "sm3":
        config.update(momentum=args.momentum, beta=args.beta, momentum_dtype=args.momentum_dtype,
                      bias_correction=bool(args.bias_correction and args.beta > 0),
                      update_clip=args.update_clip)  # fmt: skip
    section = (deepspeed_config or {}).get("optimizer") or {}
    if isinstance(section, dict) and str(section.get("type", "")).lower() == DS_OPTIMIZER_TYPES[args.optimizer].lower():
        fixed = {"lr", "weight_decay", "momentum", "beta", "momentum_dtype", "bias_correction", "update_clip"}
        extra = {k: v for k, v in (section.get("params") or {}).items() if k not in fixed and v != "auto"}
        if extra:
            config["deepspeed_params"] = extra
    if deepspeed_config is not None and deepspeed_config.get("gradient_clipping", "auto") != "auto":
        config["gradient_clipping"] = deepspeed_config["gradient_clipping"]
    return config


def expected_checkpoint(plan: Plan) -> checkpoint.Expected:
    """What this run writes into a checkpoint's manifest, and what it needs from one to resume."""
    args = plan.args
    return checkpoint.Expected(
        setup=args.setup,
        optimizer=args.optimizer,
        model_size=args.model_size,
        model=model_config(args),
        optimizer_config=optimizer_config(args, plan.deepspeed_config),
        world_size=plan.world_size,
        reshardable=SETUPS[args.setup].reshardable,
        zero_stage=plan.zero_stage,
    )
