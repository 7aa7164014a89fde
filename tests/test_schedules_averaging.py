"""Warm-up/cool-down schedule and Polyak averaging."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sm3_dist import SM3
from sm3_dist.averaging import averaged_weights, polyak
from sm3_dist.schedules import WarmupCooldown, warmup_cooldown


def _lrs(total, **kwargs):
    p = torch.zeros(2, 2, requires_grad=True)
    opt = SM3([p], lr=1.0)
    sched = warmup_cooldown(opt, total, **kwargs)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    return lrs


def test_quadratic_warmup_then_constant():
    lrs = _lrs(100, warmup_fraction=0.05, power=2.0)
    assert lrs[:5] == pytest.approx([(t / 5) ** 2 for t in range(1, 6)])
    assert all(v == 1.0 for v in lrs[5:])


def test_linear_warmup():
    lrs = _lrs(40, warmup_fraction=0.1, power=1.0)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cooldown_decays_linearly_to_zero():
    lrs = _lrs(100, warmup_fraction=0.0, cooldown_fraction=0.1)
    assert all(v == 1.0 for v in lrs[:90])
    tail = lrs[90:]
    assert all(a > b for a, b in itertools.pairwise(tail))
    diffs = [a - b for a, b in itertools.pairwise(tail)]
    assert max(diffs) - min(diffs) < 1e-9
    assert 0 < tail[-1] <= 1 / 10


def test_schedule_survives_state_dict():
    p = torch.zeros(2, requires_grad=True)
    opt = SM3([p], lr=1.0)
    sched = warmup_cooldown(opt, 50, warmup_fraction=0.2)
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = SM3([p], lr=1.0)
    sched2 = warmup_cooldown(opt2, 50, warmup_fraction=0.2)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(total_steps=0, warmup_steps=0), "total_steps"),
        (dict(total_steps=10, warmup_steps=11), "warmup_steps"),
        (dict(total_steps=10, warmup_steps=1, power=0.0), "power"),
        (dict(total_steps=10, warmup_steps=1, cooldown_steps=-1), "cooldown_steps"),
    ],
)
def test_bad_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupCooldown(**kwargs)


def test_bad_fractions():
    opt = SM3([torch.zeros(1, requires_grad=True)])
    with pytest.raises(ValueError, match="warmup_fraction"):
        warmup_cooldown(opt, 10, warmup_fraction=1.5)
    with pytest.raises(ValueError, match="exceeds"):
        warmup_cooldown(opt, 10, warmup_fraction=0.6, cooldown_fraction=0.6)


def test_polyak_is_ema_and_swaps_back():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    averaged = polyak(model, decay=0.5)
    opt = SM3(model.parameters(), lr=0.1)
    history = [model.weight.detach().clone()]
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        averaged.update_parameters(model)
        history.append(model.weight.detach().clone())
    # AveragedModel copies the first update, then averages: avg = 0.5 avg + 0.5 w
    expected = history[1]
    for w in history[2:]:
        expected = 0.5 * expected + 0.5 * w
    torch.testing.assert_close(averaged.module.weight, expected)
    trained = model.weight.detach().clone()
    with averaged_weights(model, averaged):
        torch.testing.assert_close(model.weight, expected)
    assert torch.equal(model.weight, trained)
    assert not math.isclose(float(trained.sum()), float(expected.sum()))


def test_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        polyak(torch.nn.Linear(2, 2), decay=1.0)
