"""Shard geometry on its own: flat ranges split into dense blocks, boxes, layouts, bad input."""

from __future__ import annotations

import itertools
import math

import pytest

from sm3_dist.layout import (
    Block,
    Piece,
    TensorLayout,
    box_piece,
    flat_range_piece,
    full_piece,
    normalize_shape,
    split_flat_range,
)

# rank 0 (a scalar is treated as a vector of one element) to rank 4, with size-1 and size-0 dims
SHAPES = [(), (7,), (1,), (3, 5), (5, 1), (1, 6), (2, 3, 4), (4, 1, 3), (2, 3, 2, 3), (0, 4), (3, 0, 2)]


def _flat_index(shape: tuple[int, ...], idx: tuple[int, ...]) -> int:
    flat = 0
    for i, n in zip(idx, shape):
        flat = flat * n + i
    return flat


def _block_indices(shape: tuple[int, ...], block: Block) -> list[int]:
    """Global flat indices of a block's elements, in the block's row-major (storage) order."""
    axes = [range(s, s + n) for s, n in zip(block.starts, block.lengths)]
    return [_flat_index(shape, idx) for idx in itertools.product(*axes)]


def _all_ranges(numel: int):
    return [(a, b) for a in range(numel + 1) for b in range(a, numel + 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_flat_range_tiles_in_order(shape):
    norm = normalize_shape(shape)
    numel = math.prod(norm)
    ndim = len(norm)
    for start, stop in _all_ranges(numel):
        blocks = split_flat_range(shape, start, stop)
        assert len(blocks) <= 2 * ndim - 1, (shape, start, stop, blocks)
        covered: list[int] = []
        for block in blocks:
            assert block.numel > 0, f"empty block in the split of [{start}, {stop}) of {shape}: {blocks}"
            assert len(block.starts) == len(block.lengths) == ndim
            for d, (s, n) in enumerate(zip(block.starts, block.lengths)):
                assert s >= 0 and s + n <= norm[d], (shape, block)
            assert block.offset == len(covered), "block offsets must count local storage from the range's start"
            covered.extend(_block_indices(norm, block))
        assert covered == list(range(start, stop)), (shape, start, stop, blocks)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_flat_range_piece_hull_and_offsets(shape):
    norm = normalize_shape(shape)
    numel = math.prod(norm)
    for start, stop in _all_ranges(numel):
        piece = flat_range_piece(shape, start, stop, tensor_id=3, offset=11)
        assert (piece.tensor_id, piece.shape, piece.offset, piece.numel) == (3, norm, 11, stop - start)
        assert piece.is_full == (stop - start == numel)
        indices = [tuple(int(i) for i in idx) for idx in itertools.product(*(range(n) for n in norm))]
        touched = indices[start:stop]
        if touched:
            hull = tuple((min(t[d] for t in touched), max(t[d] for t in touched) + 1) for d in range(len(norm)))
        else:
            hull = tuple((0, 0) for _ in norm)
        assert piece.ranges == hull, (shape, start, stop)
        assert piece.accumulator_numel == sum(hi - lo for lo, hi in hull)
        plain = split_flat_range(shape, start, stop)
        assert [b.offset - 11 for b in piece.blocks] == [b.offset for b in plain]
        assert [(b.starts, b.lengths) for b in piece.blocks] == [(b.starts, b.lengths) for b in plain]


# (shape, range, expected blocks as (offset, starts, lengths)): the leading slab / full slabs / trailing slab split
SPLITS = [
    ((3, 4), (0, 12), [(0, (0, 0), (3, 4))]),
    ((3, 4), (2, 10), [(0, (0, 2), (1, 2)), (2, (1, 0), (1, 4)), (6, (2, 0), (1, 2))]),
    ((3, 4), (4, 8), [(0, (1, 0), (1, 4))]),
    ((3, 4), (5, 7), [(0, (1, 1), (1, 2))]),
    ((3, 4), (3, 12), [(0, (0, 3), (1, 1)), (1, (1, 0), (2, 4))]),
    (
        (2, 3, 4),
        (5, 19),
        [
            (0, (0, 1, 1), (1, 1, 3)),
            (3, (0, 2, 0), (1, 1, 4)),
            (7, (1, 0, 0), (1, 1, 4)),
            (11, (1, 1, 0), (1, 1, 3)),
        ],
    ),
    ((2, 3, 4), (3, 24), [(0, (0, 0, 3), (1, 1, 1)), (1, (0, 1, 0), (1, 2, 4)), (9, (1, 0, 0), (1, 3, 4))]),
    ((), (0, 1), [(0, (0,), (1,))]),
    ((5,), (2, 2), []),
]


@pytest.mark.parametrize(("shape", "rng", "expected"), SPLITS, ids=lambda x: str(x))
def test_split_known_cases(shape, rng, expected):
    blocks = split_flat_range(shape, *rng)
    assert [(b.offset, b.starts, b.lengths) for b in blocks] == expected


BOXES = [
    # shape, starts, lengths, expected ranges
    ((6, 4), (2, 0), (3, 4), ((2, 5), (0, 4))),
    ((6, 4), (0, 1), (6, 2), ((0, 6), (1, 3))),
    # an empty (0, n) dimension shard still stores the replicated accumulator of the other dim in full
    ((6, 4), (6, 0), (0, 4), ((6, 6), (0, 4))),
    ((2, 3, 5), (0, 0, 3), (2, 3, 2), ((0, 2), (0, 3), (3, 5))),
    ((), (), (), ((0, 1),)),
]


@pytest.mark.parametrize(("shape", "starts", "lengths", "ranges"), BOXES, ids=str)
def test_box_piece(shape, starts, lengths, ranges):
    piece = box_piece(shape, starts, lengths, tensor_id=2, offset=5)
    assert piece.ranges == ranges
    assert piece.numel == math.prod(lengths or (1,))
    (block,) = piece.blocks
    assert (block.offset, block.starts, block.lengths) == (5, tuple(starts) or (0,), tuple(lengths) or (1,))
    assert piece.tensor_id == 2 and piece.offset == 5


def test_full_piece():
    piece = full_piece((3, 4, 5))
    assert piece.is_full and piece.ranges == ((0, 3), (0, 4), (0, 5)) and piece.accumulator_numel == 12
    assert full_piece(()).shape == (1,)


def test_layout_of_several_pieces():
    a = flat_range_piece((3, 4), 7, 12, tensor_id=0, offset=0)
    b = flat_range_piece((5,), 0, 3, tensor_id=1, offset=5)
    layout = TensorLayout(pieces=(a, b), numel=10)  # two trailing padding elements
    assert layout.pieces == (a, b)


BAD = [
    (lambda: split_flat_range((3, 4), -1, 2), "outside a parameter"),
    (lambda: split_flat_range((3, 4), 0, 13), "outside a parameter"),
    (lambda: split_flat_range((3, 4), 5, 4), "outside a parameter"),
    (lambda: flat_range_piece((2, 2), 3, 5), "outside a parameter"),
    (lambda: split_flat_range((), 0, 2), "outside a parameter"),
    (lambda: normalize_shape((3, -1)), "negative sizes"),
    (lambda: box_piece((6, 4), (5, 0), (2, 4)), "lies outside"),
    (lambda: box_piece((6, 4), (-1, 0), (1, 4)), "lies outside"),
    (lambda: box_piece((6, 4), (0, 0), (1, -1)), "lies outside"),
    (lambda: box_piece((6, 4), (0,), (1,)), "box of rank"),
    (
        lambda: TensorLayout(pieces=(flat_range_piece((4,), 0, 4), flat_range_piece((4,), 0, 4, offset=2)), numel=8),
        "overlap",
    ),
    (lambda: TensorLayout(pieces=(flat_range_piece((4,), 0, 4, offset=1),), numel=4), "past the local tensor"),
]


@pytest.mark.parametrize(("make", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_input(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_dataclasses_are_frozen():
    piece = full_piece((2, 2))
    with pytest.raises(AttributeError):
        piece.numel = 3  # type: ignore[misc]
    assert isinstance(piece, Piece)
