"""The block plan of a param group: what one step runs, prepared once and reused while nothing changes.

A step of :class:`sm3_dist.SM3` runs one kernel over *blocks*: dense boxes of
the parameters' local tensors (:class:`~sm3_dist.layout.Block`), each with the
slices of the stored accumulators it reads and the maxima targets it writes.
Every layout comes down to the same description:

* a whole tensor (the single-process case, and a DTensor shard on a mesh of
  one rank) is one block, the local tensor itself;
* a dimension shard (FSDP2 ``Shard(d)``) is one block whose maxima go to the
  reducer's buffer at the block's global indices;
* a flat range (ZeRO partitions, FSDP1 flat parameters) is up to
  ``2 * ndim - 1`` blocks, straddled rows included, cut from the flat local
  tensor, whose maxima are collected by max in one target per piece.

The geometry (:class:`BlockRef`, :class:`PieceRef`) is pure data computed from
the :class:`~sm3_dist.placement.ShardSpec`; :class:`GroupPlan` binds it to the
tensors of a param group (parameter and momentum views, accumulator slices,
maxima buffers, the device's fused-kernel plan, the finalizers) together with
the *signature* of what it was built for: the parameters and their storage,
which gradients are present and their dtype and layout, and the identity of
every state tensor. The optimizer rebuilds a group's plan exactly when the
signature changes; otherwise a step re-reads only the gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sm3_dist import functional, fused
from sm3_dist.layout import TensorLayout

__all__ = ["BlockRef", "Finalizer", "GroupPlan", "PieceRef", "block_refs"]


@dataclass(frozen=True, slots=True)
class PieceRef:
    """One piece of a global parameter held by a stepped parameter's local tensor."""

    param: int
    """Position of the parameter among the plan's stepped parameters."""
    piece: int
    """Index of the piece in the parameter's layout."""
    ranges: tuple[tuple[int, int], ...]
    """Stored accumulator range ``(lo, hi)`` per dimension."""
    tensor_id: int
    """The piece's global tensor in its reducer's plan."""
    reduced: bool
    """Whether the maxima go to the reducer's buffer (global indices) rather than a local maxima buffer."""


@dataclass(frozen=True, slots=True)
class BlockRef:
    """One dense block of a stepped parameter's local tensor and where its accumulator reads and maxima go."""

    param: int
    """Position of the parameter among the plan's stepped parameters."""
    piece: int
    """Index of the piece in the parameter's layout."""
    offset: int
    """Element offset of the block in the local flat tensor."""
    lengths: tuple[int, ...]
    """The block's shape."""
    acc_starts: tuple[int, ...]
    """Where the block starts in each stored accumulator slice of its piece."""
    out_starts: tuple[int, ...]
    """Where the block starts in each maxima target: the global index (reduced) or the index in the piece's
    stored range (local)."""
    whole: bool
    """The block is the local tensor itself: no view to cut, the gradient used as it comes."""


def block_refs(
    param: int, layout: TensorLayout, local_shape: Sequence[int], reduced: bool
) -> tuple[tuple[PieceRef, ...], tuple[BlockRef, ...]]:
    """The pieces and non-empty blocks of one parameter's local tensor, in storage order."""
    pieces, blocks = [], []
    local_shape = tuple(local_shape)
    whole_tensor = len(layout.pieces) == 1 and len(layout.pieces[0].blocks) == 1
    for j, piece in enumerate(layout.pieces):
        pieces.append(PieceRef(param, j, piece.ranges, piece.tensor_id, reduced))
        for block in piece.blocks:
            if block.numel == 0:
                continue
            los = [lo for lo, _ in piece.ranges]
            whole = whole_tensor and block.offset == 0 and block.lengths == (local_shape or (1,))
            blocks.append(
                BlockRef(
                    param=param,
                    piece=j,
                    offset=block.offset,
                    lengths=block.lengths,
                    acc_starts=tuple(s - lo for s, lo in zip(block.starts, los)),
                    out_starts=block.starts if reduced else tuple(s - lo for s, lo in zip(block.starts, los)),
                    whole=whole,
                )
            )
    return tuple(pieces), tuple(blocks)


class Finalizer:
    """``accumulators <- maxima`` (their max under ``keep_max``) unless ``found_inf``, for fixed lists of tensors.

    Through the device's fused kernel's prepared finalize (one launch) where it
    has one and the tensors are fp32, else :func:`sm3_dist.functional.finalize_`.
    """

    def __init__(self, accumulators: Sequence[Tensor], maxima: Sequence[Tensor]) -> None:
        self.accumulators = list(accumulators)
        self.maxima = list(maxima)
        self._plan = None
        if self.accumulators:
            kernel = fused.fused_kernel(self.accumulators[0].device.type)
            make = None if kernel is None else kernel.finalize_plan
            if make is not None and all(t.dtype == torch.float32 for t in (*self.accumulators, *self.maxima)):
                self._plan = make(self.accumulators, self.maxima)

    def __call__(self, *, keep_max: bool, found_inf: Tensor | None, zero_maxima: bool) -> None:
        if not self.accumulators:
            return
        if self._plan is not None:
            self._plan.run(keep_max=keep_max, found_inf=found_inf, zero_maxima=zero_maxima)
        else:
            functional.finalize_(
                self.accumulators, self.maxima, keep_max=keep_max, found_inf=found_inf, zero_maxima=zero_maxima
            )


@dataclass(frozen=True, slots=True, eq=False)
class GroupPlan:
    """A param group's step, bound to its tensors (see the module docstring)."""

    signature: tuple
    """What the plan was built for (see :meth:`sm3_dist.SM3._signature`)."""
    kernel: str
    """``"fused"``, ``"foreach"`` or ``"single"`` (:func:`sm3_dist.fused.default_kernel`)."""
    stepped: tuple[int, ...]
    """Positions in ``group["params"]`` of the parameters with a dense gradient."""
    sparse: tuple[int, ...]
    """Positions in ``group["params"]`` of the parameters with a sparse gradient."""
    pieces: tuple[PieceRef, ...]
    blocks: tuple[BlockRef, ...]
    params: tuple[Tensor, ...]
    """Per block, the view of the local parameter."""
    momentum_buffers: tuple[Tensor | None, ...]
    accumulators: tuple[tuple[Tensor, ...], ...]
    """Per block, the slices of the stored accumulators it reads."""
    maxima_out: tuple[tuple[Tensor, ...], ...]
    """Per block, the regions of its maxima targets (zeroed before the kernel; it collects by max)."""
    steps: tuple[Tensor, ...]
    """The step counts of the stepped (and sparse) parameters."""
    step_owners: tuple[int, ...]
    """Positions in ``group["params"]`` of the parameters whose counts :attr:`steps` are."""
    counts: Tensor | None
    """On an accelerator, the one tensor whose elements ``steps`` are views of (one add counts a step)."""
    uniform_steps: bool
    """Whether every stepped parameter has the same step count (one bias-correction divisor for the group)."""
    local: Finalizer
    """Stored accumulators of unreduced pieces <- their local maxima, after the kernel."""
    reduced: Finalizer
    """Stored accumulators of reduced pieces <- their reduced maxima, after the all-reduce."""
    fused: Any = None
    """The device's fused-kernel plan over the blocks :attr:`fused_blocks` (``None``: no fused plan)."""
    fused_blocks: tuple[int, ...] = ()
    other_blocks: tuple[int, ...] = ()
    """Blocks the kernel runs through :func:`sm3_dist.functional.sm3` each step (all of them without a fused plan)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def block_grads(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """Per block, its gradient: the stepped parameter's local gradient, or the block's view of it."""
        out = []
        flat: dict[int, Tensor] = {}
        for b in self.blocks:
            g = grads[b.param]
            if b.whole:
                out.append(g)
                continue
            f = flat.get(b.param)
            if f is None:
                f = flat[b.param] = g.reshape(-1)  # a view when contiguous; a read-only copy otherwise
            n = 1
            for k in b.lengths:
                n *= k
            out.append(f[b.offset : b.offset + n].view(b.lengths))
        return out
