"""The fused SM3 kernels, one per device type, behind one registry; and the one place a step's kernel is chosen.

A device type's fused kernel is one :class:`FusedKernel` entry (:func:`register_fused_kernel`), as
``torch.optim`` keeps its fused kernels: CPU, the one-pass C++ kernel of :mod:`sm3_dist.kernels.cpu`
(:class:`~sm3_dist.kernels.cpu.native_step.NativePlan`); CUDA, the Triton kernel of
:mod:`sm3_dist.kernels.cuda` where Triton imports. Entries are loaded at first use, so importing this module
builds and imports nothing; no kernel imports this module. :func:`default_kernel` picks among ``"single"`` (the
per-tensor loop), ``"foreach"`` and ``"fused"`` when the caller does not.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MOMENTUM_DTYPES",
    "SCAN_DTYPES",
    "FusedKernel",
    "default_kernel",
    "fused_kernel",
    "register_fused_kernel",
    "require_fused_kernel",
]

logger = logging.getLogger(__name__)

MOMENTUM_DTYPES = frozenset({None, torch.float32, torch.bfloat16})
"""Momentum dtypes every fused kernel takes (``None``: no momentum)."""
SCAN_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
"""The dtypes every fused non-finite scan reads (contiguous tensors only)."""


@dataclass(frozen=True, slots=True)
class FusedKernel:
    """A device type's fused kernel: a plan built once for a fixed list of blocks, stepped many times.

    ``build(params, momentum_buffers, accumulators, maxima_out)`` returns a plan
    (``None`` when it cannot take the blocks) whose ``holds(...)`` says whether
    it was built for exactly these tensors and whose ``step(grads, rule, *, lr,
    nu_divisor=None, found_inf=None, grad_scale=None)`` runs one step,
    accumulating the maxima into ``maxima_out`` by max (the caller zeroes them)
    and writing nothing where ``found_inf`` is set.
    """

    device_type: str
    available: Callable[[], bool]
    build: Callable[..., Any]
    param_dtypes: frozenset[torch.dtype]
    """Parameter dtypes the kernel takes (gradients of the same dtype; fp32/bf16 momentum)."""
    fallback_dtypes: frozenset[torch.dtype] = frozenset()
    """Parameter dtypes the kernel leaves to the per-tensor kernel inside a fused step."""
    nonfinite: Callable[[Sequence[Tensor], Tensor], None] | None = None
    """``nonfinite(tensors, found_inf)``: set ``found_inf`` where any tensor holds an inf/NaN, on the device."""
    finalize: Callable[..., None] | None = None
    """``finalize(accumulators, maxima, *, keep_max, found_inf, zero_maxima)`` in one launch."""
    finalize_plan: Callable[..., Any] | None = None
    """``finalize_plan(accumulators, maxima)``: :attr:`finalize` prepared once for fixed lists (``.run(...)``)."""
    first_nonfinite: Callable[[Sequence[Tensor]], int | None] | None = None
    """``first_nonfinite(tensors)``: the index of the first tensor holding an inf/NaN (``None``: all finite), read on
    the host (a kernel whose device reads flags on the host for free)."""
    nonfinite_plan: Callable[..., Any] | None = None
    """``nonfinite_plan(tensors)``: :attr:`nonfinite` prepared once (``.run(found_inf, tensors)`` re-points it to
    tensors of the same sizes and dtypes, and raises ``ValueError`` for others)."""

    def takes(self, p: Tensor, g: Tensor, m: Tensor | None) -> bool:
        return p.dtype in self.param_dtypes and g.dtype == p.dtype and (m is None or m.dtype in MOMENTUM_DTYPES)

    def check(self, params: Sequence[Tensor]) -> None:
        """Raise a clear error for a parameter the fused step cannot take at all."""
        for p in params:
            if p.dtype not in self.param_dtypes and p.dtype not in self.fallback_dtypes:
                names = ", ".join(str(d).removeprefix("torch.") for d in sorted(self.param_dtypes, key=str))
                raise TypeError(
                    f"the fused SM3 kernel for {self.device_type} takes {names} parameters, not {p.dtype}: "
                    "use foreach=True (or the default kernel choice) for them"
                )


_FUSED: dict[str, Callable[[], FusedKernel | None]] = {}
_FUSED_CACHE: dict[str, FusedKernel | None] = {}


def register_fused_kernel(device_type: str, loader: Callable[[], FusedKernel | None]) -> None:
    """Register the fused kernel of a device type; ``loader`` returns it, or ``None`` where it is unavailable."""
    _FUSED[device_type] = loader
    _FUSED_CACHE.pop(device_type, None)


def fused_kernel(device_type: str) -> FusedKernel | None:
    """The fused kernel registered for ``device_type``, or ``None`` (none registered, or it cannot load here)."""
    if device_type not in _FUSED_CACHE:
        loader = _FUSED.get(device_type)
        kernel = loader() if loader is not None else None
        _FUSED_CACHE[device_type] = kernel if kernel is not None and kernel.available() else None
    return _FUSED_CACHE[device_type]


def require_fused_kernel(params: Sequence[Tensor]) -> FusedKernel:
    """The fused kernel of the one device type ``params`` are on; a clear error when there is none or it cannot
    take one of them."""
    types = {p.device.type for p in params}
    if len(types) != 1:
        raise ValueError(f"a fused SM3 step needs all blocks on one device type, got {sorted(types)}")
    (device_type,) = types
    kernel = fused_kernel(device_type)
    if kernel is None:
        why = "none is registered" if device_type not in _FUSED else "it is unavailable here (see the logged reason)"
        raise RuntimeError(
            f"fused=True: no fused SM3 kernel for device type {device_type!r}: {why}. Use foreach=True, or leave "
            "foreach and fused unset for the default kernel"
        )
    kernel.check(params)
    return kernel


_FOREACH_DEVICES = ("cuda", "xpu", "mps")


def default_kernel(params: Sequence[Tensor], *, foreach: bool | None = None, fused: bool | None = None) -> str:
    """The kernel a step runs: ``"fused"``, ``"foreach"`` or ``"single"`` (the per-tensor loop).

    The only place the choice is made. Explicit ``fused=True`` or
    ``foreach=True`` wins (``fused=True`` on a device type without a fused
    kernel is an error when the step runs). With neither set: the device's
    fused kernel where one is registered and available and takes every
    parameter's dtype, else ``foreach`` on accelerators and the per-tensor loop
    on CPU, as ``torch.optim`` chooses.
    """
    if foreach and fused:
        raise ValueError("foreach and fused cannot both be True: choose one kernel")
    if fused:
        return "fused"
    if foreach:
        return "foreach"
    if foreach is None and fused is None and params:
        types = {p.device.type for p in params}
        if len(types) == 1:
            (device_type,) = types
            kernel = fused_kernel(device_type)
            if kernel is not None and all(p.dtype in kernel.param_dtypes for p in params):
                return "fused"
            if device_type in _FOREACH_DEVICES:
                return "foreach"
    return "single"


def _native_loader() -> FusedKernel:
    from sm3_dist.kernels.cpu.native_step import PARAM_DTYPES, NativePlan, native_available
    from sm3_dist.kernels.cpu.scan import first_nonfinite, nonfinite_on_host_

    return FusedKernel(
        device_type="cpu",
        available=native_available,
        build=NativePlan.build,
        param_dtypes=frozenset(PARAM_DTYPES),
        fallback_dtypes=frozenset({torch.float16}),
        nonfinite=nonfinite_on_host_,
        first_nonfinite=first_nonfinite,
    )


def _triton_loader() -> FusedKernel | None:
    try:
        triton_kernel = importlib.import_module("sm3_dist.kernels.cuda")
    except ImportError as exc:  # no Triton (or no module): the CUDA default falls back to foreach
        logger.info("sm3_dist: the Triton SM3 kernel is unavailable: %s", exc)
        return None
    return FusedKernel(
        device_type="cuda",
        available=triton_kernel.available,
        build=triton_kernel.TritonPlan.build,
        param_dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
        nonfinite=triton_kernel.nonfinite_,
        finalize=triton_kernel.finalize_,
        finalize_plan=triton_kernel.FinalizePlan,
        nonfinite_plan=triton_kernel.NonfinitePlan,
    )


register_fused_kernel("cpu", _native_loader)
register_fused_kernel("cuda", _triton_loader)
