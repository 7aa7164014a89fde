"""SM3 against the torch.optim contract: the properties PyTorch's generic optimizer tests assert.

PyTorch states what a ``torch.optim.Optimizer`` promises as a suite of generic tests
(``test/test_optim.py`` in the PyTorch repository) run over an ``OptimizerInfo`` per
optimizer. ``tests/optim_info.py`` describes SM3 that way; this module asserts the same
properties over SM3's configurations, on every kernel it offers (per-tensor loop,
foreach, fused), on CPU and, where one is present, on a CUDA device. What does not
apply to SM3 says why in its skip reason.
"""

from __future__ import annotations

import copy
import functools
import io
import os
import pickle
import tempfile
from itertools import product

import pytest
import torch
from torch.nn import Parameter
from torch.optim import SGD
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from sm3_dist import SM3, ShardedSM3, functional, fused
from tests.common import KERNELS
from tests.optim_info import SM3_INFO, OptimizerErrorEnum, sm3_optim_inputs

CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
CONFIGS = list(dict.fromkeys(i.desc for dev in ("cpu", "cuda") for i in sm3_optim_inputs(dev)))
SCHEDULERS = {
    "none": [],
    "steplr": [lambda opt: StepLR(opt, gamma=0.9, step_size=10)],
    "plateau": [lambda opt: ReduceLROnPlateau(opt)],
}
CLASSES = {"SM3": SM3, "ShardedSM3": ShardedSM3}


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread (two threads on a shared 2-core machine spin for ~100 ms per op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(device: str, desc: str) -> dict:
    """The constructor keywords of configuration ``desc`` (made fresh: a tensor lr is mutable)."""
    for optim_input in sm3_optim_inputs(device):
        if optim_input.desc == desc:
            return copy.deepcopy(optim_input.kwargs)
    pytest.skip(f"{desc} is a CUDA-only configuration (capturable steps exist for CUDA graphs)")


def kernel(device: str, name: str) -> dict:
    if name == "fused" and functional.fused_kernel(torch.device(device).type) is None:
        pytest.skip(
            f"no fused {device} kernel here (the CPU one needs a C++ compiler, the CUDA one Triton); "
            "test_fused_without_a_kernel_is_refused covers that case"
        )
    return dict(KERNELS[name])


def settings(device: str, desc: str, kname: str, **override) -> dict:
    return {**config(device, desc), **kernel(device, kname), **override}


def all_settings(device: str, kname: str) -> list[dict]:
    """Every configuration offered on ``device``, with kernel ``kname``."""
    return [{**copy.deepcopy(i.kwargs), **kernel(device, kname)} for i in sm3_optim_inputs(device)]


def step_device(optimizer, device) -> torch.device:
    """Where SM3 keeps a step count: on CPU for CPU parameters, unless ``capturable``; else on their device."""
    if torch.device(device).type == "cpu" and not optimizer.param_groups[0].get("capturable", False):
        return torch.device("cpu")
    return torch.empty(0, device=device).device


def refused_float64(err: Exception, device) -> bool:
    """Whether ``err`` is the fused kernels' documented refusal of float64 parameters, naming the dtype.

    Only the fused kernels may refuse: the per-tensor kernel must take float64 (asserted here).
    """
    if not (isinstance(err, (TypeError, ValueError, NotImplementedError)) and "float64" in str(err)):
        return False
    p = Parameter(torch.ones(2, 3, device=device, dtype=torch.float64))
    optimizer = SM3([p], **KERNELS["eager"])
    p.grad = torch.ones_like(p)
    optimizer.step()
    assert optimizer.state[p]["mu_0"].dtype == torch.float64
    return True


def maximizing(kwargs: dict) -> bool:
    return bool(kwargs.get("maximize", False))


def linear_problem(device, dtype=torch.float32, contiguous=True):
    """``weight`` (10, 5), ``bias`` (10) and an input: the loss ``|weight @ x + bias|^2``."""
    if contiguous:
        weight = Parameter(torch.randn(10, 5, device=device, dtype=dtype))
        bias = Parameter(torch.randn(10, device=device, dtype=dtype))
    else:
        weight = Parameter(torch.randn(10, 5, 2, device=device, dtype=dtype)[..., 0])
        bias = Parameter(torch.randn(10, 2, device=device, dtype=dtype)[..., 0])
        assert not weight.is_contiguous() and not bias.is_contiguous()
    x = torch.randn(5, device=device, dtype=dtype)
    return weight, bias, x


def loss_closure(optimizer, weight, bias, x):
    def closure():
        optimizer.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    return closure


def small_model(device, dtype):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    return model.to(device=device, dtype=dtype)


def assert_same(a, b, exact=False, **tol):
    if isinstance(a, torch.Tensor):
        if exact:
            assert torch.equal(a, b), (a, b)
        else:
            torch.testing.assert_close(a, b, **tol)
    else:
        assert a == b, (a, b)


def assert_tree_equal(a, b, path="state_dict"):
    """Exact equality of nested dicts/lists of tensors and plain values (dtype and device included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.device == b.device, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, a.keys(), getattr(b, "keys", lambda: b)())
        for key in a:
            assert_tree_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def compare_between(inputs, models, optimizers, exact=False, **tol):
    """Step two models side by side (frozen layers and ``None`` gradients included); params and state agree.

    Each optimizer also holds two parameters outside the model, a 0-d one and an empty one, stepped with
    gradients of their own.
    """
    for i in range(7):
        for inp, model, optimizer in zip(inputs, models, optimizers):
            optimizer.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:  # a step with every gradient None is a no-op
                model(inp).sum().backward()
                for extra in params_of(optimizer)[-2:]:
                    extra.grad = torch.full_like(extra, 0.1 * (i + 1))
            optimizer.step()
        for p, q in zip(params_of(optimizers[0]), params_of(optimizers[1])):
            assert_same(p, q, exact, **tol)
            s, t = optimizers[0].state[p], optimizers[1].state[q]
            assert s.keys() == t.keys()
            for key in s:
                assert_same(s[key], t[key], exact, **tol)


def derived_models(device, dtype, kwargs_a, kwargs_b):
    """Two identical small models, each with an SM3 of its own settings (and a 0-d and an empty parameter)."""
    inp = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype, device=device).reshape(3, 2)
    models, optimizers = [], []
    for kwargs in (kwargs_a, kwargs_b):
        model = small_model(device, dtype)
        extras = [
            Parameter(torch.full((), 0.5, device=device, dtype=dtype)),
            Parameter(torch.empty(0, device=device, dtype=dtype)),
        ]
        models.append(model)
        optimizers.append(SM3(list(model.parameters()) + extras, **copy.deepcopy(kwargs)))
    return [inp, inp], models, optimizers


def params_of(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def grads_for(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype) for p in params]


def fill_grads(params, step):
    for p, g in zip(params, grads_for(params, step)):
        p.grad = g


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
        for p, q, g in zip(strided, dense, grads_for(dense, step)):
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
        for p, q, g in zip(up, down, grads_for(up, step)):
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


# ---------------------------------------------------------------------------------------------- kernels agree


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("desc", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_foreach_matches_forloop(device, desc, dtype):
    inputs, models, optimizers = derived_models(
        device, dtype, settings(device, desc, "eager"), settings(device, desc, "foreach")
    )
    compare_between(inputs, models, optimizers)


FUSED_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("desc", CONFIGS)
@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
def test_fused_matches_forloop(device, desc, dtype):
    """Fused matches the loop; for float64, which the fused kernels may refuse, the refusal names the dtype."""
    try:
        inputs, models, optimizers = derived_models(
            device, dtype, settings(device, desc, "eager"), settings(device, desc, "fused")
        )
        compare_between(inputs, models, optimizers)
    except Exception as err:
        if dtype == torch.float64 and refused_float64(err, device):
            return
        raise


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", ["foreach", "fused"])
def test_different_dtypes_match_forloop(device, kname):
    """One group mixing parameter dtypes (and an empty tensor): each kernel steps each as the loop does."""
    dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
    if kname == "fused":
        dtypes.remove(torch.float64)  # the fused kernels may refuse it: test_fused_matches_forloop
    torch.manual_seed(0)
    base = [torch.rand(2, 3, device=device, dtype=dt) for dt in dtypes] + [torch.rand(0, 3, device=device)]
    results = []
    for kwargs in (kernel(device, "eager"), kernel(device, kname)):
        params = [Parameter(b.clone()) for b in base]
        optimizer = SM3(params, momentum=0.9, beta=0.5, **kwargs)
        for step in range(7):
            fill_grads(params, step)
            optimizer.step()
        results.append((params, optimizer))
    (ps, a), (qs, b) = results
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q)
        for key in a.state[p]:
            torch.testing.assert_close(a.state[p][key], b.state[q][key])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("default_dtype", [torch.float64, torch.float16], ids=str)
def test_set_default_dtype_works_with_foreach(device, default_dtype):
    """Another default dtype changes nothing: foreach matches the loop, the step count stays float32."""
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(default_dtype)
        inputs, models, optimizers = derived_models(
            device, torch.float64, settings(device, "momentum", "eager"), settings(device, "momentum", "foreach")
        )
        compare_between(inputs, models, optimizers)
    finally:
        torch.set_default_dtype(old)
    for optimizer in optimizers:
        for state in optimizer.state.values():
            assert state["step"].dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_mixed_device_dtype(device, impl):
    if device == "cpu" or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (parameters spread over devices)")
    params = [torch.rand(2, 3, dtype=dt, device=f"cuda:{i}") for i in (0, 1) for dt in (torch.float32, torch.bfloat16)]
    results = []
    for kwargs in (KERNELS["eager"], KERNELS[impl]):
        clones = [Parameter(p.clone()) for p in params]
        optimizer = SM3(clones, momentum=0.9, **kwargs)
        for step in range(3):
            fill_grads(clones, step)
            optimizer.step()
        results.append(clones)
    for p, q in zip(*results):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("device", DEVICES)
def test_forloop_goes_right_direction_multigpu(device):
    if device == "cpu" or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (parameters spread over devices)")
    weight = Parameter(torch.randn(10, 5, device="cuda:0"))
    bias = Parameter(torch.randn(10, device="cuda:1"))
    x = torch.randn(5, device="cuda:0")
    optimizer = SM3([weight, bias], foreach=False)

    def closure():
        optimizer.zero_grad()
        loss = (weight.mv(x).cuda(1) + bias).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(20):
        optimizer.step(closure)
    assert closure().item() < initial


LARGE = os.environ.get("SM3_LARGE_TENSOR_TESTS") == "1"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kname", ["foreach", "fused"])
def test_large_tensor(device, kname):
    """A 2**32-element parameter (int32 indexing would overflow)."""
    if device == "cpu" or not LARGE or torch.cuda.get_device_properties(0).total_memory < 72 * 2**30:
        pytest.skip("needs a 64 GB tensor: a CUDA device of 72 GB or more and SM3_LARGE_TENSOR_TESTS=1")
    param = torch.ones(2**32, device=device, dtype=torch.float16)
    param.grad = torch.zeros_like(param)
    SM3([param], **KERNELS[kname]).step()
    assert torch.all(param == 1)


def test_fused_without_a_kernel_is_refused(monkeypatch):
    """``fused=True`` where the device has no fused kernel (no compiler, no Triton) is a clear error at the
    step, which names the device type and the way out, and changes nothing."""
    monkeypatch.setattr(fused, "fused_kernel", lambda device_type: None)
    param = Parameter(torch.randn(3, 2))
    before = param.detach().clone()
    optimizer = SM3([param], fused=True)
    param.grad = torch.randn_like(param)
    with pytest.raises(RuntimeError, match=r"fused=True: no fused SM3 kernel for device type 'cpu'.*foreach=True"):
        optimizer.step()
    assert torch.equal(param, before)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_error_on_params_on_meta(device):
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1))
    optimizer = SM3(model.parameters(), **kernel(device, "fused"))
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises((RuntimeError, TypeError, ValueError), match="meta"):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.to_empty(device=device)
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    optimizer.step()  # the optimizer's own (meta) parameters have no gradients now: a no-op, not an error


# ---------------------------------------------------------------------------------------------- grad scaling


def _no_inf(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "nonfinite"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("desc", CONFIGS)
@pytest.mark.parametrize("no_grad_scale", [False, True], ids=["grad_scale", "no_grad_scale"])
def test_fused_does_not_step_if_foundinf(device, desc, no_grad_scale):
    kwargs = settings(device, desc, "fused")
    params = [torch.ones((1,), device=device) for _ in range(5)]
    reference = [p.clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer = SM3(params, **kwargs)
    assert getattr(optimizer, "_step_supports_amp_scaling", False), "the fused step takes grad_scale/found_inf"
    optimizer.grad_scale = None if no_grad_scale else torch.ones((1,), device=device)
    optimizer.found_inf = torch.ones((), device=device)
    optimizer.step()
    for p in params:
        if "step" in optimizer.state[p]:
            assert optimizer.state[p]["step"].item() == 0
    for p, r in zip(params, reference):
        assert torch.equal(p, r)
    # with state: a found_inf step leaves parameters and every state tensor bitwise alone
    optimizer.found_inf = torch.zeros((), device=device)
    optimizer.step()
    saved = [p.clone() for p in params], copy.deepcopy(optimizer.state_dict()["state"])
    optimizer.found_inf = torch.ones((), device=device)
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    optimizer.step()
    for p, s in zip(params, saved[0]):
        assert torch.equal(p, s)
    for k, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, saved[1][k][key]), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("desc", CONFIGS)
def test_grad_scaler_fused_matches_unscale_then_step(device, desc):
    """``torch.amp.GradScaler`` hands the fused step ``grad_scale``/``found_inf``; the result equals the
    loop's (which GradScaler unscales first), an overflowing step changes nothing, and the scale follows."""
    kwargs = _no_inf(settings(device, desc, "eager"))
    torch.manual_seed(0)
    weight0, bias0, x = linear_problem(device)
    runs = []
    for kname in ("fused", "eager"):
        weight, bias = Parameter(weight0.detach().clone()), Parameter(bias0.detach().clone())
        optimizer = SM3([weight, bias], **{**copy.deepcopy(kwargs), **kernel(device, kname)})
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
        history = []
        for step in range(6):
            optimizer.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            scaler.scale(loss).backward()
            if step == 3:
                weight.grad[0, 0] = float("inf")
            scaler.step(optimizer)
            scaler.update()
            history.append((weight.detach().clone(), bias.detach().clone(), scaler.get_scale()))
        runs.append((optimizer, history))
    fused, loop = runs
    assert getattr(fused[0], "_step_supports_amp_scaling", False)
    for (w1, b1, s1), (w2, b2, s2) in zip(fused[1], loop[1]):
        torch.testing.assert_close(w1, w2)
        torch.testing.assert_close(b1, b2)
        assert s1 == s2
    assert torch.equal(fused[1][3][0], fused[1][2][0])  # the overflowing step changed nothing


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
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2)).to(device)
    x = torch.rand(1, 4, 16, 16, device=device)
    optimizer = SM3(model.parameters(), **kwargs)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
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
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2)).to(device)
        x = torch.rand(1, 4, 16, 16, device=device)
        optimizer = SM3(model.named_parameters() if named0 else model.parameters(), **copy.deepcopy(kwargs))
        for _ in range(3):
            optimizer.zero_grad()
            model(x).sum().backward()
            optimizer.step()
        saved = copy.deepcopy(optimizer.state_dict())
        optimizer2 = SM3(model.named_parameters() if named1 else model.parameters(), **copy.deepcopy(kwargs))
        optimizer2.load_state_dict(saved)
        optimizer2.zero_grad()
        model(x).sum().backward()
        optimizer2.step()
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


# ---------------------------------------------------------------------------------------------- CUDA only


@pytest.mark.parametrize("desc", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@NEEDS_CUDA
def test_fused_cpu_matches_cuda(desc, dtype):
    inputs, models, optimizers = [], [], []
    for device in ("cpu", "cuda"):
        try:
            i, m, o = derived_models(device, dtype, settings(device, desc, "fused"), settings(device, desc, "fused"))
            m[0](i[0]).sum().backward()
            o[0].step()
            o[0].zero_grad()
        except Exception as err:
            if dtype == torch.float64 and refused_float64(err, device):
                return
            raise
        m, o = derived_models(device, dtype, settings(device, desc, "fused"), settings(device, desc, "fused"))[1:]
        inputs.append(i[0])
        models.append(m[0])
        optimizers.append(o[0])
    for _ in range(5):
        for inp, model, optimizer in zip(inputs, models, optimizers):
            optimizer.zero_grad()
            model(inp).sum().backward()
            optimizer.step()
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(p, q.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("desc", CONFIGS)
def test_default_kernel(device, desc):
    """With neither flag set, as torch.optim chooses: the device's fused kernel where one is available, else
    foreach on an accelerator, else the per-tensor loop; the default step is that kernel's step, bit for bit."""
    kwargs = config(device, desc)
    torch.manual_seed(0)
    params = [Parameter(torch.randn(4, 3, device=device)), Parameter(torch.randn(5, device=device))]
    if functional.fused_kernel(torch.device(device).type) is not None:
        expected = "fused"
    else:
        expected = "single" if device == "cpu" else "foreach"
    assert functional.default_kernel(params) == expected
    explicit = {"fused": KERNELS["fused"], "foreach": KERNELS["foreach"], "single": KERNELS["eager"]}[expected]
    twins = [Parameter(p.detach().clone()) for p in params]
    a, b = SM3(params, **copy.deepcopy(kwargs)), SM3(twins, **copy.deepcopy(kwargs), **explicit)
    for step in range(3):
        fill_grads(params, step)
        fill_grads(twins, step)
        a.step()
        b.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)


@pytest.mark.parametrize("desc", CONFIGS)
@NEEDS_CUDA
def test_peak_memory_foreach(desc):
    """The foreach step's transient memory stays within a few copies of the parameters."""
    peaks = []
    for foreach in (False, True):
        params = [torch.rand(16, 8, device="cuda") for _ in range(10)]
        optimizer = SM3(params, **{**config("cuda", desc), "foreach": foreach})
        for p in params:
            p.grad = torch.rand_like(p)
        optimizer.step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        optimizer.step()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    intermediate = 10 * 16 * 8 * 4
    assert peaks[1] <= peaks[0] + 4 * intermediate, (peaks, intermediate)


def test_sharded_copy_across_ranks():
    """At two ranks, a copy of a ShardedSM3 over the default group rebuilds its shard on the same rank and
    steps as the original (parameters and consolidated state); over another group it refuses clearly."""
    from tests.common import run_distributed
    from tests.optim_copy_worker import sharded_copy_worker

    for rank, result in enumerate(run_distributed(sharded_copy_worker, 2)):
        for how in ("deepcopy", "pickle"):
            same, world, copied_rank, sm3_settings = result[how]
            assert same and (world, copied_rank) == (2, rank), (how, result[how])
            assert sm3_settings == (torch.float32, True, "raise")
        assert "cannot be copied or pickled" in result["subgroup"] and "state_dict()" in result["subgroup"]


# ---------------------------------------------------------------------------------------------- not applicable


def test_second_order_optims_return_consistent_types():
    pytest.skip("for optimizers whose step requires a closure (LBFGS); SM3 is first-order and takes one optionally")


def test_differentiable():
    pytest.skip("SM3 offers no differentiable=True: its step runs under torch.no_grad, as torch's fused kernels do")
