"""Device code of the SM3 update: one program per tile of a block, every op as ``sm3_dist.kernels.math.single_block``.

The kernel reads each block's row of the table at the field offsets of :mod:`.table` (``e + 0`` is ``_F_W``,
...); :class:`~sm3_dist.kernels.cuda.step.TritonPlan` packs and launches it.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    clip,
    PK: tl.constexpr,
    GK: tl.constexpr,
    MK: tl.constexpr,
    WD: tl.constexpr,
    BETA: tl.constexpr,
    EPS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    NUD: tl.constexpr,
    GS: tl.constexpr,
    CLIP: tl.constexpr,
):
    """One tile of the update, op for op as ``single_block``; writes ``w`` and ``m``, returns ``nu``."""
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
    if CLIP:
        # torch's clamp_min then clamp_max on CPU: the bound only where it lies strictly beyond u, so a NaN u
        # stays that NaN and a u equal to the bound stays u (selects, exact on every device)
        u = tl.where(u < -clip, -clip, u)
        u = tl.where(clip < u, clip, u)
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
def _block_tensors(e, ALIGNED: tl.constexpr):
    """A block's parameter and momentum addresses and their dtype kinds: ``(w_addr, m_addr, pkind, mkind)``."""
    w_addr = tl.load(e + 0)
    m_addr = tl.load(e + 1)
    if ALIGNED:  # every address 16-byte aligned, every row a multiple of 8 elements: vector loads and stores
        # (said with shifts, which are identities here and which the compiler's alignment analysis follows)
        w_addr = (w_addr >> 4) << 4
        m_addr = (m_addr >> 4) << 4
    kinds = tl.load(e + 10)
    return w_addr, m_addr, kinds & 15, (kinds >> 4) & 15


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
    clip,
    PK: tl.constexpr,
    GK: tl.constexpr,
    MK: tl.constexpr,
    WD: tl.constexpr,
    BETA: tl.constexpr,
    EPS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    NUD: tl.constexpr,
    GS: tl.constexpr,
    CLIP: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    RI: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Rows ``[RI*BR*rt, RI*BR*(rt+1))`` x columns ``[BC*ct, BC*(ct+1))`` of a ``rows x cols`` block."""
    w_addr, m_addr, pkind, mkind = _block_tensors(e, ALIGNED)
    rowmin_ptr = tl.load(e + 2).to(tl.pointer_type(tl.float32))
    colacc_ptr = tl.load(e + 3).to(tl.pointer_type(tl.float32))
    rowmax_ptr = tl.load(e + 4).to(tl.pointer_type(tl.int32))
    colmax_ptr = tl.load(e + 5).to(tl.pointer_type(tl.int32))
    rows = tl.load(e + 6)
    cols = tl.load(e + 7)
    if ALIGNED:
        cols = (cols >> 3) << 3
    nct = tl.load(e + 8)
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
            clip,
            PK,
            GK,
            MK,
            WD,
            BETA,
            EPS,
            MAXIMIZE,
            NUD,
            GS,
            CLIP,
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
    clip,
    PK: tl.constexpr,
    GK: tl.constexpr,
    MK: tl.constexpr,
    WD: tl.constexpr,
    BETA: tl.constexpr,
    EPS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    NUD: tl.constexpr,
    GS: tl.constexpr,
    CLIP: tl.constexpr,
    VB: tl.constexpr,
    VI: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Elements ``[VI*VB*t, VI*VB*(t+1))`` of a rank-0/1 block: ``nu = mu_0`` plus the square, its own maximum."""
    w_addr, m_addr, pkind, mkind = _block_tensors(e, ALIGNED)
    acc_ptr = tl.load(e + 3).to(tl.pointer_type(tl.float32))
    max_ptr = tl.load(e + 5).to(tl.pointer_type(tl.int32))
    n = tl.load(e + 7)
    if ALIGNED:
        n = (n >> 3) << 3
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
            clip,
            PK,
            GK,
            MK,
            WD,
            BETA,
            EPS,
            MAXIMIZE,
            NUD,
            GS,
            CLIP,
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
    clip,
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
    CLIP: tl.constexpr,
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
                    root, e, g_addr, gkind, t, lr, nud, gs, mom, omm, beta, omb, eps, wd, clip,
                    PK, GK, MK, WD, BETA, EPS, MAXIMIZE, NUD > 0, GS, CLIP, BR, BC, RI, ALIGNED,
                )  # fmt: skip
        if HAS_NARROW:  # noqa: SIM102
            if cls == 1:
                _tile_2d(
                    root, e, g_addr, gkind, t, lr, nud, gs, mom, omm, beta, omb, eps, wd, clip,
                    PK, GK, MK, WD, BETA, EPS, MAXIMIZE, NUD > 0, GS, CLIP, BRN, BCN, RI, ALIGNED,
                )  # fmt: skip
        if HAS_FLAT:  # noqa: SIM102
            if cls == 2:
                _tile_flat(
                    root, e, g_addr, gkind, t, lr, nud, gs, mom, omm, beta, omb, eps, wd, clip,
                    PK, GK, MK, WD, BETA, EPS, MAXIMIZE, NUD > 0, GS, CLIP, VB, VI, ALIGNED and FLAT_ALIGNED,
                )  # fmt: skip
