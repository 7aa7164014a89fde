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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sm3_dist.comm import MaxReducer
from sm3_dist.kernels import dispatch, registry
from sm3_dist.kernels.rule import UpdateRule
from sm3_dist.layout import TensorLayout

__all__ = [
    "BlockRef",
    "Finalizer",
    "GroupPlan",
    "PieceRef",
    "block_refs",
    "block_views",
    "fused_plan_for",
    "maxima_targets",
    "plan_signature",
    "stack_step_counts",
]


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
    has one and the tensors are fp32, else :func:`sm3_dist.dispatch.finalize_`.
    """

    def __init__(self, accumulators: Sequence[Tensor], maxima: Sequence[Tensor]) -> None:
        self.accumulators = list(accumulators)
        self.maxima = list(maxima)
        self._plan = None
        if self.accumulators:
            kernel = registry.fused_kernel(self.accumulators[0].device.type)
            make = None if kernel is None else kernel.finalize_plan
            if make is not None and all(t.dtype == torch.float32 for t in (*self.accumulators, *self.maxima)):
                self._plan = make(self.accumulators, self.maxima)

    def __call__(self, *, keep_max: bool, found_inf: Tensor | None, zero_maxima: bool) -> None:
        if not self.accumulators:
            return
        if self._plan is not None:
            self._plan.run(keep_max=keep_max, found_inf=found_inf, zero_maxima=zero_maxima)
        else:
            dispatch.finalize_(
                self.accumulators, self.maxima, keep_max=keep_max, found_inf=found_inf, zero_maxima=zero_maxima
            )


@dataclass(frozen=True, slots=True, eq=False)
class GroupPlan:
    """A param group's step, bound to its tensors (see the module docstring)."""

    signature: tuple
    """What the plan was built for (see :func:`plan_signature`)."""
    kernel: str
    """``"fused"``, ``"foreach"`` or ``"single"`` (:func:`sm3_dist.registry.default_kernel`)."""
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
    """Blocks the kernel runs through :func:`sm3_dist.dispatch.sm3` each step (all of them without a fused plan)."""
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

    def count_step(self, one_step: Tensor | None) -> None:
        """One more step for every stepped parameter (none where ``found_inf`` is set on the device)."""
        increment = 1.0 if one_step is None else one_step
        if self.counts is not None:
            self.counts.add_(increment)
        elif all(type(t) is Tensor for t in self.steps):
            if isinstance(increment, Tensor):
                torch._foreach_add_(list(self.steps), [increment.to(t.device) for t in self.steps])
            else:
                torch._foreach_add_(list(self.steps), increment)
        else:
            for t in self.steps:
                t.add_(increment)

    def nu_divisors(self, rule: UpdateRule) -> list[tuple[Any, tuple[int, ...] | None]]:
        """The bias-correction divisors of this step: ``[(divisor, blocks or None for all)]``.

        One for the group when its step counts agree (the usual case; on an accelerator computed there from
        the count, no host synchronization); else one per distinct count, each for its blocks.
        """
        if not rule.bias_correction or rule.beta == 0.0:
            return [(None, None)]
        first = self.steps[0]
        if self.uniform_steps and first.device.type not in dispatch.HOST_READ_DEVICES:
            # 1 - beta ** step in fp64, as UpdateRule.nu_divisor computes it on the host (the kernels round it)
            power = torch.pow(rule.beta, first.reshape(()).to(torch.float64))
            return [(power.neg_().add_(1.0), None)]
        counts = [int(s) for s in self.steps]  # host reads (a synchronization only for unequal device counts)
        count_of = dict(zip(self.step_owners, counts))
        by_count: dict[int, list[int]] = {}
        for i, b in enumerate(self.blocks):
            by_count.setdefault(count_of[self.stepped[b.param]], []).append(i)
        if len(by_count) <= 1:
            return [(rule.nu_divisor(counts[0]), None)]
        return [(rule.nu_divisor(c), tuple(blocks)) for c, blocks in by_count.items()]


# ---------------------------------------------------------------------------------------------- building a plan


def _local(t: Tensor) -> Tensor:
    """The local tensor of a DTensor (its storage, without ``to_local``'s autograd wrapper: the step runs under
    ``no_grad`` and only reads and writes the data); anything else as it is."""
    local = getattr(t, "_local_tensor", None)
    return t if local is None else local


def plan_signature(group: dict[str, Any], state: Mapping[Tensor, dict[str, Any]]) -> tuple[tuple, list[Tensor | None]]:
    """What a group's plan depends on, and the local gradients (one pass over the parameters).

    Per parameter: the parameter and its local tensor (their identity and storage), whether it has a
    gradient and the gradient's dtype, shape, layout and sparsity, and the identity of every state tensor;
    per group: whether there is momentum, the kernel flags and ``capturable``.
    """
    params = group["params"]
    locals_ = [_local(p) for p in params]
    grads = [None if g is None else _local(g) for g in [p.grad for p in params]]
    states = [state.get(p) for p in params]
    sig = (
        group["momentum"] > 0.0,
        group["foreach"],
        group["fused"],
        group.get("capturable", False),
        tuple(map(id, params)),
        tuple([t.data_ptr() for t in locals_]),
        tuple([(t.shape, t.is_contiguous()) for t in locals_]),
        tuple([None if g is None else (g.layout, g.dtype, g.shape, g.is_sparse or g.is_contiguous()) for g in grads]),
        tuple([None if st is None else len(st) for st in states]),
        tuple([id(v) for st in states if st is not None for v in st.values()]),
    )
    return sig, grads


def maxima_targets(
    pieces: Sequence[PieceRef],
    stored: Sequence[Sequence[Sequence[Tensor]]],
    reducers: Sequence[MaxReducer | None],
    device: torch.device,
) -> tuple[dict[tuple[int, int], list[Tensor]], Finalizer, Finalizer]:
    """Where each piece's maxima go, per dimension: its reducer's buffer at the global indices for reduced pieces,
    one zeroed local buffer per dtype otherwise; and the finalizers of the local and of the reduced pieces.

    ``stored[k][j]`` are the stored accumulators of piece ``j`` of stepped parameter ``k``, ``reducers[k]`` its
    reducer (``None``: not reduced)."""
    local_sizes: dict[torch.dtype, int] = {}
    for pr in pieces:
        if not pr.reduced:
            dtype = stored[pr.param][pr.piece][0].dtype
            local_sizes[dtype] = local_sizes.get(dtype, 0) + sum(hi - lo for lo, hi in pr.ranges)
    buffers = {dt: torch.zeros(n, dtype=dt, device=device) for dt, n in local_sizes.items()}
    used = dict.fromkeys(buffers, 0)
    targets: dict[tuple[int, int], list[Tensor]] = {}
    local_accs, local_maxima, reduced_accs, reduced_maxima = [], [], [], []
    for pr in pieces:
        accs = stored[pr.param][pr.piece]
        if pr.reduced:
            slots = [reducers[pr.param].slot(pr.tensor_id, d) for d in range(len(pr.ranges))]
            targets[pr.param, pr.piece] = slots
            for acc, slot, (lo, hi) in zip(accs, slots, pr.ranges):
                if hi > lo:
                    reduced_accs.append(acc)
                    reduced_maxima.append(slot[lo:hi])
        else:
            dtype = accs[0].dtype
            regions = []
            for lo, hi in pr.ranges:
                regions.append(buffers[dtype][used[dtype] : used[dtype] + hi - lo])
                used[dtype] += hi - lo
            targets[pr.param, pr.piece] = regions
            local_accs += [a for a, r in zip(accs, regions) if r.numel()]
            local_maxima += [r for r in regions if r.numel()]
    return targets, Finalizer(local_accs, local_maxima), Finalizer(reduced_accs, reduced_maxima)


def block_views(
    blocks: Sequence[BlockRef],
    tensors: Sequence[tuple[Tensor, Tensor | None]],
    stored: Sequence[Sequence[Sequence[Tensor]]],
    targets: Mapping[tuple[int, int], Sequence[Tensor]],
) -> tuple[list[Tensor], list[Tensor | None], list[tuple[Tensor, ...]], list[tuple[Tensor, ...]]]:
    """Per block: the view of the local parameter and of its momentum (``tensors[k]``: those of stepped
    parameter ``k``), the slices of the stored accumulators it reads and the regions of its maxima targets."""
    params, bufs, accs, outs = [], [], [], []
    flat: dict[int, tuple[Tensor, Tensor | None]] = {}
    for b in blocks:
        local, buf = tensors[b.param]
        target = targets[b.param, b.piece]
        accs.append(tuple(a[s : s + n] for a, s, n in zip(stored[b.param][b.piece], b.acc_starts, b.lengths)))
        outs.append(tuple(t[s : s + n] for t, s, n in zip(target, b.out_starts, b.lengths)))
        if b.whole:
            params.append(local)
            bufs.append(buf)
            continue
        if b.param not in flat:
            flat[b.param] = (local.view(-1), None if buf is None else buf.view(-1))
        fp, fm = flat[b.param]
        n = math.prod(b.lengths)
        params.append(fp[b.offset : b.offset + n].view(b.lengths))
        bufs.append(None if fm is None else fm[b.offset : b.offset + n].view(b.lengths))
    return params, bufs, accs, outs


def fused_plan_for(
    params: Sequence[Tensor],
    bufs: Sequence[Tensor | None],
    accs: Sequence[Sequence[Tensor]],
    outs: Sequence[Sequence[Tensor]],
    block_grads: Sequence[Tensor],
) -> tuple[Any, tuple[int, ...], tuple[int, ...]]:
    """The device's fused-kernel plan over the blocks it takes as they are (contiguous, of its dtypes):
    ``(plan or None, its blocks, the other blocks)``."""
    kernel = registry.require_fused_kernel(params)
    take = [
        i
        for i, (p, g, m) in enumerate(zip(params, block_grads, bufs))
        if kernel.takes(p, g, m) and p.is_contiguous() and g.is_contiguous() and (m is None or m.is_contiguous())
    ]
    plan = None
    if take:
        plan = kernel.build(
            [params[i] for i in take],
            [bufs[i] for i in take],
            [list(accs[i]) for i in take],
            [list(outs[i]) for i in take],
        )
    if plan is None:
        return None, (), tuple(range(len(params)))
    chosen = set(take)
    return plan, tuple(take), tuple(i for i in range(len(params)) if i not in chosen)


def stack_step_counts(steps: Sequence[Tensor]) -> tuple[Tensor | None, list[Tensor]]:
    """On one accelerator, the step counts as one tensor and each count a 0-d view of its element (one add
    counts a step): ``(that tensor, the views)``; elsewhere ``(None, the counts as they are)``."""
    host = dispatch.HOST_READ_DEVICES
    if (
        steps
        and all(type(s) is Tensor and s.device.type not in host for s in steps)
        and len({s.device for s in steps}) == 1
    ):
        counts = torch.stack(list(steps))
        return counts, list(counts.unbind())
    return None, list(steps)
