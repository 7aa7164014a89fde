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
as the native CPU kernel views it (:mod:`sm3_dist._native`). A program takes a
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
:func:`sm3_dist.functional._single_block` (``tl.sqrt_rn``, ``tl.div_rn``, the
kernel compiled with ``enable_fp_fusion=False``: no multiply-add contraction;
bf16 stores rounded to nearest even with integer operations), so the results
are bitwise those of the eager kernel. Under ``TRITON_INTERPRET=1`` (set before
``triton`` is imported) the same kernels run on CPU tensors.

``python -m sm3_dist._triton --check`` compares the kernel on a CUDA device with
the eager CPU kernel; ``--bench`` times it against ``torch.optim.Adam(fused=True)``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import struct
from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "FinalizePlan",
    "NonfinitePlan",
    "TritonPlan",
    "available",
    "check",
    "finalize_",
    "nonfinite_",
]

logger = logging.getLogger(__name__)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# dtype codes of parameters and gradients, and of momentum buffers (0: none)
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MKIND = {None: 0, torch.float32: 1, torch.bfloat16: 2}
_MIXED = -1

# block table fields (int64 each; w and m as byte offsets from the plan's root tensor)
_F_W, _F_M, _F_ROWMIN, _F_COLACC, _F_ROWMAX, _F_COLMAX, _F_ROWS, _F_COLS, _F_NCT, _F_FIRST, _F_KINDS = range(11)
_NF = 12
# the block's class (how its tiles are cut), in bits 8.. of the kinds field
_CLS_WIDE, _CLS_NARROW, _CLS_FLAT = 0, 1, 2

# tile geometry: BC columns x BR rows per inner step, RI inner steps per program (constexpr, tunable by --bench)
_WIDE = {"BC": 512, "BR": 2, "RI": 2 if _INTERPRET else 16}
_NARROW_BC = 32
_FLAT = {"VB": 2048, "VI": 1 if _INTERPRET else 4}
_NUM_WARPS = 4
_TUNE = [(2, 512, 16, 4), (4, 512, 8, 4), (2, 512, 32, 4), (1, 1024, 32, 4), (2, 1024, 16, 8), (8, 256, 8, 4)]
"""(BR, BC, RI, num_warps) that ``--bench --tune`` tries."""
_WIDE_MIN_COLS = 256
"""Blocks with at least this many columns get tiles ``BC`` wide; narrower ones tiles ``_NARROW_BC`` wide."""


def available() -> bool:
    """Whether the kernels can run here: triton imports (it did) and there is a CUDA device or the interpreter."""
    return _INTERPRET or torch.cuda.is_available()


def _f32(x: float) -> float:
    """``x`` rounded to fp32, as torch rounds a Python scalar for an fp32 tensor op."""
    return struct.unpack("f", struct.pack("f", x))[0]


# ---------------------------------------------------------------------------------------------------------------
# device code


@triton.jit
def _bf16_to_f32(bits):
    return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16(x):
    """Round to nearest even, NaN to 0x7FC0, as ``c10::BFloat16`` does (integer operations: exact everywhere)."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + ((u >> 16) & 1) + 0x7FFF) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.uint16)


@triton.jit
def _load_kind(root, addr, base, offs, mask, KIND: tl.constexpr):
    if KIND == 0:
        x = tl.load((root + addr).to(tl.pointer_type(tl.float32), bitcast=True) + base + offs, mask=mask, other=0.0)
    elif KIND == 1:
        x = _bf16_to_f32(
            tl.load((root + addr).to(tl.pointer_type(tl.uint16), bitcast=True) + base + offs, mask=mask, other=0)
        )
    else:
        x = tl.load((root + addr).to(tl.pointer_type(tl.float16), bitcast=True) + base + offs, mask=mask, other=0.0).to(
            tl.float32
        )
    return x


@triton.jit
def _load(root, addr, base, offs, mask, kind, KIND: tl.constexpr):
    """An fp32/bf16/fp16 tensor's elements as fp32: ``KIND`` when all blocks share it, else ``kind`` at run time."""
    if KIND >= 0:
        x = _load_kind(root, addr, base, offs, mask, KIND)
    else:
        if kind == 0:
            x = _load_kind(root, addr, base, offs, mask, 0)
        elif kind == 1:
            x = _load_kind(root, addr, base, offs, mask, 1)
        else:
            x = _load_kind(root, addr, base, offs, mask, 2)
    return x


@triton.jit
def _store_kind(root, addr, base, offs, x, mask, KIND: tl.constexpr):
    if KIND == 0:
        tl.store((root + addr).to(tl.pointer_type(tl.float32), bitcast=True) + base + offs, x, mask=mask)
    elif KIND == 1:
        tl.store((root + addr).to(tl.pointer_type(tl.uint16), bitcast=True) + base + offs, _f32_to_bf16(x), mask=mask)
    else:
        tl.store((root + addr).to(tl.pointer_type(tl.float16), bitcast=True) + base + offs, x.to(tl.float16), mask=mask)


@triton.jit
def _store(root, addr, base, offs, x, mask, kind, KIND: tl.constexpr):
    if KIND >= 0:
        _store_kind(root, addr, base, offs, x, mask, KIND)
    else:
        if kind == 0:
            _store_kind(root, addr, base, offs, x, mask, 0)
        elif kind == 1:
            _store_kind(root, addr, base, offs, x, mask, 1)
        else:
            _store_kind(root, addr, base, offs, x, mask, 2)


@triton.jit
def _nu_bits(nu, mask):
    """``nu`` (``+0..+inf`` or NaN) as int32 bit patterns that order as the values do; 0 outside ``mask``."""
    bits = nu.to(tl.int32, bitcast=True)
    bits = tl.where(nu != nu, 0x7FC00000, bits)
    return tl.where(mask, bits, 0)


@triton.jit
def _update(
    root,
    w_addr,
    g_addr,
    m_addr,
    base,
    offs,
    mask,
    mn,
    pkind,
    gkind,
    mkind,
    lr,
    nud,
    gs,
    mom,
    omm,
    beta,
    omb,
    eps,
    wd,
    PK: tl.constexpr,
    GK: tl.constexpr,
    MK: tl.constexpr,
    WD: tl.constexpr,
    BETA: tl.constexpr,
    EPS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    NUD: tl.constexpr,
    GS: tl.constexpr,
):
    """One tile of the update, op for op as ``_single_block``; writes ``w`` and ``m``, returns ``nu``."""
    g = _load(root, g_addr, base, offs, mask, gkind, GK)
    if GS:
        g = tl.div_rn(g, gs)
    if MAXIMIZE:
        g = g * -1.0
    w = _load(root, w_addr, base, offs, mask, pkind, PK)
    if WD:
        g = g + w * wd
    sq = g * g
    if BETA:
        nu = mn * beta + sq * omb
    else:
        nu = mn + sq
    if NUD:
        nh = tl.div_rn(nu, nud)
    else:
        nh = nu
    if EPS:
        u = tl.div_rn(1.0, tl.sqrt_rn(nh + eps)) * g
    else:
        u = tl.where(nh > 0, g * tl.div_rn(1.0, tl.sqrt_rn(nh)), 0.0)
    upd = u * lr
    if MK > 0:
        m = _load(root, m_addr, base, offs, mask, MK - 1, MK - 1)
        m = m * mom + u * omm
        _store(root, m_addr, base, offs, m, mask, MK - 1, MK - 1)
        upd = m * lr
    elif MK < 0:  # noqa: SIM102 (a constexpr test, then a run-time one)
        if mkind != 0:
            m = _load(root, m_addr, base, offs, mask, mkind - 1, -1)
            m = m * mom + u * omm
            _store(root, m_addr, base, offs, m, mask, mkind - 1, -1)
            upd = m * lr
    _store(root, w_addr, base, offs, w - upd, mask, pkind, PK)
    return nu


@triton.jit
def _tile_2d(
    root,
    e,
    g_addr,
    gkind,
    t,
    lr,
    nud,
    gs,
    mom,
    omm,
    beta,
    omb,
    eps,
    wd,
    PK: tl.constexpr,
    GK: tl.constexpr,
    MK: tl.constexpr,
    WD: tl.constexpr,
    BETA: tl.constexpr,
    EPS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    NUD: tl.constexpr,
    GS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    RI: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Rows ``[RI*BR*rt, RI*BR*(rt+1))`` x columns ``[BC*ct, BC*(ct+1))`` of a ``rows x cols`` block."""
    w_addr = tl.load(e + 0)
    m_addr = tl.load(e + 1)
    if ALIGNED:  # every address 16-byte aligned, every row a multiple of 8 elements: vector loads and stores
        # (said with shifts, which are identities here and which the compiler's alignment analysis follows)
        w_addr = (w_addr >> 4) << 4
        m_addr = (m_addr >> 4) << 4
    rowmin_ptr = tl.load(e + 2).to(tl.pointer_type(tl.float32))
    colacc_ptr = tl.load(e + 3).to(tl.pointer_type(tl.float32))
    rowmax_ptr = tl.load(e + 4).to(tl.pointer_type(tl.int32))
    colmax_ptr = tl.load(e + 5).to(tl.pointer_type(tl.int32))
    rows = tl.load(e + 6)
    cols = tl.load(e + 7)
    if ALIGNED:
        cols = (cols >> 3) << 3
    nct = tl.load(e + 8)
    kinds = tl.load(e + 10)
    pkind = kinds & 15
    mkind = (kinds >> 4) & 15
    rt = t // nct
    ct = t - rt * nct
    c0 = ct * BC
    j = tl.arange(0, BC)
    cmask = j < cols - c0  # constant over runs of 8 columns when ALIGNED: loads stay vectors
    colacc = tl.load(colacc_ptr + c0 + j, mask=cmask, other=0.0)
    cols32 = cols.to(tl.int32)
    colbits = tl.zeros([BR, BC], dtype=tl.int32)
    i = tl.arange(0, BR)
    offs = i[:, None] * cols32 + j[None, :]
    for it in range(RI):
        r0 = (rt * RI + it) * BR
        rmask = i < rows - r0
        rowmin = tl.load(rowmin_ptr + r0 + i, mask=rmask, other=0.0)
        mn = tl.minimum(rowmin[:, None], colacc[None, :], propagate_nan=tl.PropagateNan.ALL)
        base = r0 * cols + c0
        mask = rmask[:, None] & cmask[None, :]
        nu = _update(
            root,
            w_addr,
            g_addr,
            m_addr,
            base,
            offs,
            mask,
            mn,
            pkind,
            gkind,
            mkind,
            lr,
            nud,
            gs,
            mom,
            omm,
            beta,
            omb,
            eps,
            wd,
            PK,
            GK,
            MK,
            WD,
            BETA,
            EPS,
            MAXIMIZE,
            NUD,
            GS,
        )
        bits = _nu_bits(nu, mask)
        tl.atomic_max(rowmax_ptr + r0 + i, tl.max(bits, axis=1), mask=rmask, sem="relaxed")
        colbits = tl.maximum(colbits, bits)
    tl.atomic_max(colmax_ptr + c0 + j, tl.max(colbits, axis=0), mask=cmask, sem="relaxed")


@triton.jit
def _tile_flat(
    root,
    e,
    g_addr,
    gkind,
    t,
    lr,
    nud,
    gs,
    mom,
    omm,
    beta,
    omb,
    eps,
    wd,
    PK: tl.constexpr,
    GK: tl.constexpr,
    MK: tl.constexpr,
    WD: tl.constexpr,
    BETA: tl.constexpr,
    EPS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    NUD: tl.constexpr,
    GS: tl.constexpr,
    VB: tl.constexpr,
    VI: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Elements ``[VI*VB*t, VI*VB*(t+1))`` of a rank-0/1 block: ``nu = mu_0`` plus the square, its own maximum."""
    w_addr = tl.load(e + 0)
    m_addr = tl.load(e + 1)
    if ALIGNED:
        w_addr = (w_addr >> 4) << 4
        m_addr = (m_addr >> 4) << 4
    acc_ptr = tl.load(e + 3).to(tl.pointer_type(tl.float32))
    max_ptr = tl.load(e + 5).to(tl.pointer_type(tl.int32))
    n = tl.load(e + 7)
    if ALIGNED:
        n = (n >> 3) << 3
    kinds = tl.load(e + 10)
    pkind = kinds & 15
    mkind = (kinds >> 4) & 15
    j = tl.arange(0, VB)
    for it in range(VI):
        base = (t * VI + it) * VB
        mask = j < n - base
        mn = tl.load(acc_ptr + base + j, mask=mask, other=0.0)
        nu = _update(
            root,
            w_addr,
            g_addr,
            m_addr,
            base,
            j,
            mask,
            mn,
            pkind,
            gkind,
            mkind,
            lr,
            nud,
            gs,
            mom,
            omm,
            beta,
            omb,
            eps,
            wd,
            PK,
            GK,
            MK,
            WD,
            BETA,
            EPS,
            MAXIMIZE,
            NUD,
            GS,
        )
        tl.atomic_max(max_ptr + base + j, _nu_bits(nu, mask), mask=mask, sem="relaxed")


@triton.jit
def _sm3_step_kernel(
    root,
    tab,
    gtab,
    prog_block,
    lr_ptr,
    lr_val,
    nud_ptr,
    nud_val,
    fi_ptr,
    gs_ptr,
    mom,
    omm,
    beta,
    omb,
    eps,
    wd,
    NF: tl.constexpr,
    PK: tl.constexpr,
    GK: tl.constexpr,
    MK: tl.constexpr,
    WD: tl.constexpr,
    BETA: tl.constexpr,
    EPS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    LR_T: tl.constexpr,
    NUD: tl.constexpr,
    FI: tl.constexpr,
    GS: tl.constexpr,
    HAS_WIDE: tl.constexpr,
    HAS_NARROW: tl.constexpr,
    HAS_FLAT: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    RI: tl.constexpr,
    BRN: tl.constexpr,
    BCN: tl.constexpr,
    VB: tl.constexpr,
    VI: tl.constexpr,
    FLAT_ALIGNED: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    if FI:
        go = tl.load(fi_ptr) == 0.0
    else:
        go = True
    if go:
        if LR_T:
            lr = tl.load(lr_ptr)
        else:
            lr = lr_val
        if NUD == 2:
            nud = tl.load(nud_ptr)
        else:
            nud = nud_val
        if GS:
            gs = tl.load(gs_ptr)
        else:
            gs = 1.0
        b = tl.load(prog_block + pid).to(tl.int64)
        e = tab + b * NF
        t = pid - tl.load(e + 9)
        cls = (tl.load(e + 10) >> 8) & 15
        g_addr = tl.load(gtab + 2 * b)
        if ALIGNED:
            g_addr = (g_addr >> 4) << 4
        gkind = tl.load(gtab + 2 * b + 1)
        if HAS_WIDE:  # noqa: SIM102
            if cls == 0:
                _tile_2d(
                    root, e, g_addr, gkind, t, lr, nud, gs, mom, omm, beta, omb, eps, wd,
                    PK, GK, MK, WD, BETA, EPS, MAXIMIZE, NUD > 0, GS, BR, BC, RI, ALIGNED,
                )  # fmt: skip
        if HAS_NARROW:  # noqa: SIM102
            if cls == 1:
                _tile_2d(
                    root, e, g_addr, gkind, t, lr, nud, gs, mom, omm, beta, omb, eps, wd,
                    PK, GK, MK, WD, BETA, EPS, MAXIMIZE, NUD > 0, GS, BRN, BCN, RI, ALIGNED,
                )  # fmt: skip
        if HAS_FLAT:  # noqa: SIM102
            if cls == 2:
                _tile_flat(
                    root, e, g_addr, gkind, t, lr, nud, gs, mom, omm, beta, omb, eps, wd,
                    PK, GK, MK, WD, BETA, EPS, MAXIMIZE, NUD > 0, GS, VB, VI, ALIGNED and FLAT_ALIGNED,
                )  # fmt: skip


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


# ---------------------------------------------------------------------------------------------------------------
# host side

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


def _upload(values: list[int], device: torch.device, out: Tensor | None = None) -> Tensor:
    """An int64 device tensor of ``values`` without a host synchronization (pinned source, asynchronous copy)."""
    if device.type != "cuda":
        host = torch.tensor(values, dtype=torch.int64)
        if out is None:
            return host.to(device)
        out.copy_(host)
        return out
    host = torch.tensor(values, dtype=torch.int64, pin_memory=True)
    if out is None:
        out = torch.empty(len(values), dtype=torch.int64, device=device)
    out.copy_(host, non_blocking=True)  # the caching host allocator keeps `host` until the copy is done
    return out


def _common_kind(kinds: list[int]) -> int:
    return kinds[0] if kinds and all(k == kinds[0] for k in kinds) else _MIXED


def _scalar_arg(value, name: str, device: torch.device) -> tuple[Tensor | None, float]:
    """A hyperparameter given as a Python number or a 1-element device tensor: ``(tensor or None, fp32 value)``."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a 1-element tensor, got a tensor of shape {tuple(value.shape)}"
            )
        if value.device != device:
            raise ValueError(f"{name} is on {value.device}, the blocks on {device}")
        if value.dtype != torch.float32:
            value = value.to(torch.float32)
        return value.reshape(1), 0.0
    return None, _f32(float(value))


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
        rows_per_wide = _WIDE["BR"] * _WIDE["RI"]
        rows_per_narrow = self._narrow_rows() * _WIDE["RI"]
        first = 0
        for i, p in enumerate(self._params):
            accs, outs = self._accumulators[i], self._maxima[i]
            numel = p.numel()
            if p.ndim <= 1:
                cls, rows, cols = _CLS_FLAT, 1, numel
                rowmin = rowmax = 0
                nct = 1
                count = -(-numel // (_FLAT["VB"] * _FLAT["VI"]))
            else:
                cols = p.shape[-1]
                rows = numel // cols if cols else 0
                if p.ndim == 2:
                    rowmin, rowmax = accs[0].data_ptr(), outs[0].data_ptr()
                else:
                    rowmin, rowmax = rowmin_views[i].data_ptr(), rowmax_views[i].data_ptr()
                if cols >= _WIDE_MIN_COLS:
                    cls, bc, rpp = _CLS_WIDE, _WIDE["BC"], rows_per_wide
                else:
                    cls, bc, rpp = _CLS_NARROW, _NARROW_BC, rows_per_narrow
                nct = -(-cols // bc)
                count = nct * -(-rows // rpp) if numel else 0
            if count:
                classes.add(cls)
            m = self._buffers[i]
            kinds = pkinds[i] | (mkinds[i] << 4) | (cls << 8)
            table += [
                p.data_ptr() - root,
                0 if m is None else m.data_ptr() - root,
                rowmin,
                accs[-1].data_ptr(),
                rowmax,
                outs[-1].data_ptr(),
                rows,
                cols,
                nct,
                first,
                kinds,
                0,
            ]
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

    @staticmethod
    def _narrow_rows() -> int:
        return max(1, _WIDE["BR"] * _WIDE["BC"] // _NARROW_BC)

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

        ``rule``: an :class:`~sm3_dist.rule.UpdateRule`. ``lr``, ``nu_divisor``: numbers or 1-element device
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
                HAS_WIDE=_CLS_WIDE in self._classes,
                HAS_NARROW=_CLS_NARROW in self._classes,
                HAS_FLAT=_CLS_FLAT in self._classes,
                BR=_WIDE["BR"],
                BC=_WIDE["BC"],
                RI=_WIDE["RI"],
                BRN=self._narrow_rows(),
                BCN=_NARROW_BC,
                VB=_FLAT["VB"],
                VI=_FLAT["VI"],
                FLAT_ALIGNED=self._flat_aligned,
                num_warps=_NUM_WARPS,
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


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equal, NaN payloads apart (NaN at the same places)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().cpu(), b.detach().cpu()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return False
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return torch.equal(a.view(ints)[~nan_a], b.view(ints)[~nan_b])


def _check_cases():
    from sm3_dist.rule import UpdateRule

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    mixed = [(1000, 256), (256,), (64, 1024), (1024, 64), (300, 3), (3, 5, 7), (2, 3, 4, 300), (7,), ()]
    return [
        ("fp32, momentum 0.9", dict(shapes=mixed, p=f32, m=f32, rule=UpdateRule(momentum=0.9))),
        (
            "bf16 params and momentum, weight decay, maximize",
            dict(shapes=mixed, p=bf16, m=bf16, rule=UpdateRule(momentum=0.9, weight_decay=0.01, maximize=True)),
        ),
        ("fp16 params, tiny gradients (subnormal results)", dict(shapes=mixed, p=f16, m=f32, tiny=True)),
        ("fp32, subnormal gradients and accumulators", dict(shapes=mixed, p=f32, m=None, tiny=True, tiny_acc=True)),
        (
            "eps 0, beta 0.9, nu_divisor, grad_scale and lr as tensors",
            dict(shapes=mixed, p=f32, m=f32, rule=UpdateRule(momentum=0.9, beta=0.9, eps=0.0), tensors=True),
        ),
        (
            "flat ranges straddling rows, keep_max",
            dict(shapes=mixed, p=f32, m=f32, rule=UpdateRule(momentum=0.5, beta=0.9), cuts=(0.21, 0.6), keep=True),
        ),
        ("found_inf set: nothing written", dict(shapes=mixed, p=bf16, m=f32, found_inf=1.0)),
    ]


def _flat_blocks(tensors, accs, outs, cuts):
    """Each tensor cut into flat ranges at the fractions ``cuts`` of its size (blocks straddle rows)."""
    from sm3_dist.layout import split_flat_range

    blocks = []  # (tensor index, flat start, view shape, accumulator slices, maxima slices)
    for k, (t, a, o) in enumerate(zip(tensors, accs, outs)):
        n = t.numel()
        bounds = sorted({0, n, *(min(n, max(0, int(f * n))) for f in cuts)}) if n > 1 else [0, n]
        for lo, hi in itertools.pairwise(bounds):
            for b in split_flat_range(t.shape, lo, hi):
                start = lo + b.offset
                if t.ndim <= 1:
                    sl = [slice(start, start + b.numel)]
                    shape = (b.numel,) if t.ndim else ()
                else:
                    sl = [slice(s, s + m) for s, m in zip(b.starts, b.lengths)]
                    shape = b.lengths
                blocks.append((k, start, shape, [x[s] for x, s in zip(a, sl)], [x[s] for x, s in zip(o, sl)]))
    return blocks


def _run_check_case(spec: dict, device: torch.device, steps: int = 2) -> dict:
    from sm3_dist import functional
    from sm3_dist.rule import UpdateRule

    gen = torch.Generator().manual_seed(0)
    rule = spec.get("rule", UpdateRule())
    shapes = spec["shapes"]
    params = [torch.randn(s, generator=gen).to(spec["p"]) for s in shapes]
    bufs = [None if spec["m"] is None else (0.1 * torch.randn(s, generator=gen)).to(spec["m"]) for s in shapes]
    lengths = [list(s) if len(s) >= 2 else [math.prod(s)] for s in shapes]
    accs = [[torch.rand(n, generator=gen) for n in ls] for ls in lengths]
    if spec.get("tiny_acc"):
        accs = [[a * 1e-38 for a in aa] for aa in accs]
    grads = []
    for _ in range(steps):
        gs = [torch.randn(s, generator=gen) for s in shapes]
        if spec.get("tiny"):
            for g in gs:
                g.view(-1)[::3] *= 1e-20
                g.view(-1)[1::3] *= 1e-4
        grads.append([g.to(spec["p"]) for g in gs])
    tensors = spec.get("tensors", False)
    found = spec.get("found_inf")
    keep = spec.get("keep", False)
    # on the device: the kernel
    d_params = [p.to(device) for p in params]
    d_bufs = [None if m is None else m.to(device) for m in bufs]
    d_accs = [[a.to(device) for a in aa] for aa in accs]
    d_outs = [[torch.zeros_like(a) for a in aa] for aa in d_accs]
    if spec.get("cuts"):
        cut = _flat_blocks(d_params, d_accs, d_outs, spec["cuts"])
        b_params = [d_params[k].view(-1)[s : s + math.prod(v)].view(v) for k, s, v, _, _ in cut]
        b_bufs = [
            None if d_bufs[k] is None else d_bufs[k].view(-1)[s : s + math.prod(v)].view(v) for k, s, v, _, _ in cut
        ]
        b_accs, b_outs = [c[3] for c in cut], [c[4] for c in cut]
    else:
        cut = None
        b_params, b_bufs, b_accs, b_outs = d_params, d_bufs, d_accs, d_outs
    plan = TritonPlan.build(b_params, b_bufs, b_accs, b_outs)
    if plan is None:
        return {"ok": False, "error": f"TritonPlan.build refused: {TritonPlan.reason}"}
    finalize = FinalizePlan([a for aa in d_accs for a in aa], [o for oo in d_outs for o in oo])
    flag = None if found is None else torch.full((1,), found, device=device)
    scale, divisor = 512.0, 0.271
    for step, gs in enumerate(grads):
        lr = 0.01 * (step + 1)
        d_gs = [g.to(device) for g in gs]
        if cut is not None:
            d_gs = [d_gs[k].view(-1)[s : s + math.prod(v)].view(v) for k, s, v, _, _ in cut]
        kw = {}
        if tensors:
            kw = dict(
                nu_divisor=torch.full((1,), divisor, device=device),
                grad_scale=torch.full((1,), scale, device=device),
            )
            lr = torch.full((1,), lr, device=device)
        plan.step(d_gs, rule, lr=lr, found_inf=flag, **kw)
        finalize.run(keep_max=keep, found_inf=flag)
    # on CPU: the eager kernel
    for step, gs in enumerate(grads):
        if found:
            break
        lr = 0.01 * (step + 1)
        nud, gsc = (torch.tensor(divisor), torch.tensor(scale)) if tensors else (None, None)
        if tensors:
            lr = torch.tensor(lr)
        for p, g, m, aa in zip(params, gs, bufs, accs):
            if p.ndim == 0:
                p, g, m = p.view(1), g.view(1), None if m is None else m.view(1)
            maxima = functional._single_block(p, g, m, aa, rule, lr, nud, gsc)
            functional.store_maxima(list(aa), list(maxima), keep)
    bad = []
    for k in range(len(shapes)):
        if not _same_bits(d_params[k], params[k]):
            bad.append(f"param {k} {tuple(shapes[k])}")
        if bufs[k] is not None and not _same_bits(d_bufs[k], bufs[k]):
            bad.append(f"momentum {k}")
        for d, (x, y) in enumerate(zip(d_accs[k], accs[k])):
            if not _same_bits(x, y):
                bad.append(f"accumulator {k}.{d}")
    return {"ok": not bad, "mismatches": bad}


def check(device: str | torch.device = "cuda") -> list[dict]:
    """The kernels on ``device`` against the eager CPU kernel, bitwise, on a few shapes and settings.

    Returns one dict per case: ``name``, ``ok`` and the ``mismatches`` (what differed) or an ``error``.
    """
    device = torch.device(device)
    results = []
    for name, spec in _check_cases():
        try:
            r = _run_check_case(spec, device)
        except Exception as exc:  # reported, not raised: the other cases still run
            r = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        results.append({"name": name, **r})
    # the non-finite scan: each position of an inf/NaN, in each dtype
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        found_all = True
        for where in (0, 4095, 4096, 9999):
            ts = [torch.randn(n, device=device).to(dtype) for n in (10, 10000, 3)]
            flag = torch.zeros(1, device=device)
            nonfinite_(ts, flag)
            clean = float(flag.item()) == 0.0
            ts[1][where] = float("nan") if where % 2 else float("-inf")
            nonfinite_(ts, flag)
            found_all = found_all and clean and float(flag.item()) == 1.0
        results.append({"name": f"nonfinite_ {str(dtype).removeprefix('torch.')}", "ok": found_all})
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, steps: int, rounds: int, device: torch.device) -> float:
    """Median over ``rounds`` of the mean time of ``steps`` back-to-back calls, in ms (device synchronized)."""
    import statistics
    import time

    samples = []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3 / steps)
    return statistics.median(samples)


def _copy_bandwidth(device: torch.device, mib: int = 1024) -> float:
    """Bytes per second of a large fp32 copy (read and write counted)."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = _time_ms(lambda: dst.copy_(src), 5, 5, device)
    return 2 * src.numel() * 4 / (ms / 1e3)


def bench(
    shapes: Sequence[Sequence[int]],
    *,
    device: str = "cuda",
    steps: int = 10,
    rounds: int = 7,
    tune: bool = False,
    dump: str | None = None,
) -> list[dict]:
    """The plan's step (with the finalize launch) against ``torch.optim.Adam(fused=True)`` on the same parameters.

    fp32 parameters, momentum 0.9 in fp32. Rows: name, ms per step, ratio to Adam, bytes moved, % of the copy
    bandwidth bound. SM3 moves ``20 * numel`` (reads w, g, m; writes w, m) plus the accumulators and maxima;
    Adam ``28 * numel``.
    """
    from sm3_dist.rule import UpdateRule

    device = torch.device(device)
    torch.manual_seed(0)
    params = [torch.randn(*s, device=device) for s in shapes]
    grads = [torch.randn_like(p) for p in params]
    numel = sum(p.numel() for p in params)
    sum_dims = sum(sum(p.shape) if p.ndim >= 2 else p.numel() for p in params)
    bufs = [torch.zeros_like(p) for p in params]
    accs = [[torch.zeros(n, device=device) for n in (p.shape if p.ndim >= 2 else (p.numel(),))] for p in params]
    outs = [[torch.zeros_like(a) for a in aa] for aa in accs]
    plan = TritonPlan.build(params, bufs, accs, outs)
    if plan is None:
        raise RuntimeError(f"TritonPlan.build refused the set: {TritonPlan.reason}")
    finalize = FinalizePlan([a for aa in accs for a in aa], [o for oo in outs for o in oo])
    scan = NonfinitePlan(grads)
    flag = torch.zeros(1, device=device)
    rule = UpdateRule(momentum=0.9)

    def sm3_step():
        plan.step(grads, rule, lr=1e-4)
        finalize.run(keep_max=False)

    def sm3_step_skip():  # the default non-finite handling: scan, and skip on the device
        flag.zero_()
        scan.run(flag)
        plan.step(grads, rule, lr=1e-4, found_inf=flag)
        finalize.run(keep_max=False, found_inf=flag)

    def kernel_only():
        plan.step(grads, rule, lr=1e-4)

    rows = []
    bandwidth = _copy_bandwidth(device, 1024 if device.type == "cuda" else 16)
    sm3_bytes = 20 * numel + 8 * sum_dims
    if tune:
        global _NUM_WARPS
        saved = (dict(_WIDE), _NUM_WARPS)
        best = None
        for br, bc, ri, nw in _TUNE:
            _WIDE.update(BR=br, BC=bc, RI=ri)
            _NUM_WARPS = nw
            plan = TritonPlan.build(params, bufs, accs, outs)  # tile geometry is part of the table
            kernel_only()
            ms = _time_ms(kernel_only, steps, 3, device)
            print(f"[tune] BR={br} BC={bc} RI={ri} warps={nw}: {ms:.3f} ms kernel", flush=True)
            if best is None or ms < best[0]:
                best = (ms, br, bc, ri, nw)
        _WIDE.update(BR=best[1], BC=best[2], RI=best[3])
        _NUM_WARPS = best[4]
        print(f"[tune] best: BR={best[1]} BC={best[2]} RI={best[3]} warps={best[4]} ({best[0]:.3f} ms)", flush=True)
        plan = TritonPlan.build(params, bufs, accs, outs)
        del saved
    for fn in (sm3_step, sm3_step_skip, kernel_only):
        fn()
    syncs = "none" if device.type == "cuda" else "not checked (no CUDA device)"
    ptx = getattr(_LAST.get("kernel"), "asm", {}).get("ptx", "") if device.type == "cuda" else ""
    if ptx:
        import re

        print(f"[ptx] aligned variant: {plan._aligned()} (hints on: {_ALIGN_HINTS['on']})", flush=True)
        if dump:
            os.makedirs(dump, exist_ok=True)
            for key, text in _LAST["kernel"].asm.items():
                if isinstance(text, str):
                    with open(os.path.join(dump, f"sm3_step.{key}"), "w") as f:
                        f.write(text)

        kinds = sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx)))
        print("[ptx] " + ", ".join(f"{k} x{ptx.count(k + ' ')}" for k in kinds), flush=True)
    try:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        sm3_step()
        sm3_step_skip()
    except RuntimeError as exc:
        syncs = f"host synchronization: {exc}"
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    adam_params = [p.clone().requires_grad_() for p in params]
    for p, g in zip(adam_params, grads):
        p.grad = g
    adam = torch.optim.Adam(adam_params, lr=1e-4, fused=True)
    adam.step()
    timed = [
        ("adam fused", adam.step, 28 * numel),
        ("sm3 triton m=0.9, no non-finite check (2 launches)", sm3_step, sm3_bytes),
        ("sm3 triton m=0.9, non-finite skip (4 launches)", sm3_step_skip, sm3_bytes + 4 * numel),
        ("sm3 triton update kernel alone", kernel_only, sm3_bytes),
    ]
    ms_adam = None
    for name, fn, moved in timed:
        ms = _time_ms(fn, steps, rounds, device)
        ms_adam = ms if ms_adam is None else ms_adam
        bound = moved / bandwidth * 1e3
        rows.append(
            {
                "name": name,
                "ms": ms,
                "vs_adam": ms / ms_adam,
                "moved_mb": moved / 1e6,
                "bound_ms": bound,
                "pct_of_bound": 100 * bound / ms,
            }
        )
    print(
        f"{numel / 1e6:.1f}M parameters in {len(params)} tensors on "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else device}; "
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; host syncs inside an SM3 step: {syncs}"
    )
    print("| step | ms/step | vs Adam fused | MB moved | bound ms | % of bound |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['ms']:.3f} | {r['vs_adam']:.2f}x | {r['moved_mb']:.0f} | {r['bound_ms']:.3f} "
            f"| {r['pct_of_bound']:.0f}% |"
        )
    return rows


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sm3_dist._triton", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare the kernels with the eager CPU kernel")
    parser.add_argument("--bench", action="store_true", help="time the step against Adam(fused=True)")
    parser.add_argument("--tune", action="store_true", help="with --bench: try a few tile shapes first")
    parser.add_argument("--params", default="50257,1024,24", help="VOCAB,WIDTH,BLOCKS of the GPT-like set")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dump", metavar="DIR", help="with --bench: write the update kernel's IR and PTX there")
    args = parser.parse_args(argv)
    if not (args.check or args.bench):
        parser.error("give --check and/or --bench")
    status = 0
    if args.check:
        results = check(args.device)
        for r in results:
            detail = r.get("error") or ", ".join(r.get("mismatches", []))
            print(f"[check] {'ok  ' if r['ok'] else 'FAIL'} {r['name']}{': ' + detail if detail else ''}", flush=True)
        status = 0 if all(r["ok"] for r in results) else 1
    if args.bench:
        from sm3_dist.bench import gpt_shapes

        vocab, width, blocks = (int(x) for x in args.params.split(","))
        bench(
            gpt_shapes(vocab, width, blocks),
            device=args.device,
            steps=args.steps,
            rounds=args.rounds,
            tune=args.tune,
            dump=args.dump,
        )
    return status


if __name__ == "__main__":
    raise SystemExit(_main())
