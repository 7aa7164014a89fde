"""The torch.optim contract's shared settings and helpers (see ``tests/test_optim_contract.py``).

SM3's configurations come from ``tests/optim_info.py`` (its ``OptimizerInfo``); the helpers here pick
one with a kernel and device, build the small problems and models the generic tests step, and compare
two runs. ``one_thread`` is an autouse fixture each contract module imports.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR

from sm3_dist import SM3, ShardedSM3, functional
from tests.common import KERNELS, native_library
from tests.optim_info import sm3_optim_inputs

CUDA = torch.cuda.is_available()
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
    """The constructor flags of kernel ``name``. A fused row is skipped only where its kernel cannot exist: on CPU
    where there is no C++ compiler (:func:`tests.common.native_library`; a native library that fails to build fails
    the row), on CUDA where Triton is missing."""
    device_type = torch.device(device).type
    if name == "fused" and functional.fused_kernel(device_type) is None:
        if device_type == "cpu":
            native_library()  # skips without a compiler; fails if the library does not build or load
            pytest.fail("the native CPU library loads, yet no fused CPU kernel is registered")
        pytest.skip(
            f"no fused {device} kernel here (the CUDA one needs Triton); "
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
