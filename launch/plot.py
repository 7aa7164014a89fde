"""Loss curves from a run's ``metrics.jsonl`` (matplotlib, Agg backend: no display needed).

Usable on its own: ``python -m sm3_dist.launch.plot OUT.png RUN_DIR [RUN_DIR ...]``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_compare", "plot_runs", "read_metrics"]


def read_metrics(path: str | Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """Training and evaluation records of a ``metrics.jsonl``, keyed by step (the last record wins)."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            record = json.loads(line)
            if record.get("kind") == "train":
                train[record["step"]] = record
            elif record.get("kind") == "eval":
                evals[record["step"]] = record
    return train, evals


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


_EVAL_LINES = (
    ("eval_loss", "o", 1.6, "--", "held-out"),
    ("eval_loss_polyak", "^", 1.0, ":", "held-out (Polyak)"),
)
"""Per ``eval`` record key: marker, line width, line style and label of its curve."""


def plot_runs(runs: Sequence[tuple[str, str | Path]], out: str | Path, *, title: str | None = None) -> Path:
    """One PNG with the training loss (smoothed) and held-out loss of each ``(label, metrics.jsonl)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, path) in enumerate(runs):
        color = colors[i % len(colors)]
        train, evals = read_metrics(path)
        steps = sorted(train)
        if steps:
            losses = [train[s]["loss"] for s in steps]
            window = max(1, len(steps) // 50)
            ax.plot(steps, _smooth(losses, window), color=color, alpha=0.8, lw=1.2, label=f"{label} train")
        for key, marker, lw, ls, suffix in _EVAL_LINES:
            esteps = sorted(s for s in evals if evals[s].get(key) is not None)
            if esteps:
                ax.plot(esteps, [evals[s][key] for s in esteps], color=color, marker=marker, ms=3, lw=lw, ls=ls,
                        label=f"{label} {suffix}")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    """Lay out, write and close ``fig`` as ``out`` (its folder made if missing)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_compare(runs: Sequence[tuple[str, str | Path]], out: str | Path, *, title: str | None = None) -> Path:
    """``--compare``'s PNG: held-out loss against steps, one line per ``(label, metrics.jsonl)``.

    The labels say what each optimizer costs (``launch.launcher.compare`` puts its optimizer state per rank there);
    each run's smoothed training loss is drawn thin and faint behind its held-out line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    finals = []
    for i, (label, path) in enumerate(runs):
        color = colors[i % len(colors)]
        train, evals = read_metrics(path)
        steps = sorted(train)
        if steps:
            window = max(1, len(steps) // 50)
            ax.plot(steps, _smooth([train[s]["loss"] for s in steps], window), color=color, alpha=0.3, lw=0.8)
        esteps = sorted(s for s in evals if evals[s].get("eval_loss") is not None)
        if esteps:
            values = [evals[s]["eval_loss"] for s in esteps]
            finals.append(values[-1])
            ax.plot(esteps, values, color=color, marker="o", ms=3, lw=1.8, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats / byte)")
    if finals:
        ax.set_ylim(min(finals) - 0.15, min(finals) + 2.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="optimizer: final held-out loss, optimizer state per rank", title_fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("usage: python -m sm3_dist.launch.plot OUT.png RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    runs = [(Path(d).name, Path(d) / "metrics.jsonl") for d in argv[1:]]
    print(plot_runs(runs, argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
