"""Inf and NaN in gradients: :func:`first_nonfinite` (read on the host, naming the tensor) and
:func:`nonfinite_` (a device flag, without a host synchronization), each through the device's fused scan where
it has one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sm3_dist import _native, fused

__all__ = ["SCAN_DTYPES", "first_nonfinite", "nonfinite_", "nonfinite_on_host_"]

SCAN_DTYPES = {
    torch.float32: _native.CODES["SCAN_F32"],
    torch.bfloat16: _native.CODES["SCAN_BF16"],
    torch.float16: _native.CODES["SCAN_F16"],
}
"""The dtypes the fused scans read (contiguous tensors only), and their codes in the native kernel."""


def first_nonfinite(tensors: Sequence[Tensor]) -> int | None:
    """Index of the first tensor holding an inf or NaN, ``None`` if all are finite (reads them on the host).

    On CPU, one parallel pass of the native kernel over all of them (reads only);
    elsewhere the largest absolute values, batched with ``torch._foreach_norm``.
    """
    if not tensors:
        return None
    lib = _native.load() if all(t.device.type == "cpu" for t in tensors) else None
    if lib is not None and all(t.dtype in SCAN_DTYPES and t.is_contiguous() for t in tensors):
        fields = torch.tensor(
            [[t.data_ptr() for t in tensors], [t.numel() for t in tensors], [SCAN_DTYPES[t.dtype] for t in tensors]],
            dtype=torch.int64,
        )
        index = lib.sm3_native_first_nonfinite(
            fields[0].data_ptr(),
            fields[1].data_ptr(),
            fields[2].data_ptr(),
            len(tensors),
            torch.get_num_threads(),
            _native.TILE_ELEMS,
        )
        return None if index < 0 else int(index)
    nonempty = [i for i, t in enumerate(tensors) if t.numel()]
    if not nonempty:
        return None
    finite = torch.isfinite(_abs_max(tensors[i] for i in nonempty))
    if bool(finite.all()):
        return None
    return nonempty[int((~finite).nonzero()[0])]


def _abs_max(tensors) -> Tensor:
    tensors = list(tensors)
    return torch.stack([n.float() for n in torch._foreach_norm(tensors, ord=float("inf"))])


def nonfinite_(tensors: Sequence[Tensor], found_inf: Tensor) -> None:
    """Set ``found_inf`` (a one-element tensor, left as it is otherwise) where any tensor holds an inf or NaN.

    On the device, without a host synchronization: the device's fused kernel's
    check in one launch where it has one, else a batched ``_foreach_norm``.
    """
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return
    kernel = fused.fused_kernel(tensors[0].device.type)
    if (
        kernel is not None
        and kernel.nonfinite is not None
        and all(t.dtype in SCAN_DTYPES and t.is_contiguous() for t in tensors)
    ):  # the fused scan reads contiguous fp32/bf16/fp16 tensors; the others through _foreach_norm
        kernel.nonfinite(tensors, found_inf)
        return
    bad = (~torch.isfinite(_abs_max(tensors))).any().to(found_inf.dtype)
    torch.maximum(found_inf, bad.view(found_inf.shape).to(found_inf.device), out=found_inf)


def nonfinite_on_host_(tensors: Sequence[Tensor], found_inf: Tensor) -> None:
    """:func:`nonfinite_` by a host read (:func:`first_nonfinite`): the CPU fused kernel's check, free there."""
    if first_nonfinite(tensors) is not None:
        found_inf.fill_(1.0)
