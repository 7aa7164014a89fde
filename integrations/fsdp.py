"""FSDP1 (``FullyShardedDataParallel``) shard layouts for SM3.

With ``use_orig_params=True`` FSDP1 hands the optimizer its original
parameters, but each one's data is a 1-D view of the rank's piece of a flat
parameter: elements ``[start, stop)`` of the parameter's row-major
flattening, or nothing. The original parameters carry no pointer back to
their flat parameter, so SM3 cannot find the layout on its own; this module
reads it from FSDP's shard metadata::

    from sm3_dist import SM3
    from sm3_dist.integrations.fsdp import fsdp1_shard_resolver

    model = FSDP(module, use_orig_params=True, ...)
    optimizer = SM3(model.parameters(), lr=0.1, shard_resolver=fsdp1_shard_resolver(model))

Each original parameter becomes one flat-range piece
(:func:`sm3_dist.layout.flat_range_piece`) reduced over the FSDP module's
process group (the shard group under ``HYBRID_SHARD``). Every rank declares
the same reduction plan: the global shapes of all original parameters of
the wrapped model, in FSDP's traversal order, whatever the rank holds.
With ``use_orig_params=False`` the optimizer sees the flat parameters
themselves; each becomes a layout of several pieces (padding left alone).
``NO_SHARD`` parameters are whole tensors.

Checkpoints: FSDP1's optimizer state-dict conversion (``FSDP.optim_state_dict``,
and ``torch.distributed.checkpoint.state_dict.get_state_dict`` on an FSDP1
model) assumes state shaped like the parameters (Adam's) and rejects SM3's
per-dimension accumulators with an assertion; resharding SM3 state is
supported under FSDP2, whose state is DTensors. Under FSDP1 each rank's
``optimizer.state_dict()`` resumes at the same world size and wrapping.

SM3 built without the resolver on FSDP1 parameters raises
:class:`~sm3_dist.UnsupportedLayoutError` instead of treating the 1-D views as
whole vectors (which would silently give per-element accumulators).

Nothing here communicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from sm3_dist.layout import TensorLayout, flat_range_piece, full_piece
from sm3_dist.placement import ShardSpec, SpecResolver, UnsupportedLayoutError

__all__ = ["fsdp1_shard_resolver"]


@dataclass(frozen=True, slots=True)
class _OrigParam:
    """One original parameter inside an FSDP1 flat parameter, as this rank holds it."""

    param: Tensor | None
    """The original parameter variable (``None`` with ``use_orig_params=False``)."""
    fqn: str
    """Its name relative to the FSDP module that flattened it."""
    shape: tuple[int, ...]
    """Its global shape."""
    start: int
    """First element of the parameter's flattening held locally."""
    stop: int
    """One past the last element held locally (``start == stop``: none)."""
    offset: int
    """Where the held elements begin in the local flat shard."""


@dataclass(frozen=True, slots=True)
class _FlatParam:
    """An FSDP1 flat parameter: the rank's shard of several original parameters."""

    flat_param: Tensor
    sharded: bool
    """False under ``NO_SHARD``: every rank holds every original parameter whole."""
    group: Any
    """The process group the flat parameter is sharded over."""
    local_numel: int
    """Elements of the local shard, padding included."""
    params: tuple[_OrigParam, ...]


def _read_flat_param(fsdp_module: nn.Module) -> _FlatParam | None:
    """FSDP1's shard metadata of one FSDP module; the only reader of FSDP's private attributes."""
    handle = getattr(fsdp_module, "_handle", None)
    if handle is None:  # an FSDP module that manages no parameters
        return None
    flat_param = handle.flat_param
    try:
        infos = flat_param._shard_param_infos
        shapes = flat_param._shapes
        fqns = flat_param._fqns
        orig = flat_param._params
    except AttributeError as err:
        raise UnsupportedLayoutError(
            f"FSDP flat parameter of {type(fsdp_module).__name__} holding "
            f"{getattr(flat_param, '_fqns', '?')} has no shard metadata ({err}); SM3 cannot recover the layout "
            "of its original parameters"
        ) from err
    if orig is None:
        orig = [None] * len(shapes)
    if not len(infos) == len(shapes) == len(fqns) == len(orig):
        raise UnsupportedLayoutError(
            f"FSDP flat parameter holding {fqns}: shard metadata for {len(infos)} parameters, shapes for "
            f"{len(shapes)}: SM3 cannot recover the layout"
        )
    params = []
    for param, info, shape, fqn in zip(orig, infos, shapes, fqns):
        if info.in_shard:
            # FSDP's intra_param_end_idx is inclusive
            start, stop, offset = info.intra_param_start_idx, info.intra_param_end_idx + 1, info.offset_in_shard
        else:
            start = stop = offset = 0
        params.append(_OrigParam(param, fqn, tuple(shape), start, stop, offset))
    return _FlatParam(
        flat_param=flat_param,
        sharded=handle.uses_sharded_strategy,
        group=fsdp_module.process_group,
        local_numel=flat_param.numel(),
        params=tuple(params),
    )


def fsdp1_shard_resolver(model: nn.Module) -> SpecResolver:
    """A ``shard_resolver`` for :class:`sm3_dist.SM3` on an FSDP1-wrapped ``model``.

    Resolves the original parameters (``use_orig_params=True``) and the flat
    parameters (``use_orig_params=False``) of every FSDP module inside
    ``model``; other tensors are left to SM3 (``None``). The metadata is read
    on the first call, when SM3 takes its first step.
    """
    specs: dict[int, ShardSpec] = {}

    def build() -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        modules = [(m, _read_flat_param(m)) for m in FullyShardedDataParallel.fsdp_modules(model)]
        if not modules:
            raise UnsupportedLayoutError(
                f"fsdp1_shard_resolver: {type(model).__name__} contains no FullyShardedDataParallel module"
            )
        plans: dict[int, list[tuple[int, ...]]] = {}
        for _, flat in modules:
            if flat is not None and flat.sharded:
                plans.setdefault(id(flat.group), []).extend(p.shape for p in flat.params)
        frozen = {key: tuple(shapes) for key, shapes in plans.items()}
        next_id: dict[int, int] = dict.fromkeys(plans, 0)
        for _, flat in modules:
            if flat is None:
                continue
            group = flat.group if flat.sharded else None
            plan = frozen[id(flat.group)] if flat.sharded else None
            pieces = []
            for index, p in enumerate(flat.params):
                if flat.sharded:
                    tensor_id = next_id[id(flat.group)]
                    next_id[id(flat.group)] += 1
                else:
                    tensor_id = index
                if p.param is not None:
                    if flat.sharded:
                        piece = flat_range_piece(p.shape, p.start, p.stop, tensor_id=tensor_id)
                    else:  # NO_SHARD keeps the original parameters whole
                        piece = full_piece(p.shape, tensor_id=tensor_id)
                    layout = TensorLayout(pieces=(piece,), numel=piece.numel)
                    specs[id(p.param)] = ShardSpec(layout=layout, group=group, plan=plan)
                if p.stop > p.start:
                    pieces.append(flat_range_piece(p.shape, p.start, p.stop, tensor_id=tensor_id, offset=p.offset))
            flat_layout = TensorLayout(pieces=tuple(pieces), numel=flat.local_numel)
            specs[id(flat.flat_param)] = ShardSpec(layout=flat_layout, group=group, plan=plan)

    def resolve(tensor: Tensor) -> ShardSpec | None:
        if not specs:
            build()
        spec = specs.get(id(tensor))
        if spec is None and _is_fsdp_flattened(tensor):
            raise UnsupportedLayoutError(
                f"a parameter of shape {tuple(tensor.shape)} was flattened by an FSDP module outside the model "
                "given to fsdp1_shard_resolver: its layout is unknown"
            )
        return spec

    return resolve


def _is_fsdp_flattened(tensor: Tensor) -> bool:
    from torch.distributed.fsdp._common_utils import FSDP_FLATTENED

    return bool(getattr(tensor, FSDP_FLATTENED, False))
