"""Timing the step against ``torch.optim.Adam(fused=True)``: :func:`bench` (``python -m sm3_dist.kernels.cuda --bench``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .scan_finalize import FinalizePlan, NonfinitePlan
from .step import _ALIGN_HINTS, _LAST, TritonPlan
from .table import _NUM_WARPS, _TUNE, _WIDE


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, steps: int, rounds: int, device: torch.device) -> float:
    """Median over ``rounds`` of the mean time of ``steps`` back-to-back calls, in ms (device synchronized)."""
    import statistics
    import time

    samples = []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3 / steps)
    return statistics.median(samples)


def _copy_bandwidth(device: torch.device, mib: int = 1024) -> float:
    """Bytes per second of a large fp32 copy (read and write counted)."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = _time_ms(lambda: dst.copy_(src), 5, 5, device)
    return 2 * src.numel() * 4 / (ms / 1e3)


def bench(
    shapes: Sequence[Sequence[int]],
    *,
    device: str = "cuda",
    steps: int = 10,
    rounds: int = 7,
    tune: bool = False,
    dump: str | None = None,
) -> list[dict]:
    """The plan's step (with the finalize launch) against ``torch.optim.Adam(fused=True)`` on the same parameters.

    fp32 parameters, momentum 0.9 in fp32. Rows: name, ms per step, ratio to Adam, bytes moved, % of the copy
    bandwidth bound. SM3 moves ``20 * numel`` (reads w, g, m; writes w, m) plus the accumulators and maxima;
    Adam ``28 * numel``.
    """
    from sm3_dist.kernels.rule import UpdateRule

    device = torch.device(device)
    torch.manual_seed(0)
    params = [torch.randn(*s, device=device) for s in shapes]
    grads = [torch.randn_like(p) for p in params]
    numel = sum(p.numel() for p in params)
    sum_dims = sum(sum(p.shape) if p.ndim >= 2 else p.numel() for p in params)
    bufs = [torch.zeros_like(p) for p in params]
    accs = [[torch.zeros(n, device=device) for n in (p.shape if p.ndim >= 2 else (p.numel(),))] for p in params]
    outs = [[torch.zeros_like(a) for a in aa] for aa in accs]
    plan = TritonPlan.build(params, bufs, accs, outs)
    if plan is None:
        raise RuntimeError(f"TritonPlan.build refused the set: {TritonPlan.reason}")
    finalize = FinalizePlan([a for aa in accs for a in aa], [o for oo in outs for o in oo])
    scan = NonfinitePlan(grads)
    flag = torch.zeros(1, device=device)
    rule = UpdateRule(momentum=0.9)

    def sm3_step():
        plan.step(grads, rule, lr=1e-4)
        finalize.run(keep_max=False)

    def sm3_step_skip():  # the default non-finite handling: scan, and skip on the device
        flag.zero_()
        scan.run(flag)
        plan.step(grads, rule, lr=1e-4, found_inf=flag)
        finalize.run(keep_max=False, found_inf=flag)

    def kernel_only():
        plan.step(grads, rule, lr=1e-4)

    rows = []
    bandwidth = _copy_bandwidth(device, 1024 if device.type == "cuda" else 16)
    sm3_bytes = 20 * numel + 8 * sum_dims
    if tune:
        saved = (dict(_WIDE), _NUM_WARPS["update"])
        best = None
        for br, bc, ri, nw in _TUNE:
            _WIDE.update(BR=br, BC=bc, RI=ri)
            _NUM_WARPS["update"] = nw
            plan = TritonPlan.build(params, bufs, accs, outs)  # tile geometry is part of the table
            kernel_only()
            ms = _time_ms(kernel_only, steps, 3, device)
            print(f"[tune] BR={br} BC={bc} RI={ri} warps={nw}: {ms:.3f} ms kernel", flush=True)
            if best is None or ms < best[0]:
                best = (ms, br, bc, ri, nw)
        _WIDE.update(BR=best[1], BC=best[2], RI=best[3])
        _NUM_WARPS["update"] = best[4]
        print(f"[tune] best: BR={best[1]} BC={best[2]} RI={best[3]} warps={best[4]} ({best[0]:.3f} ms)", flush=True)
        plan = TritonPlan.build(params, bufs, accs, outs)
        del saved
    for fn in (sm3_step, sm3_step_skip, kernel_only):
        fn()
    syncs = "none" if device.type == "cuda" else "not checked (no CUDA device)"
    ptx = getattr(_LAST.get("kernel"), "asm", {}).get("ptx", "") if device.type == "cuda" else ""
    if ptx:
        import re

        print(f"[ptx] aligned variant: {plan._aligned()} (hints on: {_ALIGN_HINTS['on']})", flush=True)
        if dump:
            os.makedirs(dump, exist_ok=True)
            for key, text in _LAST["kernel"].asm.items():
                if isinstance(text, str):
                    with open(os.path.join(dump, f"sm3_step.{key}"), "w") as f:
                        f.write(text)

        kinds = sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx)))
        print("[ptx] " + ", ".join(f"{k} x{ptx.count(k + ' ')}" for k in kinds), flush=True)
    try:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        sm3_step()
        sm3_step_skip()
    except RuntimeError as exc:
        syncs = f"host synchronization: {exc}"
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    adam_params = [p.clone().requires_grad_() for p in params]
    for p, g in zip(adam_params, grads):
        p.grad = g
    adam = torch.optim.Adam(adam_params, lr=1e-4, fused=True)
    adam.step()
    timed = [
        ("adam fused", adam.step, 28 * numel),
        ("sm3 triton m=0.9, no non-finite check (2 launches)", sm3_step, sm3_bytes),
        ("sm3 triton m=0.9, non-finite skip (4 launches)", sm3_step_skip, sm3_bytes + 4 * numel),
        ("sm3 triton update kernel alone", kernel_only, sm3_bytes),
    ]
    ms_adam = None
    for name, fn, moved in timed:
        ms = _time_ms(fn, steps, rounds, device)
        ms_adam = ms if ms_adam is None else ms_adam
        bound = moved / bandwidth * 1e3
        rows.append(
            {
                "name": name,
                "ms": ms,
                "vs_adam": ms / ms_adam,
                "moved_mb": moved / 1e6,
                "bound_ms": bound,
                "pct_of_bound": 100 * bound / ms,
            }
        )
    print(
        f"{numel / 1e6:.1f}M parameters in {len(params)} tensors on "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else device}; "
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; host syncs inside an SM3 step: {syncs}"
    )
    print("| step | ms/step | vs Adam fused | MB moved | bound ms | % of bound |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['ms']:.3f} | {r['vs_adam']:.2f}x | {r['moved_mb']:.0f} | {r['bound_ms']:.3f} "
            f"| {r['pct_of_bound']:.0f}% |"
        )
    return rows
