"""The native kernel's scan for inf and NaN: one parallel pass over many tensors, reads only."""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch
from torch import Tensor

from sm3_dist.kernels.cpu import library

__all__ = ["SCAN_CODES", "first_nonfinite", "nonfinite_on_host_"]

SCAN_CODES = {
    torch.float32: library.CODES["SCAN_F32"],
    torch.bfloat16: library.CODES["SCAN_BF16"],
    torch.float16: library.CODES["SCAN_F16"],
}
"""The dtypes the scan reads (contiguous CPU tensors only), and their codes in the native kernel."""


def first_nonfinite(tensors: Sequence[Tensor]) -> int | None:
    """Index of the first tensor holding an inf or NaN, ``None`` if all are finite: one pass of the native kernel
    (contiguous CPU tensors of the dtypes of :data:`SCAN_CODES`; the library must load)."""
    lib = library.load()
    if lib is None:
        raise RuntimeError("the native SM3 kernel is unavailable: its scan cannot run")
    # int64 arrays of the standard library (no tensor allocation in the step's check)
    ptrs = array("q", [t.data_ptr() for t in tensors])
    numels = array("q", [t.numel() for t in tensors])
    kinds = array("q", [SCAN_CODES[t.dtype] for t in tensors])
    index = lib.sm3_native_first_nonfinite(
        ptrs.buffer_info()[0],
        numels.buffer_info()[0],
        kinds.buffer_info()[0],
        len(tensors),
        torch.get_num_threads(),
        library.TILE_ELEMS,
    )
    return None if index < 0 else int(index)


def nonfinite_on_host_(tensors: Sequence[Tensor], found_inf: Tensor) -> None:
    """``found_inf`` set by a host read (:func:`first_nonfinite`): the CPU fused kernel's check, free there."""
    if first_nonfinite(tensors) is not None:
        found_inf.fill_(1.0)
