"""``sm3-dist memory --measure-cuda``: the study's claims measured on one CUDA device.

1. Whole-step peaks: for a few sizes of the training job's GPT-2 (byte vocabulary),
   AdamW and SM3, ``torch.cuda.max_memory_allocated`` over three real steps
   against :func:`~sm3_dist.tools.memory.step.predict_step`.
2. Under a budget set with ``torch.cuda.set_per_process_memory_fraction``: the
   largest micro-batch that trains (fixed model) and the largest depth that
   trains (fixed width and micro-batch), for AdamW and SM3, found by
   :func:`~sm3_dist.tools.memory.step.largest_fitting` over real steps, beside
   the model's answer to the same question, and the SM3 / AdamW ratios.

Writes ``cuda-memory.json`` and ``cuda-memory.md`` to the output folder.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from sm3_dist.tools.memory.report import OPTIMIZER_LABELS, markdown_table
from sm3_dist.tools.memory.step import StepCase, largest_fitting, measure_step_cuda, predict_step, run_steps

__all__ = ["PEAK_CASES", "SEARCH_BATCH", "SEARCH_DEPTH", "fits_cuda", "markdown", "run_cuda_study", "search"]

_GPT2 = dict(n_layer=12, n_embd=768, n_head=12)
_MEDIUM = dict(n_layer=24, n_embd=1024, n_head=16)
PEAK_CASES = tuple(
    StepCase(**shape, seq_len=256, batch=batch, optimizer=o, precision=p, checkpointing=ck)
    for shape, batch, p, ck in (
        (_GPT2, 32, "fp32", False),
        (_GPT2, 32, "fp32", True),
        (_GPT2, 32, "bf16-autocast", False),
        (_MEDIUM, 8, "fp32", False),
    )
    for o in ("adamw", "sm3")
)
"""The job's GPT-2 (12 x 768) at its batch 32 x 256 (plain, checkpointed, autocast) and 24 x 1024 at 8 x 256."""
SEARCH_BATCH = StepCase(**_GPT2, seq_len=256, batch=1)
"""The micro-batch search: the job's GPT-2, fp32, 256 tokens per sample."""
SEARCH_DEPTH = StepCase(n_layer=1, n_embd=768, n_head=12, seq_len=256, batch=4)
"""The depth search: width 768, micro-batch 4 x 256, fp32."""


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def fits_cuda(case: StepCase, steps: int = 2) -> bool:
    """Whether ``steps`` training steps of ``case`` run on the device without running out of memory."""
    _release()
    try:
        run_steps(case, "cuda", steps)
        ok = True
    except torch.OutOfMemoryError:
        ok = False  # the exception (and the frames it holds) is gone once this block ends
    except RuntimeError as exc:  # a kernel's own allocation (Triton, cuBLAS) reports it in words
        if "out of memory" not in str(exc).lower():
            raise
        ok = False
    _release()
    return ok


def search(base: StepCase, field: str, fits: Callable[[StepCase], bool], *, limit: int) -> int:
    """The largest value of ``field`` (``batch`` or ``n_layer``) with which ``fits`` holds."""
    return largest_fitting(lambda n: fits(replace(base, **{field: n})), limit=limit)


def _predicted_fits(budget: int, device: str) -> Callable[[StepCase], bool]:
    return lambda case: predict_step(case, device).peak <= budget


def _warm_up() -> None:
    """One fp32 and one bf16 matmul, so the cuBLAS workspaces (kept by the allocator for the process) exist before
    any baseline is read."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.ones(64, 64, device="cuda", dtype=dtype)
        (x @ x).sum().item()
    torch.cuda.synchronize()


def run_cuda_study(
    out: str,
    *,
    budget_gib: float = 4.0,
    tolerance: float = 0.10,
    device: str = "cuda",
    peak_cases: Sequence[StepCase] = PEAK_CASES,
    search_cases: Sequence[tuple[str, StepCase, str, int]] | None = None,
    measure: Callable[[StepCase], int] | None = None,
    fits: Callable[[StepCase], bool] | None = None,
) -> int:
    """Run both parts, print and write the tables; 1 if a peak is off by more than ``tolerance``.

    On ``cuda`` (the command) the peaks are ``torch.cuda.max_memory_allocated`` and the searches run real steps
    under ``set_per_process_memory_fraction``. ``measure`` and ``fits`` replace those (the tests run the same
    path on CPU with the allocator-event measurement and a predicate).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--measure-cuda needs a CUDA device (torch.cuda.is_available() is False)")
    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    budget = int(budget_gib * 2**30)
    result: dict[str, Any] = {"device": device, "torch": torch.__version__, "budget_gib": budget_gib}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        result.update(device=props.name, total_memory=props.total_memory)
        _warm_up()
    measure = measure or measure_step_cuda
    fits = fits or fits_cuda
    if search_cases is None:
        search_cases = (("micro-batch", SEARCH_BATCH, "batch", 4096), ("depth", SEARCH_DEPTH, "n_layer", 1024))
    peaks = []
    for case in peak_cases:
        measured = measure(case)
        predicted = predict_step(case, device)
        peaks.append(
            {
                **asdict(case),
                "predicted": predicted.peak,
                "measured": measured,
                "rel_error": (predicted.peak - measured) / measured,
                "phases": {
                    "backward_start": predicted.backward_start,
                    "block_backward": predicted.block_backward,
                    "optimizer_step": predicted.optimizer_step,
                },
            }
        )
        label = f"{case.n_layer}x{case.n_embd} {case.batch}x{case.seq_len} {case.precision} {case.optimizer}"
        print(f"peak {label}: {measured / 2**20:.1f} MiB (model {predicted.peak / 2**20:.1f})", flush=True)
    result["peaks"] = peaks

    searches = []
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / result["total_memory"]))
    try:
        for what, base, field, limit in search_cases:
            for optimizer in ("adamw", "sm3"):
                case = replace(base, optimizer=optimizer)
                measured = search(case, field, fits, limit=limit)
                predicted = search(case, field, _predicted_fits(budget, device), limit=limit)
                searches.append(
                    {"search": what, "field": field, **asdict(case), "measured": measured, "predicted": predicted}
                )
                print(f"largest {what} {optimizer}: {measured} (model: {predicted})", flush=True)
    finally:
        if device == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
    result["searches"] = searches
    result["seconds"] = time.perf_counter() - started
    text = markdown(result)
    print(text)
    with open(os.path.join(out, "cuda-memory.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "cuda-memory.md"), "w") as f:
        f.write(text + "\n")
    bad = [p for p in peaks if abs(p["rel_error"]) > tolerance]
    if bad:
        print(f"FAILED: {len(bad)} peak(s) off the prediction by more than {tolerance:.0%}")
        return 1
    return 0


def markdown(result: dict[str, Any]) -> str:
    rows = [
        [
            f"{p['n_layer']}x{p['n_embd']}",
            f"{p['batch']} x {p['seq_len']}",
            p["precision"] + (", checkpointing" if p["checkpointing"] else ""),
            OPTIMIZER_LABELS[p["optimizer"]],
            f"{p['predicted'] / 2**30:.3f}",
            f"{p['measured'] / 2**30:.3f}",
            f"{100 * p['rel_error']:+.1f}%",
        ]
        for p in result["peaks"]
    ]
    lines = [
        f"Whole-step peaks on {result['device']} (torch {result['torch']}) over 3 steps vs the model",
        "",
        markdown_table(
            ["model", "batch x seq", "precision", "optimizer", "predicted GiB", "measured GiB", "error"], rows
        ),
        "",
        f"Largest that trains under {result['budget_gib']:g} GiB, measured (model)",
        "",
    ]
    rows = []
    by = {(s["search"], s["optimizer"]): s for s in result["searches"]}
    for what in dict.fromkeys(s["search"] for s in result["searches"]):
        adamw, sm3 = by[what, "adamw"], by[what, "sm3"]
        label = (
            f"micro-batch of {adamw['n_layer']}x{adamw['n_embd']} (x {adamw['seq_len']} tokens)"
            if what == "micro-batch"
            else f"depth at width {adamw['n_embd']}, micro-batch {adamw['batch']} x {adamw['seq_len']}"
        )
        ratio = sm3["measured"] / adamw["measured"] if adamw["measured"] else float("inf")
        model_ratio = sm3["predicted"] / adamw["predicted"] if adamw["predicted"] else float("inf")
        rows.append(
            [
                label,
                f"{adamw['measured']} ({adamw['predicted']})",
                f"{sm3['measured']} ({sm3['predicted']})",
                f"{ratio:.2f} ({model_ratio:.2f})",
            ]
        )
    lines.append(markdown_table(["largest", "AdamW (model)", "SM3 (model)", "SM3 / AdamW (model)"], rows))
    lines += ["", f"({result['seconds']:.0f} s)"]
    return "\n".join(lines)
