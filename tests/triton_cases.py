"""Cases for the Triton SM3 kernel: inputs, the kernel's run, and the eager reference, all from one table.

``python -m tests.triton_cases OUT.pt`` runs every case through :mod:`sm3_dist.kernels.cuda` (under
``TRITON_INTERPRET=1``, which it sets before importing triton, on CPU tensors) and saves the results;
tests/test_triton_kernel.py compares them with :func:`reference`, which runs the same inputs through
``sm3_dist.kernels.math.single_block`` on whole tensors.
"""

from __future__ import annotations

import itertools
import math
import os
import sys

import torch
from torch import Tensor

from sm3_dist import functional
from sm3_dist.kernels.math import single_block
from sm3_dist.layout import split_flat_range

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

# every case: the parameters (shapes), their dtype, the momentum buffers' dtype, the update rule and how the step
# is called; "cuts" cuts every parameter into flat ranges at these fractions of its size (blocks that straddle
# rows, sharing the parameter's maxima buffers), "steps" steps are taken with fresh gradients each time
_BASE = dict(
    shapes=[(5, 300), (7,), ()],
    pdtype="f32",
    mdtype=None,
    momentum=0.0,
    beta=0.0,
    eps=1e-30,
    weight_decay=0.0,
    maximize=False,
    update_clip=0.0,
    lr="float",
    nu_divisor=None,
    grad_scale=None,
    found_inf=None,
    keep_max=False,
    cuts=None,
    steps=2,
)

_RANKS = [(3, 4, 5), (2, 3, 4, 3), (6, 40), (9, 700), (1, 1), (2000,), (1,), ()]

CASES: dict[str, dict] = {
    "ranks 0-4": dict(shapes=_RANKS),
    "momentum 0.9 fp32": dict(shapes=_RANKS, momentum=0.9, mdtype="f32"),
    "momentum 0.9 bf16": dict(shapes=_RANKS, momentum=0.9, mdtype="bf16"),
    "momentum buffer with momentum 0": dict(shapes=[(4, 260), (9,)], momentum=0.0, mdtype="f32"),
    "beta 0.9": dict(shapes=_RANKS, beta=0.9, momentum=0.9, mdtype="f32"),
    "eps 0": dict(shapes=_RANKS, eps=0.0, zero_grads=True),
    "eps 0 beta 0.9 bias correction": dict(shapes=[(5, 300), (3, 2, 7), (11,)], eps=0.0, beta=0.9, nu_divisor=0.19),
    "weight decay maximize": dict(shapes=_RANKS, weight_decay=0.01, maximize=True, momentum=0.5, mdtype="f32"),
    "bf16 params": dict(shapes=_RANKS, pdtype="bf16", momentum=0.9, mdtype="bf16", weight_decay=0.1),
    "bf16 params fp32 momentum": dict(shapes=[(6, 300), (4, 3, 5), (33,)], pdtype="bf16", momentum=0.9, mdtype="f32"),
    "fp16 params": dict(shapes=_RANKS, pdtype="f16", momentum=0.9, mdtype="f32", weight_decay=0.01, grad_tiny=True),
    "mixed dtypes": dict(
        shapes=_RANKS,
        pdtype=["f32", "bf16", "f16", "f32", "bf16", "f16", "f32", "bf16"],
        mdtype=["f32", None, "bf16", None, "f32", "bf16", None, "f32"],
        momentum=0.9,
    ),
    "lr tensor": dict(shapes=_RANKS, lr="tensor", momentum=0.9, mdtype="f32"),
    "nu_divisor float": dict(shapes=_RANKS, beta=0.9, nu_divisor=0.271),
    "nu_divisor tensor": dict(shapes=_RANKS, beta=0.9, nu_divisor="tensor", momentum=0.9, mdtype="bf16"),
    "grad_scale": dict(shapes=_RANKS, grad_scale=1024.0, weight_decay=0.01, maximize=True),
    "grad_scale bf16": dict(shapes=[(4, 300), (3, 3, 3), (10,)], pdtype="bf16", grad_scale=3.0),
    "found_inf set": dict(shapes=_RANKS, found_inf=1.0, momentum=0.9, mdtype="bf16", cuts=[0.3, 0.71]),
    "found_inf unset": dict(shapes=_RANKS, found_inf=0.0, momentum=0.9, mdtype="f32"),
    "flat ranges straddling rows": dict(shapes=_RANKS, cuts=[0.13, 0.5, 0.77], momentum=0.9, mdtype="f32"),
    "flat ranges keep_max": dict(shapes=_RANKS, cuts=[0.4], keep_max=True, beta=0.9, steps=3),
    "keep_max whole": dict(shapes=_RANKS, keep_max=True, momentum=0.9, mdtype="f32", beta=0.5),
    "narrow and wide": dict(
        shapes=[(300, 3), (3, 300), (70, 255), (2, 256), (1, 513), (17, 1, 9)], momentum=0.9, mdtype="f32"
    ),
    "aligned rows (vector loads on GPU)": dict(
        shapes=[(16, 256), (3, 512), (4, 2, 264), (24,), (40, 8)], momentum=0.9, mdtype="bf16", weight_decay=0.01
    ),
    "parameter storage swapped between steps": dict(
        shapes=[(5, 300), (3, 4, 5), (9,)], momentum=0.9, mdtype="f32", swap_storage=True, steps=3
    ),
    "nonfinite in state": dict(shapes=[(6, 300), (20,)], nan_accumulator=True),
    # the update clipped (it binds on some coordinates, not on others: test_the_clip_cases_bind)
    "update clip 0.5": dict(shapes=_RANKS, update_clip=0.5, momentum=0.9, mdtype="f32"),
    "update clip eps 0 bias correction bf16": dict(
        shapes=[(5, 300), (3, 2, 7), (11,)],
        eps=0.0,
        beta=0.9,
        nu_divisor=0.19,
        update_clip=1.0,
        pdtype="bf16",
        momentum=0.9,
        mdtype="bf16",
        zero_grads=True,
    ),
    "update clip scaled flat ranges": dict(
        shapes=_RANKS, update_clip=0.5, grad_scale=8.0, weight_decay=0.01, maximize=True, cuts=[0.3, 0.71]
    ),
    "update clip NaN inf -0 gradients": dict(
        shapes=[(6, 300), (3, 4, 5), (40,)], update_clip=0.5, momentum=0.9, mdtype="f32", special_grads=True, steps=1
    ),
}
CASES = {name: {**_BASE, **spec} for name, spec in CASES.items()}

# nonfinite_ cases: tensors of these dtypes and sizes, with inf/NaN at these (tensor, flat index) positions
NONFINITE_CASES: dict[str, dict] = {
    "all finite": dict(tensors=[("f32", 5000), ("bf16", 70), ("f16", 9000)], bad=[], start=0.0),
    "inf first element": dict(tensors=[("f32", 5000), ("bf16", 70)], bad=[(0, 0, "inf")], start=0.0),
    "nan last element": dict(tensors=[("f32", 5000), ("bf16", 70), ("f32", 4097)], bad=[(2, 4096, "nan")], start=0.0),
    "-inf bf16 middle": dict(tensors=[("f32", 10), ("bf16", 9000), ("f16", 3)], bad=[(1, 4500, "-inf")], start=0.0),
    "fp16 nan": dict(tensors=[("f16", 4096), ("f16", 4097)], bad=[(1, 4096, "nan")], start=0.0),
    "fp16 max finite": dict(
        tensors=[("f16", 100), ("bf16", 9)], bad=[], extreme=[(0, 3, "f16max"), (1, 8, "bf16max")], start=0.0
    ),
    "flag already 2": dict(tensors=[("f32", 100)], bad=[(0, 99, "inf")], start=2.0),
    "flag kept when finite": dict(tensors=[("f32", 100)], bad=[], start=1.0),
    "empty tensors among": dict(
        tensors=[("f32", 0), ("f32", 10), ("bf16", 0), ("f32", 7)], bad=[(3, 6, "nan")], start=0.0
    ),
}


def _per_block(value, n: int) -> list:
    return value if isinstance(value, list) else [value] * n


def make_inputs(case: dict, seed: int = 0) -> dict:
    """Parameters, momentum buffers, accumulators and one gradient per step, on CPU, the same every call."""
    gen = torch.Generator().manual_seed(seed)
    shapes = case["shapes"]
    pdt = [DTYPES[d] for d in _per_block(case["pdtype"], len(shapes))]
    mdt = [None if d is None else DTYPES[d] for d in _per_block(case["mdtype"], len(shapes))]
    params, buffers, accs, grads = [], [], [], []
    for shape, p_dt, m_dt in zip(shapes, pdt, mdt):
        params.append(torch.randn(shape, generator=gen).to(p_dt))
        buffers.append(None if m_dt is None else (0.1 * torch.randn(shape, generator=gen)).to(m_dt))
        lengths = list(shape) if len(shape) >= 2 else [math.prod(shape)]
        accs.append([torch.rand(n, generator=gen) * 0.5 for n in lengths])
        if case.get("eps") == 0.0:  # exact zeros: the 0/0 = 0 convention
            for a in accs[-1]:
                a[::3] = 0.0
        if case.get("nan_accumulator"):
            accs[-1][0][1] = float("nan")
            accs[-1][-1][2] = float("inf")
        if case.get("special_grads") and buffers[-1] is not None:
            buffers[-1].view(-1)[1::5] = -0.0  # where the gradient is -0: 0.9 m + 0.1 u is -0 only where u is
    for _ in range(case["steps"]):
        step = []
        for p in params:
            g = torch.randn(p.shape, generator=gen)
            if case.get("zero_grads"):
                g.view(-1)[::2] = 0.0
            if case.get("grad_tiny"):  # fp16 subnormal results
                g.view(-1)[::4] *= 1e-6
            if case.get("special_grads"):  # u NaN (NaN or inf gradients) and -0 (the momentum shows its sign)
                g.view(-1)[::7] = float("nan")
                g.view(-1)[3::11] = float("inf")
                g.view(-1)[5::13] = float("-inf")
                g.view(-1)[1::5] = -0.0
            step.append(g.to(p.dtype))
        grads.append(step)
    return dict(params=params, buffers=buffers, accs=accs, grads=grads)


def lr_at(step: int) -> float:
    return 0.01 * (1.0 + 0.5 * step)


def _rule(case: dict):
    from sm3_dist.kernels.rule import UpdateRule

    return UpdateRule(
        momentum=case["momentum"],
        beta=case["beta"],
        eps=case["eps"],
        weight_decay=case["weight_decay"],
        maximize=case["maximize"],
        update_clip=case["update_clip"],
    )


def _nu_divisor_value(case: dict):
    d = case["nu_divisor"]
    return 0.19 if d == "tensor" else d


def reference(case: dict) -> dict:
    """The eager kernel on whole CPU tensors: parameters, momentum buffers and accumulators after every step."""
    inp = make_inputs(case)
    params, buffers, accs = inp["params"], inp["buffers"], inp["accs"]
    skip = case["found_inf"] is not None and case["found_inf"] != 0.0
    rule = _rule(case)
    nud = _nu_divisor_value(case)
    if nud is not None:
        nud = torch.tensor(nud, dtype=torch.float32) if case["nu_divisor"] == "tensor" else nud
    grad_scale = None if case["grad_scale"] is None else torch.tensor(case["grad_scale"], dtype=torch.float32)
    for step, grads in enumerate(inp["grads"]):
        if skip:
            continue
        lr = lr_at(step)
        if case["lr"] == "tensor":
            lr = torch.tensor(lr, dtype=torch.float32)
        for p, g, m, a in zip(params, grads, buffers, accs):
            if p.ndim == 0:  # the eager kernel takes a scalar as a vector of one element
                p, g, m = p.view(1), g.view(1), None if m is None else m.view(1)
            maxima = single_block(p, g, m, a, rule, lr, nud, grad_scale)
            functional.store_maxima(list(a), list(maxima), case["keep_max"])
    return dict(params=params, buffers=buffers, accs=accs)


def _blocks(case: dict, params, buffers, accs, maxima):
    """The blocks the kernel gets: whole tensors, or each cut into flat ranges (straddling rows)."""
    out = {"p": [], "m": [], "a": [], "o": [], "index": []}
    for k, (p, m, a, o) in enumerate(zip(params, buffers, accs, maxima)):
        if case["cuts"] is None or p.numel() < 2:
            out["p"].append(p)
            out["m"].append(m)
            out["a"].append(a)
            out["o"].append(o)
            out["index"].append((k, None))
            continue
        n = p.numel()
        bounds = sorted({0, n, *(max(1, min(n - 1, int(f * n))) for f in case["cuts"])})
        for lo, hi in itertools.pairwise(bounds):
            for b in split_flat_range(p.shape, lo, hi):
                start = lo + b.offset
                if len(p.shape) <= 1:
                    sl = [slice(start, start + b.numel)]
                    view = (b.numel,) if p.ndim == 1 else ()
                else:
                    sl = [slice(s, s + n_) for s, n_ in zip(b.starts, b.lengths)]
                    view = b.lengths
                out["p"].append(p.view(-1)[start : start + b.numel].view(view))
                out["m"].append(None if m is None else m.view(-1)[start : start + b.numel].view(view))
                out["a"].append([t[s] for t, s in zip(a, sl)])
                out["o"].append([t[s] for t, s in zip(o, sl)])
                out["index"].append((k, (start, b.numel, view)))
    return out


def run_triton(case: dict) -> dict:
    """The case through TritonPlan.step and finalize_ (on CPU tensors under the interpreter)."""
    from sm3_dist.kernels import cuda as _triton

    inp = make_inputs(case)
    params, buffers, accs = inp["params"], inp["buffers"], inp["accs"]
    maxima = [[torch.zeros_like(t) for t in a] for a in accs]
    blocks = _blocks(case, params, buffers, accs, maxima)
    plan = _triton.TritonPlan.build(blocks["p"], blocks["m"], blocks["a"], blocks["o"])
    if plan is None:
        raise RuntimeError(f"TritonPlan.build refused the case: {_triton.TritonPlan.reason}")
    rule = _rule(case)
    flat_accs = [t for a in accs for t in a]
    flat_max = [t for o in maxima for t in o]
    finalize = _triton.FinalizePlan(flat_accs, flat_max)
    found_inf = None if case["found_inf"] is None else torch.tensor([case["found_inf"]], dtype=torch.float32)
    grad_scale = None if case["grad_scale"] is None else torch.tensor([case["grad_scale"]], dtype=torch.float32)
    nud = _nu_divisor_value(case)
    if case["nu_divisor"] == "tensor":
        nud = torch.tensor([nud], dtype=torch.float32)
    for step, grads in enumerate(inp["grads"]):
        lr = lr_at(step)
        if case["lr"] == "tensor":
            lr = torch.tensor([lr], dtype=torch.float32)
        block_grads = []
        for k, where in blocks["index"]:
            g = grads[k].clone()  # a new tensor each step: the plan re-reads the gradients' pointers
            block_grads.append(g if where is None else g.view(-1)[where[0] : where[0] + where[1]].view(where[2]))
        plan.step(block_grads, rule, lr=lr, nu_divisor=nud, found_inf=found_inf, grad_scale=grad_scale)
        if step == 0:
            maxima_after_step = [t.clone() for t in flat_max]
        if case.get("swap_storage"):  # `p.data = ...` as a user might: the plan must follow the new storage
            for p in blocks["p"]:
                p.data = p.data.clone()
            for m in blocks["m"]:
                if m is not None:
                    m.data = m.data.clone()
        finalize.run(keep_max=case["keep_max"], found_inf=found_inf)
    return dict(
        params=params, buffers=buffers, accs=accs, maxima_after_first_step=maxima_after_step, maxima_now=flat_max
    )


def make_nonfinite(case: dict, seed: int = 1) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=gen).to(DTYPES[d]) for d, n in case["tensors"]]
    values = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan"), "f16max": 65504.0, "bf16max": 3.3895e38}
    for k, i, v in case["bad"] + case.get("extreme", []):  # "extreme": finite values next to the exponent limit
        tensors[k][i] = values[v]
    return tensors


def run_nonfinite(case: dict) -> Tensor:
    from sm3_dist.kernels import cuda as _triton

    flag = torch.tensor([case["start"]], dtype=torch.float32)
    _triton.nonfinite_(make_nonfinite(case), flag)
    return flag


def _bad_inputs() -> dict[str, str | None]:
    """What TritonPlan.build says about inputs it cannot take (its ``reason``), and the errors of a bad step."""
    from sm3_dist.kernels import cuda as _triton

    def reason(params, bufs=None, accs=None, outs=None):
        bufs = [None] * len(params) if bufs is None else bufs
        if accs is None:
            accs = [[torch.zeros(n) for n in (p.shape if p.ndim >= 2 else (p.numel(),))] for p in params]
        outs = [[torch.zeros_like(a) for a in aa] for aa in accs] if outs is None else outs
        plan = _triton.TritonPlan.build(params, bufs, accs, outs)
        return None if plan is not None else _triton.TritonPlan.reason

    def error(fn):
        try:
            fn()
        except (ValueError, TypeError) as exc:
            return str(exc)
        return None

    w = torch.zeros(4, 8)
    accs = [[torch.zeros(4), torch.zeros(8)]]
    outs = [[torch.zeros(4), torch.zeros(8)]]
    plan = _triton.TritonPlan.build([w], [None], accs, outs)
    rule = _rule(CASES["ranks 0-4"])
    shared = torch.zeros(5)
    return {
        "no blocks": reason([]),
        "float64": reason([torch.zeros(3, 3, dtype=torch.float64)]),
        "not contiguous": reason([torch.zeros(4, 6).t()]),
        "rank 5": reason([torch.zeros(1, 1, 1, 1, 2)]),
        "fp16 momentum": reason([torch.zeros(3, 4)], [torch.zeros(3, 4, dtype=torch.float16)]),
        "accumulator length": reason([torch.zeros(3, 4)], accs=[[torch.zeros(3), torch.zeros(5)]]),
        "accumulator dtype": reason([torch.zeros(3, 4)], accs=[[torch.zeros(3), torch.zeros(4, dtype=torch.bfloat16)]]),
        "maxima overlap accumulators": reason(
            [torch.zeros(3, 4)], accs=[[shared[:3], torch.zeros(4)]], outs=[[shared[2:], torch.zeros(4)]]
        ),
        "good": reason([torch.zeros(3, 4)]),
        "holds same": str(plan.holds([w], [None], accs, outs)),
        "holds other param": str(plan.holds([w.clone()], [None], accs, outs)),
        "holds other maxima": str(plan.holds([w], [None], accs, [[torch.zeros(4), outs[0][1]]])),
        "step grad shape": error(lambda: plan.step([torch.zeros(8, 4)], rule, lr=0.1)),
        "step grad count": error(lambda: plan.step([torch.zeros(4, 8), torch.zeros(4, 8)], rule, lr=0.1)),
        "step found_inf dtype": error(
            lambda: plan.step([torch.zeros(4, 8)], rule, lr=0.1, found_inf=torch.zeros(1, dtype=torch.float64))
        ),
        "step lr shape": error(lambda: plan.step([torch.zeros(4, 8)], rule, lr=torch.zeros(2))),
        "nonfinite dtype": error(lambda: _triton.nonfinite_([torch.zeros(3, dtype=torch.float64)], torch.zeros(1))),
        "finalize lengths": error(lambda: _triton.finalize_([torch.zeros(3)], [torch.zeros(4)], keep_max=False)),
    }


def _repeated_calls() -> dict[str, list[float]]:
    """nonfinite_ and finalize_ called again on the same tensors (a prepared table reused) and on new ones."""
    from sm3_dist.kernels import cuda as _triton

    def scan(ts):
        flag = torch.zeros(1)
        _triton.nonfinite_(ts, flag)
        return flag.item()

    first = [torch.zeros(5000), torch.zeros(70, dtype=torch.bfloat16)]
    flags = [scan(first)]
    first[1][69] = float("inf")
    flags.append(scan(first))  # the same pointers: the prepared table again
    second = [torch.zeros(5000), torch.zeros(70, dtype=torch.bfloat16)]
    flags.append(scan(second))
    second[0][4999] = float("nan")
    flags.append(scan(second))
    acc, new = [torch.zeros(10), torch.zeros(3)], [torch.ones(10), torch.full((3,), 2.0)]
    seen = []
    for value in (1.0, 3.0):
        new[0].fill_(value)
        _triton.finalize_(acc, new, keep_max=False)
        seen.append(acc[0][0].item())
        seen.append(new[0][0].item())
    return {"nonfinite flags": flags, "finalize acc, maxima": seen}


CHECK_SHAPES = [(5, 300), (3, 40), (2, 3, 4, 9), (7,), ()]
"""Small shapes (wide, narrow, rank 4, flat, scalar) for :func:`sm3_dist.kernels.cuda.check` on CPU."""


def _device_check() -> dict[str, list]:
    """``_triton.check("cpu")`` (what ``python -m sm3_dist._triton --check`` runs on a GPU), its cases on the
    small :data:`CHECK_SHAPES` so that the interpreter gets through them."""
    from sm3_dist.kernels.cuda import check, checking

    full = checking._check_cases
    cases = [(name, {**spec, "shapes": CHECK_SHAPES}) for name, spec in full()]
    checking._check_cases = lambda: cases
    try:
        return {"cases": [name for name, _ in cases], "results": check("cpu")}
    finally:
        checking._check_cases = full


def main(out: str) -> None:
    results = {"cases": {}, "nonfinite": {}, "errors": {}}
    results["bad"] = _bad_inputs()
    results["repeated"] = _repeated_calls()
    results["check"] = _device_check()
    for name, case in CASES.items():
        try:
            results["cases"][name] = run_triton(case)
        except Exception as exc:  # reported per case by the test
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
    for name, case in NONFINITE_CASES.items():
        try:
            results["nonfinite"][name] = run_nonfinite(case)
        except Exception as exc:
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
    torch.save(results, out)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (set before triton is imported)")
    main(sys.argv[1])
