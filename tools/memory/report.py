"""Tables, CSV/JSON outputs and plots of ``sm3-dist memory``."""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sm3_dist.tools.memory.activations import ActivationModel, largest_model
from sm3_dist.tools.memory.measure import Check
from sm3_dist.tools.memory.model import GIB, GPT2Config, rank_memory
from sm3_dist.tools.memory.saved import ActivationCheck

__all__ = [
    "OPTIMIZER_LABELS",
    "SETUP_LABELS",
    "Report",
    "axes_grid",
    "headline_table",
    "markdown_table",
    "plot_max_params",
    "plot_memory_vs_world",
    "print_report",
    "text_table",
    "write_outputs",
]

SETUP_LABELS = {
    "ddp": "DDP",
    "ddp-sharded": "DDP+sharded",
    "zero1": "ZeRO-1",
    "zero2": "ZeRO-2",
    "zero3": "ZeRO-3",
    "fsdp2": "FSDP2",
}
OPTIMIZER_LABELS = {
    "adam": "Adam",
    "adamw": "AdamW",
    "adagrad": "Adagrad",
    "adafactor": "Adafactor",
    "sm3": "SM3",
    "sm3-momentum": "SM3 + momentum",
    "sm3-bf16-momentum": "SM3 + bf16 momentum",
}


@dataclass(slots=True, kw_only=True)
class Report:
    """Everything one run computes."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    fit: list[dict[str, Any]] = field(default_factory=list)
    largest: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    activations: list[ActivationCheck] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    """Whole-step peaks measured on CPU against the prediction (``predicted``, ``measured``, ``rel_error``)."""


def _gib(n: float) -> float:
    return n / GIB


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; columns after the first are right-aligned."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def activation_rows(checks: Sequence[ActivationCheck]) -> tuple[list[str], list[list[Any]]]:
    """The activation validation as a header and rows (MiB, relative error)."""
    header = [
        "model",
        "seq",
        "batch",
        "precision",
        "checkpointing",
        "attention",
        "predicted MiB",
        "measured MiB",
        "error",
    ]
    rows = []
    for check in checks:
        c = check.case
        attention = c.attention + (" + dropout" if c.dropout else "")
        rows.append(
            [
                f"{c.n_layer}x{c.n_embd}",
                c.seq_len,
                c.batch,
                c.precision,
                "on" if c.checkpointing else "off",
                attention,
                f"{check.predicted / 2**20:.3f}",
                f"{check.measured / 2**20:.3f}",
                f"{100 * check.rel_error:.2f}%",
            ]
        )
    return header, rows


def step_rows(steps: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Whole-step peaks (predicted vs measured) as a header and rows."""
    header = [
        "model",
        "seq x batch",
        "optimizer",
        "precision",
        "checkpointing",
        "predicted MiB",
        "measured MiB",
        "error",
    ]
    rows = [
        [
            f"{r['n_layer']}x{r['n_embd']}",
            f"{r['seq_len']} x {r['batch']}",
            OPTIMIZER_LABELS.get(r["optimizer"], r["optimizer"]),
            r["precision"],
            "on" if r["checkpointing"] else "off",
            f"{r['predicted'] / 2**20:.2f}",
            f"{r['measured'] / 2**20:.2f}",
            f"{100 * (r['predicted'] - r['measured']) / r['measured']:+.2f}%",
        ]
        for r in steps
    ]
    return header, rows


def headline_table(
    config: GPT2Config, world: int, precision: str, setups: Sequence[str], optimizers: Sequence[str]
) -> str:
    """Markdown table: per-rank GiB (total) by optimizer x setup, and what SM3 frees vs Adam."""
    header = ["optimizer", *(SETUP_LABELS[s] for s in setups)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    totals = {(o, s): rank_memory(config, s, world, o, precision).total for o in optimizers for s in setups}
    for o in optimizers:
        lines.append(f"| {OPTIMIZER_LABELS[o]} | " + " | ".join(f"{_gib(totals[o, s]):.2f}" for s in setups) + " |")
    if "adam" in optimizers:
        for o in ("sm3", "sm3-bf16-momentum"):
            if o in optimizers:
                freed = " | ".join(
                    f"{_gib(totals['adam', s] - totals[o, s]):.2f} ({100 * (1 - totals[o, s] / totals['adam', s]):.0f}%)"
                    for s in setups
                )
                lines.append(f"| *{OPTIMIZER_LABELS[o]} frees vs Adam* | {freed} |")
    return "\n".join(lines)


_STYLES = {
    "adam": dict(color="tab:red", ls="-", marker="o"),
    "adamw": dict(color="tab:orange", ls=":", marker="x"),
    "adagrad": dict(color="tab:brown", ls="-", marker="s"),
    "adafactor": dict(color="tab:green", ls="--", marker="^"),
    "sm3": dict(color="tab:blue", ls="-", marker="D"),
    "sm3-momentum": dict(color="tab:purple", ls="--", marker="v"),
    "sm3-bf16-momentum": dict(color="tab:cyan", ls="-.", marker="P"),
}


def axes_grid(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return plt, fig, flat[:n]


def plot_memory_vs_world(
    path: str,
    config: GPT2Config,
    worlds: Sequence[int],
    setups: Sequence[str],
    optimizers: Sequence[str],
    precision: str,
) -> None:
    plt, fig, axes = axes_grid(len(setups))
    for ax, setup in zip(axes, setups):
        for o in optimizers:
            ys = [_gib(rank_memory(config, setup, w, o, precision).total) for w in worlds]
            ax.plot(worlds, ys, ms=4, lw=1.3, label=OPTIMIZER_LABELS[o], **_STYLES[o])
        if len(worlds) > 1:
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(SETUP_LABELS[setup])
        ax.set_xlabel("data-parallel ranks")
        ax.set_ylabel("per-rank model states (GiB)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"GPT-2 {config.name} ({config.numel / 1e9:.2f}B params), {precision}: params + grads + master + "
        "optimizer state + working set per rank"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_max_params(
    path: str, world: int, setups: Sequence[str], optimizers: Sequence[str], precision: str, act: ActivationModel
) -> None:
    budgets = [4, 6, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160]
    plt, fig, axes = axes_grid(len(setups))
    for ax, setup in zip(axes, setups):
        for o in optimizers:
            ys = []
            for b in budgets:
                config = largest_model(setup, world, o, b * GIB, act, precision)
                ys.append(config.numel / 1e9 if config is not None else float("nan"))
            ax.plot(budgets, ys, ms=4, lw=1.3, label=OPTIMIZER_LABELS[o], **_STYLES[o])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{SETUP_LABELS[setup]}, {world} ranks")
        ax.set_xlabel("per-rank budget (GiB)")
        ax.set_ylabel("largest trainable model (B params)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    ckpt = "with" if act.checkpointing else "without"
    fig.suptitle(
        f"Largest GPT-2-style model (depth = width/128) at micro-batch 1 x {act.seq_len} tokens, {precision}, "
        f"{ckpt} activation checkpointing"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_report(
    report: Report,
    configs: Sequence[GPT2Config],
    setups: Sequence[str],
    optimizers: Sequence[str],
    budgets: Sequence[float],
    headline: str,
    world: int,
    tolerances: Tolerances,
) -> None:
    """The terminal report: per-rank tables, the largest micro-batch and model, and every validation."""
    for config in configs:
        print(f"\nGPT-2 {config.name} ({config.numel:,} params), {headline}, per-rank GiB at {world} ranks")
        print(headline_table(config, world, headline, setups, optimizers))
    big = configs[-1]
    print(f"\nGPT-2 {big.name}, {headline}, {world} ranks: per-rank breakdown (GiB)")
    rows = []
    for setup in setups:
        for o in optimizers:
            m = rank_memory(big, setup, world, o, headline)
            rows.append(
                [
                    f"{SETUP_LABELS[setup]} {o}",
                    *(f"{_gib(v):.2f}" for v in (m.params, m.grads, m.master, m.state, m.working, m.total)),
                ]
            )
    print(text_table(["setup optimizer", "params", "grads", "master", "state", "working", "total"], rows))
    for checkpointing in (True, False):
        fit = {
            (r["setup"], r["optimizer"], r["budget_gib"]): r["max_micro_batch"]
            for r in report.fit
            if r["size"] == big.name and r["precision"] == headline and r["checkpointing"] == checkpointing
        }
        ck = "with" if checkpointing else "without"
        print(f"\nGPT-2 {big.name}: largest micro-batch ({ck} activation checkpointing; -1: states do not fit)")
        header = ["optimizer", *(f"{SETUP_LABELS[s]} {b:g}G" for s in setups for b in budgets)]
        print(text_table(header, [[o, *(fit[s, o, b] for s in setups for b in budgets)] for o in optimizers]))
    print(f"\nLargest trainable model (B params; depth = width/128, micro-batch 1, checkpointing), {world} ranks")
    largest = {(r["setup"], r["optimizer"], r["budget_gib"]): r["largest_numel"] for r in report.largest}
    header = ["optimizer", *(f"{SETUP_LABELS[s]} {b:g}G" for s in setups for b in budgets)]
    print(
        text_table(
            header, [[o, *(f"{largest[s, o, b] / 1e9:.2f}" for s in setups for b in budgets)] for o in optimizers]
        )
    )
    if report.checks:
        print(
            f"\nValidation: predicted vs measured optimizer-state bytes (fp32 parameters, tolerance {tolerances.state:.0%})"
        )
        groups: dict[str, list[Check]] = {}
        for c in report.checks:
            key = re.sub(r" rank \d+ \S+$", "", c.what) if " rank " in c.what else c.what
            groups.setdefault(key, []).append(c)
        rows = []
        for key, checks in groups.items():
            worst = max(checks, key=lambda c: c.rel_error)
            ok = all(c.ok(tolerances.state) for c in checks)
            label = key if len(checks) == 1 else f"{key}: {len(checks)} rank x optimizer checks, worst"
            rows.append(
                [label, worst.predicted, worst.measured, f"{100 * worst.rel_error:.2f}%", "ok" if ok else "MISMATCH"]
            )
        print(text_table(["what", "predicted", "measured", "error", ""], rows))
    if report.activations:
        worst = max(c.rel_error for c in report.activations)
        print(
            f"\nValidation: modeled vs measured activation bytes (storages autograd keeps on CPU, plus the "
            f"recomputed layer with checkpointing; tolerance {tolerances.activations:.0%}; worst {100 * worst:.2f}%)"
        )
        header, rows = activation_rows(report.activations)
        flags = ["ok" if c.ok(tolerances.activations) else "MISMATCH" for c in report.activations]
        print(text_table([*header, ""], [[*row, flag] for row, flag in zip(rows, flags)]))
    if report.steps:
        print(
            f"\nValidation: predicted vs measured peak of whole training steps on CPU (allocator events; "
            f"tolerance {tolerances.step:.0%})"
        )
        header, rows = step_rows(report.steps)
        flags = ["ok" if abs(r["rel_error"]) <= tolerances.step else "MISMATCH" for r in report.steps]
        print(text_table([*header, ""], [[*row, flag] for row, flag in zip(rows, flags)]))


@dataclass(frozen=True, slots=True, kw_only=True)
class Tolerances:
    """Largest relative disagreement allowed for each validation."""

    state: float = 0.02
    activations: float = 0.05
    step: float = 0.10


def failures(report: Report, tolerances: Tolerances) -> list[str]:
    """What disagrees with the model beyond its tolerance, one line each."""
    bad = [f"optimizer state: {c.what}" for c in report.checks if not c.ok(tolerances.state)]
    bad += [
        f"activations: {row}"
        for c, row in zip(report.activations, activation_rows(report.activations)[1])
        if not c.ok(tolerances.activations)
    ]
    bad += [
        f"whole step: {row}"
        for r, row in zip(report.steps, step_rows(report.steps)[1])
        if abs(r["rel_error"]) > tolerances.step
    ]
    return bad


def write_outputs(report: Report, out: str, tolerances: Tolerances) -> None:
    for name, rows in (("memory.csv", report.rows), ("fit.csv", report.fit), ("largest-model.csv", report.largest)):
        if rows:
            with open(os.path.join(out, name), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    checks = [{**asdict(c), "rel_error": c.rel_error, "ok": c.ok(tolerances.state)} for c in report.checks]
    activations = [{**c.row(), "ok": c.ok(tolerances.activations)} for c in report.activations]
    steps = [{**r, "ok": abs(r["rel_error"]) <= tolerances.step} for r in report.steps]
    for name, rows in (
        ("validation.csv", checks),
        ("activation-validation.csv", activations),
        ("step-validation.csv", steps),
    ):
        if rows:
            with open(os.path.join(out, name), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    with open(os.path.join(out, "memory.json"), "w") as f:
        json.dump(
            {
                "memory": report.rows,
                "fit": report.fit,
                "largest_model": report.largest,
                "validation": checks,
                "activation_validation": activations,
                "step_validation": steps,
            },
            f,
            indent=1,
        )
