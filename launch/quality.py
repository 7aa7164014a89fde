"""``sm3-dist quality``: SM3 against AdamW and Adafactor, each at its best learning rate, on held-out loss.

For every optimizer and variant the command runs a learning-rate sweep at the
sweep seeds (``--seeds``), then the extra seeds (``--best-seeds``) at each
optimizer-variant's best rate, every run in one single-threaded worker process
(:mod:`sm3_dist.launch.quality_run`). Results go into ``OUT/results.json`` after
every run, so an interrupted or extended sweep skips what is done. From the
results it writes ``OUT/quality.md`` (tables), ``OUT/quality.json`` (the same,
machine-readable) and ``OUT/quality.png`` (held-out loss against steps of each
optimizer's best setting).

Selection: a setting is an (optimizer, variant, learning rate, reading), where
the reading is the final held-out loss of the trained weights (``last``) or of
their Polyak average (``polyak``). It is scored by its mean over the seeds that
every setting of that optimizer has (the sweep seeds), so extra seeds at the
best rate cannot favour it; its reported mean and spread (max - min) are over
all its seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from sm3_dist.launch.quality_run import (
    OPTIMIZERS,
    VARIANT_TOKENS,
    RunSpec,
    Setup,
    parse_variant,
    run,
)

__all__ = ["DEFAULT_GRIDS", "build_parser", "grid", "main", "plan_runs", "summarize"]

DEFAULT_GRIDS = {
    "sm3": (0.01, 1.0),
    "sm3:ema": (3e-4, 3e-2),
    "adamw": (3e-4, 3e-2),
    "adafactor": (3e-3, 0.3),
    "adagrad": (3e-3, 0.3),
}
"""Default sweep ranges (``DEFAULT_POINTS`` log-spaced rates each); SM3 with ``ema`` steps like Adam."""
DEFAULT_POINTS = 4
READINGS = ("last", "polyak")
RESULTS_FILE, TABLE_FILE, SUMMARY_FILE, PLOT_FILE = "results.json", "quality.md", "quality.json", "quality.png"
MARGIN_FILE = "margin.md"
DEFAULT_BETA = 0.999
"""SM3's ``beta`` with the ``ema`` variant unless ``--beta`` is given (``--margin``: the job's, 0.99)."""


def grid(low: float, high: float, points: int) -> tuple[float, ...]:
    """``points`` log-spaced rates from ``low`` to ``high``, rounded to 2 significant digits."""
    if points < 1 or not 0 < low <= high:
        raise ValueError(f"a grid needs 0 < low <= high and points >= 1, got {low}, {high}, {points}")
    if points == 1:
        return (float(f"{low:.2g}"),)
    step = math.log(high / low) / (points - 1)
    return tuple(float(f"{low * math.exp(i * step):.2g}") for i in range(points))


def _grid_key(optimizer: str, variant: str) -> str:
    return f"{optimizer}:ema" if optimizer == "sm3" and parse_variant(variant).has("ema") else optimizer


def parse_lrs(items: list[str]) -> dict[str, tuple[float, ...]]:
    """``["sm3=0.1,0.3", "sm3:cooldown+ema=1e-3"]`` -> ``{"sm3": (0.1, 0.3), "sm3:cooldown+ema": (0.001,)}``."""
    out = {}
    for item in items:
        key, sep, values = item.partition("=")
        optimizer, _, variant = key.partition(":")
        if not sep or optimizer not in OPTIMIZERS:
            raise ValueError(f"--lrs {item!r}: expected OPTIMIZER[:VARIANT]=LR,LR,... with one of {OPTIMIZERS}")
        if variant:
            key = f"{optimizer}:{parse_variant(variant).name}"
        try:
            lrs = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"--lrs {item!r}: the rates must be numbers") from None
        if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
            raise ValueError(f"--lrs {item!r}: the rates must be positive numbers")
        out[key] = lrs
    return out


def lrs_for(optimizer: str, variant: str, given: dict[str, tuple[float, ...]]) -> tuple[float, ...]:
    """The sweep of one optimizer-variant: ``--lrs OPT:VARIANT``, else ``--lrs OPT``, else the default grid."""
    for key in (f"{optimizer}:{variant}", optimizer):
        if key in given:
            return given[key]
    return grid(*DEFAULT_GRIDS[_grid_key(optimizer, variant)], DEFAULT_POINTS)


def plan_runs(
    optimizers: list[str], variants: list[str], lrs: dict[str, tuple[float, ...]], seeds: list[int]
) -> list[RunSpec]:
    """The sweep's runs: every optimizer x (applicable) variant x rate x seed.

    A variant written ``OPT:VARIANT`` is run for that optimizer only.
    """
    specs = []
    for optimizer in optimizers:
        for text in variants:
            only, _, text = text.rpartition(":")
            variant = parse_variant(text)
            if (only and only != optimizer) or not variant.applies_to(optimizer):
                continue
            for lr in lrs_for(optimizer, variant.name, lrs):
                specs.extend(RunSpec(optimizer, variant.name, lr, seed) for seed in seeds)
    return specs


# ---------------------------------------------------------------------------------------------- selection


def _settings(runs: dict[str, dict]) -> dict[tuple, dict[int, dict]]:
    """(optimizer, variant, lr) -> {seed: record}."""
    out: dict[tuple, dict[int, dict]] = {}
    for record in runs.values():
        out.setdefault((record["optimizer"], record["variant"], record["lr"]), {})[record["seed"]] = record
    return out


def _value(record: dict, reading: str) -> float:
    value = record["final"] if reading == "last" else record["final_polyak"]
    return math.inf if value is None or not math.isfinite(value) else float(value)


def summarize(runs: dict[str, dict]) -> dict:
    """Every setting's scores and the best per optimizer and per optimizer-variant (see the module docstring)."""
    settings = _settings(runs)
    common: dict[str, set[int]] = {}
    for (optimizer, _, _), by_seed in settings.items():
        seeds = set(by_seed)
        common[optimizer] = common[optimizer] & seeds if optimizer in common else seeds
    rows = []
    for (optimizer, variant, lr), by_seed in sorted(settings.items()):
        for reading in READINGS:
            values = {seed: _value(r, reading) for seed, r in sorted(by_seed.items())}
            scored = [values[s] for s in sorted(common[optimizer]) if s in values] or list(values.values())
            finite = [v for v in values.values() if math.isfinite(v)]
            rows.append(
                {
                    "optimizer": optimizer,
                    "variant": variant,
                    "lr": lr,
                    "reading": reading,
                    "score": sum(scored) / len(scored),
                    "mean": sum(values.values()) / len(values),
                    "spread": (
                        (max(finite) - min(finite) if len(finite) == len(values) else math.inf)
                        if len(values) > 1
                        else None
                    ),
                    "seeds": {str(s): v for s, v in values.items()},
                }
            )
    best_by_optimizer, best_by_variant = {}, {}
    for row in rows:
        if math.isfinite(row["score"]):
            for table, key in (
                (best_by_optimizer, row["optimizer"]),
                (best_by_variant, (row["optimizer"], row["variant"])),
            ):
                if key not in table or (row["score"], row["lr"]) < (table[key]["score"], table[key]["lr"]):
                    table[key] = row
    gap = None
    baselines = [best_by_optimizer[o]["mean"] for o in ("adamw", "adafactor") if o in best_by_optimizer]
    if "sm3" in best_by_optimizer and baselines:
        reference = min(baselines)
        gap = {
            "sm3": best_by_optimizer["sm3"]["mean"],
            "best_baseline": reference,
            "relative": best_by_optimizer["sm3"]["mean"] / reference - 1.0,
            "vs_adafactor": (
                best_by_optimizer["sm3"]["mean"] / best_by_optimizer["adafactor"]["mean"] - 1.0
                if "adafactor" in best_by_optimizer
                else None
            ),
        }
    return {
        "rows": rows,
        "best": best_by_optimizer,
        "best_by_variant": {f"{o}|{v}": row for (o, v), row in sorted(best_by_variant.items())},
        "gap": gap,
    }


def best_lrs(runs: dict[str, dict]) -> dict[tuple[str, str], float]:
    """Each optimizer-variant's best rate (either reading), as :func:`summarize` picks it."""
    return {(o, v): row["lr"] for (o, v), row in _pairs(summarize(runs)["best_by_variant"]).items()}


def _pairs(table: dict[str, dict]) -> dict[tuple[str, str], dict]:
    return {tuple(k.split("|", 1)): v for k, v in table.items()}


# ---------------------------------------------------------------------------------------------- output


def _fmt(x: float) -> str:
    return "diverged" if not math.isfinite(x) else f"{x:.4f}"


def _row_md(row: dict) -> str:
    seeds = ", ".join(f"{s}: {_fmt(v)}" for s, v in row["seeds"].items())
    spread = "-" if row["spread"] is None else _fmt(row["spread"])
    return (
        f"| {row['optimizer']} | {row['variant']} | {row['lr']:g} | {row['reading']} | **{_fmt(row['mean'])}** | "
        f"{spread} | {len(row['seeds'])} ({seeds}) |"
    )


def markdown(summary: dict, setup: Setup, command: str, corpus: str) -> str:
    head = "| optimizer | variant | lr | reading | held-out loss (mean) | spread (max-min) | seeds |\n|---|---|---:|---|---:|---:|---|"
    lines = [
        f"Held-out loss in nats per byte after {setup.steps} steps ({setup.model_size} model, batch "
        f"{setup.batch_size} x {setup.seq_len} bytes, corpus {corpus}; warm-up {setup.warmup_fraction:g} quadratic"
        f", cool-down {setup.cooldown_fraction:g} with `cooldown`, Polyak decay {setup.polyak:.4g}).",
        "",
        f"`{command}`",
        "",
        "Best per optimizer:",
        "",
        head,
        *(_row_md(summary["best"][o]) for o in OPTIMIZERS if o in summary["best"]),
    ]
    gap = summary["gap"]
    if gap is not None:
        lines += [
            "",
            f"SM3's best vs the best of AdamW and Adafactor: {gap['relative'] * 100:+.2f}%"
            + (f"; vs Adafactor: {gap['vs_adafactor'] * 100:+.2f}%" if gap["vs_adafactor"] is not None else ""),
        ]
    lines += ["", "Best per optimizer and variant:", "", head]
    lines += [_row_md(row) for row in summary["best_by_variant"].values()]
    sweep: dict[tuple[str, str, str], dict[float, dict]] = {}
    for row in summary["rows"]:
        sweep.setdefault((row["optimizer"], row["variant"], row["reading"]), {})[row["lr"]] = row
    lines += ["", "Sweep (mean held-out loss over seeds; seeds in brackets):", ""]
    lines += ["| optimizer | variant | reading | lr: loss |", "|---|---|---|---|"]
    for (optimizer, variant, reading), by_lr in sorted(sweep.items()):
        cells = "; ".join(f"{lr:g}: {_fmt(r['mean'])} ({len(r['seeds'])})" for lr, r in sorted(by_lr.items()))
        lines.append(f"| {optimizer} | {variant} | {reading} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, runs: dict[str, dict], path: Path, title: str) -> None:
    """Held-out loss against steps for each optimizer's best setting (mean over seeds, band = min..max).

    SM3's other variants (each at its best rate) are drawn dashed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    settings = _settings(runs)
    chosen = [(summary["best"][o], "-") for o in OPTIMIZERS if o in summary["best"]]
    chosen += [
        (row, "--")
        for row in summary["best_by_variant"].values()
        if row["optimizer"] == "sm3" and row["variant"] != summary["best"].get("sm3", {}).get("variant")
    ]
    for row, style in chosen:
        optimizer = row["optimizer"]
        column = 1 if row["reading"] == "last" else 2
        curves = [r["evals"] for r in settings[(optimizer, row["variant"], row["lr"])].values() if not r["diverged"]]
        if not curves:
            continue
        steps = [e[0] for e in curves[0]]
        values = [[c[i][column] for c in curves] for i in range(min(len(c) for c in curves))]
        mean = [sum(v) / len(v) for v in values]
        label = f"{optimizer} {row['variant']} lr {row['lr']:g}{' polyak' if column == 2 else ''}: {row['mean']:.3f}"
        (line,) = ax.plot(steps[: len(mean)], mean, style, label=label)
        ax.fill_between(steps[: len(mean)], [min(v) for v in values], [max(v) for v in values], alpha=0.2,
                        color=line.get_color())  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title(title, fontsize=9)
    finals = [row["mean"] for row in summary["best"].values()]
    if finals:
        ax.set_ylim(min(finals) - 0.1, min(finals) + 1.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- stability margin


def default_variant(optimizer: str) -> str:
    """The variant that is ``sm3-dist train``'s default form of ``optimizer`` (launch/defaults.py)."""
    from sm3_dist.launch.defaults import SM3_RECOMMENDED

    if optimizer != "sm3":
        return "cooldown"
    tokens = ["cooldown"]
    if SM3_RECOMMENDED["beta"] > 0.0:
        tokens += ["ema", "bc"] if SM3_RECOMMENDED["bias_correction"] else ["ema"]
    if SM3_RECOMMENDED["update_clip"] > 0.0:
        tokens.append("uclip")
    return parse_variant("+".join(tokens)).name


def margin_runs(
    optimizers: list[str], multiples: list[float], seeds: list[int], model_size: str
) -> tuple[list[RunSpec], dict[tuple[str, float], float]]:
    """Each optimizer at ``multiple x`` its job default rate, in its job default form, on every seed.

    Returns the runs and ``(optimizer, multiple) -> rate``.
    """
    from sm3_dist.launch.defaults import default_lr

    specs, rates = [], {}
    for optimizer in optimizers:
        base = default_lr(optimizer, model_size)
        for m in multiples:
            rate = rates[(optimizer, m)] = float(f"{base * m:.3g}")
            specs.extend(RunSpec(optimizer, default_variant(optimizer), rate, seed) for seed in seeds)
    return specs, rates


def margin_markdown(
    runs: dict[str, dict], rates: dict[tuple[str, float], float], seeds: list[int], setup: Setup, command: str
) -> str:
    """The held-out loss of each optimizer at each multiple of its default rate, per seed, and 2x against 1x."""
    optimizers = list(dict.fromkeys(o for o, _ in rates))
    multiples = sorted({m for _, m in rates})
    by_key = {(r["optimizer"], r["variant"], r["lr"], r["seed"]): r for r in runs.values()}

    def value(optimizer: str, m: float, seed: int) -> float | None:
        record = by_key.get((optimizer, default_variant(optimizer), rates[(optimizer, m)], seed))
        return None if record is None else _value(record, "last")

    def cell(v: float | None) -> str:
        return "-" if v is None else _fmt(v)

    head = " | ".join(f"{m:g}x" for m in multiples)
    lines = [
        f"Held-out loss in nats per byte after {setup.steps} steps at multiples of each optimizer's default rate "
        f"(`sm3-dist train`'s form and schedule; {setup.model_size} model, batch {setup.batch_size} x "
        f"{setup.seq_len} bytes, corpus {setup.data}, warm-up {setup.warmup_fraction:g} quadratic, cool-down "
        f"{setup.cooldown_fraction:g}; SM3 beta {setup.beta:g}).",
        "",
        f"`{command}`",
        "",
        f"| optimizer | form | default lr | seed | {head} | 2x vs 1x |",
        "|---|---|---:|---|" + "---:|" * len(multiples) + "---:|",
    ]
    for optimizer in optimizers:
        base = rates.get((optimizer, 1.0))
        rows = [(str(seed), [value(optimizer, m, seed) for m in multiples]) for seed in seeds]
        if len(seeds) > 1:
            mean = []
            for i in range(len(multiples)):
                column = [r[1][i] for r in rows]
                mean.append(None if None in column else sum(column) / len(column))
            rows.append(("mean", mean))
        for label, values in rows:
            by_m = dict(zip(multiples, values))
            ratio = "-"
            if by_m.get(1.0) is not None and by_m.get(2.0) is not None:
                one, two = by_m[1.0], by_m[2.0]
                ratio = f"{(two / one - 1) * 100:+.1f}%" if math.isfinite(two) else "diverged"
            lines.append(
                f"| {optimizer} | {default_variant(optimizer)} | {'-' if base is None else f'{base:g}'} | {label} | "
                + " | ".join(cell(v) for v in values)
                + f" | {ratio} |"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- running


def _clean(value):
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def load_results(path: Path, setup: Setup) -> dict[str, dict]:
    """The finished runs in ``path`` (none if it does not exist); a file of another setup is an error."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    defaults = {f.name: f.default for f in fields(Setup) if f.default is not MISSING}
    if {**defaults, **data.get("setup", {})} != setup.to_json():
        raise ValueError(
            f"{path} holds runs of another setup ({data.get('setup')}), not {setup.to_json()}: "
            "use another --out or the same options"
        )
    return data["runs"]


_steps_done = None
"""In a worker: the shared count of training steps all workers have run (for the parent's progress bar)."""


def _init_worker(threads: int, steps_done=None) -> None:
    import torch

    global _steps_done
    torch.set_num_threads(threads)
    _steps_done = steps_done


def _count_step() -> None:
    with _steps_done.get_lock():
        _steps_done.value += 1


def _work(item: tuple[RunSpec, Setup]) -> dict:
    return run(*item, on_step=_count_step if _steps_done is not None else None)


def execute(specs: list[RunSpec], setup: Setup, out: Path, *, workers: int, threads: int = 1) -> dict[str, dict]:
    """Run the specs not yet in ``OUT/results.json``; saves after every run. Returns all runs.

    The progress bar counts training steps over all runs (a run that diverges counts its steps not run as done).
    """
    from tqdm import tqdm

    path = out / RESULTS_FILE
    runs = load_results(path, setup)
    todo = [s for s in dict.fromkeys(specs) if s.key not in runs]
    if not todo:
        return runs
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo) * setup.steps, desc=f"quality {setup.data}", unit="step", dynamic_ncols=True)
    finished = 0
    skipped_steps = 0  # the steps diverged runs did not run

    def done(record: dict) -> None:
        nonlocal finished, skipped_steps
        spec = RunSpec(record["optimizer"], record["variant"], record["lr"], record["seed"])
        runs[spec.key] = record
        _write_json(path, {"setup": setup.to_json(), "runs": runs})
        finished += 1
        skipped_steps += setup.steps - record["steps_run"]
        result = "diverged" if record["diverged"] else f"{record['final']:.4f}"
        bar.set_postfix_str(f"{finished}/{len(todo)} runs, last {spec.key}: {result}")

    def show(steps_run: int) -> None:
        bar.update(steps_run + skipped_steps - bar.n)

    try:
        if workers <= 1:
            _init_worker(threads)
            steps_run = 0

            def step_done() -> None:
                nonlocal steps_run
                steps_run += 1
                show(steps_run)

            for spec in todo:
                done(run(spec, setup, on_step=step_done))
                show(steps_run)
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            steps_done = ctx.Value("q", 0)
            with ctx.Pool(workers, initializer=_init_worker, initargs=(threads, steps_done)) as pool:
                results = pool.imap_unordered(_work, [(s, setup) for s in todo])
                while finished < len(todo):
                    with contextlib.suppress(multiprocessing.TimeoutError):
                        done(results.next(timeout=1.0))
                    show(steps_done.value)
    finally:
        bar.close()
    return runs


def report(runs: dict[str, dict], setup: Setup, out: Path, command: str) -> dict:
    """Write the tables, summary JSON and plot for ``runs``; returns the summary."""
    summary = summarize(runs)
    corpus = next(iter(runs.values()))["corpus"] if runs else setup.data
    out.mkdir(parents=True, exist_ok=True)
    (out / TABLE_FILE).write_text(markdown(summary, setup, command, corpus))
    _write_json(out / SUMMARY_FILE, {"setup": setup.to_json(), "command": command, "corpus": corpus, **summary})
    if summary["best"]:
        plot(summary, runs, out / PLOT_FILE, f"{setup.model_size}, {corpus}, {setup.steps} steps: best setting each")
    return summary


def build_parser() -> argparse.ArgumentParser:
    tokens = "; ".join(f"{k}: {v}" for k, v in VARIANT_TOKENS.items())
    grids = ", ".join(f"{k} {lo:g}..{hi:g}" for k, (lo, hi) in DEFAULT_GRIDS.items())
    p = argparse.ArgumentParser(
        prog="sm3-dist quality",
        description="Learning-rate sweeps of SM3, AdamW and Adafactor (and Adagrad) on held-out loss; the best "
        "setting of each, with the spread over seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default="default", help="default (pydoc topics), stdlib (CPython's .py files), or a file")
    p.add_argument("--model-size", default="tiny", help="a size of launch.model (tiny, small, ...)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--optimizers", default="sm3,adamw,adafactor", help=f"comma-separated, from {', '.join(OPTIMIZERS)}")
    p.add_argument("--variants", default="cooldown",
                   help=f"comma-separated variants, each tokens joined by '+' ({tokens}); SM3-only ones are skipped "
                   "for the others; OPT:VARIANT runs for OPT only")  # fmt: skip
    p.add_argument("--lrs", action="append", default=[], metavar="OPT[:VARIANT]=LR,LR",
                   help=f"rates to sweep (repeatable); default {DEFAULT_POINTS} log-spaced over {grids}")  # fmt: skip
    p.add_argument("--seeds", default="0", help="sweep seeds (every rate), comma-separated")
    p.add_argument("--best-seeds", default="1", help="extra seeds run at each optimizer-variant's best rate ('' none)")
    p.add_argument("--workers", type=int, default=2, help="parallel worker processes (CPU)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: runs one after another on the GPU")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=128, help="held-out windows, spread over the held-out text")
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--cooldown-fraction", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9, help="SM3's momentum")
    p.add_argument("--beta", type=float, default=None,
                   help=f"SM3's moving-average decay with the ema variant (default {DEFAULT_BETA:g}; with --margin the "
                   "job's default, launch/defaults.py)")  # fmt: skip
    p.add_argument("--margin", default=None, metavar="X,X",
                   help="instead of a sweep: every optimizer in sm3-dist train's default form at these multiples of "
                   "its default rate (e.g. 0.5,1,2,4), on every --seeds seed; writes OUT/margin.md")  # fmt: skip
    p.add_argument("--polyak-decay", type=float, default=0.0, help="0: 1 - 10/steps")
    p.add_argument("--out", default=None, help="output directory (default runs/quality-<data>-<model-size>)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables and plot from results.json")
    return p


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _multiples(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--margin must be comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ValueError(f"--margin must be positive numbers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        multiples = _multiples(args.margin) if args.margin is not None else None
        if args.beta is None:
            from sm3_dist.launch.defaults import SM3_RECOMMENDED

            args.beta = SM3_RECOMMENDED["beta"] if multiples and SM3_RECOMMENDED["beta"] > 0 else DEFAULT_BETA
        setup = Setup(
            data=args.data,
            model_size=args.model_size,
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            eval_every=args.eval_every,
            eval_windows=args.eval_windows,
            warmup_fraction=args.warmup_fraction,
            cooldown_fraction=args.cooldown_fraction,
            momentum=args.momentum,
            beta=args.beta,
            polyak_decay=args.polyak_decay,
            device=args.device,
        )
        from sm3_dist.launch.model import SIZES

        if args.model_size not in SIZES:
            raise ValueError(f"unknown --model-size {args.model_size!r}: choose one of {', '.join(SIZES)}")
        optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
        unknown = [o for o in optimizers if o not in OPTIMIZERS]
        if unknown or not optimizers:
            raise ValueError(f"--optimizers: unknown {unknown}; choose from {', '.join(OPTIMIZERS)}")
        variants = []
        for item in args.variants.split(","):
            only, sep, text = item.rpartition(":")
            if sep and only not in OPTIMIZERS:
                raise ValueError(f"--variants {item!r}: {only!r} is not one of {', '.join(OPTIMIZERS)}")
            variants.append(f"{only}{sep}{parse_variant(text).name}")
        lrs = parse_lrs(args.lrs)
        seeds, best_seeds = _ints(args.seeds, "--seeds"), _ints(args.best_seeds, "--best-seeds")
        if not seeds:
            raise ValueError("--seeds: at least one seed")
        if args.workers < 1 or args.threads < 1:
            raise ValueError("--workers and --threads must be at least 1")
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA device is available")
            args.workers = 1
        if args.data not in ("default", "stdlib") and not Path(args.data).is_file():
            raise ValueError(f"--data {args.data!r}: not 'default', 'stdlib' or an existing file")
    except ValueError as e:
        print(f"sm3-dist quality: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/{'margin' if multiples else 'quality'}-{Path(args.data).name}-{args.model_size}")
    command = "sm3-dist quality " + " ".join(a for a in argv if a != "--report-only")
    if multiples:
        specs, rates = margin_runs(optimizers, multiples, seeds, args.model_size)
        if args.report_only:
            runs = load_results(out / RESULTS_FILE, setup)
        else:
            runs = execute(specs, setup, out, workers=args.workers, threads=args.threads)
        text = margin_markdown(runs, rates, seeds, setup, command)
        (out / MARGIN_FILE).write_text(text)
        print(text)
        print(f"wrote {out / RESULTS_FILE}, {out / MARGIN_FILE}")
        return 0
    if not args.report_only:
        specs = plan_runs(optimizers, variants, lrs, seeds)
        runs = execute(specs, setup, out, workers=args.workers, threads=args.threads)
        if best_seeds:
            chosen = {(s.optimizer, s.variant) for s in specs}
            best = {
                k: lr
                for k, lr in best_lrs({k: r for k, r in runs.items() if r["seed"] in seeds}).items()
                if k in chosen
            }
            extra = [RunSpec(o, v, lr, s) for (o, v), lr in sorted(best.items()) for s in best_seeds if s not in seeds]
            runs = execute(extra, setup, out, workers=args.workers, threads=args.threads)
    else:
        runs = load_results(out / RESULTS_FILE, setup)
    summary = report(runs, setup, out, command)
    print((out / TABLE_FILE).read_text())
    print(
        f"wrote {out / RESULTS_FILE}, {out / TABLE_FILE}, {out / SUMMARY_FILE}"
        + (f", {out / PLOT_FILE}" if summary["best"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
