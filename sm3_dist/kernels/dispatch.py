"""One SM3 step, routed to its kernel: :func:`sm3` (and :func:`finalize_`, :func:`first_nonfinite`,
:func:`nonfinite_`) take the same arguments whichever kernel runs them.

**One kernel interface.** Every kernel takes the same arguments: the blocks
(``params``, ``grads``, ``momentum_buffers``, ``accumulators``), the
:class:`~sm3_dist.kernels.rule.UpdateRule`, and the keywords of
:data:`~sm3_dist.kernels.math.STEP_KEYWORDS` (``lr``, ``nu_divisor``, ``maxima_out``, ``keep_max``,
``found_inf``, ``grad_scale``). There are three kinds: the per-tensor loop and the ``foreach`` kernel of
:mod:`sm3_dist.kernels.math` (the readable reference), and a *fused* kernel per device type, looked up in
:mod:`sm3_dist.kernels.registry` (CPU: the one-pass C++ kernel of :mod:`sm3_dist.kernels.cpu`; CUDA: the
Triton kernel of :mod:`sm3_dist.kernels.cuda` where Triton imports), as ``torch.optim`` keeps its fused
kernels. :func:`~sm3_dist.kernels.registry.default_kernel` is the one place that picks a kernel when the
caller does not. Every fused kernel is bitwise equal to the per-tensor loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sm3_dist.kernels import registry
from sm3_dist.kernels.math import (
    as_scalar,
    first_nonfinite_eager,
    foreach_sm3,
    nonfinite_eager_,
    single_block,
    single_tensor_sm3,
    store_maxima,
)
from sm3_dist.kernels.rule import UpdateRule

__all__ = ["HOST_READ_DEVICES", "finalize_", "first_nonfinite", "nonfinite_", "sm3"]

HOST_READ_DEVICES = {"cpu"}
"""Device types whose flags a step reads on the host (free there). Elsewhere a ``found_inf`` stays on the
device and the kernels read it; tests empty this set to run that path on CPU."""


def _fused_sm3(params, grads, momentum_buffers, accumulators, *, rule, lr, nu_divisor, grad_scale, found_inf):
    """One-off step of the device's fused kernel: a plan built for these blocks, zeroed maxima buffers, one step.

    Blocks the kernel cannot take as they are (a non-contiguous tensor) go
    through contiguous working copies that are written back; blocks of a dtype
    the kernel lacks but the per-tensor kernel has (see :class:`FusedKernel`)
    run per tensor.
    """
    kernel = registry.require_fused_kernel(params)
    results: list[tuple[Tensor, ...] | None] = [None] * len(params)
    taken, copies = [], []
    for i, (p, g, m) in enumerate(zip(params, grads, momentum_buffers)):
        if p.numel() == 0:
            results[i] = tuple(
                torch.zeros(n, dtype=a.dtype, device=a.device) for n, a in zip(p.shape or (1,), accumulators[i])
            )
        elif kernel.takes(p, g, m):
            taken.append(i)
        else:
            results[i] = single_block(p, g, m, accumulators[i], rule, lr, nu_divisor, grad_scale)
    if not taken:
        return results
    ps, gs, ms, accs = [], [], [], []
    for i in taken:
        p, g, m = params[i], grads[i], momentum_buffers[i]
        pc, mc = _contiguous(p), None if m is None else _contiguous(m)
        if pc is not p or (m is not None and mc is not m):
            copies.append((p, pc, m, mc))
        ps.append(pc)
        gs.append(_contiguous(g))
        ms.append(mc)
        accs.append([_contiguous(a) for a in accumulators[i]])
    outs = [[torch.zeros(a.numel(), dtype=torch.float32, device=a.device) for a in block] for block in accs]
    plan = kernel.build(ps, ms, accs, outs)
    if plan is None:
        raise RuntimeError(f"the fused SM3 kernel for {kernel.device_type} refused blocks it reported it takes")
    plan.step(gs, rule, lr=lr, nu_divisor=nu_divisor, found_inf=found_inf, grad_scale=grad_scale)
    for p, pc, m, mc in copies:
        if pc is not p:
            p.copy_(pc)
        if m is not None and mc is not m:
            m.copy_(mc)
    for i, block in zip(taken, outs):
        results[i] = tuple(block)
    return results


def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


# ---------------------------------------------------------------------------------------------- the common entry


def sm3(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    accumulators: Sequence[Sequence[Tensor]],
    *,
    rule: UpdateRule,
    lr: float | Tensor,
    nu_divisor: float | Tensor | None = None,
    maxima_out: Sequence[Sequence[Tensor]] | None = None,
    keep_max: bool = False,
    found_inf: Tensor | None = None,
    grad_scale: Tensor | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> list[tuple[Tensor, ...]] | None:
    """One SM3 step on a list of dense blocks; returns each block's maxima per dimension.

    ``params[i]``, ``grads[i]`` and ``momentum_buffers[i]`` (``None`` when
    momentum is 0) are views of one dense block, all of the same shape (any
    strides); ``accumulators[i][d]`` is the 1-D slice of ``mu_d`` that the
    block's indices along ``d`` cover (fp32, fp64 for fp64 parameters; read
    only). The parameter and momentum are updated in place (computed in fp32,
    or fp64 for fp64 parameters, written back in their own dtypes); the returned
    ``maxima[i][d]`` are the new values of that slice of ``mu_d`` as far as this
    block can see them.

    ``lr`` is a number or a one-element tensor (any shape), ``nu_divisor`` the
    bias-correction divisor (:meth:`UpdateRule.nu_divisor`; ``None``: none),
    ``grad_scale`` a one-element tensor the raw gradients are divided by (a
    ``GradScaler``'s scale), ``found_inf`` a one-element tensor: where it is
    nonzero the parameters and momentum stay bitwise unchanged and the maxima
    are the accumulators as they were (nothing is accumulated under
    ``keep_max``). Off CPU it is read on the device, without a host
    synchronization.

    With ``maxima_out`` the maxima are written into ``maxima_out[i][d]`` instead
    and ``None`` is returned: assigned, or under ``keep_max`` the elementwise max
    of the old values and the new maxima (so zeroed outputs shared by several
    blocks collect their maxima). ``maxima_out[i]`` may be ``accumulators[i]``
    itself: every accumulator is read before any maximum is written.

    ``foreach``/``fused`` choose the kernel as in :func:`default_kernel`.
    """
    for i, (p, g, accs) in enumerate(zip(params, grads, accumulators)):
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has shape {tuple(p.shape)}")
        if len(accs) != max(g.ndim, 1) or any(a.numel() != n for a, n in zip(accs, g.shape or (1,))):
            raise ValueError(
                f"accumulators[{i}] have lengths {[a.numel() for a in accs]}, expected {list(g.shape or (1,))}"
            )
    if maxima_out is not None and len(maxima_out) != len(params):
        raise ValueError(f"maxima_out has {len(maxima_out)} entries for {len(params)} blocks")
    kind = registry.default_kernel(params, foreach=foreach, fused=fused)
    lr, nu_divisor, grad_scale, found_inf = (
        as_scalar(lr),
        as_scalar(nu_divisor),
        as_scalar(grad_scale),
        as_scalar(found_inf),
    )
    gate = None
    if found_inf is not None:
        if found_inf.device.type in HOST_READ_DEVICES:  # reading it costs nothing here
            if bool(found_inf):
                if maxima_out is None:
                    return [tuple(a.clone() for a in accs) for accs in accumulators]
                if not keep_max:
                    store_maxima(
                        [o for outs in maxima_out for o in outs], [a.clone() for accs in accumulators for a in accs]
                    )
                return None
            found_inf = None
        elif kind != "fused":
            gate, found_inf = found_inf, None
    args = dict(rule=rule, lr=lr, nu_divisor=nu_divisor, grad_scale=grad_scale)
    if gate is not None:
        maxima = _gated(kind, params, grads, momentum_buffers, accumulators, gate, args)
    elif kind == "fused":
        maxima = _fused_sm3(params, grads, momentum_buffers, accumulators, found_inf=found_inf, **args)
    elif kind == "foreach":
        maxima = foreach_sm3(params, grads, momentum_buffers, accumulators, **args)
    else:
        maxima = single_tensor_sm3(params, grads, momentum_buffers, accumulators, **args)
    flag = found_inf if found_inf is not None else gate
    if flag is not None:  # skipped on the device: the maxima are the accumulators as they were, nothing collected
        skip = flag != 0
        if maxima_out is None:
            return [
                tuple(torch.where(skip, a, new) for a, new in zip(accs, block))
                for accs, block in zip(accumulators, maxima)
            ]
        for outs, accs, block in zip(maxima_out, accumulators, maxima):
            for o, a, new in zip(outs, accs, block):
                o.copy_(torch.where(skip, o, torch.maximum(o, new)) if keep_max else torch.where(skip, a, new))
        return None
    if maxima_out is None:
        return maxima
    outs = [o for block in maxima_out for o in block]
    store_maxima(outs, [m for block in maxima for m in block], keep_max)
    return None


def _gated(kind, params, grads, momentum_buffers, accumulators, found_inf, args):
    """A non-fused kernel on an accelerator with a device-side ``found_inf``: it runs on working copies, which
    replace the originals only where the flag is clear (no host synchronization, one extra pass)."""
    work_p = [p.clone() for p in params]
    work_m = [None if m is None else m.clone() for m in momentum_buffers]
    kernel = foreach_sm3 if kind == "foreach" else single_tensor_sm3
    maxima = kernel(work_p, grads, work_m, accumulators, **args)
    skip = found_inf != 0
    for p, w, m, wm in zip(params, work_p, momentum_buffers, work_m):
        p.copy_(torch.where(skip, p, w))
        if m is not None:
            m.copy_(torch.where(skip, m, wm))
    return maxima


def finalize_(
    accumulators: Sequence[Tensor],
    maxima: Sequence[Tensor],
    *,
    keep_max: bool,
    found_inf: Tensor | None = None,
    zero_maxima: bool = True,
) -> None:
    """``accumulators <- maxima`` (their max under ``keep_max``) unless ``found_inf`` is set; then the maxima are
    zeroed for the next step. The device's fused kernel does it in one launch where it has a ``finalize``."""
    if not accumulators:
        return
    kernel = registry.fused_kernel(accumulators[0].device.type)
    if (
        kernel is not None
        and kernel.finalize is not None
        and all(t.dtype == torch.float32 and t.is_contiguous() for t in (*accumulators, *maxima))
    ):  # the fused finalize takes contiguous fp32 state; float64 state (per-tensor and foreach kernels) does not
        kernel.finalize(accumulators, maxima, keep_max=keep_max, found_inf=found_inf, zero_maxima=zero_maxima)
        return
    if found_inf is not None and found_inf.device.type in HOST_READ_DEVICES:
        if not bool(found_inf):
            store_maxima(list(accumulators), list(maxima), keep_max)
    elif found_inf is not None:
        skip = as_scalar(found_inf) != 0
        for acc, new in zip(accumulators, maxima):
            acc.copy_(torch.where(skip, acc, torch.maximum(acc, new) if keep_max else new))
    else:
        store_maxima(list(accumulators), list(maxima), keep_max)
    if zero_maxima:
        torch._foreach_zero_(list(maxima))


# ---------------------------------------------------------------------------------------------- inf and NaN


def _scan_kernel(tensors: Sequence[Tensor]):
    """The fused kernel whose scan reads all of ``tensors`` (one device type, contiguous fp32/bf16/fp16)."""
    if len({t.device.type for t in tensors}) != 1:
        return None
    kernel = registry.fused_kernel(tensors[0].device.type)
    if kernel is None or not all(t.dtype in registry.SCAN_DTYPES and t.is_contiguous() for t in tensors):
        return None
    return kernel


def first_nonfinite(tensors: Sequence[Tensor]) -> int | None:
    """Index of the first tensor holding an inf or NaN, ``None`` if all are finite (reads them on the host).

    Through the device's fused scan where it has a host-read one (CPU: one parallel pass of the native kernel,
    reads only); elsewhere the largest absolute values, batched with ``torch._foreach_norm``.
    """
    if not tensors:
        return None
    kernel = _scan_kernel(tensors)
    if kernel is not None and kernel.first_nonfinite is not None:
        return kernel.first_nonfinite(tensors)
    return first_nonfinite_eager(tensors)


def nonfinite_(tensors: Sequence[Tensor], found_inf: Tensor) -> None:
    """Set ``found_inf`` (a one-element tensor, left as it is otherwise) where any tensor holds an inf or NaN.

    On the device, without a host synchronization: the device's fused kernel's
    check in one launch where it has one, else a batched ``_foreach_norm``.
    """
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return
    kernel = _scan_kernel(tensors)
    if kernel is not None and kernel.nonfinite is not None:
        kernel.nonfinite(tensors, found_inf)
        return
    nonfinite_eager_(tensors, found_inf)
