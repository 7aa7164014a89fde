"""What a run reports: ``metrics.jsonl``, the progress bar, the final summary (plots: :mod:`.plot`).

``metrics.jsonl`` holds one JSON record a line, each with a ``kind``:
``config`` (the options, world size, parameter count and the ranks' pids) or
``resume`` (the step and checkpoint resumed from, and the checkpoints skipped),
``train`` (per step: loss, lr, tokens/s, step time, the optimizer's skipped
steps), ``eval`` (held-out loss, and the Polyak average's) and ``summary``.
Rank 0 writes it; the other ranks' writers do nothing.
"""

from __future__ import annotations

import json
import resource
import threading
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

__all__ = ["MetricsLog", "fmt_bytes", "last_summary", "peak_memory_bytes", "progress_bar", "summary_text"]


class MetricsLog:
    """Appends records to ``path`` (rank 0), flushed at once so a killed run keeps every line it wrote."""

    def __init__(self, path: Path, *, enabled: bool) -> None:
        self._file = open(path, "a") if enabled else None  # noqa: SIM115 (open for the run's lifetime)

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def last_summary(path: Path) -> dict[str, Any]:
    """The last ``summary`` record of a ``metrics.jsonl`` ({} if there is none)."""
    summary: dict[str, Any] = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("kind") == "summary":
                summary = record
    return summary


def progress_bar(*, total: int, initial: int, enabled: bool, desc: str) -> tqdm:
    # a thread lock: tqdm's default also makes a multiprocessing lock, a named semaphore that a rank ending
    # with os._exit would leave behind ("resource_tracker: ... leaked semaphore objects")
    tqdm.set_lock(threading.RLock())
    return tqdm(
        total=total, initial=initial, disable=not enabled, desc=desc, unit="step", mininterval=1.0, dynamic_ncols=True
    )


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated on ``device``, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def summary_text(s: dict[str, Any]) -> str:
    """The lines rank 0 prints at the end of a run, from its ``summary`` record."""
    lines = [
        f"final train loss   {s['final_loss']:.4f}",
        f"held-out loss      {s['eval_loss']:.4f}"
        + (f" (Polyak {s['eval_loss_polyak']:.4f})" if s["eval_loss_polyak"] is not None else ""),
        f"tokens/s           {s['tokens_per_s']:.0f}" if s["tokens_per_s"] else "tokens/s           -",
        f"wall time          {s['wall_s']:.1f} s",
    ]
    kind = "peak RSS" if s["peak_memory_kind"] == "max_rss" else "peak CUDA"
    for r, (state, peak) in enumerate(zip(s["optimizer_state_bytes"], s["peak_memory_bytes"])):
        lines.append(f"rank {r}: optimizer state {fmt_bytes(state)}, {kind} {fmt_bytes(peak)}")
    return "\n".join(lines)
