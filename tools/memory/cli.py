"""The ``sm3-dist memory`` command."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict

from sm3_dist.tools.memory.activations import (
    ActivationModel,
    activation_bytes_per_token,
    largest_model,
    max_micro_batch,
)
from sm3_dist.tools.memory.model import (
    BUDGETS_GIB,
    DEFAULT_SIZES,
    GIB,
    OPTIMIZERS,
    PRECISIONS,
    SETUPS,
    WORLD_SIZES,
    _check_choice,
    rank_memory,
    resolve_size,
)
from sm3_dist.tools.memory.report import (
    Report,
    Tolerances,
    failures,
    plot_max_params,
    plot_memory_vs_world,
    print_report,
    write_outputs,
)

__all__ = ["main"]


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sm3-dist memory",
        description="Per-rank memory of data-parallel training by optimizer and setup, the largest micro-batch "
        "and model a budget allows, and a check of the model against real optimizer instances.",
    )
    p.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="model sizes: names or LAYERSxHIDDEN")
    p.add_argument("--world-sizes", default=",".join(map(str, WORLD_SIZES)), help="data-parallel world sizes")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"from {', '.join(SETUPS)}")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"from {', '.join(OPTIMIZERS)}")
    p.add_argument(
        "--precision",
        default="fp32,bf16-mixed",
        help="fp32, bf16-mixed (bf16 params/grads, fp32 master weights and state) and/or bf16-autocast (fp32 "
        "params/grads/state, bf16 compute); the last one is the headline (default fp32,bf16-mixed)",
    )
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS_GIB)), help="per-rank budgets in GiB")
    p.add_argument("--table-world", type=int, default=8, help="world size of the terminal tables (default 8)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sample for the activation model")
    p.add_argument("--attention", choices=("flash", "eager"), default="flash", help="attention kernel")
    p.add_argument("--no-dropout", action="store_true", help="no dropout masks in the activation model")
    p.add_argument(
        "--measure",
        choices=("full", "tiny", "none"),
        default="tiny",
        help="validate on CPU: optimizer state of real optimizers (the tiny config on one process, every setup's "
        "layouts, ShardedSM3 on 2 processes; full adds GPT-2 124M), activation bytes autograd keeps and whole-step "
        "peaks of the training job's model (tiny: small shapes; full: the README tables) (default tiny)",
    )
    p.add_argument("--tolerance", type=float, default=0.02, help="optimizer state: largest relative error (0.02)")
    p.add_argument("--activation-tolerance", type=float, default=0.05, help="activations: largest relative error")
    p.add_argument("--step-tolerance", type=float, default=0.10, help="whole-step peaks: largest relative error")
    p.add_argument(
        "--measure-cuda",
        action="store_true",
        help="on a CUDA device only: whole-step peaks (torch.cuda.max_memory_allocated) against the prediction for "
        "AdamW and SM3, and the largest micro-batch and depth that train under --cuda-budget-gib; writes "
        "cuda-memory.json and cuda-memory.md to --out and nothing else",
    )
    p.add_argument("--cuda-budget-gib", type=float, default=4.0, help="budget of the --measure-cuda searches (GiB)")
    p.add_argument("--out", default="sm3-memory", help="output folder (default ./sm3-memory)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def _parse_ints(text: str, what: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in _split(text)]
    except ValueError:
        raise ValueError(f"{what} must be integers, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{what} must be integers >= {minimum}, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return _run(args)
    except ValueError as exc:
        print(f"sm3-dist memory: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    configs = [resolve_size(s) for s in _split(args.sizes)]
    if not configs:
        raise ValueError("no model size given")
    worlds = _parse_ints(args.world_sizes, "world sizes", 1)
    setups = _split(args.setups)
    for s in setups:
        _check_choice(s, SETUPS, "setup")
    optimizers = _split(args.optimizers)
    for o in optimizers:
        _check_choice(o, OPTIMIZERS, "optimizer")
    precisions = _split(args.precision)
    for p in precisions:
        _check_choice(p, PRECISIONS, "precision")
    if not setups or not optimizers or not precisions:
        raise ValueError("at least one setup, optimizer and precision is needed")
    try:
        budgets = [float(b) for b in _split(args.budgets)]
    except ValueError:
        raise ValueError(f"budgets must be numbers of GiB, got {args.budgets!r}") from None
    if not budgets or any(not b > 0 for b in budgets):
        raise ValueError(f"budgets must be positive numbers of GiB, got {args.budgets!r}")
    if args.table_world < 1 or args.seq_len < 1:
        raise ValueError("--table-world and --seq-len must be >= 1")
    for name in ("tolerance", "activation_tolerance", "step_tolerance", "cuda_budget_gib"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    tolerances = Tolerances(state=args.tolerance, activations=args.activation_tolerance, step=args.step_tolerance)
    if args.measure_cuda:
        from sm3_dist.tools.memory.cuda import run_cuda_study

        return run_cuda_study(args.out, budget_gib=args.cuda_budget_gib, tolerance=args.step_tolerance)
    headline = precisions[-1]
    table_world = args.table_world
    for config in configs:
        for precision in precisions:
            smallest = min(rank_memory(config, s, w, "sm3", precision).params for s in setups for w in worlds)
            if min(budgets) * GIB < smallest:
                raise ValueError(
                    f"a budget of {min(budgets):g} GiB is smaller than the parameters alone: {config.name} needs "
                    f"{smallest / GIB:.2f} GiB of parameters per rank ({precision}, best of the setups and world sizes given)"
                )
    act_variants = [
        ActivationModel(
            seq_len=args.seq_len,
            checkpointing=ck,
            attention=args.attention,
            dropout=not args.no_dropout,
        )
        for ck in (True, False)
    ]
    report = Report()
    for config in configs:
        for precision in precisions:
            for world in worlds:
                for setup in setups:
                    for o in optimizers:
                        m = rank_memory(config, setup, world, o, precision)
                        report.rows.append(
                            dict(
                                size=config.name,
                                numel=config.numel,
                                precision=precision,
                                world_size=world,
                                setup=setup,
                                optimizer=o,
                                **asdict(m),
                                total=m.total,
                            )
                        )
            for act in act_variants:
                per_token = activation_bytes_per_token(config, act, precision)
                for setup in setups:
                    for o in optimizers:
                        for b in budgets:
                            report.fit.append(
                                dict(
                                    size=config.name,
                                    precision=precision,
                                    world_size=table_world,
                                    setup=setup,
                                    optimizer=o,
                                    budget_gib=b,
                                    checkpointing=act.checkpointing,
                                    seq_len=act.seq_len,
                                    activation_bytes_per_token=per_token,
                                    max_micro_batch=max_micro_batch(
                                        config, setup, table_world, o, int(b * GIB), act, precision
                                    ),
                                )
                            )
    act = act_variants[0]
    for setup in setups:
        for o in optimizers:
            for b in budgets:
                best = largest_model(setup, table_world, o, int(b * GIB), act, headline)
                report.largest.append(
                    dict(
                        precision=headline,
                        world_size=table_world,
                        setup=setup,
                        optimizer=o,
                        budget_gib=b,
                        checkpointing=True,
                        largest=best.name if best else None,
                        largest_numel=best.numel if best else 0,
                    )
                )
    if args.measure != "none":
        _measure(report, args.measure, optimizers)

    os.makedirs(args.out, exist_ok=True)
    print_report(report, configs, setups, optimizers, budgets, headline, table_world, tolerances)
    write_outputs(report, args.out, tolerances)
    if not args.no_plots:
        for config in configs:
            plot_memory_vs_world(
                os.path.join(args.out, f"memory-{config.name}.png"), config, worlds, setups, optimizers, headline
            )
        plot_max_params(os.path.join(args.out, "max-params.png"), table_world, setups, optimizers, headline, act)
    print(f"\noutputs in {os.path.abspath(args.out)} ({time.perf_counter() - started:.1f} s)")
    bad = failures(report, tolerances)
    if bad:
        print(f"FAILED: {len(bad)} measurement(s) disagree with the model beyond their tolerance:")
        for line in bad:
            print(f"  {line}")
        return 1
    return 0


def _measure(report: Report, level: str, optimizers: Sequence[str]) -> None:
    """Every validation on CPU: optimizer state, activations, whole steps (``tiny``: small cases, fast)."""
    from sm3_dist.tools.memory.measure import validate
    from sm3_dist.tools.memory.saved import ACTIVATION_TABLE, QUICK_ACTIVATION_TABLE, validate_activations
    from sm3_dist.tools.memory.step import QUICK_STEP_TABLE, STEP_TABLE, validate_steps

    report.checks = validate(level, optimizers)
    full = level == "full"
    report.activations = validate_activations(ACTIVATION_TABLE if full else QUICK_ACTIVATION_TABLE)
    report.steps = validate_steps(STEP_TABLE if full else QUICK_STEP_TABLE)


if __name__ == "__main__":
    sys.exit(main())
