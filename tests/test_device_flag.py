"""The non-finite decision as a device flag, and torch.amp.GradScaler's grad_scale / found_inf protocol.

On an accelerator a step never reads a device value on the host for
``nonfinite="skip"``/``"ignore"``: the check sets a ``found_inf`` tensor the
kernels read, the step counts add ``1 - found_inf``, the accumulators are
finalized under it, and ``skipped_steps`` reads a device counter only when
asked. Here that path runs on CPU (``kernels.dispatch.HOST_READ_DEVICES`` emptied) and
is held bitwise to the host path, on every kernel. GradScaler hands its scale
and flag to the optimizer (``_step_supports_amp_scaling``): the kernels unscale,
so a scaled run equals an unscaled one bitwise (power-of-two scales).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sm3_dist import SM3, functional
from sm3_dist.kernels import dispatch, registry
from tests.common import KERNELS, seeded_grads

SHAPES = [(6, 5), (4,), (3, 2, 4), ()]
HYPER = dict(lr=0.05, momentum=0.9, beta=0.9, bias_correction=True)


@pytest.fixture
def device_path(monkeypatch):
    monkeypatch.setattr(dispatch, "HOST_READ_DEVICES", set())


def _grads(step, bad=False):
    grads = seeded_grads(SHAPES, step, seed=300)
    if bad:
        grads[0][2, 3] = math.nan
        grads[2][1, 1, 1] = math.inf
    return grads


def _train(kernel, steps=5, bad_at=(2,), **kw):
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    opt = SM3(params, **HYPER, **KERNELS[kernel], **kw)
    snapshots = []
    for step in range(steps):
        for p, g in zip(params, _grads(step, bad=step in bad_at)):
            p.grad = g
        before = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])
        opt.step()
        snapshots.append(before)
    return params, opt, snapshots


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_device_flag_skips_like_the_host_check(device_path, kernel, monkeypatch):
    params, opt, snaps = _train(kernel)
    assert opt._skipped_device is not None  # counted on the device, not yet read
    assert opt.skipped_steps == 1 and opt._skipped_device is None
    # the skipped step (2) changed nothing: what step 3 started from is what step 2 started from
    for a, b in zip(snaps[2][0], snaps[3][0]):
        assert torch.equal(a, b)
    for k, entry in snaps[2][1].items():
        for key, value in entry.items():
            assert torch.equal(snaps[3][1][k][key], value), key
    assert opt.state[params[0]]["step"].item() == 4.0
    monkeypatch.setattr(dispatch, "HOST_READ_DEVICES", {"cpu"})
    host_params, host_opt, _ = _train(kernel)
    assert host_opt.skipped_steps == 1
    for p, q in zip(params, host_params):
        assert torch.equal(p, q)
        for key, value in host_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    assert opt.state_dict()["param_groups"][0]["skipped_steps"] == 1


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_ignore_reads_nothing_and_lets_nan_through(device_path, kernel):
    params, opt, _ = _train(kernel, steps=3, nonfinite="ignore")
    assert opt.__dict__.get("_skipped_device") is None and opt.skipped_steps == 0
    assert params[0].isnan().any()


def test_raise_still_names_the_parameter_on_the_device_path(device_path):
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[0\] \(shape \(6, 5\)\)"):
        _train("fused", nonfinite="raise")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_grad_scaler_hands_the_scale_to_the_kernels(kernel):
    """A GradScaler run equals the unscaled run bitwise: the kernels divide by the (power-of-two) scale."""
    plain_model, scaled_model = _model(), _model()
    plain = SM3(plain_model.parameters(), **HYPER, **KERNELS[kernel])
    scaled = SM3(scaled_model.parameters(), **HYPER, **KERNELS[kernel])
    assert scaled._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    unscale_calls = []
    original = scaler.unscale_
    scaler.unscale_ = lambda opt: unscale_calls.append(opt) or original(opt)
    for step in range(5):
        x, y = _batch(step)
        plain.zero_grad()
        torch.nn.functional.mse_loss(plain_model(x), y).backward()
        plain.step()
        scaled.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(scaled_model(x), y)).backward()
        grads = [p.grad.clone() for p in scaled_model.parameters()]
        scaler.step(scaled)
        scaler.update()
        for p, g in zip(scaled_model.parameters(), grads):
            assert torch.equal(p.grad, g)  # the gradients were read, not unscaled in place
    assert not unscale_calls and scaler.get_scale() == 2.0**12  # grown twice, never skipped
    for p, q in zip(plain_model.parameters(), scaled_model.parameters()):
        assert torch.equal(p, q)
        for key, value in plain.state[p].items():
            assert torch.equal(scaled.state[q][key], value), key
    assert not hasattr(scaled, "grad_scale") and not hasattr(scaled, "found_inf")


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_found_inf_from_the_scaler_skips_the_step_bitwise(kernel):
    model = _model()
    opt = SM3(model.parameters(), **HYPER, **KERNELS[kernel], nonfinite="raise")
    x, y = _batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
    for p in model.parameters():
        p.grad = torch.full_like(p, math.inf)  # what an overflowing scaled backward leaves
    opt.step()  # the scaler's flag is no error, even under nonfinite="raise"
    for p, b in zip(model.parameters(), before[0]):
        assert torch.equal(p, b)
    for k, entry in before[1].items():
        for key, value in entry.items():
            assert torch.equal(opt.state_dict()["state"][k][key], value), key
    assert opt.skipped_steps == 1


class HostReadError(AssertionError):
    pass


@pytest.fixture
def no_host_reads(monkeypatch):
    """While armed, reading a tensor's value on the host (what synchronizes with an accelerator) raises: the
    CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``."""
    armed = []

    def guard(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if armed:
                raise HostReadError(f"Tensor.{name} inside step()")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"):
        guard(name)
    return armed


@pytest.mark.parametrize("nonfinite", ["skip", "ignore"])
@pytest.mark.parametrize("kernel", ["eager", "foreach"])
def test_device_path_reads_nothing_on_the_host(device_path, no_host_reads, kernel, nonfinite):
    """After the plan is built, a step reads no tensor value on the host: the flag, the step counts, the
    bias-correction divisor, a GradScaler's scale and flag stay tensors. (The CPU-only native kernel reads its
    flag on the host, which is free there: it is not part of this check.)"""
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    opt = SM3(params, **HYPER, **KERNELS[kernel], nonfinite=nonfinite, capturable=True)
    for step in range(4):
        for p, g in zip(params, _grads(step, bad=step == 2)):
            p.grad = g
        if step == 3:
            opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)
        if step >= 1:
            no_host_reads.append(True)
        opt.step()
        no_host_reads.clear()
    assert all(isinstance(opt.state[p]["step"], torch.Tensor) for p in params)
    assert opt.state[params[0]]["step"].item() == (3.0 if nonfinite == "skip" else 4.0)
    assert opt.skipped_steps == (1 if nonfinite == "skip" else 0)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_capturable_and_an_lr_tensor_of_any_shape_step_alike(kernel):
    """``capturable=True`` and ``lr`` as a (1, 1) tensor change where values live, not a bit of the result."""
    plain, plain_opt, _ = _train(kernel, bad_at=())
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    hyper = {**HYPER, "lr": torch.tensor([[HYPER["lr"]]])}
    opt = SM3(params, **hyper, **KERNELS[kernel], capturable=True)
    for step in range(5):
        for p, g in zip(params, _grads(step)):
            p.grad = g
        opt.step()
    for p, q in zip(plain, params):
        assert torch.equal(p, q)
        for key, value in plain_opt.state[p].items():
            assert torch.equal(opt.state[q][key], value), key


def _strict_kernel() -> functional.FusedKernel:
    """A fused kernel whose scan and finalize take only contiguous fp32/bf16/fp16 tensors, as the Triton ones do."""

    def nonfinite(tensors, found_inf):
        if not all(t.is_contiguous() for t in tensors):
            raise ValueError("the fused scan takes contiguous tensors")
        bad = any(not bool(torch.isfinite(t).all()) for t in tensors)
        found_inf.fill_(max(float(found_inf), float(bad)))

    def finalize(accumulators, maxima, **kwargs):
        if not all(t.dtype == torch.float32 and t.is_contiguous() for t in (*accumulators, *maxima)):
            raise ValueError("the fused finalize takes contiguous fp32 tensors")
        functional.store_maxima(list(accumulators), list(maxima), kwargs["keep_max"])

    return functional.FusedKernel(
        device_type="cpu",
        available=lambda: True,
        build=lambda *a: None,
        param_dtypes=frozenset(),
        nonfinite=nonfinite,
        finalize=finalize,
    )


def test_scan_and_finalize_leave_what_the_fused_kernel_cannot_take_to_torch(monkeypatch):
    """Non-contiguous gradients and float64 state go through the torch path, not the device's fused scan/finalize."""
    kernel = _strict_kernel()
    monkeypatch.setattr(registry, "fused_kernel", lambda device_type: kernel)
    found = torch.zeros(1)
    grad = torch.ones(4, 3).t()
    grad[1, 2] = float("nan")
    functional.nonfinite_([grad], found)  # non-contiguous: torch's batched norm, no error
    assert found.item() == 1.0
    accs, maxima = [torch.zeros(3, dtype=torch.float64)], [torch.full((3,), 2.0, dtype=torch.float64)]
    functional.finalize_(accs, maxima, keep_max=False)  # float64: the torch path
    assert torch.equal(accs[0], torch.full((3,), 2.0, dtype=torch.float64))
    assert torch.equal(maxima[0], torch.zeros(3, dtype=torch.float64))
