"""The host side of the update kernel: :class:`TritonPlan` packs the block table once and launches the kernel."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from .table import (
    _CLS_FLAT,
    _CLS_NARROW,
    _CLS_WIDE,
    _F_KINDS,
    _F_M,
    _F_W,
    _FLAT,
    _INTERPRET,
    _KIND,
    _MKIND,
    _NARROW_BC,
    _NF,
    _NUM_WARPS,
    _WIDE,
    _block_row,
    _common_kind,
    _f32,
    _narrow_rows,
    _scalar_arg,
    _upload,
)
from .update_kernel import _sm3_step_kernel

logger = logging.getLogger(__name__)

_ALIGN_HINTS = {"on": os.environ.get("SM3_TRITON_ALIGN", "1") != "0"}
"""Whether aligned blocks get the kernel variant with alignment hints (off after it failed to compile once)."""


def _launch(aligned: bool, grid, *args, **kwargs) -> None:
    """The update kernel, with alignment hints where the blocks allow; without them if that variant fails to
    compile (logged once), since the hints only make loads wider."""
    if aligned:
        try:
            _LAST["kernel"] = _sm3_step_kernel[grid](*args, ALIGNED=True, **kwargs)
            return
        except Exception as exc:  # a compiler that rejects the hints: the plain variant computes the same
            if isinstance(exc, (ValueError, TypeError)) and "must" in str(exc):
                raise
            _ALIGN_HINTS["on"] = False
            logger.warning("sm3_dist: Triton SM3 kernel: aligned variant failed (%s); using the plain one", exc)
    _LAST["kernel"] = _sm3_step_kernel[grid](*args, ALIGNED=False, **kwargs)


_LAST: dict = {}
"""The compiled update kernel of the last launch (``--bench`` reports its vector loads)."""


class TritonPlan:
    """One launch of the Triton SM3 kernel per step over a fixed list of dense blocks on one device.

    Built by :meth:`build` from the blocks (``params[i]``), their momentum
    buffers (``None`` or fp32/bf16 of the same shape), the accumulator slices
    they read (``accumulators[i][d]``, fp32, length ``shape[d]``; one of length
    ``numel`` for rank 0/1) and the fp32 buffers their maxima go to
    (``maxima_out[i][d]``, same lengths), into which :meth:`step` accumulates by
    max: they must hold ``+0`` (or earlier maxima) before the step, see
    :class:`FinalizePlan`. Several blocks may share maxima regions (a tensor cut
    into flat ranges); blocks must not share parameters or momentum buffers, and
    ``maxima_out`` must not overlap the accumulators.
    """

    reason: str | None = None
    """Why the last :meth:`build` returned ``None`` (a class attribute, also logged at debug level)."""

    def __init__(self, params, momentum_buffers, accumulators, maxima_out, device: torch.device) -> None:
        self._params = list(params)
        self._buffers = list(momentum_buffers)
        self._accumulators = [list(a) for a in accumulators]
        self._maxima = [list(m) for m in maxima_out]
        self.device = device
        n = len(self._params)
        # w, g and m are addressed as byte offsets from one root tensor: a kernel argument, whose alignment the
        # compiler knows (a pointer made from an integer has none it can see, and its loads stay scalar)
        self._root = torch.empty(16, dtype=torch.uint8, device=device)
        root = self._root.data_ptr()
        pkinds = [_KIND[p.dtype] for p in self._params]
        mkinds = [_MKIND[None if m is None else m.dtype] for m in self._buffers]
        self._pk = _common_kind(pkinds)
        self._mk = _common_kind(mkinds)
        # rank > 2: row minima formed before the launch, row maxima reduced after it, in two scratch buffers
        self._deep = [i for i, p in enumerate(self._params) if p.ndim > 2]
        deep_rows = [math.prod(self._params[i].shape[:-1]) for i in self._deep]
        self._rowmin = torch.empty(sum(deep_rows), dtype=torch.float32, device=device)
        self._rowmax = torch.zeros(sum(deep_rows), dtype=torch.float32, device=device)
        rowmin_views = dict(zip(self._deep, self._rowmin.split(deep_rows)))
        rowmax_views = dict(zip(self._deep, self._rowmax.split(deep_rows)))
        self._deep_views = [(i, rowmin_views[i], rowmax_views[i]) for i in self._deep]
        table: list[int] = []
        counts: list[int] = []
        classes = set()
        first = 0
        for i, p in enumerate(self._params):
            deep = (rowmin_views[i], rowmax_views[i]) if p.ndim > 2 else None
            row, count, cls = _block_row(p, self._buffers[i], self._accumulators[i], self._maxima[i], deep, root, first)
            if count:
                classes.add(cls)
            table += row
            counts.append(count)
            first += count
        self._table_host = table
        self._tab = _upload(table, device)
        self._nprog = first
        self._prog_block = torch.repeat_interleave(
            torch.arange(n, dtype=torch.int32), torch.tensor(counts, dtype=torch.int64)
        ).to(device)
        self._classes = classes
        # vector loads need 16-byte aligned rows: aligned addresses and row lengths a multiple of 8 elements
        self._rows_aligned = all(p.ndim <= 1 or p.shape[-1] % 8 == 0 for p in self._params)
        self._flat_aligned = all(p.ndim >= 2 or p.numel() % 8 == 0 for p in self._params)
        self._pptrs = [p.data_ptr() for p in self._params]
        self._mptrs = [0 if m is None else m.data_ptr() for m in self._buffers]
        self._gptrs: list[int] | None = None
        self._gkinds: list[int] = []
        self._gk = 0
        self._gtab = torch.zeros(2 * n, dtype=torch.int64, device=device)
        self._dummy = torch.zeros(1, dtype=torch.float32, device=device)

    def _aligned(self) -> bool:
        ptrs = [self._root.data_ptr(), *self._pptrs, *self._mptrs, *(self._gptrs or [1])]
        return _ALIGN_HINTS["on"] and self._rows_aligned and all(x % 16 == 0 for x in ptrs)

    @classmethod
    def build(cls, params, momentum_buffers, accumulators, maxima_out) -> TritonPlan | None:
        """A plan for these blocks, or ``None`` (with :attr:`reason` set) when the kernel cannot take them."""
        reason = cls._unfit(params, momentum_buffers, accumulators, maxima_out)
        cls.reason = reason
        if reason is not None:
            logger.debug("sm3_dist: Triton SM3 kernel not used: %s", reason)
            return None
        return cls(params, momentum_buffers, accumulators, maxima_out, params[0].device)

    @staticmethod
    def _unfit(params, momentum_buffers, accumulators, maxima_out) -> str | None:
        if not params:
            return "no blocks"
        if not (len(params) == len(momentum_buffers) == len(accumulators) == len(maxima_out)):
            return "params, momentum_buffers, accumulators and maxima_out differ in length"
        device = params[0].device
        if device.type != "cuda" and not (_INTERPRET and device.type == "cpu"):
            return f"blocks on {device} (the kernel runs on CUDA, or on CPU under TRITON_INTERPRET=1)"
        acc_spans = []
        for i, (p, m, accs, outs) in enumerate(zip(params, momentum_buffers, accumulators, maxima_out)):
            if type(p) is not Tensor and not isinstance(p, torch.nn.Parameter):
                return f"params[{i}] is a {type(p).__name__}, not a plain tensor"
            if p.device != device:
                return f"params[{i}] is on {p.device}, params[0] on {device}"
            if p.dtype not in _KIND:
                return f"params[{i}] has dtype {p.dtype} (fp32, bf16 or fp16 only)"
            if not p.is_contiguous():
                return f"params[{i}] is not contiguous"
            if p.ndim > 4:
                return f"params[{i}] has rank {p.ndim} (at most 4)"
            if p.ndim >= 2 and p.shape[-1] * max(_WIDE["BR"], _WIDE["BR"] * _WIDE["BC"] // _NARROW_BC) >= 2**31:
                return f"params[{i}] has rows of {p.shape[-1]} elements (tile offsets are 32-bit)"
            if m is not None and (
                m.device != device or m.dtype not in _MKIND or m.shape != p.shape or not m.is_contiguous()
            ):
                return (
                    f"momentum_buffers[{i}] is not a contiguous fp32/bf16 tensor of shape {tuple(p.shape)} on {device}"
                )
            lengths = list(p.shape) if p.ndim >= 2 else [p.numel()]
            for what, vecs in (("accumulators", accs), ("maxima_out", outs)):
                if len(vecs) != len(lengths):
                    return f"{what}[{i}] has {len(vecs)} tensors, expected {len(lengths)}"
                for d, (v, n) in enumerate(zip(vecs, lengths)):
                    if v.device != device or v.dtype != torch.float32 or v.ndim != 1 or v.numel() != n:
                        return f"{what}[{i}][{d}] is not a 1-D fp32 tensor of length {n} on {device}"
                    if not v.is_contiguous():
                        return f"{what}[{i}][{d}] is not contiguous"
            acc_spans += [(a.data_ptr(), a.data_ptr() + 4 * a.numel()) for a in accs if a.numel()]
        acc_spans.sort()
        for i, outs in enumerate(maxima_out):
            for d, o in enumerate(outs):
                lo, hi = o.data_ptr(), o.data_ptr() + 4 * o.numel()
                for a_lo, a_hi in acc_spans:  # small lists: one per accumulator slice
                    if a_lo < hi and lo < a_hi and o.numel():
                        return f"maxima_out[{i}][{d}] overlaps an accumulator (the kernel reads those while writing)"
        return None

    def holds(self, params, momentum_buffers, accumulators, maxima_out) -> bool:
        """Whether this plan was built for exactly these tensors (the same objects, in the same order)."""
        return (
            len(params) == len(self._params)
            and all(a is b for a, b in zip(params, self._params))
            and all(a is b for a, b in zip(momentum_buffers, self._buffers))
            and len(accumulators) == len(self._accumulators)
            and all(a is b for x, y in zip(accumulators, self._accumulators) for a, b in zip(x, y))
            and len(maxima_out) == len(self._maxima)
            and all(a is b for x, y in zip(maxima_out, self._maxima) for a, b in zip(x, y))
        )

    @property
    def launches(self) -> int:
        """Kernel launches per step of the update pass (the rank > 2 blocks add torch ops around it)."""
        return 1 if self._nprog else 0

    def _set_grads(self, grads: Sequence[Tensor], ptrs: list[int]) -> None:
        params = self._params
        if len(grads) != len(params):
            raise ValueError(f"{len(grads)} gradients for {len(params)} blocks")
        kinds = []
        for i, (g, p) in enumerate(zip(grads, params)):
            if g.shape != p.shape or g.device != self.device or g.dtype not in _KIND or not g.is_contiguous():
                raise ValueError(
                    f"grads[{i}] must be a contiguous fp32/bf16/fp16 tensor of shape {tuple(p.shape)} on "
                    f"{self.device}, got {g.dtype} {tuple(g.shape)} on {g.device}"
                )
            kinds.append(_KIND[g.dtype])
        root = self._root.data_ptr()
        _upload([x for ptr, kind in zip(ptrs, kinds) for x in (ptr - root, kind)], self.device, out=self._gtab)
        self._gptrs = ptrs
        self._gkinds = kinds
        self._gk = _common_kind(kinds)
        self._aligned_now = self._aligned()

    def _refresh_pointers(self) -> None:
        """Parameters whose storage moved (``p.data = ...``): their table entries (and their momentum buffers')
        again. Momentum buffers belong to the optimizer, which builds a new plan when it replaces one."""
        pptrs = [p.data_ptr() for p in self._params]
        if pptrs == self._pptrs:
            return
        mptrs = [0 if m is None else m.data_ptr() for m in self._buffers]
        for i, (p, m) in enumerate(zip(self._params, self._buffers)):
            if not p.is_contiguous() or _KIND.get(p.dtype) != self._table_host[_NF * i + _F_KINDS] & 15:
                raise ValueError(f"params[{i}] changed dtype or layout since the plan was built: build a new one")
            if m is not None and not m.is_contiguous():
                raise ValueError(f"momentum_buffers[{i}] is no longer contiguous: build a new plan")
            self._table_host[_NF * i + _F_W] = pptrs[i] - self._root.data_ptr()
            self._table_host[_NF * i + _F_M] = mptrs[i] and mptrs[i] - self._root.data_ptr()
        _upload(self._table_host, self.device, out=self._tab)
        self._pptrs, self._mptrs = pptrs, mptrs
        self._aligned_now = self._aligned()

    def step(self, grads: Sequence[Tensor], rule, *, lr, nu_divisor=None, found_inf=None, grad_scale=None) -> None:
        """One SM3 step of every block: one kernel launch (plus torch ops for blocks of rank > 2).

        ``rule``: an :class:`~sm3_dist.kernels.rule.UpdateRule`. ``lr``, ``nu_divisor``: numbers or 1-element device
        tensors (read on the device). ``found_inf``: ``None`` or a 1-element fp32 device tensor; when nonzero
        nothing is written. ``grad_scale``: ``None`` or a 1-element fp32 device tensor the gradients are
        divided by (one correctly rounded division, before ``maximize`` and weight decay).
        """
        ptrs = [g.data_ptr() for g in grads]
        if ptrs != self._gptrs:
            self._set_grads(grads, ptrs)
        self._refresh_pointers()
        device = self.device
        lr_t, lr_v = _scalar_arg(lr, "lr", device)
        if nu_divisor is None:
            nud_t, nud_v, nud_mode = None, 1.0, 0
        else:
            nud_t, nud_v = _scalar_arg(nu_divisor, "nu_divisor", device)
            nud_mode = 2 if nud_t is not None else 1
        for name, flag in (("found_inf", found_inf), ("grad_scale", grad_scale)):
            if flag is not None and (
                not isinstance(flag, Tensor)
                or flag.numel() != 1
                or flag.dtype != torch.float32
                or flag.device != device
            ):
                raise ValueError(f"{name} must be None or a 1-element fp32 tensor on {device}")
        if self._deep:
            self._prepare_deep()
        if self._nprog:
            dummy = self._dummy
            momentum, beta = float(rule.momentum), float(rule.beta)
            aligned = self._aligned_now and _ALIGN_HINTS["on"]
            _launch(
                aligned,
                (self._nprog,),
                self._root,
                self._tab,
                self._gtab,
                self._prog_block,
                dummy if lr_t is None else lr_t,
                lr_v,
                dummy if nud_t is None else nud_t,
                nud_v,
                dummy if found_inf is None else found_inf,
                dummy if grad_scale is None else grad_scale,
                _f32(momentum),
                _f32(1.0 - momentum),
                _f32(beta),
                _f32(1.0 - beta),
                _f32(float(rule.eps)),
                _f32(float(rule.weight_decay)),
                _f32(float(rule.update_clip)),
                NF=_NF,
                PK=self._pk,
                GK=self._gk,
                MK=self._mk,
                WD=rule.weight_decay != 0.0,
                BETA=beta > 0.0,
                EPS=rule.eps > 0.0,
                MAXIMIZE=bool(rule.maximize),
                LR_T=lr_t is not None,
                NUD=nud_mode,
                FI=found_inf is not None,
                GS=grad_scale is not None,
                CLIP=rule.update_clip > 0.0,
                HAS_WIDE=_CLS_WIDE in self._classes,
                HAS_NARROW=_CLS_NARROW in self._classes,
                HAS_FLAT=_CLS_FLAT in self._classes,
                BR=_WIDE["BR"],
                BC=_WIDE["BC"],
                RI=_WIDE["RI"],
                BRN=_narrow_rows(),
                BCN=_NARROW_BC,
                VB=_FLAT["VB"],
                VI=_FLAT["VI"],
                FLAT_ALIGNED=self._flat_aligned,
                num_warps=_NUM_WARPS["update"],
                enable_fp_fusion=False,
            )
        if self._deep:
            self._finish_deep()

    def _prepare_deep(self) -> None:
        """Row minima ``min_(d < last) mu_d`` of the rank > 2 blocks; their row-maxima scratch to +0."""
        for i, rowmin, _ in self._deep_views:
            accs = self._accumulators[i]
            lead = self._params[i].shape[:-1]
            nd = len(lead)
            views = [a.view([-1 if d == k else 1 for k in range(nd)]) for d, a in enumerate(accs[:-1])]
            out = rowmin.view(lead)
            out.copy_(views[0].expand(lead))
            for v in views[1:]:
                torch.minimum(out, v, out=out)
        self._rowmax.zero_()

    def _finish_deep(self) -> None:
        """The leading dimensions' maxima from the row maxima (+0 everywhere when the kernel wrote nothing)."""
        # one op per output, in stream order: blocks cut from one tensor share maxima regions, and a multi-tensor
        # kernel would update those concurrently
        for i, _, rowmax in self._deep_views:
            lead = self._params[i].shape[:-1]
            r = rowmax.view(lead)
            for d in range(len(lead)):
                out = self._maxima[i][d]
                torch.maximum(out, r.amax(dim=tuple(k for k in range(len(lead)) if k != d)), out=out)
