"""The torch.optim contract (see ``test_optim_contract.py``): the kernels agree, grad scaling, CUDA-only properties.

foreach and fused against the per-tensor loop over every configuration and dtype, the fused kernel's
found_inf/grad_scale protocol (``torch.amp.GradScaler``), the default kernel, and the properties that
need a CUDA device.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.nn import Parameter

from sm3_dist import SM3, functional
from sm3_dist.kernels import registry
from tests.common import DEVICES, KERNELS, NEEDS_CUDA, fill_grads
from tests.optim_contract import (  # noqa: F401  (one_thread: an autouse fixture)
    CONFIGS,
    CUDA,
    compare_between,
    config,
    derived_models,
    kernel,
    linear_problem,
    one_thread,
    refused_float64,
    settings,
)

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
    monkeypatch.setattr(registry, "fused_kernel", lambda device_type: None)
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
