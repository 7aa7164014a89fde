"""The torch.optim contract (see ``test_optim_contract.py``): state_dict.

Deterministic save and load, older and named state dicts, ``weights_only`` loading, a non-tensor step,
other param groups, and moving between devices.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from itertools import product

import pytest
import torch
from torch.nn import Parameter

from sm3_dist import SM3
from tests.common import DEVICES, KERNELS, NEEDS_CUDA, fill_grads
from tests.optim_contract import (  # noqa: F401  (one_thread: an autouse fixture)
    CONFIGS,
    assert_tree_equal,
    kernel,
    linear_problem,
    one_thread,
    settings,
    step_device,
)
from tests.optim_info import SM3_INFO, sm3_optim_inputs

# ---------------------------------------------------------------------------------------------- state_dict


def _fwd_bwd(optimizer, w, b, x):
    optimizer.zero_grad()
    loss = (w.mv(x) + b).pow(2).sum()
    loss.backward()
    return loss


def _without_names(state_dict):
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


def _conv_bn(device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A small Conv2d + BatchNorm2d model (seed 1) and its input."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2)).to(device)
    return model, torch.rand(1, 4, 16, 16, device=device)


def _train(model: torch.nn.Module, x: torch.Tensor, optimizer: SM3, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()


def _named(params, named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
def test_state_dict_deterministic(device, kname, desc):
    for named0, named1 in product((False, True), repeat=2):
        kwargs = settings(device, desc, kname)
        torch.manual_seed(0)
        weight = Parameter(torch.randn(2, 3, device=device))
        bias = Parameter(torch.randn(2, device=device))
        x = torch.randn(3, device=device)
        optimizer = SM3(_named([weight, bias], named0), **copy.deepcopy(kwargs))
        for _ in range(5):
            _fwd_bwd(optimizer, weight, bias, x)
            optimizer.step()
        weight_c, bias_c = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
        optimizer_c = SM3(_named([weight_c, bias_c], named1), **copy.deepcopy(kwargs))
        saved = copy.deepcopy(optimizer.state_dict())
        optimizer_c.load_state_dict(copy.deepcopy(saved))
        for _ in range(5):
            _fwd_bwd(optimizer, weight, bias, x)
            _fwd_bwd(optimizer_c, weight_c, bias_c, x)
            optimizer.step()
            optimizer_c.step()
            assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
        assert_tree_equal(_without_names(optimizer.state_dict()), _without_names(optimizer_c.state_dict()))
        # repeated groups have identical representations
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        assert (
            _without_names(optimizer.state_dict())["param_groups"][-1]
            == _without_names(optimizer_c.state_dict())["param_groups"][-1]
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
def test_can_load_older_state_dict(device, kname, desc):
    """A state_dict saved before a flag existed (its key absent from the param groups) loads and steps."""
    kwargs = settings(device, desc, kname)
    model, x = _conv_bn(device)
    optimizer = SM3(model.parameters(), **kwargs)
    _train(model, x, optimizer, 3)
    old = copy.deepcopy(optimizer.state_dict())
    for group in old["param_groups"]:
        for flag in SM3_INFO.not_og_supported_flags:
            group.pop(flag, None)
    optimizer.load_state_dict(old)
    for flag in SM3_INFO.not_og_supported_flags:
        if flag in optimizer.defaults:
            assert optimizer.param_groups[0][flag] == optimizer.defaults[flag]
    optimizer.zero_grad()
    model(x).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
def test_can_load_from_to_named_state_dict(device, kname, desc):
    for named0, named1 in product((False, True), repeat=2):
        kwargs = settings(device, desc, kname)
        model, x = _conv_bn(device)
        optimizer = SM3(model.named_parameters() if named0 else model.parameters(), **copy.deepcopy(kwargs))
        _train(model, x, optimizer, 3)
        saved = copy.deepcopy(optimizer.state_dict())
        optimizer2 = SM3(model.named_parameters() if named1 else model.parameters(), **copy.deepcopy(kwargs))
        optimizer2.load_state_dict(saved)
        _train(model, x, optimizer2, 1)
        if named0 or named1:
            assert optimizer2.state_dict()["param_groups"][0]["param_names"] == [
                "0.weight",
                "0.bias",
                "1.weight",
                "1.bias",
            ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
def test_save_load_equality_with_weights_only(device, kname, desc):
    weight, bias, x = linear_problem(device)
    optimizer = SM3(_named([weight, bias], True), **settings(device, desc, kname))
    for _ in range(3):
        optimizer.step(functools.partial(_fwd_bwd, optimizer, weight, bias, x))
    state_dict = optimizer.state_dict()
    with tempfile.TemporaryFile() as f:
        torch.save(state_dict, f)
        for weights_only in (False, True):
            f.seek(0)
            assert_tree_equal(torch.load(f, weights_only=weights_only), state_dict)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
def test_load_nontensor_step(device, kname, desc):
    """A checkpoint whose step counts are Python numbers (older optimizers saved them so) loads and steps."""
    params = [Parameter(torch.randn(2, 3, device=device)) for _ in range(2)]
    twins = [Parameter(p.detach().clone()) for p in params]
    kwargs = settings(device, desc, kname)
    optimizer, twin = SM3(params, **copy.deepcopy(kwargs)), SM3(twins, **copy.deepcopy(kwargs))
    for step in range(3):
        for group in (params, twins):
            fill_grads(group, step)
        optimizer.step()
        twin.step()
    state_dict = copy.deepcopy(optimizer.state_dict())
    for state in state_dict["state"].values():
        state["step"] = state["step"].item()
    optimizer.load_state_dict(state_dict)
    for group in (params, twins):
        fill_grads(group, 3)
    optimizer.step()
    twin.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        assert torch.equal(optimizer.state[p]["step"], twin.state[q]["step"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
def test_load_state_dict_with_different_param_groups(device, kname):
    a = [Parameter(torch.randn(3, 2, device=device)), Parameter(torch.randn(4, device=device))]
    optimizer = SM3([{"params": [a[0]]}, {"params": [a[1]], "lr": 0.2}], **kernel(device, kname))
    fill_grads(a, 0)
    optimizer.step()
    saved = optimizer.state_dict()
    b = [Parameter(p.detach().clone()) for p in a]
    other = SM3([{"params": b}], **kernel(device, kname))  # one group of two instead of two of one
    with pytest.raises(ValueError):
        other.load_state_dict(copy.deepcopy(saved))
    fewer = SM3([b[0]], **kernel(device, kname))
    with pytest.raises(ValueError):
        fewer.load_state_dict(copy.deepcopy(saved))
    same = SM3([{"params": [b[0]], "lr": 0.5}, {"params": [b[1]]}], **kernel(device, kname))
    same.load_state_dict(copy.deepcopy(saved))
    assert [g["lr"] for g in same.param_groups] == [0.1, 0.2]  # the saved hyperparameters win, per group


@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
@NEEDS_CUDA
def test_state_dict_with_cuda_params(kname, desc):
    kwargs = settings("cpu", desc, kname)
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = SM3(params, **copy.deepcopy(kwargs))
    for _ in range(3):
        optimizer.step()
    with torch.no_grad():
        params_cuda = [Parameter(p.to("cuda")) for p in params]
    for p, q in zip(params, params_cuda):
        q.grad = p.grad.to("cuda")
    optimizer_cuda = SM3(params_cuda, **copy.deepcopy(kwargs))
    state_dict_cpu = copy.deepcopy(optimizer.state_dict())
    state_dict_cuda = copy.deepcopy(optimizer.state_dict())
    optimizer_cuda.load_state_dict(state_dict_cuda)
    assert_tree_equal(state_dict_cuda, state_dict_cpu)  # loading does not modify the caller's dict
    for _ in range(5):
        optimizer.step()
        optimizer_cuda.step()
        for p, q in zip(params, params_cuda):
            torch.testing.assert_close(p, q.cpu())
    for p, q in zip(params, params_cuda):
        for key in optimizer.state[p]:
            torch.testing.assert_close(optimizer.state[p][key], optimizer_cuda.state[q][key].cpu())
    # a loaded step count lives where SM3 keeps one for these parameters (on the device, for an accelerator)
    for state in optimizer_cuda.state_dict()["state"].values():
        assert state["step"].device == step_device(optimizer_cuda, "cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "capturable"])
def test_cpu_load_state_dict(device, impl):
    """A CPU checkpoint (``torch.load(map_location="cpu")``) flagged fused/capturable loads on the device."""
    if device == "cpu":
        pytest.skip("loads a CPU checkpoint into an optimizer on another device")
    for optim_input in sm3_optim_inputs("cpu"):
        param = torch.tensor([0.1, 0.2])
        optimizer = SM3([param], **optim_input.kwargs)
        param.grad = torch.rand_like(param)
        optimizer.step()
        state_dict = copy.deepcopy(optimizer.state_dict())
        state_dict["param_groups"][0][impl] = True
        param_device = param.detach().clone().to(device)
        optimizer_device = SM3([param_device], **{**optim_input.kwargs, impl: True})
        optimizer_device.load_state_dict(state_dict)
        param_device.grad = torch.rand_like(param_device)
        optimizer_device.step()
        assert torch.isfinite(param_device).all()
