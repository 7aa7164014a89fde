"""The SM3 step on CUDA: one Triton kernel launch over every block of a parameter group.

A :class:`TritonPlan` is built once for a fixed list of dense blocks (the
parameters, their momentum buffers, the accumulator slices they read and the
maxima buffers they write). It holds a device-side table with one row per
block (where its tensors are, ``rows x cols`` geometry, dtypes) and a map from
program to block, so that :meth:`TritonPlan.step` is one launch whose host
work is a comparison of the data pointers with the previous step's (and one
small asynchronous host-to-device copy when they moved). Parameters, gradients
and momentum buffers are addressed as byte offsets from one small "root"
tensor passed as a kernel argument: the compiler knows that argument's
alignment and so emits 16-byte vector loads and stores where every row is
aligned (a pointer made from an integer carries no alignment it can see).

Each block is viewed as ``rows x cols``, its last dimension against the others,
as the native CPU kernel views it (:mod:`sm3_dist.kernels.cpu.library`). A program takes a
tile of ``rows_per_program x BC`` elements (rows in steps of ``BR``): it loads
one slice of the column accumulator, and per step one slice of the row minima,
then reads ``w``, ``g`` and ``m`` once and writes ``w`` and ``m`` once. The
maxima of ``nu`` per row and per column of the tile go to the maxima buffers
by an atomic max on the fp32 bit patterns (``nu`` is ``+0..+inf`` or NaN, whose
bit patterns, as integers, order as the values do, with NaN above ``+inf``):
exact, and independent of the order the programs run in. Blocks of rank 0 and 1
are flat runs whose maxima are ``nu`` itself. For rank > 2 the row minima
(``min`` over the leading accumulators) are formed before the launch and the
leading dimensions' maxima are reduced from the row maxima after it, with torch
ops, as the native kernel does.

Every elementwise step is one correctly rounded IEEE operation in the order of
:func:`sm3_dist.kernels.math.single_block` (``tl.sqrt_rn``, ``tl.div_rn``, the
kernel compiled with ``enable_fp_fusion=False``: no multiply-add contraction;
bf16 stores rounded to nearest even with integer operations), so the results
are bitwise those of the eager kernel. Under ``TRITON_INTERPRET=1`` (set before
``triton`` is imported) the same kernels run on CPU tensors.

The package, by role: :mod:`.table` (dtype codes, the block table's fields and tile geometry, and the
packing of one block's row), :mod:`.update_kernel` (the update's device code), :mod:`.step`
(:class:`TritonPlan`, which packs, uploads and launches it), :mod:`.scan_finalize` (the non-finite scan and the
finalize kernels with their plans), :mod:`.checking` (:func:`check`), :mod:`.benchmark` (:func:`bench`) and
``__main__`` (the command line).

``python -m sm3_dist.kernels.cuda --check`` compares the kernel on a CUDA device with
the eager CPU kernel; ``--bench`` times it against ``torch.optim.Adam(fused=True)``.
"""

from __future__ import annotations

import torch

from .benchmark import bench
from .checking import check
from .scan_finalize import FinalizePlan, NonfinitePlan, finalize_, nonfinite_
from .step import TritonPlan
from .table import _INTERPRET

__all__ = [
    "FinalizePlan",
    "NonfinitePlan",
    "TritonPlan",
    "available",
    "bench",
    "check",
    "finalize_",
    "nonfinite_",
]


def available() -> bool:
    """Whether the kernels can run here: triton imports (it did) and there is a CUDA device or the interpreter."""
    return _INTERPRET or torch.cuda.is_available()
