"""The CPU entry of the fused-kernel registry: :class:`NativePlan`, the one-pass C++ kernel of
:mod:`sm3_dist.kernels.cpu.library` stepping a fixed list of contiguous blocks.

A block's arguments are packed by name (:func:`pack_block`) in the order of :data:`sm3_dist.kernels.cpu.library.BLOCK_FIELDS`;
the codes they carry (parameter dtype, momentum kind, flags) are those of :mod:`sm3_dist.kernels.cpu.library`. Rank > 2
blocks get their leading dimensions' maxima from the kernel's row maxima with :mod:`sm3_dist.kernels.math`.
"""

from __future__ import annotations

import ctypes
from array import array
from collections.abc import Sequence

import torch
from torch import Tensor

from sm3_dist.kernels.cpu import library
from sm3_dist.kernels.math import cover_maxima, min_over_covers
from sm3_dist.kernels.rule import UpdateRule

__all__ = ["MOMENTUM_KINDS", "PARAM_DTYPES", "NativePlan", "native_available", "pack_block", "step_arguments"]

PARAM_DTYPES = {torch.float32: library.CODES["DTYPE_F32"], torch.bfloat16: library.CODES["DTYPE_BF16"]}
"""The parameter dtypes the kernel takes, and their codes."""
MOMENTUM_KINDS = {
    None: library.CODES["MOMENTUM_NONE"],
    torch.float32: library.CODES["MOMENTUM_F32"],
    torch.bfloat16: library.CODES["MOMENTUM_BF16"],
}
"""The momentum dtypes the kernel takes (``None``: no momentum), and their codes."""
_POS_INF: dict[torch.device, Tensor] = {}


def _native_geometry(p: Tensor, accs: Sequence[Tensor]) -> tuple[int, int, Tensor | None, Tensor]:
    """A block as the kernel sees it: ``rows, cols``, the row minima ``min_(d < last) mu_d`` (``None``: formed
    each step, rank > 2) and ``mu_last``."""
    if p.ndim <= 1:
        inf = _POS_INF.get(p.device)
        if inf is None:
            inf = _POS_INF[p.device] = torch.full((1,), float("inf"), dtype=torch.float32)
        return 1, p.numel(), inf, accs[0]
    if p.ndim == 2:
        return p.shape[0], p.shape[1], accs[0], accs[1]
    return p.numel() // p.shape[-1], p.shape[-1], None, accs[-1]


def pack_block(**fields: int) -> list[int]:
    """One block's row of the native kernel's argument array, packed by name in the order of
    :data:`sm3_dist.kernels.cpu.library.BLOCK_FIELDS` (every field exactly once)."""
    if set(fields) != set(library.BLOCK_FIELDS):
        missing = sorted(set(library.BLOCK_FIELDS) - set(fields))
        unknown = sorted(set(fields) - set(library.BLOCK_FIELDS))
        raise ValueError(f"native block fields: missing {missing}, unknown {unknown}")
    return [int(fields[name]) for name in library.BLOCK_FIELDS]


def step_arguments(rule: UpdateRule, lr, nu_divisor=None, grad_scale=None) -> tuple[list[float], int]:
    """The kernel's hyperparameters (in the order of :data:`sm3_dist.kernels.cpu.library.HYPER_FIELDS`) and flag
    bits for one step."""
    values = {
        "lr": float(lr),
        "momentum": rule.momentum,
        "one_minus_momentum": 1.0 - rule.momentum,
        "beta": rule.beta,
        "one_minus_beta": 1.0 - rule.beta,
        "eps": rule.eps,
        "weight_decay": rule.weight_decay,
        "sign": -1.0 if rule.maximize else 1.0,
        "nu_divisor": 1.0 if nu_divisor is None else float(nu_divisor),
        "grad_scale": 1.0 if grad_scale is None else float(grad_scale),
        "update_clip": float(rule.update_clip),
    }
    code = library.CODES
    flags = (
        (code["FLAG_WD"] if rule.weight_decay != 0.0 else 0)
        | (code["FLAG_BETA"] if rule.beta > 0.0 else 0)
        | (code["FLAG_EPS"] if rule.eps > 0.0 else 0)
        | (code["FLAG_NU_DIV"] if nu_divisor is not None else 0)
        | (code["FLAG_SCALE"] if grad_scale is not None else 0)
        | (code["FLAG_CLIP"] if rule.update_clip > 0.0 else 0)
    )
    return [values[name] for name in library.HYPER_FIELDS], flags


class NativePlan:
    """Repeated native steps of one fixed list of contiguous CPU blocks (the CPU entry of the fused registry).

    What stays the same from step to step (shapes, dtypes, the kernel's
    argument array) is prepared once; each :meth:`step` re-reads the data
    pointers. The maxima are accumulated into ``maxima_out`` by max (the
    caller zeroes them: ``+0`` is the identity of the max of ``nu >= 0``); rank
    > 2 blocks get their leading dimensions' maxima by exact max reductions of
    the kernel's row maxima.
    """

    def __init__(self, lib, params, momentum_buffers, accumulators, maxima_out) -> None:
        self._lib = lib
        self._params = list(params)
        self._buffers = list(momentum_buffers)
        self._accumulators = [list(accs) for accs in accumulators]
        self._outs = [list(outs) for outs in maxima_out]
        self._dtypes = [p.dtype for p in params]
        self._sink = torch.empty(1, dtype=torch.float32)  # the row maximum of rank-1 blocks
        self._deep = [i for i, p in enumerate(self._params) if p.ndim > 2]
        self._rowmax = {i: torch.zeros(self._params[i].numel() // self._params[i].shape[-1]) for i in self._deep}
        self._rowmin: dict[int, Tensor] = {}
        meta = []
        for i, (p, m, accs, outs) in enumerate(zip(self._params, self._buffers, self._accumulators, self._outs)):
            rows, cols, rowmin, colacc = _native_geometry(p, accs)
            if rowmin is None:
                rowmin = self._rowmin[i] = torch.empty(rows, dtype=torch.float32)
                rowmax = self._rowmax[i]
            else:
                rowmax = outs[0] if p.ndim == 2 else self._sink
            meta += pack_block(
                w=p.data_ptr(),
                g=0,  # set each step
                m=0 if m is None else m.data_ptr(),
                rowmin=rowmin.data_ptr(),
                colacc=colacc.data_ptr(),
                rowmax=rowmax.data_ptr(),
                colmax=outs[-1].data_ptr(),
                rows=rows,
                cols=cols,
                pdtype=PARAM_DTYPES[p.dtype],
                mkind=MOMENTUM_KINDS[None if m is None else m.dtype],
                keep_max=1,
            )
        self._meta = array("q", meta)
        self._meta_address = self._meta.buffer_info()[0]  # the array never grows: its address is fixed
        self._hyper = (ctypes.c_double * len(library.HYPER_FIELDS))()
        self._hyper_address = ctypes.addressof(self._hyper)
        self._w_at = range(library.FIELD["w"], len(meta), library.META_FIELDS)
        self._g_at = range(library.FIELD["g"], len(meta), library.META_FIELDS)

    @classmethod
    def build(cls, params, momentum_buffers, accumulators, maxima_out) -> NativePlan | None:
        """A plan for these blocks, or ``None`` when the native kernel is off or cannot take them all."""
        lib = library.load() if params else None
        if lib is None:
            return None
        for p, m, accs, outs in zip(params, momentum_buffers, accumulators, maxima_out):
            if not (
                p.is_cpu
                and p.dtype in PARAM_DTYPES
                and p.is_contiguous()
                and p.numel() > 0
                and (m is None or (m.is_cpu and m.dtype in PARAM_DTYPES and m.is_contiguous()))
                and all(a.is_cpu and a.dtype == torch.float32 and a.is_contiguous() for a in accs)
                and len(outs) == len(accs)
                and all(o.is_cpu and o.dtype == torch.float32 and o.is_contiguous() for o in outs)
            ):
                return None
        return cls(lib, params, momentum_buffers, accumulators, maxima_out)

    def holds(self, params, momentum_buffers, accumulators, maxima_out) -> bool:
        """Whether this plan was built for exactly these tensors (the same objects, in the same order)."""
        return (
            len(params) == len(self._params)
            and all(a is b for a, b in zip(params, self._params))
            and all(a is b for a, b in zip(momentum_buffers, self._buffers))
            and all(a is b for accs, mine in zip(accumulators, self._accumulators) for a, b in zip(accs, mine))
            and all(a is b for outs, mine in zip(maxima_out, self._outs) for a, b in zip(outs, mine))
        )

    def step(self, grads, rule: UpdateRule, *, lr, nu_divisor=None, found_inf=None, grad_scale=None) -> None:
        params = self._params
        if len(grads) != len(params):
            raise ValueError(f"{len(grads)} gradients for a plan of {len(params)} blocks")
        for g, p, d in zip(grads, params, self._dtypes):
            if g.dtype != d or p.dtype != d or not g.is_contiguous() or not p.is_contiguous() or g.shape != p.shape:
                raise ValueError("a gradient or parameter no longer fits the native plan (dtype, shape or layout)")
        if found_inf is not None and bool(found_inf):
            return
        for i in self._deep:
            accs = self._accumulators[i]
            shape = params[i].shape
            self._rowmin[i].copy_(min_over_covers(accs[:-1], shape[:-1]).reshape(-1))
            self._rowmax[i].zero_()
        # the argument arrays are the plan's: only their values change (data pointers, hyperparameters)
        meta = self._meta
        for w_at, g_at, p, g in zip(self._w_at, self._g_at, params, grads):
            meta[w_at] = p.data_ptr()
            meta[g_at] = g.data_ptr()
        values, flags = step_arguments(rule, lr, nu_divisor, grad_scale)
        self._hyper[:] = values
        status = self._lib.sm3_native_step(
            self._meta_address, len(params), self._hyper_address, flags, torch.get_num_threads(), library.TILE_ELEMS
        )
        if status != 0:
            raise RuntimeError(f"native SM3 kernel failed with status {status}")
        for i in self._deep:
            shape = params[i].shape
            for out, new in zip(self._outs[i][:-1], cover_maxima(self._rowmax[i].view(shape[:-1]))):
                torch.maximum(out, new, out=out)


def native_available() -> bool:
    """Whether the one-pass native CPU kernel is built (or builds now) and enabled."""
    return library.load() is not None
