"""The doctor's report: ``report.md`` and ``report.json`` of a ``--full`` run, and ``docs/gpu-report.md`` rendered
from a committed ``report.json`` (:func:`render_docs`, ``sm3-dist doctor --render-docs REPORT.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["ACCEPTANCE_COMMAND", "render_docs", "report_markdown", "write_report"]

ACCEPTANCE_COMMAND = "sm3-dist doctor --device cuda --full --out gpu-report"


def _targets_table(stages: list[dict]) -> list[str]:
    lines = ["| stage | target | value | limit | result |", "|---|---|---:|---:|---|"]
    for s in stages:
        for t in s["targets"]:
            value = t["shown"]
            limit = "-" if t["limit"] is None else f"{t['op']} {t['limit']:g}"
            lines.append(f"| {s['name']} | {t['name']} | {value} | {limit} | {t['result']} |")
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    env = report.get("environment", [])
    lines = [
        f"# sm3-dist doctor: {'acceptance run' if report.get('full') else 'report'} on {report['device_name']}",
        "",
        f"- date: {report['date']}",
        f"- device: {report['device_name']} (`--device {report['device']}`)",
        f"- command: `{report['command']}`",
        f"- wall time: {report['seconds']:.0f} s of a {report.get('budget_s', 0):.0f} s budget",
        f"- result: {'ok' if report['ok'] else 'FAILED'}"
        + (f" ({report['failure']})" if report.get("failure") else ""),
        "",
    ]
    if report.get("stages"):
        lines += ["## Targets", ""]
        if report["device"] != "cuda":
            lines += [
                f"No GPU: this run on {report['device']} exercises the report's format. The targets are the CUDA "
                "step's; the CPU figures below are not measured against them.",
                "",
            ]
        lines += [*_targets_table(report["stages"]), ""]
        lines += ["## Stages", "", "| stage | what | status | seconds | log |", "|---|---|---|---:|---|"]
        for s in report["stages"]:
            status = s["status"] + (f": {s['reason']}" if s["reason"] and s["status"] != "ok" else "")
            log = f"`{Path(s['log']).relative_to(report['out'])}`" if s.get("log") else "-"
            lines.append(f"| {s['name']} | {s['what']} | {status} | {s['seconds']:.0f} | {log} |")
        unreached = [s["name"] for s in report["stages"] if s["status"] not in ("ok", "not applicable")]
        lines += ["", "Not reached or not finished: " + (", ".join(unreached) if unreached else "none"), ""]
    if env:
        lines += ["## Environment", "", *(f"- {i['line']}" for i in env), ""]
    corr = report.get("correctness")
    if corr:
        lines += ["## Correctness", "", *corr["lines"], ""]
    speed = report.get("speed")
    if speed:
        lines += ["## Speed", "", *speed["lines"], ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "report.md", out / "report.json"
    md.write_text(report_markdown(report) + "\n")
    js.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return md, js


def render_docs(report_json: Path, docs: Path) -> Path:
    """``docs/gpu-report.md`` from a ``--full`` run's ``report.json`` on a GPU: its date, device, targets and
    stages, and the command that produced it."""
    report = json.loads(Path(report_json).read_text())
    if report.get("device") != "cuda" or not report.get("full"):
        raise ValueError(f"{report_json} is not a --device cuda --full report (device {report.get('device')})")
    body = report_markdown(report).splitlines()
    header = [
        "# GPU report",
        "",
        f"Generated from `{report_json}` by `sm3-dist doctor --render-docs`: the acceptance run of "
        f"{report['date']} on {report['device_name']} (torch {report.get('torch')}). Rerun it with",
        "",
        f"    {ACCEPTANCE_COMMAND}",
        "",
    ]
    docs.write_text("\n".join(header + ["#" + line if line.startswith("#") else line for line in body]) + "\n")
    return docs
