"""``SM3`` stepping through the Triton kernel as its fused-registry entry, run under Triton's interpreter.

``python -m tests.triton_optimizer_cases OUT`` (with ``TRITON_INTERPRET=1`` set before triton is imported)
registers the Triton kernel for CPU tensors, empties ``kernels.dispatch.HOST_READ_DEVICES`` (so the step keeps its
non-finite flag on the "device", as on a GPU) and trains every case of :data:`CASES` with ``fused=True``;
tests/test_triton_optimizer.py trains the same cases with the eager kernel and compares bitwise.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import torch

from sm3_dist import SM3
from sm3_dist.layout import TensorLayout, flat_range_piece
from sm3_dist.placement import ShardSpec

SHAPES = [(13, 11), (37,), (5, 7, 9), (), (2, 3, 4, 5), (3, 300)]
CASES = {
    "momentum fp32": dict(momentum=0.9),
    "no momentum, eps 0": dict(eps=0.0),
    "bf16 momentum, weight decay": dict(momentum=0.9, momentum_dtype=torch.bfloat16, weight_decay=0.01),
    "beta, bias correction": dict(momentum=0.9, beta=0.9, bias_correction=True),
    "beta, ema_keeps_max, maximize": dict(beta=0.9, ema_keeps_max=True, maximize=True),
    "bf16 params": dict(momentum=0.9, dtype=torch.bfloat16),
    "fp16 params": dict(momentum=0.9, dtype=torch.float16),
    "ignore lets nan through": dict(momentum=0.9, nonfinite="ignore"),
    "flat ranges straddling rows": dict(momentum=0.9, flat=True),
    "grad scale": dict(momentum=0.9, scale=1024.0),
    "update clip, bias correction": dict(momentum=0.9, beta=0.99, bias_correction=True, update_clip=0.5),
    "update clip, flat ranges, eps 0": dict(momentum=0.9, eps=0.0, update_clip=0.5, flat=True),
}
STEPS = 4
BAD_STEP = 2


def make(case: dict, **kernel):
    """Parameters, optimizer and a function giving step ``k``'s gradients for one case."""
    case = dict(case)
    dtype = case.pop("dtype", torch.float32)
    flat = case.pop("flat", False)
    scale = case.pop("scale", None)
    torch.manual_seed(0)
    if flat:
        # one local tensor: elements [7, 118) of a (13, 11) weight (cut mid-row at both ends), then [0, 50) of
        # a (5, 7, 9) weight (a partial slab): the blocks share maxima regions
        layout = TensorLayout((flat_range_piece((13, 11), 7, 118), flat_range_piece((5, 7, 9), 0, 50, offset=111)), 161)
        params = [torch.nn.Parameter(torch.randn(161))]
        opt = SM3(params, lr=0.05, shard_resolver=lambda t: ShardSpec(layout), **case, **kernel)
    else:
        params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]
        opt = SM3(params, lr=0.05, **case, **kernel)

    def grads(step: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(100 + step)
        out = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
        if step == BAD_STEP:
            out[0].view(-1)[5] = math.nan
        return [g * scale for g in out] if scale else out

    return params, opt, grads, scale


def train(case: dict, **kernel) -> dict:
    params, opt, grads, scale = make(case, **kernel)
    for step in range(STEPS):
        for p, g in zip(params, grads(step)):
            p.grad = g
        if scale:
            opt.grad_scale = torch.tensor(scale)
            opt.found_inf = torch.tensor(1.0 if step == BAD_STEP else 0.0)
        opt.step()
    out = {
        "params": [p.detach().clone() for p in params],
        "state": opt.state_dict()["state"],
        "skipped": opt.skipped_steps,
    }
    plan = opt._dense.get(0)
    out["fused"] = None if plan is None or plan.fused is None else type(plan.fused).__name__
    out["other_blocks"] = None if plan is None else len(plan.other_blocks)
    return out


def main(path: str) -> None:
    from sm3_dist.kernels import dispatch, registry

    registry.register_fused_kernel("cpu", lambda: replace(registry._triton_loader(), device_type="cpu"))
    dispatch.HOST_READ_DEVICES.clear()
    results, errors = {}, {}
    for name, case in CASES.items():
        try:
            results[name] = train(case, fused=True)
        except Exception as exc:  # reported per case by the test
            errors[name] = f"{type(exc).__name__}: {exc}"
    torch.save({"cases": results, "errors": errors}, path)


if __name__ == "__main__":
    main(sys.argv[1])
