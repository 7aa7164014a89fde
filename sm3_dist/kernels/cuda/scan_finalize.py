"""The non-finite scan (:func:`nonfinite_`) and the finalize pass (:func:`finalize_`): kernels and plans."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .table import _KIND, _upload


@triton.jit
def _nonfinite_kernel(tab, starts, n, fi_ptr, LOG2N: tl.constexpr, CHUNK: tl.constexpr):
    """Sets ``*fi_ptr = max(*fi_ptr, 1)`` when the chunk of this program holds an inf or NaN."""
    pid = tl.program_id(0)
    lo = pid * 0
    hi = lo + n
    for _ in range(LOG2N):  # the last tensor whose first program is <= pid
        mid = (lo + hi) // 2
        ok = tl.load(starts + mid) <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    k = lo.to(tl.int64)
    addr = tl.load(tab + 3 * k)
    numel = tl.load(tab + 3 * k + 1)
    kind = tl.load(tab + 3 * k + 2)
    offs = (pid - tl.load(starts + k)).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < numel
    if kind == 0:
        x = tl.load(addr.to(tl.pointer_type(tl.int32)) + offs, mask=mask, other=0)
        bad = (x & 0x7F800000) == 0x7F800000
    else:
        x = tl.load(addr.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=0).to(tl.int32)
        expo = tl.where(kind == 1, 0x7F80, 0x7C00)
        bad = (x & expo) == expo
    if tl.max(bad.to(tl.int32), axis=0) > 0:
        tl.atomic_max(fi_ptr, 1.0)


@triton.jit
def _finalize_kernel(tab, prog_entry, fi_ptr, KEEP_MAX: tl.constexpr, FI: tl.constexpr, ZERO: tl.constexpr,
                     BLOCK: tl.constexpr):  # fmt: skip
    """``acc <- maxima`` (``max(acc, maxima)`` under ``KEEP_MAX``) unless ``*fi_ptr``; then ``maxima <- 0``."""
    pid = tl.program_id(0)
    k = tl.load(prog_entry + pid).to(tl.int64)
    acc_ptr = tl.load(tab + 4 * k).to(tl.pointer_type(tl.float32))
    max_ptr = tl.load(tab + 4 * k + 1).to(tl.pointer_type(tl.float32))
    n = tl.load(tab + 4 * k + 2)
    offs = (pid - tl.load(tab + 4 * k + 3)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    new = tl.load(max_ptr + offs, mask=mask, other=0.0)
    if FI:
        write = tl.load(fi_ptr) == 0.0
    else:
        write = True
    if write:
        if KEEP_MAX:
            new = tl.maximum(tl.load(acc_ptr + offs, mask=mask, other=0.0), new, propagate_nan=tl.PropagateNan.ALL)
        tl.store(acc_ptr + offs, new, mask=mask)
    if ZERO:
        tl.store(max_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=mask)


class NonfinitePlan:
    """:func:`nonfinite_` for a fixed list of tensors, its table prepared once (pointers re-read per call)."""

    CHUNK = 4096

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        tensors = [t for t in tensors if t.numel()]
        for i, t in enumerate(tensors):
            if t.dtype not in _KIND or not t.is_contiguous():
                raise ValueError(f"tensors[{i}] must be a contiguous fp32/bf16/fp16 tensor, got {t.dtype}")
        self._tensors = tensors
        self.device = tensors[0].device if tensors else None
        self._ptrs = [t.data_ptr() for t in tensors]
        self._numels = [t.numel() for t in tensors]
        self._kinds = [_KIND[t.dtype] for t in tensors]
        starts, total = [], 0
        for n in self._numels:
            starts.append(total)
            total += -(-n // self.CHUNK)
        self._nprog = total
        self._log2n = max(1, len(tensors).bit_length())
        if tensors:
            self._starts = _upload([*starts, total], self.device)
            self._tab = _upload(self._table(), self.device)

    def _table(self) -> list[int]:
        return [x for row in zip(self._ptrs, self._numels, self._kinds) for x in row]

    def detached(self) -> NonfinitePlan:
        """This plan without its tensors: :meth:`run` then scans the addresses it was built for."""
        self._tensors = None
        return self

    def run(self, found_inf: Tensor, tensors: Sequence[Tensor] | None = None) -> None:
        """``found_inf = max(found_inf, 1)`` if any of the tensors (the plan's, re-pointed, or ``tensors`` of the
        same sizes and dtypes in the same order) holds an inf or NaN. One launch, no host synchronization."""
        if not self._nprog:
            return
        if tensors is None and self._tensors is None:  # a prepared table of exactly these pointers
            self._launch(found_inf)
            return
        if tensors is not None:
            tensors = [t for t in tensors if t.numel()]
            if [t.numel() for t in tensors] != self._numels or [_KIND.get(t.dtype) for t in tensors] != self._kinds:
                raise ValueError("tensors differ in sizes or dtypes from the plan's: build a new NonfinitePlan")
            self._tensors = tensors
        ptrs = [t.data_ptr() for t in self._tensors]
        if ptrs != self._ptrs:
            self._ptrs = ptrs
            _upload(self._table(), self.device, out=self._tab)
        self._launch(found_inf)

    def _launch(self, found_inf: Tensor) -> None:
        _nonfinite_kernel[(self._nprog,)](
            self._tab, self._starts, len(self._numels), found_inf, LOG2N=self._log2n, CHUNK=self.CHUNK, num_warps=4
        )


def nonfinite_(tensors: Sequence[Tensor], found_inf: Tensor) -> None:
    """``found_inf = max(found_inf, 1.0)`` if any tensor (fp32/bf16/fp16) holds an inf or NaN: one launch, no sync.

    ``found_inf`` is a 1-element fp32 tensor on the tensors' device. For repeated calls on the same tensors,
    :class:`NonfinitePlan` saves re-building the table.
    """
    _check_flag(found_inf, "found_inf")
    tensors = [t for t in tensors if t.numel()]
    key = ("nonfinite", *((t.data_ptr(), t.numel(), t.dtype, t.is_contiguous()) for t in tensors))
    _prepared(key, lambda: NonfinitePlan(tensors).detached()).run(found_inf)


_PREPARED: OrderedDict[tuple, object] = OrderedDict()
_PREPARED_MAX = 16


def _prepared(key: tuple, make):
    """The plan prepared for ``key`` (data pointers, sizes, dtypes: what its table holds), made on first use.

    Keyed by addresses rather than tensors, so that the next step's gradients, allocated where the last ones
    were, find the same table; the plans hold no tensors, so the cache keeps no memory alive.
    """
    plan = _PREPARED.get(key)
    if plan is None:
        plan = _PREPARED[key] = make()
        if len(_PREPARED) > _PREPARED_MAX:
            _PREPARED.popitem(last=False)
    else:
        _PREPARED.move_to_end(key)
    return plan


def _check_flag(flag: Tensor, name: str) -> None:
    if not isinstance(flag, Tensor) or flag.numel() != 1 or flag.dtype != torch.float32:
        raise ValueError(f"{name} must be a 1-element fp32 tensor")


class FinalizePlan:
    """:func:`finalize_` for fixed lists of accumulators and maxima buffers, its table prepared once."""

    BLOCK = 1024

    def __init__(self, accumulators: Sequence[Tensor], maxima: Sequence[Tensor]) -> None:
        if len(accumulators) != len(maxima):
            raise ValueError(f"{len(accumulators)} accumulators but {len(maxima)} maxima buffers")
        for i, (a, m) in enumerate(zip(accumulators, maxima)):
            for what, t in (("accumulators", a), ("maxima", m)):
                if t.dtype != torch.float32 or not t.is_contiguous():
                    raise ValueError(f"{what}[{i}] must be a contiguous fp32 tensor, got {t.dtype}")
            if a.numel() != m.numel() or a.device != m.device:
                raise ValueError(f"accumulators[{i}] and maxima[{i}] differ in size or device")
        pairs = [(a, m) for a, m in zip(accumulators, maxima) if a.numel()]  # not kept: the table is enough
        self.device = pairs[0][0].device if pairs else None
        table, counts, first = [], [], 0
        for a, m in pairs:
            count = -(-a.numel() // self.BLOCK)
            table += [a.data_ptr(), m.data_ptr(), a.numel(), first]
            counts.append(count)
            first += count
        self._nprog = first
        if pairs:
            self._tab = _upload(table, self.device)
            self._entry = torch.repeat_interleave(
                torch.arange(len(pairs), dtype=torch.int32), torch.tensor(counts, dtype=torch.int64)
            ).to(self.device)
            self._dummy = torch.zeros(1, dtype=torch.float32, device=self.device)

    def run(self, *, keep_max: bool, found_inf: Tensor | None = None, zero_maxima: bool = True) -> None:
        """One launch: ``acc <- maxima`` (``max(acc, maxima)`` under ``keep_max``) unless ``found_inf`` is
        nonzero; then ``maxima <- +0`` (with ``zero_maxima``), ready for the next step's atomic max."""
        if not self._nprog:
            return
        if found_inf is not None:
            _check_flag(found_inf, "found_inf")
        _finalize_kernel[(self._nprog,)](
            self._tab,
            self._entry,
            self._dummy if found_inf is None else found_inf,
            KEEP_MAX=bool(keep_max),
            FI=found_inf is not None,
            ZERO=bool(zero_maxima),
            BLOCK=self.BLOCK,
            num_warps=4,
        )


def finalize_(
    accumulators: Sequence[Tensor],
    maxima: Sequence[Tensor],
    *,
    keep_max: bool,
    found_inf: Tensor | None = None,
    zero_maxima: bool = True,
) -> None:
    """``acc <- maxima`` (or ``max(acc, maxima)`` under ``keep_max``) unless ``found_inf`` is set; then
    ``maxima <- 0``. One launch over lists of fp32 tensors; :class:`FinalizePlan` prepares it once."""
    key = ("finalize", *((a.data_ptr(), m.data_ptr(), a.numel(), m.numel(), a.dtype, m.dtype, a.device, m.device,
                          a.is_contiguous(), m.is_contiguous()) for a, m in zip(accumulators, maxima)))  # fmt: skip
    if len(accumulators) != len(maxima):
        raise ValueError(f"{len(accumulators)} accumulators but {len(maxima)} maxima buffers")
    plan = _prepared(key, lambda: FinalizePlan(accumulators, maxima))
    plan.run(keep_max=keep_max, found_inf=found_inf, zero_maxima=zero_maxima)


# ---------------------------------------------------------------------------------------------------------------
# checking a device against the eager CPU kernel, and timing
