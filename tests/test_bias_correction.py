"""SM3's bias-corrected EMA variant (``bias_correction=True``): nu / (1 - beta^t) for the update only.

Held to the independent per-element reference (extended with the rule) and every
kernel bitwise to the eager one. Sharded runs (``ShardedSM3``, FSDP2, FSDP1,
ZeRO 0-3) are bitwise single-process SM3: the ``beta+bias_correction`` rows of
``test_exactness.py``.
"""

from __future__ import annotations

import pytest
import torch

from sm3_dist import SM3, accumulator_key
from tests.common import KERNELS, seeded_grads
from tests.reference import ReferenceSM3

VARIANTS = [
    dict(momentum=0.0, beta=0.9, bias_correction=True),
    dict(momentum=0.9, beta=0.99, bias_correction=True, weight_decay=0.01, eps=0.0),
    dict(momentum=0.9, beta=0.99, bias_correction=True, update_clip=1.0),  # the recommended setting
    dict(momentum=0.5, beta=0.9, bias_correction=True, weight_decay=0.01, eps=0.0, update_clip=0.5),
]
SHAPES = [(), (7,), (5, 6), (3, 4, 5)]


def _grads(step):
    return seeded_grads(SHAPES, step, seed=500)


def _run(kernel, hyper, steps=6, drop_at=3):
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    opt = SM3(params, lr=0.05, **hyper, **KERNELS[kernel])
    for step in range(steps):
        for k, (p, g) in enumerate(zip(params, _grads(step))):
            p.grad = None if (step == drop_at and k == 2) else g  # one parameter skips a step: its own count
        opt.step()
    return params, opt


@pytest.mark.parametrize("hyper", VARIANTS, ids=str)
def test_matches_the_reference(hyper):
    torch.manual_seed(0)
    base = [torch.randn(s) for s in SHAPES]
    ref = ReferenceSM3(base, lr=0.05, **hyper)
    for step in range(6):
        grads = _grads(step)
        if step == 3:
            grads[2] = None
        ref.step(grads)
    params, opt = _run("eager", hyper)
    for k, (p, r) in enumerate(zip(params, ref.params)):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)
        for d, acc in enumerate(ref.accumulators(k)):
            torch.testing.assert_close(opt.state[p][accumulator_key(d)].double(), acc, rtol=1e-5, atol=1e-6)
    assert opt.state[params[2]]["step"].item() == 5.0 and opt.state[params[1]]["step"].item() == 6.0


@pytest.mark.parametrize("hyper", VARIANTS, ids=str)
@pytest.mark.parametrize("kernel", ["foreach", "fused"])
def test_every_kernel_is_bitwise_the_eager_one(kernel, hyper):
    eager, eager_opt = _run("eager", hyper)
    other, other_opt = _run(kernel, hyper)
    for p, q in zip(eager, other):
        assert torch.equal(p, q)
        for key, value in eager_opt.state[p].items():
            assert torch.equal(other_opt.state[q][key], value), key


def test_the_correction_changes_the_update_not_the_state():
    plain, plain_opt = _run("eager", dict(beta=0.9))
    corrected, corrected_opt = _run("eager", dict(beta=0.9, bias_correction=True))
    assert not torch.equal(plain[2], corrected[2])
    # the accumulators are the same plain moving average only while the gradients are; they differ after a
    # step because the parameters (hence nothing else here) differ: compare one step from the same start
    p = torch.zeros(4, 3, requires_grad=True)
    q = torch.zeros(4, 3, requires_grad=True)
    a, b = SM3([p], lr=0.1, beta=0.9), SM3([q], lr=0.1, beta=0.9, bias_correction=True)
    p.grad = q.grad = torch.ones(4, 3)
    a.step()
    b.step()
    assert torch.equal(a.state[p]["mu_0"], b.state[q]["mu_0"])
    # nu = 0.1 g^2; corrected: nu / (1 - 0.9) = g^2, so the first step is lr * sign(g), as in Adam
    torch.testing.assert_close(q.detach(), torch.full((4, 3), -0.1))
    torch.testing.assert_close(p.detach(), torch.full((4, 3), -0.1 / 0.1**0.5))
    del plain_opt, corrected_opt
