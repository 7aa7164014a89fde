"""Checking a device against the eager CPU kernel, bitwise: :func:`check` (``python -m sm3_dist.kernels.cuda --check``)."""

from __future__ import annotations

import itertools
import math

import torch

from sm3_dist.kernels.math import same_bits

from .scan_finalize import FinalizePlan, nonfinite_
from .step import TritonPlan


def _check_cases():
    from sm3_dist.kernels.rule import UpdateRule

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    mixed = [(1000, 256), (256,), (64, 1024), (1024, 64), (300, 3), (3, 5, 7), (2, 3, 4, 300), (7,), ()]
    return [
        ("fp32, momentum 0.9", dict(shapes=mixed, p=f32, m=f32, rule=UpdateRule(momentum=0.9))),
        (
            "bf16 params and momentum, weight decay, maximize",
            dict(shapes=mixed, p=bf16, m=bf16, rule=UpdateRule(momentum=0.9, weight_decay=0.01, maximize=True)),
        ),
        ("fp16 params, tiny gradients (subnormal results)", dict(shapes=mixed, p=f16, m=f32, tiny=True)),
        ("fp32, subnormal gradients and accumulators", dict(shapes=mixed, p=f32, m=None, tiny=True, tiny_acc=True)),
        (
            "eps 0, beta 0.9, nu_divisor, grad_scale and lr as tensors",
            dict(shapes=mixed, p=f32, m=f32, rule=UpdateRule(momentum=0.9, beta=0.9, eps=0.0), tensors=True),
        ),
        (
            "flat ranges straddling rows, keep_max",
            dict(shapes=mixed, p=f32, m=f32, rule=UpdateRule(momentum=0.5, beta=0.9), cuts=(0.21, 0.6), keep=True),
        ),
        ("found_inf set: nothing written", dict(shapes=mixed, p=bf16, m=f32, found_inf=1.0)),
        (  # the clip binds where mu is small against g^2 (about half the coordinates here), not elsewhere
            "update_clip 0.5, eps 0, beta 0.9, bf16 momentum",
            dict(shapes=mixed, p=f32, m=bf16, rule=UpdateRule(momentum=0.9, beta=0.9, eps=0.0, update_clip=0.5)),
        ),
    ]


def _flat_blocks(tensors, accs, outs, cuts):
    """Each tensor cut into flat ranges at the fractions ``cuts`` of its size (blocks straddle rows)."""
    from sm3_dist.layout import split_flat_range

    blocks = []  # (tensor index, flat start, view shape, accumulator slices, maxima slices)
    for k, (t, a, o) in enumerate(zip(tensors, accs, outs)):
        n = t.numel()
        bounds = sorted({0, n, *(min(n, max(0, int(f * n))) for f in cuts)}) if n > 1 else [0, n]
        for lo, hi in itertools.pairwise(bounds):
            for b in split_flat_range(t.shape, lo, hi):
                start = lo + b.offset
                if t.ndim <= 1:
                    sl = [slice(start, start + b.numel)]
                    shape = (b.numel,) if t.ndim else ()
                else:
                    sl = [slice(s, s + m) for s, m in zip(b.starts, b.lengths)]
                    shape = b.lengths
                blocks.append((k, start, shape, [x[s] for x, s in zip(a, sl)], [x[s] for x, s in zip(o, sl)]))
    return blocks


def _run_check_case(spec: dict, device: torch.device, steps: int = 2) -> dict:
    from sm3_dist.kernels.math import single_block, store_maxima
    from sm3_dist.kernels.rule import UpdateRule

    gen = torch.Generator().manual_seed(0)
    rule = spec.get("rule", UpdateRule())
    shapes = spec["shapes"]
    params = [torch.randn(s, generator=gen).to(spec["p"]) for s in shapes]
    bufs = [None if spec["m"] is None else (0.1 * torch.randn(s, generator=gen)).to(spec["m"]) for s in shapes]
    lengths = [list(s) if len(s) >= 2 else [math.prod(s)] for s in shapes]
    accs = [[torch.rand(n, generator=gen) for n in ls] for ls in lengths]
    if spec.get("tiny_acc"):
        accs = [[a * 1e-38 for a in aa] for aa in accs]
    grads = []
    for _ in range(steps):
        gs = [torch.randn(s, generator=gen) for s in shapes]
        if spec.get("tiny"):
            for g in gs:
                g.view(-1)[::3] *= 1e-20
                g.view(-1)[1::3] *= 1e-4
        grads.append([g.to(spec["p"]) for g in gs])
    tensors = spec.get("tensors", False)
    found = spec.get("found_inf")
    keep = spec.get("keep", False)
    # on the device: the kernel
    # copies even on the CPU (Triton's interpreter), where .to(device) would return the eager run's own tensors
    d_params = [p.to(device, copy=True) for p in params]
    d_bufs = [None if m is None else m.to(device, copy=True) for m in bufs]
    d_accs = [[a.to(device, copy=True) for a in aa] for aa in accs]
    d_outs = [[torch.zeros_like(a) for a in aa] for aa in d_accs]
    if spec.get("cuts"):
        cut = _flat_blocks(d_params, d_accs, d_outs, spec["cuts"])
        b_params = [d_params[k].view(-1)[s : s + math.prod(v)].view(v) for k, s, v, _, _ in cut]
        b_bufs = [
            None if d_bufs[k] is None else d_bufs[k].view(-1)[s : s + math.prod(v)].view(v) for k, s, v, _, _ in cut
        ]
        b_accs, b_outs = [c[3] for c in cut], [c[4] for c in cut]
    else:
        cut = None
        b_params, b_bufs, b_accs, b_outs = d_params, d_bufs, d_accs, d_outs
    plan = TritonPlan.build(b_params, b_bufs, b_accs, b_outs)
    if plan is None:
        return {"ok": False, "error": f"TritonPlan.build refused: {TritonPlan.reason}"}
    finalize = FinalizePlan([a for aa in d_accs for a in aa], [o for oo in d_outs for o in oo])
    flag = None if found is None else torch.full((1,), found, device=device)
    scale, divisor = 512.0, 0.271
    for step, gs in enumerate(grads):
        lr = 0.01 * (step + 1)
        d_gs = [g.to(device) for g in gs]
        if cut is not None:
            d_gs = [d_gs[k].view(-1)[s : s + math.prod(v)].view(v) for k, s, v, _, _ in cut]
        kw = {}
        if tensors:
            kw = dict(
                nu_divisor=torch.full((1,), divisor, device=device),
                grad_scale=torch.full((1,), scale, device=device),
            )
            lr = torch.full((1,), lr, device=device)
        plan.step(d_gs, rule, lr=lr, found_inf=flag, **kw)
        finalize.run(keep_max=keep, found_inf=flag)
    # on CPU: the eager kernel
    for step, gs in enumerate(grads):
        if found:
            break
        lr = 0.01 * (step + 1)
        nud, gsc = (torch.tensor(divisor), torch.tensor(scale)) if tensors else (None, None)
        if tensors:
            lr = torch.tensor(lr)
        for p, g, m, aa in zip(params, gs, bufs, accs):
            if p.ndim == 0:
                p, g, m = p.view(1), g.view(1), None if m is None else m.view(1)
            maxima = single_block(p, g, m, aa, rule, lr, nud, gsc)
            store_maxima(list(aa), list(maxima), keep)
    bad = []
    for k in range(len(shapes)):
        if not same_bits(d_params[k], params[k]):
            bad.append(f"param {k} {tuple(shapes[k])}")
        if bufs[k] is not None and not same_bits(d_bufs[k], bufs[k]):
            bad.append(f"momentum {k}")
        for d, (x, y) in enumerate(zip(d_accs[k], accs[k])):
            if not same_bits(x, y):
                bad.append(f"accumulator {k}.{d}")
    return {"ok": not bad, "mismatches": bad}


def check(device: str | torch.device = "cuda") -> list[dict]:
    """The kernels on ``device`` against the eager CPU kernel, bitwise, on a few shapes and settings.

    Returns one dict per case: ``name``, ``ok`` and the ``mismatches`` (what differed) or an ``error``.
    """
    device = torch.device(device)
    results = []
    for name, spec in _check_cases():
        try:
            r = _run_check_case(spec, device)
        except Exception as exc:  # reported, not raised: the other cases still run
            r = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        results.append({"name": name, **r})
    # the non-finite scan: each position of an inf/NaN, in each dtype
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        found_all = True
        for where in (0, 4095, 4096, 9999):
            ts = [torch.randn(n, device=device).to(dtype) for n in (10, 10000, 3)]
            flag = torch.zeros(1, device=device)
            nonfinite_(ts, flag)
            clean = float(flag.item()) == 0.0
            ts[1][where] = float("nan") if where % 2 else float("-inf")
            nonfinite_(ts, flag)
            found_all = found_all and clean and float(flag.item()) == 1.0
        results.append({"name": f"nonfinite_ {str(dtype).removeprefix('torch.')}", "ok": found_all})
    return results
