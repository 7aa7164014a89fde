"""Shard geometry: which part of a parameter a rank holds, as data.

Every form a local piece of a parameter takes is described by the same two
frozen dataclasses:

* :class:`Block` - a dense box of the global parameter (a start and a length per
  dimension) stored contiguously in the local tensor. A block is what the math
  in :mod:`sm3_dist.kernels.math` runs on: a strided view with the box's shape.
* :class:`Piece` - the part of one global parameter held locally: the blocks it
  consists of and, per dimension, the range of accumulator entries it touches.

A whole parameter, a dimension shard of a DTensor (``Shard(d)`` on any mesh
axis, uneven and empty shards included) and a flat range ``[start, stop)`` of
the row-major flattening (DeepSpeed ZeRO partitions, FSDP1 flat parameters)
are all a :class:`Piece`; a local tensor that holds pieces of several
parameters (a ZeRO flat partition) is a :class:`TensorLayout` of several
pieces. No per-element index tensors are ever built: a flat range splits into
at most ``2 * ndim - 1`` blocks (:func:`split_flat_range`).

This module is pure geometry: it never touches tensors or process groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Block",
    "Piece",
    "TensorLayout",
    "box_piece",
    "flat_range_piece",
    "full_piece",
    "normalize_shape",
    "split_flat_range",
]


def normalize_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape SM3 works on: a scalar is treated as a vector of one element."""
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"a shape cannot have negative sizes, got {shape}")
    return shape or (1,)


@dataclass(frozen=True, slots=True)
class Block:
    """A dense box of a global parameter, stored contiguously in local memory."""

    offset: int
    """Element offset of the block's first element in the local flat tensor."""
    starts: tuple[int, ...]
    """Global index of the box's first element, one entry per dimension."""
    lengths: tuple[int, ...]
    """Extent of the box along each dimension."""

    @property
    def numel(self) -> int:
        return math.prod(self.lengths)


@dataclass(frozen=True, slots=True)
class Piece:
    """The part of one global parameter that a rank holds.

    ``ranges[d] = (lo, hi)`` is the range of entries of the accumulator ``mu_d``
    that the piece stores: the hull of the indices its blocks touch along ``d``
    (empty, ``(0, 0)``, for an empty piece). ``mu_d`` is stored for exactly
    those entries.
    """

    tensor_id: int
    """Index of the global parameter in the reduction plan shared by all ranks."""
    shape: tuple[int, ...]
    """Global shape of the parameter (scalars as ``(1,)``)."""
    offset: int
    """Element offset of the piece in the local flat tensor."""
    numel: int
    """Number of local elements in the piece."""
    blocks: tuple[Block, ...]
    """Dense boxes the piece consists of, in local storage order."""
    ranges: tuple[tuple[int, int], ...]
    """Stored accumulator range ``(lo, hi)`` per dimension."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_full(self) -> bool:
        """Whether the piece is the whole parameter."""
        return self.numel == math.prod(self.shape)

    @property
    def accumulator_numel(self) -> int:
        return sum(hi - lo for lo, hi in self.ranges)


@dataclass(frozen=True, slots=True)
class TensorLayout:
    """How a local tensor maps onto global parameters: one piece or several."""

    pieces: tuple[Piece, ...]
    """Pieces in local storage order; elements outside every piece are padding."""
    numel: int
    """Number of elements of the local tensor (padding included)."""

    def __post_init__(self) -> None:
        end = 0
        for piece in self.pieces:
            if piece.offset < end:
                raise ValueError(f"pieces of a layout overlap or are out of order: {self.pieces}")
            end = piece.offset + piece.numel
        if end > self.numel:
            raise ValueError(f"pieces end at element {end}, past the local tensor's {self.numel} elements")


def _hull(blocks: Sequence[Block], ndim: int) -> tuple[tuple[int, int], ...]:
    nonempty = [b for b in blocks if b.numel > 0]
    if not nonempty:
        return tuple((0, 0) for _ in range(ndim))
    return tuple(
        (min(b.starts[d] for b in nonempty), max(b.starts[d] + b.lengths[d] for b in nonempty)) for d in range(ndim)
    )


def box_piece(
    shape: Sequence[int], starts: Sequence[int], lengths: Sequence[int], *, tensor_id: int = 0, offset: int = 0
) -> Piece:
    """A dense box of a parameter: a dimension shard (DTensor ``Shard(d)``) or a whole tensor.

    The local tensor holds the box in row-major order. Along a dimension whose
    box is empty, nothing is touched; the stored ranges of the other dimensions
    are still the box's (so a ``(0, n)`` shard of an ``(m, n)`` weight stores
    ``mu_1`` in full, as a replicated accumulator must).
    """
    shape = normalize_shape(shape)
    starts = tuple(int(s) for s in starts) or (0,)
    lengths = tuple(int(n) for n in lengths) or (1,)
    if not (len(shape) == len(starts) == len(lengths)):
        raise ValueError(f"box of rank {len(starts)}/{len(lengths)} for a parameter of shape {shape}")
    for d, (n, s, k) in enumerate(zip(shape, starts, lengths)):
        if k < 0 or s < 0 or s + k > n:
            raise ValueError(f"box [{s}, {s + k}) along dim {d} lies outside the parameter's extent {n}")
    block = Block(offset=offset, starts=starts, lengths=lengths)
    ranges = tuple((s, s + k) for s, k in zip(starts, lengths))
    return Piece(tensor_id=tensor_id, shape=shape, offset=offset, numel=block.numel, blocks=(block,), ranges=ranges)


def full_piece(shape: Sequence[int], *, tensor_id: int = 0, offset: int = 0) -> Piece:
    """The whole parameter."""
    shape = normalize_shape(shape)
    return box_piece(shape, (0,) * len(shape), shape, tensor_id=tensor_id, offset=offset)


def split_flat_range(shape: Sequence[int], start: int, stop: int) -> tuple[Block, ...]:
    """Split ``[start, stop)`` of a row-major tensor into dense blocks.

    The result is at most ``2 * ndim - 1`` blocks: a partial leading slab, a
    run of full slabs and a partial trailing slab, applied recursively. Block
    offsets count from ``start``.
    """
    shape = normalize_shape(shape)
    numel = math.prod(shape)
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"flat range [{start}, {stop}) lies outside a parameter of shape {shape} ({numel} elements)")
    blocks: list[Block] = []

    def split(dim: int, prefix: tuple[int, ...], base: int, lo: int, hi: int) -> None:
        # [lo, hi) counts within the sub-tensor shape[dim:] whose first element is global flat index `base`.
        rest = shape[dim + 1 :]
        ones = (1,) * len(prefix)
        if lo == hi:
            return
        if not rest:
            blocks.append(Block(offset=base + lo - start, starts=(*prefix, lo), lengths=(*ones, hi - lo)))
            return
        slab = math.prod(rest)
        first, last = lo // slab, (hi - 1) // slab
        if first == last:
            split(dim + 1, (*prefix, first), base + first * slab, lo - first * slab, hi - first * slab)
            return
        full_from = first if lo % slab == 0 else first + 1
        full_to = last + 1 if hi % slab == 0 else last
        if full_from != first:
            split(dim + 1, (*prefix, first), base + first * slab, lo - first * slab, slab)
        if full_from < full_to:
            blocks.append(
                Block(
                    offset=base + full_from * slab - start,
                    starts=(*prefix, full_from, *(0,) * len(rest)),
                    lengths=(*ones, full_to - full_from, *rest),
                )
            )
        if full_to != last + 1:
            split(dim + 1, (*prefix, last), base + last * slab, 0, hi - last * slab)

    split(0, (), 0, start, stop)
    return tuple(blocks)


def flat_range_piece(shape: Sequence[int], start: int, stop: int, *, tensor_id: int = 0, offset: int = 0) -> Piece:
    """Elements ``[start, stop)`` of the row-major flattening of a parameter.

    ``offset`` is where the range begins in the local flat tensor (a ZeRO
    partition holds several parameters back to back).
    """
    shape = normalize_shape(shape)
    blocks = tuple(
        Block(offset=b.offset + offset, starts=b.starts, lengths=b.lengths)
        for b in split_flat_range(shape, start, stop)
    )
    return Piece(
        tensor_id=tensor_id,
        shape=shape,
        offset=offset,
        numel=stop - start,
        blocks=blocks,
        ranges=_hull(blocks, len(shape)),
    )
