"""The block table: dtype codes, the fields of a block's row, tile geometry, and small host helpers.

Each block of a :class:`~sm3_dist.kernels.cuda.step.TritonPlan` is one row of ``_NF`` int64 fields in a device
table; :func:`_block_row` packs it, and the update kernel (:mod:`.update_kernel`) reads the fields at the
offsets ``_F_*`` (``tl.load(e + 0)`` is ``_F_W``, and so on).
"""

from __future__ import annotations

import os
import struct

import torch
from torch import Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# dtype codes of parameters and gradients, and of momentum buffers (0: none)
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MKIND = {None: 0, torch.float32: 1, torch.bfloat16: 2}
_MIXED = -1

# block table fields (int64 each; w and m as byte offsets from the plan's root tensor)
_F_W, _F_M, _F_ROWMIN, _F_COLACC, _F_ROWMAX, _F_COLMAX, _F_ROWS, _F_COLS, _F_NCT, _F_FIRST, _F_KINDS = range(11)
_NF = 12  # the last field is spare (0)
# the block's class (how its tiles are cut), in bits 8.. of the kinds field
_CLS_WIDE, _CLS_NARROW, _CLS_FLAT = 0, 1, 2

# tile geometry: BC columns x BR rows per inner step, RI inner steps per program (constexpr, tunable by --bench)
_WIDE = {"BC": 512, "BR": 2, "RI": 2 if _INTERPRET else 16}
_NARROW_BC = 32
_FLAT = {"VB": 2048, "VI": 1 if _INTERPRET else 4}
_TUNE = [(2, 512, 16, 4), (4, 512, 8, 4), (2, 512, 32, 4), (1, 1024, 32, 4), (2, 1024, 16, 8), (8, 256, 8, 4)]
"""(BR, BC, RI, num_warps) that ``--bench --tune`` tries."""
_WIDE_MIN_COLS = 256
"""Blocks with at least this many columns get tiles ``BC`` wide; narrower ones tiles ``_NARROW_BC`` wide."""
_NUM_WARPS = {"update": 4}
"""``num_warps`` of the update kernel (a dict, so that ``--bench --tune`` can change it)."""


def _f32(x: float) -> float:
    """``x`` rounded to fp32, as torch rounds a Python scalar for an fp32 tensor op."""
    return struct.unpack("f", struct.pack("f", x))[0]


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


def _narrow_rows() -> int:
    """Rows per inner step of the tiles of narrow blocks (``_NARROW_BC`` columns: as many elements as wide)."""
    return max(1, _WIDE["BR"] * _WIDE["BC"] // _NARROW_BC)


def _block_row(p: Tensor, m: Tensor | None, accs, outs, deep, root: int, first: int) -> tuple[list[int], int, int]:
    """One block's table row (``_NF`` int64 fields), its number of programs and its class.

    ``p``, ``m``: the block and its momentum buffer (or ``None``); ``accs``, ``outs``: its accumulator slices
    and maxima buffers; ``deep``: for rank > 2, the (row minima, row maxima) scratch views the kernel uses in
    place of the first accumulator and maxima buffer, else ``None``; ``root``: the address ``w`` and ``m`` are
    offsets from; ``first``: the block's first program.
    """
    numel = p.numel()
    if p.ndim <= 1:
        cls, rows, cols = _CLS_FLAT, 1, numel
        rowmin = rowmax = 0
        nct = 1
        count = -(-numel // (_FLAT["VB"] * _FLAT["VI"]))
    else:
        cols = p.shape[-1]
        rows = numel // cols if cols else 0
        if deep is None:
            rowmin, rowmax = accs[0].data_ptr(), outs[0].data_ptr()
        else:
            rowmin, rowmax = deep[0].data_ptr(), deep[1].data_ptr()
        if cols >= _WIDE_MIN_COLS:
            cls, bc, rpp = _CLS_WIDE, _WIDE["BC"], _WIDE["BR"] * _WIDE["RI"]
        else:
            cls, bc, rpp = _CLS_NARROW, _NARROW_BC, _narrow_rows() * _WIDE["RI"]
        nct = -(-cols // bc)
        count = nct * -(-rows // rpp) if numel else 0
    row = [0] * _NF
    row[_F_W] = p.data_ptr() - root
    row[_F_M] = 0 if m is None else m.data_ptr() - root
    row[_F_ROWMIN] = rowmin
    row[_F_COLACC] = accs[-1].data_ptr()
    row[_F_ROWMAX] = rowmax
    row[_F_COLMAX] = outs[-1].data_ptr()
    row[_F_ROWS] = rows
    row[_F_COLS] = cols
    row[_F_NCT] = nct
    row[_F_FIRST] = first
    row[_F_KINDS] = _KIND[p.dtype] | (_MKIND[None if m is None else m.dtype] << 4) | (cls << 8)
    return row, count, cls
