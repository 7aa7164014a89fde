"""``sm3-dist doctor --full``: the acceptance run, every stage a child process with a time budget and a log.

Stages (CUDA; on CPU the applicable ones run short and the others are listed as not applicable):

* ``bench``: ``sm3-dist bench --device cuda --check --sync-error --fsdp2 --params 50257,1024,24``;
* ``graph``: a CUDA-graph capture of a ``capturable=True`` SM3 step (:mod:`.graph`);
* ``train-sm3``, ``train-adamw``: a short ``sm3-dist train --nproc 1 --model-size gpt2`` for each;
* ``memory``: ``sm3-dist memory --measure-cuda``;
* ``tests``: the CUDA rows of the test suite (``pytest -k "cuda or gpu"``: the ``cuda`` device axis and the
  ``gpu`` marker).

The whole run stops within its budget: a stage gets what is left of it (at most its own budget), is ended
(its process group) when that runs out, and stages not started are reported as not reached. Each stage's
targets are evaluated from its outputs (:func:`targets_of`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Stage", "Target", "find_repo", "plan_stages", "run_stages", "targets_of"]

MIN_STAGE_S = 5.0
"""A stage is not started with less than this left of the overall budget."""


@dataclass
class Target:
    name: str
    value: float | str | None
    limit: float | None = None
    op: str = "<="
    unit: str = ""
    met: bool | None = None
    """``None``: not measured (the stage did not run or its output lacks it)."""
    note: str = ""

    def evaluate(self) -> Target:
        if isinstance(self.value, (int, float)) and self.limit is not None:
            self.met = self.value <= self.limit if self.op == "<=" else self.value >= self.limit
        return self

    @property
    def result(self) -> str:
        if self.met is None:
            return "not measured" + (f" ({self.note})" if self.note else "")
        if self.met:
            return "met"
        if isinstance(self.value, (int, float)) and self.limit is not None:
            gap = abs(self.value - self.limit)
            return f"missed by {gap:.3g}{self.unit}"
        return "missed" + (f" ({self.note})" if self.note else "")

    def shown(self) -> str:
        """The value as the report shows it."""
        if isinstance(self.value, float):
            return f"{self.value:.3g}"
        return "-" if self.value is None else str(self.value)

    def as_dict(self) -> dict:
        return asdict(self) | {"result": self.result, "shown": self.shown()}


@dataclass
class Stage:
    name: str
    what: str
    command: list[str] | None
    """``None``: not applicable on this device (``reason`` says why)."""
    budget_s: float
    cwd: str | None = None
    reason: str = ""
    status: str = "not reached"
    rc: int | None = None
    seconds: float = 0.0
    log: str | None = None
    targets: list[Target] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = [t.as_dict() for t in self.targets]
        return d


def find_repo(start: Path | None = None) -> Path | None:
    """The sm3-dist source tree with its tests: from the working directory upward, then beside the package."""
    import sm3_dist

    candidates = [Path.cwd(), *Path.cwd().parents, Path(sm3_dist.__file__).resolve().parents[1]]
    if start is not None:
        candidates.insert(0, start)
    for root in candidates:
        if (root / "tests" / "common.py").is_file() and (root / "pyproject.toml").is_file():
            return root
    return None


def plan_stages(device: str, out: Path, repo: Path | None) -> list[Stage]:
    py = [sys.executable, "-m", "sm3_dist.cli"]
    cuda = device == "cuda"
    na = "needs CUDA"
    bench = [*py, "bench", "--device", device, "--check", "--sync-error", "--fsdp2", "--json", str(out / "bench.json")]
    bench += ["--params", "50257,1024,24"] if cuda else ["--params", "tiny", "--rounds", "2", "--steps", "1"]
    # on CPU only the rows the targets read: the DeepSpeedCPUAdam row's first use JIT-builds DeepSpeed's op (minutes)
    bench += [] if cuda else ["--warmup", "1", "--only", IGNORE_ROW, SKIP_ROW, "adam fused"]
    train = [*py, "train", "--nproc", "1", "--eval-every", "0", "--eval-windows", "4", "--no-plot"]
    train += ["--model-size", "gpt2", "--steps", "40", "--log-every", "10"] if cuda else []
    if not cuda:
        train += ["--model-size", "tiny", "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--log-every", "1"]
    stages = [
        Stage("bench", "SM3 vs Adam step time, % of bound, launches, syncs, FSDP2 world 1", bench, 150 if cuda else 60),
        Stage(
            "graph",
            "CUDA-graph capture of a capturable=True fused SM3 step, bitwise against eager",
            [sys.executable, "-m", "sm3_dist.tools.doctor.graph", "--json", str(out / "graph.json")] if cuda else None,
            60,
            reason=na,
        ),
    ]
    for opt in ("sm3", "adamw"):
        stages.append(
            Stage(
                f"train-{opt}",
                f"one-GPU training, {opt}: tokens/s and peak memory" if cuda else f"training on CPU, {opt} (short)",
                [*train, "--optimizer", opt, "--out", str(out / f"train-{opt}")],
                90 if cuda else 60,
            )
        )
    memory = [*py, "memory", "--measure-cuda", "--out", str(out / "memory"), "--no-plots"]
    stages.append(Stage("memory", "predicted vs measured CUDA peaks", memory if cuda else None, 120, reason=na))
    tests = None
    reason = na
    if cuda and repo is None:
        reason = "no test suite found (run from the repository, or pass --repo)"
    elif cuda:
        tests = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-k", "cuda or gpu", "tests"]
    stages.append(
        Stage(
            "tests",
            "the CUDA rows of the test suite",
            tests,
            240,
            cwd=None if repo is None else str(repo),
            reason=reason,
        )
    )
    return stages


def _kill(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stages(stages: list[Stage], out: Path, *, deadline: float, progress=print) -> list[Stage]:
    """Run every applicable stage in order within ``deadline`` (``time.monotonic()``); logs in ``out/logs``."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for stage in stages:
        if stage.command is None:
            stage.status = "not applicable"
            stage.targets = targets_of(stage, out)
            continue
        left = deadline - time.monotonic()
        if left < MIN_STAGE_S:
            stage.status, stage.reason = "not reached", "the overall time budget was spent"
            stage.targets = targets_of(stage, out)
            continue
        budget = min(stage.budget_s, left)
        stage.log = str(logs / f"{stage.name}.log")
        progress(f"[doctor --full] {stage.name}: up to {budget:.0f} s, log {stage.log}")
        started = time.monotonic()
        with open(stage.log, "w") as log:
            log.write("$ " + " ".join(stage.command) + "\n")
            log.flush()
            proc = subprocess.Popen(
                stage.command, stdout=log, stderr=subprocess.STDOUT, cwd=stage.cwd or str(out), env=env,
                start_new_session=True,
            )  # fmt: skip
            try:
                stage.rc = proc.wait(timeout=budget)
                stage.status = "ok" if stage.rc == 0 else f"failed (exit {stage.rc})"
            except subprocess.TimeoutExpired:
                _kill(proc)
                stage.status = f"timed out after {budget:.0f} s"
                stage.reason = "stopped at its time budget"
        stage.seconds = time.monotonic() - started
        stage.targets = targets_of(stage, out)
        progress(f"[doctor --full] {stage.name}: {stage.status} ({stage.seconds:.0f} s)")
    return stages


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_summary(path: Path) -> dict | None:
    summary = None
    try:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "summary":
                summary = record
    except (OSError, ValueError):
        return None
    return summary


IGNORE_ROW = "sm3 fused m=0.9 nonfinite=ignore"
SKIP_ROW = "sm3 fused m=0.9"
FSDP2_ROW = "sm3 fused m=0.9 fsdp2 world-1"


def targets_of(stage: Stage, out: Path) -> list[Target]:
    """The issue's targets for a stage, evaluated from its outputs (``met`` is ``None`` where nothing was
    measured)."""
    note = stage.reason or stage.status
    if stage.name == "bench":
        return _bench_targets(_read_json(out / "bench.json"), stage, note)
    if stage.name == "graph":
        result = _read_json(out / "graph.json")
        t = Target("CUDA-graph capture of a capturable=True step, bitwise equal to eager", None, note=note)
        if result is not None:
            stage.outputs = result
            t.value, t.met = ("ok" if result.get("ok") else result.get("error", "differs")), bool(result.get("ok"))
        return [t]
    if stage.name == "train-adamw":  # the comparison, once both runs are in
        sm3, adamw = (
            _last_summary(out / "train-sm3" / "metrics.jsonl"),
            _last_summary(out / "train-adamw" / "metrics.jsonl"),
        )
        stage.outputs = {"sm3": sm3, "adamw": adamw}
        t = Target("one-GPU training: SM3 tokens/s / AdamW tokens/s", None, 1.0, ">=", "", note=note)
        if sm3 and adamw and sm3.get("tokens_per_s") and adamw.get("tokens_per_s"):
            t.value = sm3["tokens_per_s"] / adamw["tokens_per_s"]
            t.note = f"SM3 {sm3['tokens_per_s']:.0f} tokens/s, AdamW {adamw['tokens_per_s']:.0f} tokens/s"
            peaks = [(s.get("peak_memory_bytes") or [None])[0] for s in (sm3, adamw)]
            if all(peaks):
                kind = "CUDA" if sm3.get("peak_memory_kind", "").startswith("cuda") else "RSS"
                t.note += f"; peak {kind} SM3 {peaks[0] / 2**30:.2f} GiB, AdamW {peaks[1] / 2**30:.2f} GiB"
        return [t.evaluate()]
    if stage.name == "train-sm3":
        stage.outputs = _last_summary(out / "train-sm3" / "metrics.jsonl") or {}
        return []
    if stage.name == "memory":
        result = _read_json(out / "memory" / "cuda-memory.json")
        t = Target("memory: largest relative error of the predicted whole-step peak", None, 0.10, "<=", "", note=note)
        if result and result.get("peaks"):
            t.value = max(abs(p["rel_error"]) for p in result["peaks"])
            stage.outputs = {"peaks": len(result["peaks"]), "searches": result.get("searches")}
        return [t.evaluate()]
    if stage.name == "tests":
        counts = _pytest_counts(stage.log)
        stage.outputs = counts
        t = Target("every CUDA contract and exactness row passing (failed + errors)", None, 0, "<=", "", note=note)
        if counts and stage.status != "not reached" and "timed out" not in stage.status:
            t.value = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
            t.note = ", ".join(f"{v} {k}" for k, v in counts.items())
            if not counts.get("passed"):
                t.value, t.note = "no test passed", t.note or "nothing ran"
                return [t]
        return [t.evaluate()]
    return []


def _pytest_counts(log: str | None) -> dict[str, int]:
    if not log:
        return {}
    try:
        lines = Path(log).read_text().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line)
        if found:
            return {k: int(v) for v, k in found}
    return {}


def _bench_targets(result: dict | None, stage: Stage, note: str) -> list[Target]:
    rows = {r["name"]: r for r in (result or {}).get("rows", [])}
    if result is not None:
        stage.outputs = {
            "bandwidth_gb_s": result.get("bandwidth_gb_s"),
            "parameters": result.get("parameters"),
            "rows": {
                n: {
                    k: r.get(k)
                    for k in ("median_ms", "ratio_to_adam_fused", "pct_of_bound", "launches", "syncs", "sync_error")
                }
                for n, r in rows.items()
            },
        }
    cuda = (result or {}).get("device", "").startswith("cuda")

    def row(name: str, key: str, label: str, limit, op: str, unit: str = "") -> Target:
        t = Target(label, None, limit, op, unit, note=note if result is None else f"no row {name!r}")
        if name in rows and rows[name].get(key) is not None:
            t.value, t.note = rows[name][key], ""
        elif name in rows and key in ("launches", "syncs"):
            t.note = "counted on CUDA only"
        return t.evaluate()

    targets = [
        row(IGNORE_ROW, "ratio_to_adam_fused", 'SM3(fused=True) "ignore" / Adam(fused=True)', 0.80, "<=", "x"),
        row(SKIP_ROW, "ratio_to_adam_fused", 'SM3(fused=True) "skip" / Adam(fused=True)', 0.95, "<=", "x"),
        row(IGNORE_ROW, "pct_of_bound", 'SM3(fused=True) "ignore": % of the bandwidth bound', 70.0, ">=", " points"),
        row(SKIP_ROW, "pct_of_bound", 'SM3(fused=True) "skip": % of the bandwidth bound', 70.0, ">=", " points"),
        row(IGNORE_ROW, "launches", 'launches per step (one param group), "ignore"', 3, "<="),
        row(SKIP_ROW, "syncs", 'host syncs per step, "skip"', 0, "<="),
        row(IGNORE_ROW, "syncs", 'host syncs per step, "ignore"', 0, "<="),
    ]
    sync = Target('no host sync under set_sync_debug_mode("error") (every SM3 row)', None, note=note)
    errors = {n: r.get("sync_error") for n, r in rows.items() if n.startswith("sm3")}
    if cuda and errors:
        bad = {n: e for n, e in errors.items() if e not in ("ok", None)}
        sync.value, sync.met = ("ok" if not bad else f"{len(bad)} rows raised"), not bad
        sync.note = "; ".join(f"{n}: {e}" for n, e in bad.items())
    elif result is not None:
        sync.note = "checked on CUDA only"
    fsdp2 = Target("FSDP2 world 1 through the block table: step / Adam(fused=True)", None, note=note)
    if FSDP2_ROW in rows:
        fsdp2.value = rows[FSDP2_ROW].get("ratio_to_adam_fused")
        fsdp2.met = fsdp2.value is not None
        fsdp2.note = f"{rows[FSDP2_ROW]['median_ms']:.3f} ms/step"
    elif result is not None:
        fsdp2.note, fsdp2.met = "the FSDP2 row is missing", False
    return [*targets, sync, fsdp2]
