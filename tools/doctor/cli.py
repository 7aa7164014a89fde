"""The ``sm3-dist doctor`` command (see :mod:`sm3_dist.tools.doctor`)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["SECTIONS", "main", "run_doctor"]

SECTIONS = ("environment", "correctness", "speed")
DESCRIPTION = "check this installation on its own hardware: environment, kernel correctness, step speed"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sm3-dist doctor", description=DESCRIPTION)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda where available, else cpu")
    parser.add_argument(
        "--full", action="store_true", help="the acceptance run: bench, tests, memory, training, CUDA graph; a report"
    )
    parser.add_argument("--out", metavar="DIR", help="--full: report.md, report.json and logs (default sm3-doctor)")
    parser.add_argument("--json", metavar="PATH", help="also write the sections' results as JSON")
    parser.add_argument("--budget", type=float, default=480.0, metavar="S", help="--full: overall seconds (480)")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated, from {', '.join(SECTIONS)} (default all); 'none' for --full's stages only",
    )
    parser.add_argument("--repo", metavar="DIR", help="--full: the source tree whose tests to run (default: found)")
    parser.add_argument(
        "--render-docs", metavar="REPORT_JSON", help="render a --full report.json into docs/gpu-report.md and exit"
    )
    parser.add_argument("--docs-out", default="docs/gpu-report.md", metavar="PATH", help="--render-docs' output")
    return parser


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from .environment import cpu_model

    return cpu_model()


def run_doctor(device: torch.device, sections, *, say=print) -> dict[str, Any]:
    """The sections on ``device``, printed as they finish; the results (``ok`` is False where a correctness
    check failed)."""
    result: dict[str, Any] = {"ok": True}
    if "environment" in sections:
        from .environment import check_environment

        say("== environment ==")
        items, extra = check_environment(device)
        for item in items:
            say("  " + item.line())
        result["environment"] = [item.as_dict() | {"line": item.line()} for item in items]
        result.update(extra)
        problems = sum(1 for i in items if not i.ok)
        say(f"  {len(items) - problems} ok, {problems} problem(s)\n")
    if "correctness" in sections:
        from .correctness import run_checks

        say("== correctness: every kernel bitwise against the eager per-tensor kernel, close to float64 ==")
        try:
            checks = run_checks(device)
        except Exception as exc:  # the checks themselves broke: a failure, named
            checks = {"ok": False, "results": [], "kernels": [], "missing": {}, "error": f"{type(exc).__name__}: {exc}"}
        lines = []
        cases = dict.fromkeys(r["case"] for r in checks["results"])
        for case in cases:
            rows = [r for r in checks["results"] if r["case"] == case]
            lines.append(f"  {case}: " + ", ".join(f"{r['kernel']} {'ok' if r['ok'] else 'FAIL'}" for r in rows))
            lines += [f"    FAIL {r['kernel']}: {r['detail']}" for r in rows if not r["ok"]]
        lines += [f"  {name}: not checked ({why})" for name, why in checks["missing"].items()]
        if checks.get("error"):
            lines.append(f"  FAIL: the checks raised {checks['error']}")
        passed = sum(1 for r in checks["results"] if r["ok"])
        bitwise = sum(1 for r in checks["results"] if r.get("bitwise"))
        total = len(checks["results"])
        verdict = "ok" if checks["ok"] else "FAILED"
        lines.append(
            f"  bitwise check: {bitwise}/{total} equal to the eager kernel; {passed}/{total} passed "
            f"(kernels: {', '.join(checks['kernels'])}) ... {verdict}"
        )
        for line in lines:
            say(line)
        say("")
        checks["lines"] = lines
        result["correctness"] = checks
        result["ok"] = result["ok"] and checks["ok"]
    if "speed" in sections:
        from .speed import run_speed, speed_lines

        say("== speed: one optimizer step (sm3-dist bench's measurement, short) ==")
        try:
            speed = run_speed(device)
            lines = speed_lines(speed)
        except Exception as exc:  # reported, not a correctness failure
            speed, lines = {"error": f"{type(exc).__name__}: {exc}"}, [f"PROBLEM: the timing raised {exc!r}"]
        for line in lines:
            say("  " + line)
        say("")
        speed.pop("rows_full", None)
        for r in speed.get("rows", []):
            r.pop("times_ms", None)
        speed["lines"] = lines
        result["speed"] = speed
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.render_docs:
        from .report import render_docs

        try:
            path = render_docs(Path(args.render_docs), Path(args.docs_out))
        except (OSError, ValueError) as exc:
            print(f"sm3-dist doctor: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
        return 0
    sections = [] if args.sections == "none" else [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)} (from {', '.join(SECTIONS)}, or none)")
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(
            f"sm3-dist doctor: --device cuda, but no CUDA device is available (torch {torch.__version__}, {build}); "
            "run without --device to check the CPU",
            file=sys.stderr,
        )
        return 2
    device = torch.device(device_type)
    started, t0 = datetime.datetime.now(datetime.timezone.utc), time.monotonic()
    deadline = t0 + args.budget
    print(f"sm3-dist doctor on {device_type}: {_device_name(device)}, torch {torch.__version__}\n", flush=True)
    result = run_doctor(device, sections, say=lambda s: print(s, flush=True))
    status = 0 if result["ok"] else 1
    report: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_type,
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "command": "sm3-dist doctor " + " ".join(argv),
        "full": args.full,
        **result,
    }
    if args.full:
        from .full import find_repo, plan_stages, run_stages

        out = Path(args.out or "sm3-doctor").resolve()
        out.mkdir(parents=True, exist_ok=True)
        repo = Path(args.repo).resolve() if args.repo else find_repo()
        stages = run_stages(plan_stages(device_type, out, repo), out, deadline=deadline, progress=print)
        report["stages"] = [s.as_dict() for s in stages]
        report["budget_s"] = args.budget
        report["out"] = str(out)
        missed = [t["name"] for s in report["stages"] for t in s["targets"] if t["met"] is False]
        failed = [s["name"] for s in report["stages"] if s["status"].startswith(("failed", "timed out"))]
        print("\n== targets ==")
        for s in stages:
            for t in s.targets:
                print(f"  [{s.name}] {t.name}: {t.shown()} ... {t.result}")
        if not result["ok"]:
            report["failure"] = "a correctness check failed"
        elif failed or missed:
            report["failure"] = "; ".join(
                ([f"stages failed or timed out: {', '.join(failed)}"] if failed else [])
                + ([f"{len(missed)} target(s) missed"] if missed else [])
            )
            status = 1
    report["ok"] = status == 0
    report["seconds"] = time.monotonic() - t0
    if args.full:
        from .report import write_report

        md, js = write_report(report, Path(report["out"]))
        print(f"\nwrote {md} and {js} ({report['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"doctor: {'ok' if status == 0 else 'FAILED'}" + (f" ({report['failure']})" if report.get("failure") else ""))
    return status
