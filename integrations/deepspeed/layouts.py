"""ZeRO layout recovery: the only reader of DeepSpeed's private attributes.

Maps the flat fp32 tensors DeepSpeed's wrappers hand the base optimizer back
to parameter shapes, through :mod:`sm3_dist.layout`:

* ZeRO-1/2 and ``BF16_Optimizer`` (:func:`hp_mapping_layout`): each model
  parameter's ``_hp_mapping`` (``lp_fragment_address``: where the fragment
  starts in the parameter; ``hp_fragment_address``: where it starts in the fp32
  partition) and ``_dp_group``, cross-checked with where the parameter actually
  lives in the low-precision flat buffer (its storage offset) and the
  partition's bounds ``[rank * partition_size, (rank + 1) * partition_size)``;
  the layout follows the buffer. Round-robin gradient ordering changes these
  offsets, not ownership (DeepSpeed 0.19's ``_hp_mapping`` ignores it).
* ZeRO-3 (:func:`zero3_layout`): the optimizer steps one sub-group at a time on
  ``fp32_partitioned_groups_flat[k]``, which holds the partitions of the
  parameters ``fp16_groups[k]`` back to back; rank ``r`` holds ``[r * ps, (r +
  1) * ps)`` of each parameter's flattening, ``ps = partition_numel()`` (the
  tail past ``ds_numel`` is padding), global shape ``ds_shape``, group
  ``ds_process_group``.
* Stage 0 (fp32) hands over the model parameters themselves; the unfused
  fp16/bf16 wrapper hands over whole fp32 copies of them: no sharding.

A flat tensor none of this explains raises
:class:`~sm3_dist.placement.UnsupportedLayoutError` naming the DeepSpeed version
and ZeRO stage: SM3 never falls back to a diagonal (numel-sized) accumulator.

**A plain** :class:`sm3_dist.SM3` **under ZeRO.** ``deepspeed.initialize(model,
optimizer=SM3(...))`` (and accelerate's DeepSpeed plugin, which calls it)
replaces the optimizer's parameters with these tensors after construction.
SM3's :class:`~sm3_dist.placement.LayoutGuard` asks :func:`explain_swapped`
about every tensor it was not built on: it finds the DeepSpeed wrapper that put
the tensor there (among the callers of the step, else among the tensor's
referrers) and reads the wrapper's own record of its groups' model parameters
(``bit16_groups``, ``bf16_groups``, ``fp16_groups``), then maps the tensor as
above. The layouts, and so the state, are those :class:`DeepSpeedSM3` builds.
"""

from __future__ import annotations

import gc
import inspect
import sys
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sm3_dist.layout import Piece, TensorLayout, flat_range_piece, normalize_shape
from sm3_dist.placement import ShardSpec, UnsupportedLayoutError, local_spec, register_swap_explainer

__all__ = ["explain_swapped", "hp_mapping_layout", "layout_error", "zero3_layout"]

SUPPORTED_DEEPSPEED = ((0, 19, 0), (0, 20, 0))
"""Half-open range ``[low, high)`` of DeepSpeed versions this package has been checked against."""


def layout_error(tensor: Tensor, reason: str, stage: Any = "unknown") -> UnsupportedLayoutError:
    import deepspeed

    low, high = SUPPORTED_DEEPSPEED
    return UnsupportedLayoutError(
        f"DeepSpeed {deepspeed.__version__}, ZeRO stage {stage}: the optimizer tensor of shape "
        f"{tuple(tensor.shape)} is a flat partition whose layout SM3 cannot recover ({reason}). SM3 will not "
        "treat it as a vector (that would silently turn it into diagonal AdaGrad). Supported DeepSpeed: "
        f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
    )


# ---------------------------------------------------------------------- a plain SM3 under ZeRO

_HOLDERS = (
    # (wrapper attribute: the base optimizer's tensors by group, attribute: the model parameters by group, stage)
    ("single_partition_of_fp32_groups", "bit16_groups", "1 or 2"),  # DeepSpeedZeroOptimizer
    ("fp32_groups_flat_partition", "bf16_groups", "1"),  # BF16_Optimizer
    ("fp32_partitioned_groups_flat", "fp16_groups", "3"),  # DeepSpeedZeroOptimizer_Stage3 (sub-groups)
    ("fp32_groups", "fp16_groups", "0"),  # FP16_UnfusedOptimizer: whole fp32 copies, one list per group
)


def explain_swapped(tensor: Tensor, optimizer: Any = None) -> ShardSpec | None:
    """The spec of a tensor a DeepSpeed wrapper put into a plain SM3's param groups; ``None`` if none did.

    ``optimizer``'s ``state_dict`` then carries the piece record
    (:data:`~sm3_dist.integrations.deepspeed.universal.LAYOUT_KEY`) as
    ``DeepSpeedSM3``'s does, so its ZeRO checkpoints convert with ``to_universal``.
    """
    found = _find_holder(tensor)
    if found is None:
        return None
    attrs, (flats_name, models_name, stage), (i, j) = found
    models = attrs[models_name]
    if j is not None:
        model = models[i][j]
        if tuple(model.shape) != tuple(tensor.shape):
            raise layout_error(tensor, f"the fp32 copy of a parameter of shape {tuple(model.shape)}", stage)
        return local_spec(tensor)
    trainable = [p for group in models for p in group]
    tensor_ids = {id(p): k for k, p in enumerate(trainable)}
    plan = tuple(normalize_shape(global_shape(p)) for p in trainable)
    try:
        if stage == "3":
            pieces, group = _zero3_pieces(tensor, attrs[flats_name], models, tensor_ids)
        else:
            pieces, group = hp_mapping_layout(tensor, list(models[i]), tensor_ids)
    except UnsupportedLayoutError as err:
        if stage == "1 or 2" and "partition_gradients" in attrs:
            stage = 2 if attrs["partition_gradients"] else 1
        raise layout_error(tensor, str(err), stage) from None
    if optimizer is not None:
        _record_layouts(optimizer, plan)
    return ShardSpec(TensorLayout(pieces=pieces, numel=tensor.numel()), group=group, plan=plan)


_RECORDING: weakref.WeakSet = weakref.WeakSet()


def _record_layouts(optimizer: Any, plan: tuple[tuple[int, ...], ...]) -> None:
    """Make ``optimizer.state_dict()`` carry the piece record of its ZeRO partitions (once per optimizer)."""
    if optimizer in _RECORDING or not hasattr(optimizer, "register_state_dict_post_hook"):
        return
    from sm3_dist.integrations.deepspeed.universal import LAYOUT_KEY, layout_record

    def add_record(opt: Any, state_dict: dict) -> dict:
        record = layout_record(opt, opt._specs, plan)
        if record is not None:
            state_dict[LAYOUT_KEY] = record
        return state_dict

    optimizer.register_state_dict_post_hook(add_record)
    _RECORDING.add(optimizer)


def _find_holder(tensor: Tensor) -> tuple[dict, tuple[str, str, str], tuple[int, int | None]] | None:
    for attrs in _candidates(tensor):
        for entry in _HOLDERS:
            flats, models = attrs.get(entry[0]), attrs.get(entry[1])
            if not isinstance(flats, list) or not isinstance(models, list):
                continue
            for i, flat in enumerate(flats):
                if flat is tensor:
                    return attrs, entry, (i, None)
                if isinstance(flat, list) and entry[2] == "0":
                    for j, t in enumerate(flat):
                        if t is tensor:
                            return attrs, entry, (i, j)
    return None


def _candidates(tensor: Tensor) -> Iterator[dict]:
    """Attribute dicts of objects that may hold ``tensor``: the callers' ``self`` first, then its referrers."""
    frame = sys._getframe(1)
    try:
        for _ in range(64):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            attrs = getattr(owner, "__dict__", None)
            if isinstance(attrs, dict):
                yield attrs
            frame = frame.f_back
    finally:
        del frame
    seen: set[int] = set()
    lists = [ref for ref in gc.get_referrers(tensor) if isinstance(ref, list)]
    for _ in range(2):  # the list holding the tensor, or (the unfused wrapper) a list of such lists
        outer = []
        for held in lists:
            for ref in gc.get_referrers(held):
                if id(ref) in seen:
                    continue
                seen.add(id(ref))
                attrs = ref if isinstance(ref, dict) else getattr(ref, "__dict__", None)
                if isinstance(attrs, dict):
                    yield attrs
                elif isinstance(ref, list):
                    outer.append(ref)
        lists = outer


register_swap_explainer(explain_swapped)


# ---------------------------------------------------------------------- DeepSpeed metadata readers


def hp_mapping_layout(
    tensor: Tensor, params: Sequence[Tensor], tensor_ids: dict[int, int]
) -> tuple[tuple[Piece, ...], Any]:
    """Pieces of a ZeRO-1/2 (or BF16_Optimizer) fp32 partition.

    The parameters of a group live back to back (in round-robin order, with
    optional alignment padding) in one low-precision flat buffer; this rank's
    fp32 partition is the copy of ``[rank * n, (rank + 1) * n)`` of it, ``n =
    tensor.numel()``, and its gradient is laid out the same way. The pieces
    come from that geometry (each parameter's storage offset in the buffer).
    Each parameter's ``_hp_mapping`` (``lp_fragment_address``,
    ``hp_fragment_address``) must exist and point into ``tensor``; where it
    disagrees with the geometry (DeepSpeed 0.19 with ``round_robin_gradients``)
    a warning says so, and if no parameter agrees the layout is refused.
    """
    groups = {id(getattr(p, "_dp_group", None)) for p in params}
    if len(groups) != 1 or getattr(params[0], "_dp_group", None) is None:
        raise UnsupportedLayoutError("the parameters of the group do not share one _dp_group")
    group = params[0]._dp_group
    rank = dist.get_rank(group)
    size = tensor.numel()
    part_start, part_stop = rank * size, (rank + 1) * size
    storages = {p.untyped_storage().data_ptr() for p in params}
    if len(storages) != 1:
        raise UnsupportedLayoutError("the group's parameters do not share one flat buffer")
    flat_numel = params[0].untyped_storage().nbytes() // params[0].element_size()
    if flat_numel != size * dist.get_world_size(group):
        raise UnsupportedLayoutError(
            f"the flat buffer has {flat_numel} elements, not world size x partition size "
            f"({dist.get_world_size(group)} x {size})"
        )
    pieces, disagreements = [], []
    for p in params:
        if not hasattr(p, "_hp_mapping"):
            raise UnsupportedLayoutError(f"a parameter of shape {tuple(p.shape)} of the group has no _hp_mapping")
        mapping = p._hp_mapping
        if (
            mapping is not None
            and mapping.hp_fragment.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
        ):
            raise UnsupportedLayoutError("an _hp_mapping points into another tensor than the optimizer's partition")
        start = p.storage_offset()
        lo, hi = max(start, part_start), min(start + p.numel(), part_stop)
        expected = (lo - start, hi - lo, lo - part_start) if lo < hi else None
        found = None
        if mapping is not None:
            found = (
                mapping.lp_fragment_address.start,
                mapping.lp_fragment_address.numel,
                mapping.hp_fragment_address.start,
            )
        if found != expected:
            disagreements.append(f"shape {tuple(p.shape)}: _hp_mapping {found}, flat buffer {expected}")
        if expected is not None:
            begin, numel, offset = expected
            pieces.append(flat_range_piece(p.shape, begin, begin + numel, tensor_id=tensor_ids[id(p)], offset=offset))
    if disagreements and len(disagreements) == len(params):
        raise UnsupportedLayoutError(
            "no parameter's _hp_mapping agrees with its place in the flat buffer: " + "; ".join(disagreements)
        )
    if disagreements:
        warn_once(
            "DeepSpeed's _hp_mapping disagrees with where parameters lie in ZeRO's flat buffer (DeepSpeed 0.19 "
            "computes it in parameter order, while round_robin_gradients lays the buffer out in round-robin "
            "order). SM3 follows the buffer, which is what the fp32 partition and its gradient hold; DeepSpeed's "
            "fragment APIs (safe_get_full_fp32_param, universal checkpoints) may be wrong here. (parameter start, "
            "elements, partition start): " + "; ".join(disagreements)
        )
    pieces.sort(key=lambda piece: piece.offset)
    return tuple(pieces), group


def zero3_layout(tensor: Tensor, params: Sequence[Tensor], tensor_ids: dict[int, int]) -> tuple[tuple[Piece, ...], Any]:
    """Pieces of a ZeRO-3 sub-group's fp32 partition, found through the parameters' ``_z3_optimizer``."""
    optimizer = getattr(params[0], "_z3_optimizer", None)
    if optimizer is None:
        raise UnsupportedLayoutError("ZeRO-3 parameters without _z3_optimizer")
    flats = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    sub_groups = getattr(optimizer, "fp16_groups", None)
    return _zero3_pieces(tensor, flats, sub_groups, tensor_ids)


def _zero3_pieces(
    tensor: Tensor, flats: Sequence[Tensor] | None, sub_groups: Sequence[Sequence[Tensor]] | None, tensor_ids
) -> tuple[tuple[Piece, ...], Any]:
    """Pieces of a ZeRO-3 sub-group's fp32 partition ``fp32_partitioned_groups_flat[k]``."""
    if flats is None or sub_groups is None:
        raise UnsupportedLayoutError("the ZeRO-3 optimizer has no fp32_partitioned_groups_flat / fp16_groups")
    index = next((k for k, flat in enumerate(flats) if flat is tensor), None)
    if index is None:
        raise UnsupportedLayoutError("the tensor is none of the ZeRO-3 optimizer's fp32_partitioned_groups_flat")
    members = sub_groups[index]
    groups = {id(p.ds_process_group) for p in members}
    if len(groups) != 1:
        raise UnsupportedLayoutError("a ZeRO-3 sub-group spans several partition groups")
    group = members[0].ds_process_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    pieces, offset = [], 0
    for p in members:
        numel, ps = p.ds_numel, p.partition_numel()
        if ps * world < numel or p.ds_tensor.numel() != ps:
            raise UnsupportedLayoutError(
                f"a parameter of {numel} elements has partitions of {ps} elements at world size {world}"
            )
        start, stop = min(rank * ps, numel), min((rank + 1) * ps, numel)
        if id(p) not in tensor_ids:
            raise UnsupportedLayoutError("a ZeRO-3 sub-group holds a parameter the optimizer was not built on")
        if stop > start:
            pieces.append(flat_range_piece(p.ds_shape, start, stop, tensor_id=tensor_ids[id(p)], offset=offset))
        offset += ps
    if offset != tensor.numel():
        raise UnsupportedLayoutError(
            f"the sub-group's partitions add up to {offset} elements, the fp32 partition has {tensor.numel()}"
        )
    return tuple(pieces), group


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def global_shape(p: Tensor) -> tuple[int, ...]:
    shape = getattr(p, "ds_shape", None)
    return tuple(shape) if shape is not None else tuple(p.shape)


def common_shape(params: Sequence[Tensor], tensor: Tensor) -> torch.Size | None:
    shapes = {tuple(global_shape(p)) for p in params}
    return tensor.shape if tuple(tensor.shape) in shapes else None


def find_engine() -> weakref.ref | None:
    """The DeepSpeed engine building this optimizer from its config, if any (used to name the stage in errors)."""
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError:  # pragma: no cover
        return None
    frame = inspect.currentframe()
    try:
        for _ in range(12):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, DeepSpeedEngine):
                return weakref.ref(owner)
            frame = frame.f_back
    finally:
        del frame
    return None
