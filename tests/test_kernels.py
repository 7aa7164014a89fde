"""The SM3 kernels are bitwise independent of where a shard boundary cuts a block.

A tensor run as one block, and the same tensor cut into sub-blocks (along rows,
or a flat range cut mid-row, as ZeRO/FSDP1 partitions cut it), must give
bitwise the same parameters, momentum and accumulator maxima (the sub-blocks'
maxima combined by max). Every kernel is held to it: eager, foreach, the
native fused kernel and the torch.compile fused kernel it falls back to. The
native kernel is also held bitwise to the eager one.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from sm3_dist import SM3, _native, functional
from sm3_dist.layout import split_flat_range

SHAPES = [(37,), (13, 11), (5, 7, 9), (3, 4, 5, 6), (2, 70)]
HYPERS = {
    "plain": dict(lr=0.1, beta=0.0, eps=1e-30, weight_decay=0.0, maximize=False),
    "beta,eps=0": dict(lr=0.05, beta=0.9, eps=0.0, weight_decay=0.0, maximize=False),
    "wd,maximize": dict(lr=0.2, beta=0.0, eps=0.0, weight_decay=0.01, maximize=True),
}
MOMENTA = {"none": None, "fp32": torch.float32, "bf16": torch.bfloat16}
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture
def compiled_only(monkeypatch):
    """Force the fused step onto its torch.compile kernel."""
    monkeypatch.setattr(functional._native, "load", lambda: None)


KERNELS = {"eager": dict(), "foreach": dict(foreach=True), "fused": dict(fused=True)}


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
    maxima = functional.sm3(
        params, grads, bufs, block_accs, momentum=momentum if m is not None else 0.0, **hyper, **KERNELS[kernel]
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
    if _native.load() is None:
        pytest.skip("native kernel unavailable (see the logged reason)")
    args = (shape, PARAM_DTYPES[pdtype], MOMENTA[mdtype], HYPERS[hyper])
    ranges = _splits(shape)["whole"]
    _assert_bitwise(_run("eager", *args, ranges, momentum=0.5), _run("fused", *args, ranges, momentum=0.5))


@pytest.mark.parametrize("shape", [(13, 11), (5, 7, 9)], ids=str)
@pytest.mark.parametrize("pdtype,mdtype", [("fp32", "fp32"), ("bf16", "bf16")])
def test_compiled_fallback_shard_boundaries_do_not_change_bits(compiled_only, shape, pdtype, mdtype):
    args = (shape, PARAM_DTYPES[pdtype], MOMENTA[mdtype], HYPERS["beta,eps=0"])
    whole = _run("fused", *args, _splits(shape)["whole"], momentum=0.9)
    for name, ranges in _splits(shape).items():
        if name != "whole":
            _assert_bitwise(whole, _run("fused", *args, ranges, momentum=0.9))
    eager = _run("eager", *args, _splits(shape)["whole"], momentum=0.9)
    torch.testing.assert_close(whole[0].float(), eager[0].float(), rtol=1e-6, atol=1e-7)


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
    base = _many_shapes_model()
    fused = _train([p.detach().clone().requires_grad_() for p in base], fused=True)
    eager = _train([p.detach().clone().requires_grad_() for p in base], foreach=False)
    for a, b in zip(fused, eager):
        assert torch.equal(a, b) or _native.load() is None


def test_many_shapes_compile_a_bounded_number_of_graphs(compiled_only):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    functional._COMPILED.clear()
    counters.clear()
    base = _many_shapes_model()
    fused = _train([p.detach().clone().requires_grad_() for p in base], fused=True)
    eager = _train([p.detach().clone().requires_grad_() for p in base], foreach=False)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # dynamic shapes: one kernel per rank and flag set, not one per shape
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])


def test_native_build_failure_falls_back_and_says_so_once(monkeypatch, tmp_path):
    monkeypatch.setenv("SM3_DIST_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "_compiler", lambda: "/bin/false")
    monkeypatch.setattr(_native, "_state", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _native.load() is None
        assert _native.load() is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "torch.compile" in messages[0], messages
    params = _train([torch.randn(6, 5, requires_grad=True)], fused=True)
    assert torch.isfinite(params[0]).all()


def test_native_builds_in_a_fresh_cache(monkeypatch, tmp_path):
    if _native._compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("SM3_DIST_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "_state", {})
    assert _native.load() is not None
    assert len(list(tmp_path.glob("sm3_native_*.so"))) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, None])
@pytest.mark.parametrize("native", [True, False])
def test_first_nonfinite(monkeypatch, dtype, bad, native):
    if not native:
        monkeypatch.setattr(functional._native, "load", lambda: None)
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


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("shape", [(13, 40), (5, 7, 36)], ids=str)
def test_nonfinite_values_propagate_alike(monkeypatch, kernel, shape):
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
    args = (shape, torch.float32, torch.float32, HYPERS["plain"])
    whole = _run(kernel, *args, _splits(shape)["whole"], momentum=0.9)
    eager = _run("eager", *args, _splits(shape)["whole"], momentum=0.9)
    assert whole[0].isnan().any() and not whole[0].isnan().all()
    for other in [eager, *(_run(kernel, *args, r, momentum=0.9) for r in _splits(shape).values())]:
        for a, b in [(whole[0], other[0]), (whole[1], other[1]), *zip(whole[2], other[2])]:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
