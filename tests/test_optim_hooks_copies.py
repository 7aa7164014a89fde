"""The torch.optim contract (see ``test_optim_contract.py``): hooks and copies.

state_dict, load_state_dict and step hooks (per optimizer and global) for ``SM3`` and ``ShardedSM3``;
deepcopy and pickle of an optimizer, which must step as the original.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch.nn import Parameter
from torch.optim import SGD
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from sm3_dist import SM3, ShardedSM3
from tests.common import DEVICES, KERNELS, fill_grads
from tests.optim_contract import (  # noqa: F401  (one_thread: an autouse fixture)
    CLASSES,
    CONFIGS,
    all_settings,
    one_thread,
    params_of,
    settings,
)

# ---------------------------------------------------------------------------------------------- hooks


def _make(cls, params, **kwargs):
    return cls(params, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("cls", list(CLASSES))
def test_state_dict_hooks(device, kname, cls):
    def pre_hook(optimizer):
        optimizer.state["test"] = 1

    def post_hook(optimizer, state_dict):
        ran = "test" in state_dict["state"]
        state_dict["state"].pop("test", None)
        state_dict["ran_state_dict_pre_hook"] = ran
        return state_dict

    for kwargs in all_settings(device, kname):
        param = torch.rand(2, 3, device=device, requires_grad=True)
        optimizer = _make(CLASSES[cls], [param], **kwargs)
        optimizer.register_state_dict_pre_hook(pre_hook)
        if cls == "SM3":  # ShardedSM3's state_dict consolidates its own state, not extra entries
            assert optimizer.state_dict()["state"]["test"] == 1
        optimizer = _make(CLASSES[cls], [param], **kwargs)
        optimizer.register_state_dict_post_hook(post_hook)
        assert optimizer.state_dict()["ran_state_dict_pre_hook"] is False
        if cls == "SM3":
            optimizer.register_state_dict_pre_hook(pre_hook)
            state_dict = optimizer.state_dict()
            assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"] is True


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("cls", list(CLASSES))
def test_load_state_dict_hooks(device, kname, cls):
    def pre_hook1(optimizer, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.002

    def pre_hook2(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.003
        return state_dict

    ran = {}

    def post_hook(optimizer):
        ran["pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
        ran["post_hook"] = True

    for kwargs in all_settings(device, kname):
        param = torch.rand(2, 3, device=device, requires_grad=True)
        optimizer = _make(CLASSES[cls], [param], **kwargs)
        state_dict = optimizer.state_dict()
        optimizer.register_load_state_dict_pre_hook(pre_hook1)
        optimizer.load_state_dict(state_dict)
        assert optimizer.param_groups[0]["lr"] == 0.002
        optimizer.register_load_state_dict_pre_hook(pre_hook2, prepend=True)
        optimizer.load_state_dict(state_dict)
        assert optimizer.param_groups[0]["lr"] == 0.002  # prepended: the other hook runs last and wins

        optimizer = _make(CLASSES[cls], [param], **kwargs)
        ran.clear()
        optimizer.register_load_state_dict_post_hook(post_hook)
        optimizer.load_state_dict(optimizer.state_dict())
        assert ran == {"pre_hook2": False, "post_hook": True}

        optimizer = _make(CLASSES[cls], [param], **kwargs)
        ran.clear()
        optimizer.register_load_state_dict_pre_hook(pre_hook2)
        optimizer.register_load_state_dict_post_hook(post_hook)
        optimizer.load_state_dict(optimizer.state_dict())
        assert ran == {"pre_hook2": True, "post_hook": True}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("cls", list(CLASSES))
def test_step_hooks(device, kname, cls):
    data = []

    def hook(value):
        def fn(optimizer, args, kwargs):
            data.append(value)

        return fn

    for kwargs in all_settings(device, kname):
        params = [torch.tensor([1.0, 1.0], device=device)]
        optimizer = _make(CLASSES[cls], params, **kwargs)
        other = SGD(params)
        data.clear()
        handles = [
            register_optimizer_step_pre_hook(hook(0)),
            register_optimizer_step_post_hook(hook(5)),
            optimizer.register_step_pre_hook(hook(1)),
            optimizer.register_step_post_hook(hook(2)),
            other.register_step_pre_hook(hook(1)),
            other.register_step_post_hook(hook(2)),
        ]
        try:
            optimizer.step()
            assert data == [0, 1, 2, 5]
            other.step()
            assert data == [0, 1, 2, 5] * 2
            optimizer.step()
            assert data == [0, 1, 2, 5] * 3
        finally:
            for handle in handles:
                handle.remove()
        optimizer.step()
        other.step()
        assert data == [0, 1, 2, 5] * 3


# ---------------------------------------------------------------------------------------------- copies


def _public(obj):
    return {k for k in obj.__dict__ if not k.startswith("_")}


def _copy(optimizer, how):
    if how == "deepcopy":
        return copy.deepcopy(optimizer)
    if how == "pickle":
        return pickle.loads(pickle.dumps(optimizer))
    buffer = io.BytesIO()
    torch.save(optimizer, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _sm3_settings(optimizer):
    inner = optimizer._inner if isinstance(optimizer, ShardedSM3) else optimizer
    return inner.momentum_dtype, inner.ema_keeps_max, inner.nonfinite


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
@pytest.mark.parametrize("cls", list(CLASSES))
def test_deepcopy_copies_all_public_attrs(device, kname, desc, cls):
    params = [Parameter(torch.randn(2, 3, device=device)) for _ in range(2)]
    optimizer = CLASSES[cls](params, **settings(device, desc, kname))
    for step in range(3):
        fill_grads(params, step)
        optimizer.step()
    copied = copy.deepcopy(optimizer)
    assert _public(optimizer) == _public(copied)
    for key in _public(optimizer):
        if key not in ("state", "param_groups"):
            assert getattr(copied, key) == getattr(optimizer, key), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
@pytest.mark.parametrize("cls", list(CLASSES))
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch_save"])
def test_copy_of_the_optimizer_steps_identically(device, kname, desc, cls, how):
    """A copy (``copy.deepcopy``, ``pickle``, ``torch.save``) keeps SM3's own settings, its state and its
    param groups, and steps exactly as the original; the original is left alone."""
    kwargs = settings(device, desc, kname, ema_keeps_max=True, nonfinite="raise")
    kwargs.setdefault("beta", 0.5)
    params = [Parameter(torch.randn(4, 3, device=device)), Parameter(torch.randn(5, device=device))]
    groups = [{"params": [params[0]]}, {"params": [params[1]], "lr": 0.02}]
    optimizer = CLASSES[cls](groups, **kwargs)
    for step in range(2):
        fill_grads(params, step)
        optimizer.step()
    copied = _copy(optimizer, how)
    copied_params = params_of(copied)
    assert all(p is not q for p, q in zip(params, copied_params))
    assert _sm3_settings(copied) == _sm3_settings(optimizer)
    assert copied.defaults == optimizer.defaults
    assert [g["lr"] for g in copied.param_groups] == [g["lr"] for g in optimizer.param_groups]
    for p, q in zip(params, copied_params):
        assert torch.equal(p, q)
        for key in optimizer.state[p]:
            assert torch.equal(optimizer.state[p][key], copied.state[q][key]), key
    for step in range(2, 5):
        fill_grads(params, step)
        fill_grads(copied_params, step)
        optimizer.step()
        copied.step()
        for p, q in zip(params, copied_params):
            assert torch.equal(p, q)
    for p, q in zip(params, copied_params):
        for key in optimizer.state[p]:
            assert torch.equal(optimizer.state[p][key], copied.state[q][key]), key
    with pytest.raises(FloatingPointError):  # nonfinite="raise" came along
        copied_params[0].grad = torch.full_like(copied_params[0], float("nan"))
        copied.step()


def _no_shards(p):
    return None


def _user_resolver(optimizer):
    resolver = optimizer._shard_resolver
    return getattr(resolver, "resolver", resolver)  # SM3 may wrap the user's resolver in a guard of its own


def test_copy_keeps_a_picklable_shard_resolver_and_refuses_an_unpicklable_one():
    params = [Parameter(torch.randn(3, 2))]
    optimizer = SM3(params, shard_resolver=_no_shards)
    fill_grads(params, 0)
    optimizer.step()
    for how in ("deepcopy", "pickle", "torch_save"):
        assert _user_resolver(_copy(optimizer, how)) is _no_shards
    local = SM3(params, shard_resolver=lambda p: None)
    assert _user_resolver(copy.deepcopy(local)) is _user_resolver(local)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError), match=r"lambda|local"):
        pickle.dumps(local)


def test_copy_drops_hooks_as_torch_does():
    params = [Parameter(torch.randn(3, 2))]
    optimizer = SM3(params)
    optimizer.register_step_pre_hook(lambda *args: None)
    copied = copy.deepcopy(optimizer)
    assert len(optimizer._optimizer_step_pre_hooks) == 1 and len(copied._optimizer_step_pre_hooks) == 0
