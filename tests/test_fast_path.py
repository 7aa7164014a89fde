"""The block plan computes what the plain eager kernel computes, and is rebuilt exactly when what it holds changes.

``functional.sm3(..., maxima_out=...)`` writes the maxima where it is told
(possibly into the accumulators it reads), :class:`~sm3_dist.kernels.cpu.native_step.NativePlan`
repeats one native launch with only the pointers re-read, and ``SM3`` keeps one
:class:`~sm3_dist.block_plan.GroupPlan` per param group. Each is held bitwise to the
plain eager kernel, including after a gradient disappears, a state tensor or a
parameter's storage is replaced, a gradient changes dtype or layout, or the
layout changes; and the plan is *not* rebuilt while none of that happens.
"""

from __future__ import annotations

import pytest
import torch

from sm3_dist import SM3, functional
from sm3_dist.block_plan import block_refs
from sm3_dist.kernels.cpu import library
from sm3_dist.kernels.cpu.native_step import NativePlan
from sm3_dist.kernels.rule import UpdateRule
from sm3_dist.layout import TensorLayout, flat_range_piece, full_piece
from sm3_dist.placement import ShardSpec
from tests.common import KERNELS, assert_same, clone_blocks, fill_grads, random_blocks

# skipped only without a compiler: where one exists, a kernel that fails to build fails these tests
needs_native = pytest.mark.skipif(library._compiler() is None, reason="no C++ compiler for the native kernel")

RULE = UpdateRule(momentum=0.9, beta=0.0, eps=0.0, weight_decay=0.01)


@pytest.mark.parametrize("keep_max", [False, True], ids=["assign", "keep_max"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_maxima_out_into_the_accumulators_equals_returned_maxima(kernel, keep_max):
    returned = random_blocks()
    written = clone_blocks(returned)
    maxima = functional.sm3(*returned, rule=RULE, lr=0.1, **KERNELS[kernel])
    for accs, new in zip(returned[3], maxima):
        for acc, value in zip(accs, new):
            acc.copy_(torch.maximum(acc, value) if keep_max else value)
    out = functional.sm3(*written, rule=RULE, lr=0.1, **KERNELS[kernel], maxima_out=written[3], keep_max=keep_max)
    assert out is None
    assert_same(returned, written)


def test_maxima_out_must_match_the_blocks():
    blocks = random_blocks()
    with pytest.raises(ValueError, match="maxima_out has 1 entries for 4 blocks"):
        functional.sm3(*blocks, rule=RULE, lr=0.1, maxima_out=blocks[3][:1])


@needs_native
@pytest.mark.parametrize("keep_max", [False, True], ids=["assign", "keep_max"])
def test_native_plan_equals_the_eager_kernel_over_steps(keep_max):
    shapes = [(37,), (13, 11), (1,), (300, 2), (3, 4, 5)]
    eager = random_blocks(shapes=shapes)
    planned = clone_blocks(eager)
    outs = [[torch.zeros_like(a) for a in accs] for accs in planned[3]]
    plan = NativePlan.build(planned[0], planned[2], planned[3], outs)
    assert plan is not None and plan.holds(planned[0], planned[2], planned[3], outs)
    for step in range(4):
        gen = torch.Generator().manual_seed(100 + step)
        new_grads = [torch.randn(s, generator=gen) for s in shapes]
        maxima = functional.sm3(eager[0], new_grads, eager[2], eager[3], rule=RULE, lr=0.1, fused=False)
        functional.store_maxima([a for accs in eager[3] for a in accs], [m for new in maxima for m in new], keep_max)
        plan.step([g.clone() for g in new_grads], RULE, lr=0.1)
        functional.finalize_(
            [a for accs in planned[3] for a in accs], [o for block in outs for o in block], keep_max=keep_max
        )
        assert_same(eager, planned)
        assert all(not o.any() for block in outs for o in block)  # zeroed for the next step


@needs_native
def test_native_plan_refuses_what_it_cannot_take_and_changes_nothing():
    shapes = [(13, 11), (37,)]
    params, grads, bufs, accs = random_blocks(shapes=shapes)
    outs = [[torch.zeros_like(a) for a in block] for block in accs]
    plan = NativePlan.build(params, bufs, accs, outs)
    before = clone_blocks((params, grads, bufs, accs))
    for bad in ([grads[0].t().contiguous().t(), grads[1]], [grads[0].bfloat16(), grads[1]], grads[:1]):
        with pytest.raises(ValueError):
            plan.step(bad, RULE, lr=0.1)
    assert_same(before, (params, grads, bufs, accs))
    assert not plan.holds(params, [bufs[0].clone(), bufs[1]], accs, outs)
    t = torch.zeros(4, 3).t()
    assert NativePlan.build([t], [None], [[torch.zeros(3), torch.zeros(4)]], [[torch.zeros(3)] * 2]) is None


# ---------------------------------------------------------------------------------------------- geometry


def test_block_refs_of_a_whole_tensor_and_a_straddling_flat_range():
    _, whole = block_refs(0, TensorLayout((full_piece((4, 5)),), 20), (4, 5), reduced=False)
    assert [b.whole for b in whole] == [True] and whole[0].acc_starts == (0, 0)
    assert block_refs(0, TensorLayout((full_piece(()),), 1), (), reduced=False)[1][0].whole
    # elements [7, 18) of a 4 x 5 tensor: the end of row 1, row 2, the start of row 3 (rows cut mid-row)
    piece = flat_range_piece((4, 5), 7, 18)
    pieces, blocks = block_refs(3, TensorLayout((piece,), 11), (11,), reduced=True)
    assert [(b.offset, b.lengths) for b in blocks] == [(0, (1, 3)), (3, (1, 5)), (8, (1, 3))]
    assert not any(b.whole for b in blocks) and all(b.param == 3 for b in blocks)
    assert pieces[0].ranges == ((1, 4), (0, 5)) and pieces[0].reduced
    # reduced: the maxima go to the global indices; local: to the index within the stored range
    assert [b.out_starts for b in blocks] == [(1, 2), (2, 0), (3, 0)]
    _, local = block_refs(3, TensorLayout((piece,), 11), (11,), reduced=False)
    assert [b.out_starts for b in local] == [(0, 2), (1, 0), (2, 0)]
    assert [b.acc_starts for b in local] == [(0, 2), (1, 0), (2, 0)]


# ---------------------------------------------------------------------------------------------- the optimizer's plan


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _pair(**kwargs):
    """The same model under the default (planned, fused) SM3 and the eager per-tensor kernel."""
    fast_model, eager_model = _model(), _model()
    fast = SM3(fast_model.parameters(), lr=0.05, momentum=0.9, **kwargs)
    eager = SM3(eager_model.parameters(), lr=0.05, momentum=0.9, foreach=False, fused=False, **kwargs)
    return fast_model, fast, eager_model, eager


def _same_training(fast_model, fast, eager_model, eager):
    for p, q in zip(fast_model.parameters(), eager_model.parameters()):
        assert torch.equal(p, q)
        for key, value in eager.state[q].items():
            assert torch.equal(fast.state[p][key], value), key


class Builds:
    """Counts the plan builds of one optimizer."""

    def __init__(self, opt, monkeypatch):
        self.count = 0
        original = opt._init_group

        def counting(gi, group):
            self.count += 1
            return original(gi, group)

        monkeypatch.setattr(opt, "_init_group", counting)


def _both(fast_model, eager_model, step, change=None):
    for model in (fast_model, eager_model):
        fill_grads(model.parameters(), step)
        if change is not None:
            change(model)


@needs_native
@pytest.mark.parametrize("ema_keeps_max", [False, True])
def test_plan_follows_gradients_that_come_and_go(ema_keeps_max, monkeypatch):
    fast_model, fast, eager_model, eager = _pair(beta=0.5 if ema_keeps_max else 0.0, ema_keeps_max=ema_keeps_max)
    builds = Builds(fast, monkeypatch)
    expected_builds = [1, 1, 2, 2, 3, 4]  # built at the start, when a gradient goes, and when the set changes again

    def drop(step):
        def change(model):
            if step in (2, 3):
                model[0].bias.grad = None  # a parameter without a gradient for two steps
            if step == 4:
                model[2].weight.grad = None

        return change

    for step in range(6):
        _both(fast_model, eager_model, step, drop(step))
        fast.step()
        eager.step()
        _same_training(fast_model, fast, eager_model, eager)
        assert builds.count == expected_builds[step], (step, builds.count)
    assert fast._dense[0].fused is not None, "the steps did not take the native plan"
    assert fast.state[fast_model[0].bias]["step"].item() == 4.0


@needs_native
def test_plan_is_rebuilt_exactly_when_state_storage_grad_layout_or_layout_change(monkeypatch):
    fast_model, fast, eager_model, eager = _pair(bias_correction=True, beta=0.9)
    builds = Builds(fast, monkeypatch)

    def replace_state(model, opt):
        weight = model[0].weight
        opt.state[weight]["mu_0"] = opt.state[weight]["mu_0"] * 2.0  # replaced, not written in place
        opt.state[weight]["momentum_buffer"] = opt.state[weight]["momentum_buffer"].clone()

    def move_storage(model, opt):
        model[2].weight.data = model[2].weight.data.clone()  # the parameter moves to new storage

    def grad_layout(model, opt):
        model[2].weight.grad = model[2].weight.grad.t().contiguous().t()  # same values, other strides

    def grad_dtype(model, opt):
        model[0].bias.grad = model[0].bias.grad.bfloat16().float()  # fresh tensor, same dtype: no rebuild

    changes = [
        (None, 0),
        (replace_state, 1),
        (None, 0),
        (move_storage, 1),
        (grad_layout, 1),
        (None, 1),  # and back to contiguous gradients
        (grad_dtype, 0),
    ]
    for step, (change, rebuilds) in enumerate(changes):
        fill_grads(fast_model.parameters(), step)
        fill_grads(eager_model.parameters(), step)
        if change is not None:
            change(fast_model, fast)
            change(eager_model, eager)
        before = builds.count
        fast.step()
        eager.step()
        _same_training(fast_model, fast, eager_model, eager)
        if step:
            assert builds.count - before == rebuilds, (step, change)
    # a layout change (a new param group) re-derives the layouts and rebuilds every group's plan
    extra = [torch.nn.Parameter(torch.randn(4, 4))]
    fast.add_param_group({"params": extra})
    extra[0].grad = torch.randn(4, 4)
    before = builds.count
    fill_grads(fast_model.parameters(), 99)
    fast.step()
    assert builds.count - before == 2


@needs_native
def test_non_contiguous_parameters_step_like_contiguous_ones():
    torch.manual_seed(0)
    w = torch.randn(7, 5)
    contiguous = torch.nn.Parameter(w.clone())
    transposed = torch.nn.Parameter(w.t().contiguous().t())  # same values, column-major
    assert not transposed.is_contiguous()
    runs = []
    for p in (contiguous, transposed):
        opt = SM3([p], lr=0.1, momentum=0.9)
        for step in range(3):
            p.grad = torch.randn(7, 5, generator=torch.Generator().manual_seed(step))
            if p is transposed:
                p.grad = p.grad.t().contiguous().t()
            opt.step()
        runs.append((p, opt.state[p]))
    (a, sa), (b, sb) = runs
    assert torch.equal(a, b) and not b.is_contiguous()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@needs_native
def test_momentum_turned_on_mid_training_is_checked():
    model = _model()
    opt = SM3(model.parameters(), lr=0.05, momentum=0.0)
    fill_grads(model.parameters(), 0)
    opt.step()
    opt.param_groups[0]["momentum"] = 0.9
    fill_grads(model.parameters(), 1)
    with pytest.raises(ValueError, match="momentum buffer missing"):
        opt.step()


def test_a_flat_range_layout_steps_through_the_plan():
    """A local tensor holding a straddling flat range of one parameter and the start of the next (unreduced)."""
    shapes = [(4, 5), (3, 2)]
    flat = torch.nn.Parameter(torch.randn(11 + 4))
    layout = TensorLayout((flat_range_piece(shapes[0], 7, 18), flat_range_piece(shapes[1], 0, 4, offset=11)), 15)
    opt = SM3([flat], lr=0.1, momentum=0.9, shard_resolver=lambda t: ShardSpec(layout))
    ref_w = flat.detach().clone()
    flat.grad = torch.randn(15)
    opt.step()
    plan = opt._dense[0]
    assert len(plan.blocks) == 3 + 1 and not any(b.whole for b in plan.blocks)
    # the same blocks stepped one by one through the eager kernel
    expected = ref_w.clone()
    for piece in layout.pieces:
        for block in piece.blocks:
            n = block.numel
            view = expected[block.offset : block.offset + n].view(block.lengths)
            grad = flat.grad[block.offset : block.offset + n].view(block.lengths)
            accs = [torch.zeros(n_d) for n_d in block.lengths]
            functional.sm3(
                [view], [grad], [torch.zeros(block.lengths)], [accs], rule=UpdateRule(momentum=0.9), lr=0.1, fused=False
            )
    assert torch.equal(flat.detach(), expected)
