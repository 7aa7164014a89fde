"""SM3 against the torch.optim contract: the properties PyTorch's generic optimizer tests assert.

PyTorch states what a ``torch.optim.Optimizer`` promises as a suite of generic tests
(``test/test_optim.py`` in the PyTorch repository) run over an ``OptimizerInfo`` per
optimizer. ``tests/optim_info.py`` describes SM3 that way; the ``test_optim_*.py`` modules
assert the same properties over SM3's configurations, on every kernel it offers (per-tensor
loop, foreach, fused), on CPU and, where one is present, on a CUDA device. What does not
apply to SM3 says why in its skip reason. This module: the OptimizerInfo's inputs and
errors, stepping in the right direction, tensor lr, sparse and complex parameters, param
groups and no-op steps. Kernels agreeing and grad scaling: ``test_optim_kernels.py``;
state_dict: ``test_optim_state_dict.py``; hooks and copies: ``test_optim_hooks_copies.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau

from sm3_dist import SM3
from tests.common import DEVICES, KERNELS, fill_grads, grads_like
from tests.optim_contract import (  # noqa: F401  (one_thread: an autouse fixture)
    CONFIGS,
    SCHEDULERS,
    all_settings,
    kernel,
    linear_problem,
    loss_closure,
    maximizing,
    one_thread,
    settings,
    step_device,
)
from tests.optim_info import SM3_INFO, OptimizerErrorEnum

# ---------------------------------------------------------------------------------------------- the OptimizerInfo


def test_optim_info_inputs_leave_the_kernel_to_each_test():
    for device in ("cpu", "cuda"):
        descs = [i.desc for i in SM3_INFO.optim_inputs_func(device=device)]
        assert len(descs) == len(set(descs))
        for optim_input in SM3_INFO.optim_inputs_func(device=device):
            assert not {"foreach", "fused", "differentiable"} & optim_input.kwargs.keys(), optim_input.desc
    wanted = {"default", "momentum", "beta", "ema_keeps_max", "weight_decay", "maximize", "bf16_momentum"}
    wanted |= {"tensor_lr", "eps0", "nonfinite_ignore", "bias_correction"}
    assert wanted <= set(CONFIGS)


@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    errors = SM3_INFO.optim_error_inputs_func(device=device, dtype=torch.float32)
    assert errors
    for error_input in errors:
        optim_input = error_input.optimizer_error_input
        params, kwargs = optim_input.params, optim_input.kwargs
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            if issubclass(error_input.error_type, Warning):
                with pytest.warns(error_input.error_type, match=error_input.error_regex):
                    SM3(params, **kwargs)
            else:
                with pytest.raises(error_input.error_type, match=error_input.error_regex):
                    SM3(params, **kwargs)
        else:
            optimizer = SM3(params, **kwargs)
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                optimizer.step()


@pytest.mark.parametrize("device", DEVICES)
def test_add_param_group_checks_and_fills_defaults(device):
    a, b = Parameter(torch.randn(3, 2, device=device)), Parameter(torch.randn(4, device=device))
    optimizer = SM3([a], lr=0.05, momentum=0.9)
    for bad, match in ((dict(lr=-1.0), "Invalid lr"), (dict(lr=torch.ones(2)), "1-element"), (dict(beta=2.0), "beta")):
        with pytest.raises(ValueError, match=match):
            optimizer.add_param_group({"params": [b], **bad})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": [b], "lr": 0.2})
    group = optimizer.param_groups[1]
    assert group["lr"] == 0.2
    for key, value in optimizer.defaults.items():
        if key != "lr":
            assert group[key] == value, key
    with pytest.raises(ValueError, match="more than one parameter group"):
        optimizer.add_param_group({"params": [a]})
    fill_grads([a, b], 0)
    b0 = b.detach().clone()
    optimizer.step()
    assert not torch.equal(b, b0) and optimizer.state[b]


def test_defaults_and_repr():
    optimizer = SM3([Parameter(torch.randn(2, 3))], lr=0.05, momentum=0.9, beta=0.5, eps=1e-8, weight_decay=0.1)
    for key, value in dict(lr=0.05, momentum=0.9, beta=0.5, eps=1e-8, weight_decay=0.1, maximize=False).items():
        assert optimizer.defaults[key] == value
        assert f"{key}: {value}" in repr(optimizer)
    assert repr(optimizer).startswith("SM3 (")


# ---------------------------------------------------------------------------------------------- right direction


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "noncontiguous"])
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_goes_right_direction(device, kname, desc, contiguous, sched):
    kwargs = settings(device, desc, kname)
    torch.manual_seed(0)
    weight, bias, x = linear_problem(device, contiguous=contiguous)
    optimizer = SM3([weight, bias], **kwargs)
    schedulers = [make(optimizer) for make in SCHEDULERS[sched]]
    closure = loss_closure(optimizer, weight, bias, x)
    initial = closure().item()
    for _ in range(20):
        loss = closure()
        optimizer.step()
        for scheduler in schedulers:
            scheduler.step(loss.item()) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
    final = closure().item()
    assert final > initial if maximizing(kwargs) else final < initial


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
def test_noncontiguous_matches_contiguous(device, kname, desc):
    """Non-contiguous parameters and gradients step exactly as their contiguous copies."""
    kwargs = settings(device, desc, kname)
    torch.manual_seed(0)
    strided = [
        Parameter(torch.randn(6, 5, 2, device=device)[..., 0]),
        Parameter(torch.randn(5, 6, device=device).t()),
        Parameter(torch.randn(4, 3, 2, device=device)[:, :, 1]),
        Parameter(torch.randn(9, device=device)[::3]),
    ]
    dense = [Parameter(p.detach().contiguous()) for p in strided]
    a, b = SM3(strided, **copy.deepcopy(kwargs)), SM3(dense, **copy.deepcopy(kwargs))
    for step in range(4):
        for p, q, g in zip(strided, dense, grads_like(dense, step)):
            p.grad = g.t().contiguous().t() if g.dim() == 2 else g  # a transposed-layout gradient as well
            q.grad = g.clone()
        a.step()
        b.step()
    for p, q in zip(strided, dense):
        assert not p.is_contiguous()
        assert torch.equal(p, q)
        for key in b.state[q]:
            assert torch.equal(a.state[p][key], b.state[q][key]), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("sched", ["steplr", "plateau"])
def test_param_group_with_lrscheduler_goes_right_direction(device, kname, sched):
    torch.manual_seed(0)
    weight, weight2 = Parameter(torch.randn(10, 5, device=device)), Parameter(torch.randn(10, 5, device=device))
    x = torch.randn(5, device=device)
    optimizer = SM3([{"params": [weight]}, {"params": [weight2], "lr": 0.01}], **kernel(device, kname))
    schedulers = [make(optimizer) for make in SCHEDULERS[sched]]

    def closure():
        optimizer.zero_grad()
        loss = (weight.mv(x) + weight2.mv(x)).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(20):
        loss = optimizer.step(closure)
        for scheduler in schedulers:
            scheduler.step(loss.item()) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
    assert closure().item() < initial


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
def test_maximize_is_minimizing_the_negated_gradient(device, kname, desc):
    kwargs = settings(device, desc, kname)
    kwargs.pop("maximize", None)
    torch.manual_seed(0)
    up = [Parameter(torch.randn(4, 3, device=device)), Parameter(torch.randn(5, device=device))]
    down = [Parameter(p.detach().clone()) for p in up]
    a, b = SM3(up, maximize=True, **copy.deepcopy(kwargs)), SM3(down, maximize=False, **copy.deepcopy(kwargs))
    for step in range(4):
        for p, q, g in zip(up, down, grads_like(up, step)):
            p.grad, q.grad = g, -g
        a.step()
        b.step()
    for p, q in zip(up, down):
        assert torch.equal(p, q)
        for key in a.state[p]:
            assert torch.equal(a.state[p][key], b.state[q][key]), key


# ---------------------------------------------------------------------------------------------- tensor lr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
@pytest.mark.parametrize("num_dim", [0, 1, 2])
def test_tensor_lr(device, kname, desc, num_dim):
    """An lr tensor of any 1-element shape, on the parameters' device or on CPU, steps as the float lr."""
    lr_devices = [device] if device == "cpu" else [device, "cpu"]
    for lr_device in lr_devices:
        kwargs = settings(device, desc, kname)
        kwargs.pop("lr", None)
        torch.manual_seed(0)
        weight, bias, x = linear_problem(device)
        weight_c, bias_c = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
        reference = SM3([weight, bias], lr=1e-3, **kwargs)
        lr = torch.tensor(1e-3).reshape([1] * num_dim).to(lr_device)
        optimizer = SM3([weight_c, bias_c], lr=lr, **kwargs)
        for _ in range(5):
            loss_closure(reference, weight, bias, x)()
            reference.step()
            loss_closure(optimizer, weight_c, bias_c, x)()
            optimizer.step()
            torch.testing.assert_close(weight, weight_c)
            torch.testing.assert_close(bias, bias_c)


# ---------------------------------------------------------------------------------------------- sparse and complex


def rosenbrock(t):
    x, y = t
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def drosenbrock(t):
    x, y = t
    return torch.stack((-400 * x * (y - x**2) - 2 * (1 - x), 200 * (y - x**2)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
def test_rosenbrock_sparse(device, kname, desc):
    """Cyclic coordinate descent with uncoalesced sparse gradients: the objective moves the right way, and
    where SM3's lazy sparse rule coincides with the dense one (no momentum, decay or moving average, which
    the sparse rule applies to the touched rows only) the result is the dense one."""
    kwargs = settings(device, desc, kname)
    kwargs["lr"] = torch.tensor(0.01) if isinstance(kwargs.get("lr"), torch.Tensor) else 0.01
    lazy = kwargs.get("momentum", 0) or kwargs.get("weight_decay", 0) or kwargs.get("beta", 0)
    start = torch.tensor([1.5, 1.5], device=device)
    sparse_p, dense_p = Parameter(start.clone()), Parameter(start.clone())
    sparse_opt, dense_opt = SM3([sparse_p], **copy.deepcopy(kwargs)), SM3([dense_p], **copy.deepcopy(kwargs))
    for i in range(30):
        w = i % 2
        for p, sparse in ((sparse_p, True), (dense_p, False)):
            grad = drosenbrock(p.detach())
            if sparse:
                idx = torch.tensor([[w, w]], device=device)
                v = torch.stack((grad[w] / 4, grad[w] - grad[w] / 4))
                p.grad = torch.sparse_coo_tensor(idx, v, (2,))
            else:
                g = torch.zeros_like(grad)
                g[w] = grad[w]
                p.grad = g
        sparse_opt.step()
        dense_opt.step()
        if not lazy:
            torch.testing.assert_close(sparse_p, dense_p, atol=5e-6, rtol=5e-6)
    if maximizing(kwargs):
        assert rosenbrock(sparse_p.detach()) > rosenbrock(start)
    else:
        assert rosenbrock(sparse_p.detach()) < rosenbrock(start)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
def test_complex_parameters_are_refused(device, kname):
    """SM3 has no complex rule (its accumulators are maxima over slices of squared real gradients): complex
    parameters are refused at construction, naming the parameter; ``torch.view_as_real`` is the way in."""
    complex_param = torch.randn(10, 5, device=device, dtype=torch.complex64, requires_grad=True)
    real_param = torch.randn(10, 5, device=device, requires_grad=True)
    for params in ([complex_param], [real_param, complex_param]):
        with pytest.raises(TypeError, match=r"complex parameters \(a parameter of shape \(10, 5\)"):
            SM3(params, **kernel(device, kname))
    as_real = torch.view_as_real(complex_param).detach().clone().requires_grad_()
    optimizer = SM3([as_real], **kernel(device, kname))
    as_real.grad = torch.randn_like(as_real)
    before = as_real.detach().clone()
    optimizer.step()
    assert not torch.equal(before, as_real)


# ---------------------------------------------------------------------------------------------- param groups, no-ops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
def test_param_groups_weight_decay(device, kname, desc):
    kwargs = settings(device, desc, kname)
    torch.manual_seed(0)
    weight, bias, x = linear_problem(device)
    optimizer = SM3(
        [dict(params=[weight], **kwargs), dict(params=[bias], **{**copy.deepcopy(kwargs), "weight_decay": 0.0})]
    )
    initial = (weight.mv(x) + bias).pow(2).sum().item()
    for _ in range(20):
        loss = loss_closure(optimizer, weight, bias, x)()
        optimizer.step()
    assert loss.item() > initial if maximizing(kwargs) else loss.item() < initial


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
def test_param_groups_lr(device, kname, desc):
    kwargs = settings(device, desc, kname)
    if "lr" not in kwargs:
        kwargs["lr"] = 1e-2
    torch.manual_seed(0)
    weight, bias, x = linear_problem(device)
    irrelevant = Parameter(torch.randn(2, device=device))
    irrelevant_before = irrelevant.detach().clone()
    optimizer = SM3([dict(params=[weight, bias], **kwargs), dict(params=[irrelevant])], lr=1e-28)
    initial = (weight.mv(x) + bias).pow(2).sum().item()
    for _ in range(20):
        loss = loss_closure(optimizer, weight, bias, x)()
        irrelevant.grad = torch.rand_like(irrelevant)
        optimizer.step()
    assert loss.item() > initial if maximizing(kwargs) else loss.item() < initial
    assert torch.equal(irrelevant, irrelevant_before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
def test_step_is_noop_when_params_have_no_grad(device, kname, desc):
    params = [torch.randn(2, 3, device=device) for _ in range(2)]
    before = [p.clone() for p in params]
    optimizer = SM3(params, **settings(device, desc, kname))
    assert optimizer.step(lambda: torch.tensor([1.0])).item() == 1.0
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        assert not optimizer.state[p]  # no state for a parameter that never had a gradient


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
def test_step_is_noop_for_zero_grads(device, kname, desc):
    kwargs = settings(device, desc, kname)
    if kwargs.get("weight_decay", 0) != 0:
        pytest.skip("weight decay moves parameters even when their gradients are zero")
    param = torch.randn(5, 1, device=device, requires_grad=True)
    before = param.detach().clone()
    optimizer = SM3([param], **kwargs)
    for _ in range(2):
        param.grad = torch.zeros_like(param)
        optimizer.step()
    assert torch.equal(param, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
@pytest.mark.parametrize("desc", CONFIGS)
def test_non_empty_state(device, kname, desc):
    model = torch.nn.Linear(5, 5).to(device)
    optimizer = SM3(model.parameters(), **settings(device, desc, kname))
    optimizer.zero_grad()
    model(torch.rand(2, 5, device=device)).sum().backward()
    optimizer.step()
    assert len(optimizer.state) == 2
    for state in optimizer.state.values():
        assert state and {"step", "mu_0"} <= state.keys()
        assert state["step"].dtype == torch.float32 and state["step"].item() == 1.0
        assert state["step"].device == step_device(optimizer, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
def test_step_with_closure_and_zero_grad(device, kname):
    weight, bias, x = linear_problem(device)
    optimizer = SM3([weight, bias], **kernel(device, kname))
    closure = loss_closure(optimizer, weight, bias, x)
    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert optimizer.step() is None
    assert weight.grad is not None
    optimizer.zero_grad(set_to_none=False)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    optimizer.zero_grad()
    assert weight.grad is None and bias.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", list(KERNELS))
def test_optimizer_can_be_printed(device, kname):
    params = [Parameter(torch.randn(2, 3, device=device)) for _ in range(2)]
    for kwargs in all_settings(device, kname):
        text = repr(SM3(params, **kwargs))
        assert text.startswith("SM3 (") and "Parameter Group 0" in text
        for key in ("lr", "momentum", "beta", "eps", "weight_decay", "maximize", "foreach", "fused"):
            assert f"    {key}: " in text


# ---------------------------------------------------------------------------------------------- not applicable


def test_second_order_optims_return_consistent_types():
    pytest.skip("for optimizers whose step requires a closure (LBFGS); SM3 is first-order and takes one optionally")


def test_differentiable():
    pytest.skip("SM3 offers no differentiable=True: its step runs under torch.no_grad, as torch's fused kernels do")
