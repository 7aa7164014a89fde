"""The functional SM3 API, as plain functions on local tensors: one import path for users.

:func:`sm3` runs one step on a list of dense blocks through the kernel chosen (per-tensor loop, ``foreach`` or
the device's fused kernel), :func:`sm3_sparse_rows_` one step for a sparse gradient, :func:`finalize_` stores
the maxima into the accumulators, :func:`first_nonfinite` and :func:`nonfinite_` check gradients for inf and
NaN. The math is :mod:`sm3_dist.kernels.math`, the routing :mod:`sm3_dist.kernels.dispatch`, the kernels'
registry :mod:`sm3_dist.kernels.registry`.
"""

from sm3_dist.kernels.dispatch import finalize_, first_nonfinite, nonfinite_, sm3
from sm3_dist.kernels.math import STEP_KEYWORDS, sm3_sparse_rows_, store_maxima
from sm3_dist.kernels.registry import FusedKernel, default_kernel, fused_kernel, register_fused_kernel
from sm3_dist.kernels.rule import UpdateRule

__all__ = [
    "STEP_KEYWORDS",
    "FusedKernel",
    "UpdateRule",
    "default_kernel",
    "finalize_",
    "first_nonfinite",
    "fused_kernel",
    "nonfinite_",
    "register_fused_kernel",
    "sm3",
    "sm3_sparse_rows_",
    "store_maxima",
]
