"""The dense fast path computes what the general path computes, and notices what changed under it.

``functional.sm3(..., maxima_out=...)`` writes the maxima where it is told
(possibly into the accumulators it reads), :class:`functional.NativeBatch`
repeats one native launch with only the pointers re-read, and ``SM3`` keeps one
per param group. Each is held bitwise to the plain eager kernel, including
after a gradient disappears, a state tensor or a parameter's storage is
replaced, or the kernel can no longer take a block.
"""

from __future__ import annotations

import pytest
import torch

from sm3_dist import SM3, _native, functional

# skipped only without a compiler: where one exists, a kernel that fails to build fails these tests
needs_native = pytest.mark.skipif(_native._compiler() is None, reason="no C++ compiler for the native kernel")

HYPER = dict(lr=0.1, momentum=0.9, beta=0.0, eps=0.0, weight_decay=0.01, maximize=False)
SHAPES = [(1,), (37,), (13, 11), (5, 7, 9)]
KERNELS = {"eager": dict(), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def _blocks(seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    bufs = [torch.randn(s, generator=gen) for s in shapes]
    accs = [[torch.rand(n, generator=gen) for n in (s or (1,))] for s in shapes]
    return params, grads, bufs, accs


def _clone(blocks):
    params, grads, bufs, accs = blocks
    return (
        [p.clone() for p in params],
        [g.clone() for g in grads],
        [b.clone() for b in bufs],
        [[a.clone() for a in acc] for acc in accs],
    )


def _assert_same(a, b):
    for x, y in zip(a, b):
        if isinstance(x, list):
            _assert_same(x, y)
        else:
            assert torch.equal(x, y)


@pytest.mark.parametrize("keep_max", [False, True], ids=["assign", "keep_max"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_maxima_out_into_the_accumulators_equals_returned_maxima(kernel, keep_max):
    returned = _blocks()
    written = _clone(returned)
    maxima = functional.sm3(*returned, **HYPER, **KERNELS[kernel])
    for accs, new in zip(returned[3], maxima):
        for acc, value in zip(accs, new):
            acc.copy_(torch.maximum(acc, value) if keep_max else value)
    out = functional.sm3(*written, **HYPER, **KERNELS[kernel], maxima_out=written[3], keep_max=keep_max)
    assert out is None
    _assert_same(returned, written)


def test_maxima_out_must_match_the_blocks():
    blocks = _blocks()
    with pytest.raises(ValueError, match="maxima_out has 1 entries for 4 blocks"):
        functional.sm3(*blocks, **HYPER, maxima_out=blocks[3][:1])


@needs_native
@pytest.mark.parametrize("keep_max", [False, True], ids=["assign", "keep_max"])
def test_native_batch_equals_the_eager_kernel_over_steps(keep_max):
    shapes = [(37,), (13, 11), (1,), (300, 2)]
    eager = _blocks(shapes=shapes)
    batched = _clone(eager)
    batch = functional.NativeBatch.build(batched[0], batched[2], batched[3], keep_max=keep_max)
    assert batch is not None and batch.holds(batched[0], batched[2], batched[3])
    for step in range(4):
        gen = torch.Generator().manual_seed(100 + step)
        new_grads = [torch.randn(s, generator=gen) for s in shapes]
        maxima = functional.sm3(eager[0], new_grads, eager[2], eager[3], **HYPER)
        functional.store_maxima([a for accs in eager[3] for a in accs], [m for new in maxima for m in new], keep_max)
        assert batch.step([g.clone() for g in new_grads], **HYPER)
        _assert_same(eager, batched)


@needs_native
def test_native_batch_refuses_what_it_cannot_take_and_changes_nothing():
    shapes = [(13, 11), (37,)]
    params, grads, bufs, accs = _blocks(shapes=shapes)
    batch = functional.NativeBatch.build(params, bufs, accs)
    before = _clone((params, grads, bufs, accs))
    assert not batch.step([grads[0].t().contiguous().t(), grads[1]], **HYPER)  # a non-contiguous gradient
    assert not batch.step([grads[0].bfloat16(), grads[1]], **HYPER)  # another dtype
    assert not batch.step(grads[:1], **HYPER)  # another number of blocks
    _assert_same(before, (params, grads, bufs, accs))
    assert not batch.holds(params, [bufs[0].clone(), bufs[1]], accs)
    assert functional.NativeBatch.build([torch.zeros(2, 3, 4)], [None], [[torch.zeros(n) for n in (2, 3, 4)]]) is None


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _grads(model, step):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def _pair(**kwargs):
    """The same model under the default (native, fast path) SM3 and the eager kernel."""
    fast_model, eager_model = _model(), _model()
    fast = SM3(fast_model.parameters(), lr=0.05, momentum=0.9, **kwargs)
    eager = SM3(eager_model.parameters(), lr=0.05, momentum=0.9, foreach=False, fused=False, **kwargs)
    return fast_model, fast, eager_model, eager


def _same_training(fast_model, fast, eager_model, eager):
    for p, q in zip(fast_model.parameters(), eager_model.parameters()):
        assert torch.equal(p, q)
        for key, value in eager.state[q].items():
            assert torch.equal(fast.state[p][key], value), key


@needs_native
@pytest.mark.parametrize("ema_keeps_max", [False, True])
def test_fast_path_follows_gradients_that_come_and_go(ema_keeps_max):
    fast_model, fast, eager_model, eager = _pair(beta=0.5 if ema_keeps_max else 0.0, ema_keeps_max=ema_keeps_max)
    for step in range(6):
        for model in (fast_model, eager_model):
            _grads(model, step)
            if step in (2, 3):
                model[0].bias.grad = None  # a parameter without a gradient for two steps
            if step == 4:
                model[2].weight.grad = None
        fast.step()
        eager.step()
        _same_training(fast_model, fast, eager_model, eager)
    assert any(d.batch is not None for d in fast._dense.values()), "the steps did not take the fast path"
    assert fast.state[fast_model[0].bias]["step"].item() == 4.0


@needs_native
def test_fast_path_follows_replaced_state_and_parameter_storage():
    fast_model, fast, eager_model, eager = _pair()
    for step in range(2):
        _grads(fast_model, step)
        _grads(eager_model, step)
        fast.step()
        eager.step()
    for model, opt in ((fast_model, fast), (eager_model, eager)):
        weight = model[0].weight
        opt.state[weight]["mu_0"] = opt.state[weight]["mu_0"] * 2.0  # replaced, not written in place
        opt.state[weight]["momentum_buffer"] = opt.state[weight]["momentum_buffer"].clone()
        model[2].weight.data = model[2].weight.data.clone()  # the parameter moves to new storage
    for step in range(2, 4):
        _grads(fast_model, step)
        _grads(eager_model, step)
        fast.step()
        eager.step()
        _same_training(fast_model, fast, eager_model, eager)
    assert any(d.batch is not None for d in fast._dense.values()), "the steps did not take the fast path"


@needs_native
def test_fast_path_momentum_turned_on_mid_training_is_checked():
    model = _model()
    opt = SM3(model.parameters(), lr=0.05, momentum=0.0)
    _grads(model, 0)
    opt.step()
    opt.param_groups[0]["momentum"] = 0.9
    _grads(model, 1)
    with pytest.raises(ValueError, match="momentum buffer missing"):
        opt.step()
