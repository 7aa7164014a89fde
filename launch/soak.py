"""A soak run of the training job: many sharded steps, resident memory and step time watched along the way.

``python -m sm3_dist.launch.soak`` starts ``sm3-dist train --setup sharded``
(``ShardedSM3`` under DDP, 2 CPU processes, the tiny model; 2,000 steps, a
checkpoint every 500) and samples each rank's resident set size (``VmRSS``
from ``/proc/PID/status``, Linux) every ``--sample-every`` seconds, tagged with
the step the job had logged. When the job ends it prints a small report and
writes it as JSON (``OUT/soak.json``):

- RSS per rank at the first logged step, after warm-up (``--warmup-steps``) and
  at the end, the growth from warm-up to the end, and the least-squares slope
  after warm-up in MiB per 1,000 steps;
- step-time percentiles (p50/p90/p99/max of ``step_s``, the time of one
  training step as the job measures it) per ``--window`` steps;
- two verdicts: memory flat (growth after warm-up within ``--rss-tolerance``
  of the post-warm-up RSS, and at most ``--rss-tolerance-mib``) and step time
  stable (every window's p50 within a factor ``--time-tolerance`` of the first
  window's).

It is a benchmark, not a test: step times depend on what else the machine
runs (the report includes the load average). Extra arguments after ``--`` go to
``sm3-dist train``. Exit code: the job's, or 3 when a verdict fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sm3_dist.launch.plot import read_metrics

__all__ = ["main", "report"]

MIB = 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sm3_dist.launch.soak",
        description="Soak the sharded training job: RSS flat after warm-up, step time stable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--checkpoint-every", type=int, default=500, help="0: no checkpoints during the soak")
    p.add_argument("--warmup-steps", type=int, default=500, help="RSS is expected flat from this step on")
    p.add_argument("--window", type=int, default=500, help="steps per step-time window")
    p.add_argument("--sample-every", type=float, default=0.25, help="seconds between RSS samples")
    p.add_argument("--rss-tolerance", type=float, default=0.05, help="allowed RSS growth after warm-up (fraction)")
    p.add_argument("--rss-tolerance-mib", type=float, default=32.0, help="and in MiB")
    p.add_argument("--time-tolerance", type=float, default=1.5, help="allowed factor between window p50s")
    p.add_argument("--out", default=None, help="output directory (default runs/soak-<timestamp>)")
    p.add_argument("train_args", nargs="*", help="more `sm3-dist train` arguments (after --)")
    return p


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


class _Tail:
    """Reads the records a running job appends to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = ""
        self.pids: list[int] | None = None
        self.step = 0

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("kind") in ("config", "resume") and record.get("pids"):
                self.pids = [int(p) for p in record["pids"]]
            elif record.get("kind") == "train":
                self.step = max(self.step, int(record["step"]))


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def _slope_per_1000(points: list[tuple[int, int]]) -> float | None:
    if len(points) < 2:
        return None
    xs = [float(s) for s, _ in points]
    ys = [r / MIB for _, r in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return 1000.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def report(
    samples: list[dict[str, Any]],
    step_times: dict[int, float],
    *,
    steps: int,
    warmup_steps: int,
    window: int,
    rss_tolerance: float,
    rss_tolerance_mib: float,
    time_tolerance: float,
) -> dict[str, Any]:
    """The soak's findings from RSS ``samples`` ({"t", "step", "rss": [per rank]}) and per-step times."""
    ranks = max((len(s["rss"]) for s in samples), default=0)
    memory = []
    flat = True
    for r in range(ranks):
        points = [(s["step"], s["rss"][r]) for s in samples if s["step"] >= 1 and s["rss"][r] is not None]
        if not points:
            memory.append({"rank": r, "samples": 0})
            flat = False
            continue
        after = [(st, v) for st, v in points if st >= warmup_steps] or points[-1:]
        start, warm, end = points[0][1], after[0][1], after[-1][1]
        growth = end - warm
        allowed = min(rss_tolerance * warm, rss_tolerance_mib * MIB)
        ok = growth <= allowed
        flat = flat and ok
        memory.append(
            {
                "rank": r,
                "samples": len(points),
                "rss_start_mib": start / MIB,
                "rss_after_warmup_mib": warm / MIB,
                "rss_end_mib": end / MIB,
                "rss_max_after_warmup_mib": max(v for _, v in after) / MIB,
                "growth_after_warmup_mib": growth / MIB,
                "slope_mib_per_1000_steps": _slope_per_1000(after),
                "allowed_growth_mib": allowed / MIB,
                "flat": ok,
            }
        )
    windows = []
    for lo in range(1, steps + 1, window):
        hi = min(lo + window - 1, steps)
        values = sorted(step_times[s] for s in range(lo, hi + 1) if s in step_times)
        windows.append(
            {
                "steps": [lo, hi],
                "n": len(values),
                "p50_ms": 1e3 * _percentile(values, 0.5),
                "p90_ms": 1e3 * _percentile(values, 0.9),
                "p99_ms": 1e3 * _percentile(values, 0.99),
                "max_ms": 1e3 * values[-1] if values else float("nan"),
                "mean_ms": 1e3 * statistics.fmean(values) if values else float("nan"),
            }
        )
    first = windows[0]["p50_ms"] if windows else float("nan")
    ratios = [w["p50_ms"] / first for w in windows] if windows and first > 0 else []
    stable = bool(ratios) and all(1 / time_tolerance <= x <= time_tolerance for x in ratios)
    return {
        "steps_logged": len(step_times),
        "memory": memory,
        "step_time_windows": windows,
        "p50_ratio_to_first_window": ratios,
        "memory_flat": flat,
        "step_time_stable": stable,
    }


def _print_report(result: dict[str, Any]) -> None:
    lines = [f"soak: {result['config']['steps']} steps, {result['config']['nproc']} ranks, setup sharded "
             f"(ShardedSM3), model {result['config']['model_size']}, wall {result['wall_s']:.0f} s, "
             f"load average {result['loadavg_start'][0]:.1f} -> {result['loadavg_end'][0]:.1f}"]  # fmt: skip
    lines.append("RSS (MiB)  start  after-warm-up  end    growth  slope/1000 steps")
    for m in result["memory"]:
        if not m.get("samples"):
            lines.append(f"rank {m['rank']}: no samples")
            continue
        slope = m["slope_mib_per_1000_steps"]
        lines.append(
            f"rank {m['rank']}    {m['rss_start_mib']:6.1f} {m['rss_after_warmup_mib']:8.1f}     "
            f"{m['rss_end_mib']:6.1f} {m['growth_after_warmup_mib']:+7.1f}  "
            + (f"{slope:+.2f}" if slope is not None else "-")
        )
    lines.append("step time (ms)   p50     p90     p99     max")
    for w in result["step_time_windows"]:
        lo, hi = w["steps"]
        lines.append(
            f"steps {lo:>4}-{hi:<4} {w['p50_ms']:7.2f} {w['p90_ms']:7.2f} {w['p99_ms']:7.2f} {w['max_ms']:7.2f}"
        )
    lines.append(
        f"memory flat after warm-up: {'yes' if result['memory_flat'] else 'NO'}; step time stable (p50 per "
        f"window / first): {'yes' if result['step_time_stable'] else 'NO'} "
        f"({', '.join(f'{x:.2f}' for x in result['p50_ratio_to_first_window'])})"
    )
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "nproc", "warmup_steps", "window"):
        if getattr(args, name) < 1:
            print(f"soak: error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if not Path("/proc/self/status").exists():
        print("soak: error: RSS sampling reads /proc (Linux only)", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs") / time.strftime("soak-%Y%m%d-%H%M%S"))
    run = out / "run"
    cmd = [sys.executable, "-m", "sm3_dist.cli", "train", "--setup", "sharded", "--nproc", str(args.nproc),
           "--model-size", args.model_size, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--eval-every", "0", "--eval-windows", "8", "--no-plot",
           "--log-every", "100", "--checkpoint-every", str(args.checkpoint_every), "--keep-checkpoints", "2",
           "--out", str(run), *args.train_args]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    tail = _Tail(run / "metrics.jsonl")
    samples: list[dict[str, Any]] = []
    loadavg_start = os.getloadavg()
    started = time.monotonic()
    with open(out / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(args.sample_every)
            tail.poll()
            if tail.pids:
                samples.append(
                    {"t": time.monotonic() - started, "step": tail.step, "rss": [_rss_bytes(p) for p in tail.pids]}
                )
    wall = time.monotonic() - started
    tail.poll()
    if proc.returncode != 0:
        print(f"soak: the training job failed (exit code {proc.returncode}); see {out / 'train.log'}", file=sys.stderr)
        return proc.returncode or 1
    train, _ = read_metrics(run / "metrics.jsonl")
    step_times = {step: float(record["step_s"]) for step, record in train.items()}
    limits = ("steps", "warmup_steps", "window", "rss_tolerance", "rss_tolerance_mib", "time_tolerance")
    result = report(samples, step_times, **{name: getattr(args, name) for name in limits})
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "command": cmd,
        "wall_s": wall,
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        **result,
        "samples": samples,
    }
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    _print_report(result)
    print(f"wrote {out / 'soak.json'}", flush=True)
    return 0 if result["memory_flat"] and result["step_time_stable"] else 3


if __name__ == "__main__":
    sys.exit(main())
