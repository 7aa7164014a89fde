"""The doctor's speed section: a short step-time table, SM3 fused/foreach against ``Adam(fused=True)``, with the
percentage of the memory-bandwidth bound, and on CUDA the launches and host syncs per step.

The measurement is ``sm3-dist bench``'s own (:func:`sm3_dist.tools.bench.step.run`), on a smaller parameter set and
fewer rounds."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ROWS", "run_speed", "speed_lines"]

ROWS = ("sm3 fused m=0.9", "sm3 fused m=0.9 nonfinite=ignore", "sm3 foreach m=0.9", "adam fused")
"""The rows shown (``sm3-dist bench``'s names): SM3 fused with ``nonfinite="skip"`` (the default) and
``"ignore"``, SM3 foreach, and ``Adam(fused=True)``."""
SETTINGS = {
    # device type: (parameter set, rounds, steps per round, warm-up steps)
    "cpu": ("small", 4, 2, 2),
    "cuda": ("gpt", 10, 5, 10),
}


def run_speed(device: torch.device, *, params: str | None = None) -> dict[str, Any]:
    from sm3_dist.tools.bench.shapes import parse_params
    from sm3_dist.tools.bench.step import run

    from sm3_dist.kernels import registry

    preset, rounds, steps, warmup = SETTINGS.get(device.type, SETTINGS["cpu"])
    only = list(ROWS)
    if registry.fused_kernel(device.type) is None:  # fused=True would be refused: the table leaves those rows out
        only = [r for r in ROWS if "fused" not in r or r.startswith("adam")]
    result = run(
        parse_params(params or preset),
        device=device,
        rounds=rounds,
        steps_per_round=steps,
        warmup=warmup,
        only=only,
        check_syncs=device.type == "cuda",
    )
    result["rows"] = [r for r in result["rows"] if r["name"] in only]
    result["preset"] = params or preset
    return result


def speed_lines(result: dict[str, Any]) -> list[str]:
    cuda = result["device"].startswith("cuda")
    lines = [
        f"{result['parameters'] / 1e6:.1f}M parameters ({result['preset']}) on {result['device']}, copy bandwidth "
        f"{result['bandwidth_gb_s']:.1f} GB/s, {result['rounds']} rounds x {result['steps_per_round']} steps",
        "",
        "| optimizer | ms/step | vs Adam fused | % of bound |"
        + (" launches | host syncs | sync error |" if cuda else ""),
        "|---|---:|---:|---:|" + ("---:|---:|---|" if cuda else ""),
    ]
    for r in result["rows"]:
        ratio = "-" if r["ratio_to_adam_fused"] is None else f"{r['ratio_to_adam_fused']:.2f}x"
        line = f"| {r['name']} | {r['median_ms']:.3f} | {ratio} | {r['pct_of_bound']:.0f}% |"
        if cuda:
            line += f" {r['launches']} | {r['syncs']} | {r.get('sync_error') or '-'} |"
        lines.append(line)
    return lines
