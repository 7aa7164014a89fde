"""The doctor's correctness section: every SM3 kernel available on a device against the eager per-tensor kernel,
bitwise, and against a float64 reference (:mod:`.reference`), close.

Each case steps a few small tensors three times through :func:`sm3_dist.kernels.dispatch.sm3` as the optimizer
does (the maxima collected into zeroed buffers by max, then :func:`~sm3_dist.kernels.dispatch.finalize_`), with
the tensors cut into blocks as a sharded step cuts them. The baseline is the per-tensor kernel on CPU; the kernels
are ``single`` (the per-tensor loop, on the device), ``foreach`` and ``fused`` (the device's registered fused
kernel: the native C++ kernel on CPU, the Triton kernel on CUDA), whichever the device has.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sm3_dist.kernels.math import same_bits

from .reference import Reference64

__all__ = ["CASES", "KERNELS", "Case", "available_kernels", "run_checks"]

KERNELS = {"single": dict(foreach=False, fused=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
"""The kernels a step can run, as ``sm3()``'s flags."""
FUSED_NAMES = {"cpu": "fused (native C++)", "cuda": "fused (Triton)"}

STEPS = 3
LR = (0.01, 0.02, 0.015)


@dataclass(frozen=True)
class Case:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype = torch.float32
    momentum_dtype: torch.dtype | None = torch.float32
    momentum: float = 0.9
    beta: float = 0.0
    bias_correction: bool = False
    weight_decay: float = 0.0
    maximize: bool = False
    update_clip: float = 0.0
    grad_scale: float | None = None
    layout: str = "dense"
    """``dense`` (whole tensors), ``dimension`` (boxes: 2-D tensors in quadrants, others halved along dim 0) or
    ``flat`` (flat ranges cut at 30% and 70% of each tensor, blocks straddling rows)."""
    found_inf_at: int | None = None
    """The step (0-based) whose ``found_inf`` is set: nothing may change."""
    options: dict[str, Any] = field(default_factory=dict)


_SHAPES = ((300, 257), (33, 70), (130,), (), (3, 5, 7))
CASES = (
    Case("dense", _SHAPES, weight_decay=0.01),
    Case("dimension shard", ((64, 90), (48, 33), (6, 10, 7), (50,)), layout="dimension"),
    Case("flat range, straddling rows", ((300, 257), (33, 70), (3, 5, 7), (130,)), momentum=0.5, layout="flat"),
    Case("bf16", _SHAPES, dtype=torch.bfloat16, momentum_dtype=torch.bfloat16, beta=0.9, bias_correction=True),
    Case(
        "beta + bias correction",
        _SHAPES,
        momentum_dtype=None,
        momentum=0.0,
        beta=0.99,
        bias_correction=True,
        grad_scale=256.0,
        maximize=True,
    ),
    Case("update clip", _SHAPES, beta=0.99, bias_correction=True, update_clip=0.5, layout="flat"),
    Case("found_inf", _SHAPES, dtype=torch.bfloat16, beta=0.9, found_inf_at=1),
)
"""The cases: dense, a dimension shard, a flat range with straddling rows, bf16, beta + bias correction (with a
gradient scale and maximize), the update clip (the recommended form, clipped at 0.5 so that it binds on three
steps of random gradients), and a step whose ``found_inf`` is set."""


def _inputs(case: Case) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1234)
    params = [torch.randn(s, generator=gen).to(case.dtype) for s in case.shapes]
    momentum = [
        None if case.momentum_dtype is None else (0.1 * torch.randn(s, generator=gen)).to(case.momentum_dtype)
        for s in case.shapes
    ]
    lengths = [list(s) if len(s) >= 2 else [math.prod(s)] for s in case.shapes]
    mu = [[torch.rand(n, generator=gen) * 0.5 for n in ls] for ls in lengths]
    scale = case.grad_scale or 1.0
    grads = [[(scale * torch.randn(s, generator=gen)).to(case.dtype) for s in case.shapes] for _ in range(STEPS)]
    return {"params": params, "momentum": momentum, "mu": mu, "grads": grads}


def _boxes(shape: tuple[int, ...], layout: str) -> list[tuple[slice, ...] | tuple[int, tuple[int, ...], list]]:
    """The blocks of one tensor: ``("box", slices)`` or ``("flat", offset, lengths, starts)``."""
    if layout == "dense" or len(shape) == 0:
        return [("box", tuple(slice(None) for _ in shape))]
    if layout == "dimension":
        halves = [slice(0, shape[0] // 2), slice(shape[0] // 2, shape[0])]
        if len(shape) == 2:
            cols = [slice(0, shape[1] // 3), slice(shape[1] // 3, shape[1])]
            return [("box", (r, c)) for r in halves for c in cols]
        return [("box", (h, *(slice(None) for _ in shape[1:]))) for h in halves]
    from sm3_dist.layout import split_flat_range

    n = math.prod(shape)
    cuts = [0, int(0.3 * n), int(0.7 * n), n]
    blocks = []
    for lo, hi in itertools.pairwise(cuts):
        if hi > lo:
            blocks += [("flat", lo + b.offset, b.lengths, b.starts) for b in split_flat_range(shape, lo, hi)]
    return blocks


def _block_views(tensor: Tensor | None, accs: list[Tensor], block) -> tuple[Tensor | None, list[Tensor]]:
    """The block's view of a tensor of the parameter's shape and the slices of ``accs`` it covers."""
    if block[0] == "box":
        slices = block[1]
        view = None if tensor is None else (tensor[slices] if slices else tensor.view(1))
        if len(accs) == 1:
            sl = slices[0] if slices else slice(None)
            return view, [accs[0][sl]]
        return view, [a[s] for a, s in zip(accs, slices)]
    _, offset, lengths, starts = block
    numel = math.prod(lengths)
    view = None if tensor is None else tensor.reshape(-1)[offset : offset + numel].view(lengths)
    return view, [a[s : s + n] for a, s, n in zip(accs, starts, lengths)]


def run_kernel(case: Case, inputs: dict[str, Any], device: torch.device, flags: dict[str, bool]) -> dict[str, list]:
    """Three steps of ``case`` through ``sm3()`` with ``flags`` on ``device``; the end state on CPU."""
    from sm3_dist.kernels.dispatch import finalize_, sm3
    from sm3_dist.kernels.rule import UpdateRule

    rule = UpdateRule(
        momentum=case.momentum,
        beta=case.beta,
        weight_decay=case.weight_decay,
        maximize=case.maximize,
        bias_correction=case.bias_correction,
        update_clip=case.update_clip,
    )
    params = [p.to(device, copy=True) for p in inputs["params"]]
    momentum = [None if m is None else m.to(device, copy=True) for m in inputs["momentum"]]
    mu = [[a.to(device, copy=True) for a in accs] for accs in inputs["mu"]]
    maxima = [[torch.zeros_like(a) for a in accs] for accs in mu]
    blocks = [_boxes(tuple(p.shape), case.layout) for p in params]
    scale = None if case.grad_scale is None else torch.full((1,), case.grad_scale, device=device)
    for step in range(STEPS):
        grads = [g.to(device) for g in inputs["grads"][step]]
        flag = None
        if case.found_inf_at is not None:
            flag = torch.full((1,), float(step == case.found_inf_at), device=device)
        bp, bg, bm, ba, bo = [], [], [], [], []
        for k, tensor_blocks in enumerate(blocks):
            for block in tensor_blocks:
                p, accs = _block_views(params[k], mu[k], block)
                bp.append(p)
                ba.append(accs)
                bg.append(_block_views(grads[k], mu[k], block)[0])
                bm.append(_block_views(momentum[k], mu[k], block)[0])
                bo.append(_block_views(None, maxima[k], block)[1])
        sm3(
            bp,
            bg,
            bm,
            ba,
            rule=rule,
            lr=LR[step],
            nu_divisor=rule.nu_divisor(step + 1),
            maxima_out=bo,
            keep_max=True,
            found_inf=flag,
            grad_scale=scale,
            **flags,
        )
        finalize_(
            [a for accs in mu for a in accs], [o for outs in maxima for o in outs], keep_max=False, found_inf=flag
        )
    return {
        "params": [p.cpu() for p in params],
        "momentum": [None if m is None else m.cpu() for m in momentum],
        "mu": [[a.cpu() for a in accs] for accs in mu],
    }


def reference(case: Case, inputs: dict[str, Any]) -> Reference64:
    ref = Reference64.of(inputs["params"], inputs["momentum"], inputs["mu"])
    for step in range(STEPS):
        divisor = 1.0 - case.beta ** (step + 1) if case.bias_correction and case.beta > 0 else None
        ref.step(
            inputs["grads"][step],
            lr=LR[step],
            momentum=case.momentum,
            beta=case.beta,
            weight_decay=case.weight_decay,
            maximize=case.maximize,
            nu_divisor=divisor,
            update_clip=case.update_clip,
            grad_scale=case.grad_scale,
            found_inf=step == case.found_inf_at,
        )
    return ref


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) of a kernel's result against the float64 reference after three steps."""
    return (2e-5, 1e-6) if dtype == torch.float32 else (2e-2, 2e-3)


def _mismatches(got: dict[str, list], want: dict[str, list], case: Case) -> list[str]:
    bad = []
    for k, shape in enumerate(case.shapes):
        label = f"{tuple(shape)}"
        if not same_bits(got["params"][k], want["params"][k]):
            bad.append(f"param {label}")
        m, n = got["momentum"][k], want["momentum"][k]
        if n is not None and not same_bits(m, n):
            bad.append(f"momentum {label}")
        for d, (x, y) in enumerate(zip(got["mu"][k], want["mu"][k])):
            if not same_bits(x, y):
                bad.append(f"accumulator {label}[{d}]")
    return bad


def _far(got: dict[str, list], ref: Reference64, case: Case) -> list[str]:
    """Where ``got`` is not close to the float64 reference, with the largest error relative to the tolerance."""
    rtol, atol = _tolerance(case.dtype)
    bad = []

    def check(what: str, x: Tensor, y: Tensor, rtol: float, atol: float) -> None:
        x = x.double().reshape(y.shape)
        excess = ((x - y).abs() - rtol * y.abs()).max().item() if y.numel() else 0.0
        if not torch.allclose(x, y, rtol=rtol, atol=atol):
            bad.append(f"{what} (off by up to {excess:.2g} beyond rtol {rtol:g})")

    for k, shape in enumerate(case.shapes):
        check(f"param {tuple(shape)}", got["params"][k], ref.params[k], rtol, atol)
        if ref.momentum[k] is not None:
            check(f"momentum {tuple(shape)}", got["momentum"][k], ref.momentum[k], rtol, atol)
        for d, (x, y) in enumerate(zip(got["mu"][k], ref.mu[k])):
            check(f"accumulator {tuple(shape)}[{d}]", x, y, _tolerance(torch.float32)[0] * 10, 1e-6)
    return bad


def available_kernels(device: torch.device) -> tuple[dict[str, dict[str, bool]], dict[str, str]]:
    """The kernels to check on ``device`` (name -> ``sm3()`` flags) and those missing (name -> why)."""
    from sm3_dist.kernels import registry

    kernels = {"single": KERNELS["single"], "foreach": KERNELS["foreach"]}
    missing = {}
    fused_name = FUSED_NAMES.get(device.type, "fused")
    try:
        kernel = registry.fused_kernel(device.type)
    except Exception as exc:  # a loader that raises: reported as the kernel's failure
        kernel, missing[fused_name] = None, f"its loader raised {type(exc).__name__}: {exc}"
    if kernel is not None:
        kernels[fused_name] = KERNELS["fused"]
    elif fused_name not in missing:
        missing[fused_name] = "no fused kernel is available for this device (see the environment section)"
    return kernels, missing


def run_checks(device: torch.device, cases=CASES) -> dict[str, Any]:
    """Every available kernel on every case: ``{"kernels", "missing", "results": [{case, kernel, bitwise,
    reference, ok, detail}], "ok"}``."""
    kernels, missing = available_kernels(device)
    results = []
    for case in cases:
        inputs = _inputs(case)
        try:
            baseline = run_kernel(case, inputs, torch.device("cpu"), KERNELS["single"])
            ref = reference(case, inputs)
        except Exception as exc:
            results.append(dict(case=case.name, kernel="baseline", ok=False, detail=f"{type(exc).__name__}: {exc}"))
            continue
        base_far = _far(baseline, ref, case)
        for name, flags in kernels.items():
            try:
                got = run_kernel(case, inputs, device, flags)
            except Exception as exc:
                results.append(
                    dict(case=case.name, kernel=name, ok=False, bitwise=False, close=False, detail=f"raised {exc!r}")
                )
                continue
            bitwise = _mismatches(got, baseline, case)
            far = base_far or _far(got, ref, case)
            detail = []
            if bitwise:
                detail.append("differs from the eager kernel in " + ", ".join(bitwise[:4]))
                detail[-1] += f" (+{len(bitwise) - 4} more)" if len(bitwise) > 4 else ""
            if far:
                detail.append("not close to the float64 reference: " + ", ".join(far[:3]))
            results.append(
                dict(
                    case=case.name,
                    kernel=name,
                    ok=not bitwise and not far,
                    bitwise=not bitwise,
                    close=not far,
                    detail="; ".join(detail),
                )
            )
    return {
        "device": str(device),
        "kernels": list(kernels),
        "missing": missing,
        "results": results,
        "ok": all(r["ok"] for r in results),
    }
