"""The SM3 kernels are bitwise independent of where a shard boundary cuts a block, and equal to each other.

A tensor run as one block, and the same tensor cut into sub-blocks (along rows,
or a flat range cut mid-row, as ZeRO/FSDP1 partitions cut it), must give
bitwise the same parameters, momentum and accumulator maxima (the sub-blocks'
maxima combined by max). Every kernel is held to it: eager, foreach and the
native fused kernel, which is also held bitwise to the eager one, as are the
step's other inputs every kernel takes alike (the bias-correction divisor, a
gradient scale, a found-inf flag, an lr tensor of any one-element shape,
non-contiguous parameters and gradients).
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from sm3_dist import SM3, functional
from sm3_dist.kernels import dispatch, registry
from sm3_dist.kernels.cpu import library
from sm3_dist.kernels.cpu.native_step import NativePlan, pack_block
from sm3_dist.kernels.rule import UpdateRule
from sm3_dist.layout import split_flat_range
from tests.common import KERNELS, assert_same, clone_blocks, native_library, random_blocks, same_bits

SHAPES = [(37,), (13, 11), (5, 7, 9), (3, 4, 5, 6), (2, 70)]
HYPERS = {
    "plain": dict(lr=0.1, beta=0.0, eps=1e-30, weight_decay=0.0, maximize=False),
    "beta,eps=0": dict(lr=0.05, beta=0.9, eps=0.0, weight_decay=0.0, maximize=False),
    "wd,maximize": dict(lr=0.2, beta=0.0, eps=0.0, weight_decay=0.01, maximize=True),
    "beta,bias-corrected,scaled": dict(
        lr=0.05, beta=0.9, eps=1e-30, weight_decay=0.0, maximize=False, bias_correction=True, grad_scale=8.0
    ),
    # the update clipped: it binds on some coordinates and not on others (test_the_clip_rows_bind)
    "clip 0.5": dict(lr=0.1, beta=0.0, eps=1e-30, weight_decay=0.0, maximize=False, update_clip=0.5),
    "clip 1,beta,eps=0,wd,maximize": dict(
        lr=0.05, beta=0.9, eps=0.0, weight_decay=0.01, maximize=True, update_clip=1.0
    ),
    "clip 1,beta,bias-corrected,scaled": dict(
        lr=0.05,
        beta=0.9,
        eps=1e-30,
        weight_decay=0.0,
        maximize=False,
        bias_correction=True,
        grad_scale=8.0,
        update_clip=1.0,
    ),
}
CLIP_HYPERS = [name for name, hyper in HYPERS.items() if hyper.get("update_clip", 0.0) > 0.0]
MOMENTA = {"none": None, "fp32": torch.float32, "bf16": torch.bfloat16}
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _problem(shape, pdtype, mdtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen).to(pdtype)
    g = torch.randn(shape, generator=gen)
    g.view(-1)[:: max(3, shape[-1] - 1)] = 0.0  # zeros at scattered places: nu == 0 with eps = 0
    g[0] = 0.0 if len(shape) > 1 else g[0]  # a zero slab
    g = g.to(pdtype)
    m = None if mdtype is None else torch.randn(shape, generator=gen).to(mdtype)
    accs = [torch.rand(n, generator=gen) * (torch.rand(n, generator=gen) > 0.3) for n in shape]
    accs[0][0] = 0.0
    return w, g, m, accs


def _splits(shape):
    """Ways to cut a tensor: lists of flat ranges [a, b) covering it."""
    numel = math.prod(shape)
    slab = numel // shape[0]
    cuts = {
        "whole": [0, numel],
        "rows": [0, slab * (shape[0] // 2 or 1), numel] if shape[0] > 1 else [0, numel // 2, numel],
        "mid-row": [0, slab + 3 if shape[0] > 1 else 5, numel],
        "ranks=3 uneven": [0, 1, numel // 3 + 2, numel],
        "ranks=4": [0, *(numel * k // 4 + (k % 2) for k in (1, 2, 3)), numel],
    }
    return {name: list(itertools.pairwise(c)) for name, c in cuts.items()}


def _run(kernel, shape, pdtype, mdtype, hyper, ranges, momentum):
    """Run one step over the blocks the flat ranges split into; returns (w, m, maxima combined by max)."""
    w, g, m, accs = _problem(shape, pdtype, mdtype)
    flat_w, flat_g = w.view(-1), g.view(-1)
    flat_m = None if m is None else m.view(-1)
    params, grads, bufs, block_accs, starts = [], [], [], [], []
    for a, b in ranges:
        for block in split_flat_range(shape, a, b):
            view = slice(a + block.offset, a + block.offset + block.numel)
            params.append(flat_w[view].view(block.lengths))
            grads.append(flat_g[view].view(block.lengths))
            bufs.append(None if flat_m is None else flat_m[view].view(block.lengths))
            block_accs.append([acc[s : s + n] for acc, s, n in zip(accs, block.starts, block.lengths)])
            starts.append(block.starts)
    hyper = dict(hyper)
    lr, scale = hyper.pop("lr"), hyper.pop("grad_scale", None)
    rule = UpdateRule(momentum=momentum if m is not None else 0.0, **hyper)
    maxima = functional.sm3(
        params,
        grads,
        bufs,
        block_accs,
        rule=rule,
        lr=lr,
        nu_divisor=rule.nu_divisor(3),
        grad_scale=None if scale is None else torch.tensor(scale),
        **KERNELS[kernel],
    )
    combined = [torch.full((n,), -math.inf) for n in shape]
    for block_maxima, block_starts in zip(maxima, starts):
        for d, (new, s) in enumerate(zip(block_maxima, block_starts)):
            region = combined[d][s : s + new.numel()]
            torch.maximum(region, new, out=region)
    return w, m, combined


def _assert_bitwise(a, b):
    wa, ma, xa = a
    wb, mb, xb = b
    assert torch.equal(wa, wb), (wa.float() - wb.float()).abs().max()
    assert (ma is None) == (mb is None)
    if ma is not None:
        assert torch.equal(ma, mb), (ma.float() - mb.float()).abs().max()
    for d, (u, v) in enumerate(zip(xa, xb)):
        assert torch.equal(u, v), (d, (u - v).abs().max())


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("hyper", list(HYPERS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("pdtype,mdtype", [("fp32", "fp32"), ("fp32", "none"), ("bf16", "bf16"), ("fp32", "bf16")])
def test_shard_boundaries_do_not_change_bits(kernel, hyper, shape, pdtype, mdtype):
    args = (shape, PARAM_DTYPES[pdtype], MOMENTA[mdtype], HYPERS[hyper])
    whole = _run(kernel, *args, _splits(shape)["whole"], momentum=0.9)
    for name, ranges in _splits(shape).items():
        if name != "whole":
            _assert_bitwise(whole, _run(kernel, *args, ranges, momentum=0.9))


@pytest.mark.parametrize("hyper", list(HYPERS))
@pytest.mark.parametrize("shape", [*SHAPES, (1,), (3, 40000), (70001,)], ids=str)
@pytest.mark.parametrize("pdtype,mdtype", [("fp32", "fp32"), ("fp32", "none"), ("bf16", "bf16"), ("bf16", "fp32")])
def test_native_kernel_is_bitwise_eager(hyper, shape, pdtype, mdtype):
    native_library()
    args = (shape, PARAM_DTYPES[pdtype], MOMENTA[mdtype], HYPERS[hyper])
    ranges = _splits(shape)["whole"]
    _assert_bitwise(_run("eager", *args, ranges, momentum=0.5), _run("fused", *args, ranges, momentum=0.5))


@pytest.mark.parametrize("hyper", CLIP_HYPERS)
@pytest.mark.parametrize("shape", [*SHAPES, (3, 40000), (70001,)], ids=str)
def test_the_clip_rows_bind(hyper, shape):
    """In every clip row the clip changes some coordinates and leaves others: a kernel that ignored
    ``update_clip`` fails the row's bitwise comparisons, one that clipped everything too."""
    args = (shape, torch.float32, torch.float32)
    ranges = _splits(shape)["whole"]
    clipped = _run("eager", *args, HYPERS[hyper], ranges, momentum=0.5)
    unclipped = _run("eager", *args, {**HYPERS[hyper], "update_clip": 0.0}, ranges, momentum=0.5)
    changed = clipped[1] != unclipped[1]  # the momentum: u only (the parameters also see w's own rounding)
    assert changed.any() and not changed.all(), (hyper, int(changed.sum()), changed.numel())


# The clip at its edges, eps = 1e-45 (a subnormal) and update_clip = 0.5: a rank-1 block (nu = mu + g^2 per
# element) of (gradient, accumulator, the update u the clip gives) cycling through these, in vector lanes and
# in the scalar tails of every width.
CLIP = 0.5
CLIP_EDGES = {
    "NaN gradient": (math.nan, 1.0, math.nan),
    "-0 gradient": (-0.0, 1.0, -0.0),  # stays -0 (the momentum, -0 here, shows its sign)
    "+0 gradient": (0.0, 1.0, 0.0),
    "u = c": (1.0, 3.0, CLIP),  # 1 / sqrt(4): the bound itself
    "u = -c": (-1.0, 3.0, -CLIP),
    "u = +inf": (2.0**63, -(2.0**126), CLIP),  # nu = +0: 2^63 / sqrt(eps) overflows
    "u = -inf": (-(2.0**63), -(2.0**126), -CLIP),
    "u = 1": (1.0, 0.0, CLIP),
    "u = -0.99": (-5.0, 0.5, -CLIP),
    "u = 0.28": (0.3, 1.0, None),  # inside: unchanged
    "inf gradient": (math.inf, 1.0, math.nan),  # nu = inf: 0 * inf
}


def _clip_edge_block(n=53):
    edges = list(CLIP_EDGES.values())
    g = torch.tensor([edges[k % len(edges)][0] for k in range(n)])
    acc = torch.tensor([edges[k % len(edges)][1] for k in range(n)])
    w = torch.linspace(-1.0, 1.0, n)
    m = torch.full((n,), 0.25)
    zero = g == 0.0
    w[zero] = -0.0
    m[zero] = -0.0  # m' = 0.9 m + 0.1 u is -0 only where u is
    return w, g, m, acc


def test_the_eager_clip_at_its_edges():
    """The reference of every kernel: u clamp_min'ed to -c then clamp_max'ed to c, NaN and -0 kept."""
    from sm3_dist.kernels.math import _preconditioned

    g = torch.tensor([e[0] for e in CLIP_EDGES.values()])
    nu = torch.tensor([e[1] for e in CLIP_EDGES.values()]) + g * g
    got = _preconditioned(g, nu, UpdateRule(eps=1e-45, update_clip=CLIP), None)
    plain = _preconditioned(g, nu, UpdateRule(eps=1e-45), None)
    expected = torch.tensor([plain[k] if e[2] is None else e[2] for k, e in enumerate(CLIP_EDGES.values())])
    assert same_bits(got, expected), (got, expected)
    assert plain.isinf().sum() == 2 and 0 < plain[-2] < CLIP  # the edges are where they are said to be


@pytest.mark.parametrize("eps", [1e-45, 0.0])
@pytest.mark.parametrize("mdtype", ["fp32", "none"])
@pytest.mark.parametrize("kernel", ["foreach", "fused"])
def test_clip_edges_bitwise_eager(kernel, mdtype, eps):
    """NaN, -0, +-inf and the bounds themselves through the clip: every kernel gives the eager kernel's bits
    (the sign of zero included)."""
    if kernel == "fused":
        native_library()
    rule = UpdateRule(momentum=0.9 if mdtype == "fp32" else 0.0, eps=eps, update_clip=CLIP)
    results = {}
    for name in ("eager", kernel):
        w, g, m, acc = _clip_edge_block()
        m = m if mdtype == "fp32" else None
        maxima = functional.sm3([w], [g], [m], [[acc]], rule=rule, lr=0.1, **KERNELS[name])
        results[name] = [w, *([] if m is None else [m]), *maxima[0]]
    if mdtype == "fp32" and eps > 0.0:  # the eager momentum shows the clip: -0 kept, NaN only where u is NaN
        # (with eps = 0 a NaN nu gives u = 0, and nu = 0 gives u = 0 instead of +-inf)
        m, g = results["eager"][1], _clip_edge_block()[1]
        edges = list(CLIP_EDGES.values())
        nan_u = torch.tensor([edges[k % len(edges)][2] is not None and math.isnan(edges[k % len(edges)][2])
                              for k in range(g.numel())])  # fmt: skip
        assert torch.equal(m.isnan(), nan_u)
        assert torch.equal(m[g == 0.0].signbit(), g[g == 0.0].signbit())
    for a, b in zip(results["eager"], results[kernel], strict=True):
        assert same_bits(a, b), (a, b)


def _many_shapes_model(n=20):
    shapes = [(8 + 3 * k, 5 + 2 * k) for k in range(n // 2)] + [(11 + 7 * k,) for k in range(n - n // 2)]
    assert len(set(shapes)) == n
    return [torch.randn(s, requires_grad=True) for s in shapes]


def _train(params, steps=3, **kwargs):
    opt = SM3(params, lr=0.05, momentum=0.9, **kwargs)
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params


def test_many_shapes_native_matches_eager():
    native_library()
    base = _many_shapes_model()
    fused = _train([p.detach().clone().requires_grad_() for p in base], fused=True)
    eager = _train([p.detach().clone().requires_grad_() for p in base], foreach=False)
    for a, b in zip(fused, eager):
        assert torch.equal(a, b)


def test_native_build_failure_falls_back_and_says_so_once(monkeypatch, tmp_path):
    monkeypatch.setenv("SM3_DIST_CACHE", str(tmp_path))
    monkeypatch.setattr(library, "_compiler", lambda: "/bin/false")
    monkeypatch.setattr(library, "_state", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert library.load() is None
        assert library.load() is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "per-tensor" in messages[0], messages
    monkeypatch.setattr(registry, "_FUSED_CACHE", {})
    assert functional.default_kernel([torch.zeros(2)]) == "single"
    params = _train([torch.randn(6, 5, requires_grad=True)])  # the default kernel falls back to per tensor
    assert torch.isfinite(params[0]).all()
    with pytest.raises(RuntimeError, match=r"no fused SM3 kernel for device type 'cpu'.*unavailable here"):
        _train([torch.randn(6, 5, requires_grad=True)], fused=True)


@pytest.mark.parametrize("fields", [{"w": 1}, {name: 0 for name in (*library.BLOCK_FIELDS, "extra")}], ids=str)
def test_native_block_packing_refuses_bad_fields(fields):
    with pytest.raises(ValueError, match="native block fields"):
        pack_block(**fields)


def test_native_reordered_layout_still_bitwise(monkeypatch, tmp_path):
    """Reordering the one table rebuilds the library with that order and both sides follow it."""
    if library._compiler() is None:
        pytest.skip("no C++ compiler")
    fields = tuple(reversed(library.BLOCK_FIELDS))
    monkeypatch.setattr(library, "BLOCK_FIELDS", fields)
    monkeypatch.setattr(library, "FIELD", {name: i for i, name in enumerate(fields)})
    monkeypatch.setenv("SM3_DIST_CACHE", str(tmp_path))
    monkeypatch.setattr(library, "_state", {})
    lib = library.load()
    assert lib is not None
    assert lib.sm3_native_field_names().decode().split(",") == list(fields)
    assert "F_W = 11" in library.layout_header()
    base = [*_many_shapes_model(6), torch.randn(3, 4, 5, requires_grad=True)]
    fused = _train([p.detach().clone().requires_grad_() for p in base], fused=True)
    eager = _train([p.detach().clone().requires_grad_() for p in base], foreach=False)
    for a, b in zip(fused, eager):
        assert torch.equal(a, b)


def test_native_builds_in_a_fresh_cache(monkeypatch, tmp_path):
    if library._compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("SM3_DIST_CACHE", str(tmp_path))
    monkeypatch.setattr(library, "_state", {})
    assert library.load() is not None
    assert len(list(tmp_path.glob("sm3_native_*.so"))) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, None])
@pytest.mark.parametrize("native", [True, False])
def test_first_nonfinite(monkeypatch, dtype, bad, native):
    if not native:
        monkeypatch.setattr(library, "load", lambda: None)
    tensors = [
        torch.randn(5).to(dtype),
        torch.randn(0).to(dtype),
        torch.randn(300, 700).to(dtype),
        torch.ones(3, 5).t(),
    ]
    tensors[2][0, 0] = torch.finfo(dtype).max  # large but finite
    assert functional.first_nonfinite(tensors) is None
    assert functional.first_nonfinite([]) is None
    if bad is not None:
        tensors[2][250, 601] = bad
        assert functional.first_nonfinite(tensors) == 2
        tensors[0][4] = bad
        assert functional.first_nonfinite(tensors) == 0


@pytest.mark.parametrize("hyper", ["plain", "clip 0.5"])
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("shape", [(13, 40), (5, 7, 36)], ids=str)
def test_nonfinite_values_propagate_alike(monkeypatch, kernel, shape, hyper):
    """A NaN/inf gradient or accumulator (nonfinite="ignore") reaches the same elements and maxima, however cut."""
    original = _problem

    def poisoned(shape, pdtype, mdtype, seed=0):
        w, g, m, accs = original(shape, pdtype, mdtype, seed)
        g.view(-1)[17] = math.nan
        g.view(-1)[-5] = math.inf
        accs[0][2] = math.nan  # a row whose minimum is NaN
        accs[-1][33] = math.nan  # a column whose minimum is NaN
        return w, g, m, accs

    monkeypatch.setitem(globals(), "_problem", poisoned)
    args = (shape, torch.float32, torch.float32, HYPERS[hyper])
    whole = _run(kernel, *args, _splits(shape)["whole"], momentum=0.9)
    eager = _run("eager", *args, _splits(shape)["whole"], momentum=0.9)
    assert whole[0].isnan().any() and not whole[0].isnan().all()
    for other in [eager, *(_run(kernel, *args, r, momentum=0.9) for r in _splits(shape).values())]:
        for a, b in [(whole[0], other[0]), (whole[1], other[1]), *zip(whole[2], other[2])]:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


SHAPES_WITH_SCALAR = ((13, 11), (37,), (5, 7, 9), ())


def _blocks(seed=0):
    return random_blocks(seed, SHAPES_WITH_SCALAR)


RULE = UpdateRule(momentum=0.9, beta=0.9, weight_decay=0.01, bias_correction=True)
STEP_INPUTS = {
    "lr (1, 1)": dict(lr=torch.tensor([[0.05]])),
    "lr (1,)": dict(lr=torch.tensor([0.05])),
    "grad_scale": dict(lr=0.05, grad_scale=torch.tensor(1024.0)),
    "nu_divisor tensor": dict(lr=0.05, nu_divisor=torch.tensor(RULE.nu_divisor(2))),
}


@pytest.mark.parametrize("inputs", list(STEP_INPUTS))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_step_inputs_are_read_alike_by_every_kernel(kernel, inputs):
    """The same step inputs, given as a number or as a tensor of any one-element shape, give the same bits."""
    kw = dict(STEP_INPUTS[inputs])
    reference = _blocks()
    eager_kw = {
        k: (float(v) if k in ("lr", "nu_divisor") and isinstance(v, torch.Tensor) else v) for k, v in kw.items()
    }
    eager_kw.setdefault("nu_divisor", RULE.nu_divisor(2))
    kw.setdefault("nu_divisor", RULE.nu_divisor(2))
    expected = functional.sm3(*reference, rule=RULE, **eager_kw)
    run = clone_blocks(_blocks())
    got = functional.sm3(*run, rule=RULE, **kw, **KERNELS[kernel])
    assert_same(reference, run)
    assert_same(expected, got)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_non_contiguous_params_and_grads_equal_the_contiguous_case(kernel):
    base = random_blocks(shapes=((11, 13), (6, 4, 5)))
    contiguous = clone_blocks(base)
    expected = functional.sm3(*contiguous, rule=RULE, lr=0.1, nu_divisor=0.19, **KERNELS[kernel])
    params, grads, bufs, accs = clone_blocks(base)
    # the same values, stored transposed: views with other strides
    t_params = [p.transpose(0, -1).contiguous().transpose(0, -1) for p in params]
    t_grads = [g.transpose(0, -1).contiguous().transpose(0, -1) for g in grads]
    t_bufs = [b.transpose(0, -1).contiguous().transpose(0, -1) for b in bufs]
    assert not any(t.is_contiguous() for t in (*t_params, *t_grads, *t_bufs))
    got = functional.sm3(t_params, t_grads, t_bufs, accs, rule=RULE, lr=0.1, nu_divisor=0.19, **KERNELS[kernel])
    assert_same(contiguous[0], t_params)
    assert_same(contiguous[2], t_bufs)
    assert_same(expected, got)


@pytest.mark.parametrize("read", ["host", "device"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_found_inf_writes_nothing(kernel, read, monkeypatch):
    if read == "device":  # the flag stays a tensor the kernels read, as on an accelerator
        monkeypatch.setattr(dispatch, "HOST_READ_DEVICES", set())
    blocks = _blocks()
    before = clone_blocks(blocks)
    outs = [[torch.full_like(a, 7.0) for a in accs] for accs in blocks[3]]
    functional.sm3(
        *blocks, rule=RULE, lr=0.1, found_inf=torch.tensor(1.0), maxima_out=outs, keep_max=True, **KERNELS[kernel]
    )
    assert_same(before, blocks)
    assert all(torch.equal(o, torch.full_like(o, 7.0)) for block in outs for o in block)
    returned = functional.sm3(*blocks, rule=RULE, lr=0.1, found_inf=torch.ones(1), **KERNELS[kernel])
    assert_same(before, blocks)
    assert_same(before[3], returned)  # the maxima a skipped step returns are the accumulators as they were
    assigned = [[torch.full_like(a, 7.0) for a in accs] for accs in blocks[3]]
    functional.sm3(*blocks, rule=RULE, lr=0.1, found_inf=torch.ones(()), maxima_out=assigned, **KERNELS[kernel])
    assert_same(before, blocks)
    assert_same(before[3], assigned)
    functional.sm3(*blocks, rule=RULE, lr=0.1, found_inf=torch.zeros(()), **KERNELS[kernel])
    assert not torch.equal(blocks[0][0], before[0][0])


def test_the_default_kernel_is_decided_in_one_place(monkeypatch):
    cpu = [torch.zeros(3, 2)]
    native = functional.fused_kernel("cpu") is not None
    assert functional.default_kernel(cpu) == ("fused" if native else "single")
    assert functional.default_kernel(cpu, foreach=True) == "foreach"
    assert functional.default_kernel(cpu, fused=False) == "single"
    assert functional.default_kernel([torch.zeros(2, dtype=torch.float64)]) == "single"
    meta = [torch.zeros(3, 2, device="meta")]
    assert functional.default_kernel(meta) == "single"
    with pytest.raises(ValueError, match="foreach and fused cannot both be True"):
        functional.default_kernel(cpu, foreach=True, fused=True)
    with pytest.raises(RuntimeError, match="no fused SM3 kernel for device type 'meta': none is registered"):
        functional.sm3(
            meta,
            meta,
            [None],
            [[torch.zeros(3, device="meta"), torch.zeros(2, device="meta")]],
            rule=RULE,
            lr=0.1,
            fused=True,
        )


def test_a_registered_fused_kernel_becomes_the_default(monkeypatch):
    """A device type's fused kernel is one registry entry: registered, it is the default and runs the step."""
    monkeypatch.setattr(registry, "_FUSED", dict(registry._FUSED))
    monkeypatch.setattr(registry, "_FUSED_CACHE", {})
    calls = []

    class Recording(NativePlan):
        def step(self, grads, rule, **kw):
            calls.append(len(grads))
            return super().step(grads, rule, **kw)

    def loader():
        kernel = registry._native_loader()
        return functional.FusedKernel(
            device_type="cpu", available=kernel.available, build=Recording.build, param_dtypes=kernel.param_dtypes
        )

    native_library()
    functional.register_fused_kernel("cpu", loader)
    blocks = _blocks()
    expected = clone_blocks(blocks)
    functional.sm3(*expected, rule=RULE, lr=0.1, foreach=False, fused=False)
    functional.sm3(*blocks, rule=RULE, lr=0.1)
    assert calls == [4]
    assert_same(expected, blocks)
