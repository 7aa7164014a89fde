"""FSDP1 (``FullyShardedDataParallel``) shard layouts and resharding checkpoints for SM3.

With ``use_orig_params=True`` FSDP1 hands the optimizer its original
parameters, but each one's data is a 1-D view of the rank's piece of a flat
parameter: elements ``[start, stop)`` of the parameter's row-major
flattening, or nothing. The original parameters carry no pointer back to
their flat parameter, so SM3 cannot find the layout on its own; this module
reads it from FSDP's shard metadata::

    from sm3_dist import SM3
    from sm3_dist.integrations.fsdp1 import fsdp1_shard_resolver

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

SM3 built without the resolver on FSDP1 parameters raises
:class:`~sm3_dist.UnsupportedLayoutError` instead of treating the 1-D views as
whole vectors (which would silently give per-element accumulators).

**Checkpoints that reshard.** FSDP1's own optimizer state-dict conversion
(``FSDP.optim_state_dict``, and ``torch.distributed.checkpoint.state_dict``'s
``get_state_dict`` on an FSDP1 model) assumes state shaped like the
parameters (Adam's) and cannot handle SM3's per-dimension accumulators. Two
functions take its place::

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model), "optim": fsdp1_optim_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=path)

    # later, at any world size, with the model and the optimizer built the same way:
    model_sd, optim_sd = get_model_state_dict(model), fsdp1_optim_state_dict(model, optimizer)
    dcp.load({"model": model_sd}, checkpoint_id=path)
    dcp.load({"optim": optim_sd}, checkpoint_id=path)
    set_model_state_dict(model, model_sd)
    fsdp1_load_optim_state_dict(model, optimizer, optim_sd)

Load the two entries in two ``dcp.load`` calls: a rank that holds no element
of a parameter leaves it out of its ``SHARDED_STATE_DICT`` (it has no local
shard), and a ``dcp.load`` request that lacks a saved key is read in DCP's
pre-2.4 key format, in which ``param_groups`` flatten differently ("Missing
key in checkpoint state_dict: optim.param_groups"). A request with the
optimizer entry alone has every key it asks for.

:func:`fsdp1_optim_state_dict` (a collective: every rank calls it) returns the
same consolidated state on every rank, in the format of a single-process
:class:`~sm3_dist.SM3` keyed by parameter FQN (the names of the unwrapped
model), which is how ``get_optimizer_state_dict`` presents a single-process
optimizer: per parameter the step count, the momentum shaped like the
parameter and every ``mu_d`` in full; ``param_groups`` list FQNs. Per process
group it issues one ``all_reduce(MAX)`` of a zero-filled fp32 bucket holding
every accumulator and step count (ranks that hold an accumulator entry hold
the same reduced value, the others contribute 0, and ``mu >= 0``), and one
``all_reduce(SUM)`` of a zero-filled bucket holding the momentum (each element
has exactly one holder; the sum runs on the buffer's bits as ``int32``, so
every value, ``-0.0`` included, arrives bit for bit). Nothing is lost or
rounded. A parameter without state yet gets the state SM3 starts from
(zeros, step 0), so on a freshly built optimizer the result is the template
``dcp.load`` fills in. While it exists, every rank holds the full momentum
(as FSDP's ``FULL_STATE_DICT`` holds full parameters); the accumulators are
``O(sum of dims)``. ``dcp.save`` writes such replicated tensors once. Model
state can be saved either way FSDP1 offers (``SHARDED_STATE_DICT``, the
helpers' default, or ``FULL_STATE_DICT``).

:func:`fsdp1_load_optim_state_dict` checks the whole dict first (parameter
names, shapes, momentum dtype), raising ``ValueError`` naming the parameter
before any state changes, then slices every full tensor down to this rank's
pieces and loads them with ``optimizer.load_state_dict``. It does not
communicate.

The consolidated dict is also a plain ``torch.save`` checkpoint (equal on
every rank: let one rank write it, every rank read it). A single-process SM3
turns it into its own state with ``set_optimizer_state_dict(module, optimizer,
state)`` and produces one with ``get_optimizer_state_dict(module, optimizer)``
(``torch.distributed.checkpoint.state_dict``), so checkpoints also move
between FSDP1 and one process.

All communication goes through :mod:`sm3_dist.comm`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sm3_dist.comm import all_reduce_
from sm3_dist.layout import Piece, TensorLayout, flat_range_piece, full_piece, normalize_shape
from sm3_dist.optimizer import SM3
from sm3_dist.placement import ShardSpec, SpecResolver, UnsupportedLayoutError
from sm3_dist.state import MOMENTUM_KEY, STEP_KEY, accumulator_key, check_hyperparameters

__all__ = ["fsdp1_load_optim_state_dict", "fsdp1_optim_state_dict", "fsdp1_shard_resolver"]


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


@dataclass(frozen=True, slots=True)
class _Unit:
    """One FSDP module's flat parameter, placed in the model and in its group's reduction plan."""

    prefix: str
    """The FSDP module's name in the model (wrapper prefixes included; cleaned with the parameter's)."""
    flat: _FlatParam
    tensor_ids: tuple[int, ...]
    """Per original parameter, its index in the group's plan (``NO_SHARD``: its index in the flat parameter)."""
    plan: tuple[tuple[int, ...], ...] | None
    """Global shapes of every original parameter reduced over the group, the same on every rank."""


def _read_model(model: nn.Module, who: str) -> list[_Unit]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    found = [
        (name, _read_flat_param(m)) for name, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)
    ]
    if not found:
        raise UnsupportedLayoutError(f"{who}: {type(model).__name__} contains no FullyShardedDataParallel module")
    plans: dict[int, list[tuple[int, ...]]] = {}
    for _, flat in found:
        if flat is not None and flat.sharded:
            plans.setdefault(id(flat.group), []).extend(p.shape for p in flat.params)
    next_id: dict[int, int] = dict.fromkeys(plans, 0)
    units = []
    for prefix, flat in found:
        if flat is None:
            continue
        n = len(flat.params)
        if flat.sharded:
            first = next_id[id(flat.group)]
            next_id[id(flat.group)] += n
            units.append(_Unit(prefix, flat, tuple(range(first, first + n)), tuple(plans[id(flat.group)])))
        else:
            units.append(_Unit(prefix, flat, tuple(range(n)), None))
    return units


def fsdp1_shard_resolver(model: nn.Module) -> SpecResolver:
    """A ``shard_resolver`` for :class:`sm3_dist.SM3` on an FSDP1-wrapped ``model``.

    Resolves the original parameters (``use_orig_params=True``) and the flat
    parameters (``use_orig_params=False``) of every FSDP module inside
    ``model``; other tensors are left to SM3 (``None``). The metadata is read
    on the first call, when SM3 takes its first step.
    """
    specs: dict[int, ShardSpec] = {}

    def build() -> None:
        for unit in _read_model(model, "fsdp1_shard_resolver"):
            flat = unit.flat
            group = flat.group if flat.sharded else None
            pieces = []
            for p, tensor_id in zip(flat.params, unit.tensor_ids):
                if p.param is not None:
                    if flat.sharded:
                        piece = flat_range_piece(p.shape, p.start, p.stop, tensor_id=tensor_id)
                    else:  # NO_SHARD keeps the original parameters whole
                        piece = full_piece(p.shape, tensor_id=tensor_id)
                    layout = TensorLayout(pieces=(piece,), numel=piece.numel)
                    specs[id(p.param)] = ShardSpec(layout=layout, group=group, plan=unit.plan)
                if p.stop > p.start:
                    pieces.append(flat_range_piece(p.shape, p.start, p.stop, tensor_id=tensor_id, offset=p.offset))
            flat_layout = TensorLayout(pieces=tuple(pieces), numel=flat.local_numel)
            specs[id(flat.flat_param)] = ShardSpec(layout=flat_layout, group=group, plan=unit.plan)

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


# ---------------------------------------------------------------------- checkpoints


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where one original parameter's optimizer state lives on this rank."""

    fqn: str
    """The parameter's name in the unwrapped model."""
    shape: tuple[int, ...]
    """Its global shape, as the parameter has it (a scalar is ``()``)."""
    tensor: Tensor
    """The optimizer tensor that holds its piece: the original parameter, or its flat parameter."""
    piece: Piece | None
    """The piece held here (its accumulator ranges); ``None``: the tensor holds no piece of it."""
    start: int
    """First element of the parameter's flattening held here."""
    stop: int
    """One past the last element held here."""
    offset: int
    """Where the held elements begin in the tensor's flattening."""
    key_index: int | None
    """Piece index in the tensor's state keys (:func:`~sm3_dist.accumulator_key`); ``None``: its only piece."""
    group: Any
    """The group its state is reduced over; ``None``: every entry is held here."""
    plan: tuple[tuple[int, ...], ...] | None
    """The group's reduction plan (global shapes by ``tensor_id``); ``None`` when not reduced."""
    tensor_id: int
    """Its index in ``plan``."""


def _param_groups(model: nn.Module, optimizer: SM3, who: str) -> list[list[tuple[Tensor, list[_Slot]]]]:
    """Per param group of ``optimizer``, each tensor with the original parameters whose state it holds."""
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    if not isinstance(optimizer, SM3):
        raise TypeError(f"{who} takes an sm3_dist.SM3 optimizer, got {type(optimizer).__name__}")
    slots: dict[int, list[_Slot]] = {}
    for unit in _read_model(model, who):
        flat = unit.flat
        group = flat.group if flat.sharded else None
        # the resolver numbers the pieces of a flat parameter among the parameters its shard holds
        held = {i: j for j, i in enumerate(i for i, p in enumerate(flat.params) if p.stop > p.start)}
        for i, (p, tensor_id) in enumerate(zip(flat.params, unit.tensor_ids)):
            fqn = clean_tensor_name(f"{unit.prefix}.{p.fqn}" if unit.prefix else p.fqn)
            piece: Piece | None = flat_range_piece(p.shape, p.start, p.stop, tensor_id=tensor_id)
            if p.param is not None:  # use_orig_params=True: the parameter holds its own piece, possibly empty
                tensor, offset, key_index = p.param, 0, None
            else:  # the flat parameter holds the pieces of its parameters that lie in this rank's shard
                tensor, offset = flat.flat_param, p.offset
                key_index = held[i] if i in held and len(held) > 1 else None
                piece = piece if i in held else None
            slot = _Slot(fqn, p.shape, tensor, piece, p.start, p.stop, offset, key_index, group, unit.plan, tensor_id)
            slots.setdefault(id(tensor), []).append(slot)
    names = {id(p): clean_tensor_name(n) for n, p in model.named_parameters()}
    groups = []
    for gi, group in enumerate(optimizer.param_groups):
        members = []
        for pi, t in enumerate(group["params"]):
            found = slots.get(id(t))
            if found is None:
                if id(t) not in names:
                    raise ValueError(
                        f"{who}: param_groups[{gi}]['params'][{pi}] (shape {tuple(t.shape)}) is not a parameter "
                        "of the model"
                    )
                # a parameter FSDP does not manage (ignored_modules): whole on every rank
                shape, numel = tuple(t.shape), t.numel()
                found = [_Slot(names[id(t)], shape, t, full_piece(shape), 0, numel, 0, None, None, None, 0)]
            members.append((t, found))
        groups.append(members)
    return groups


def fsdp1_optim_state_dict(model: nn.Module, optimizer: SM3) -> dict[str, Any]:
    """The consolidated state of ``optimizer``, an :class:`~sm3_dist.SM3` on the FSDP1-wrapped ``model``.

    A collective: every rank calls it and gets the same dict, keyed by
    parameter FQN in the format of a single-process ``SM3`` (see the module
    docstring): ``{"state": {fqn: {"step", "momentum_buffer", "mu_0", ...}},
    "param_groups": [{..., "params": [fqn, ...]}]}``. State tensors are on the
    parameters' device, the step counts on the CPU. Parameters without state
    yet get SM3's initial state (zeros, step 0).
    """
    groups = _param_groups(model, optimizer, "fsdp1_optim_state_dict")
    optimizer.state_dict()  # waits for the last step's all-reduce of accumulator maxima
    device = next((t.device for members in groups for t, _ in members), torch.device("cpu"))
    buckets: dict[int | None, list[tuple[_Slot, float]]] = {}
    for group, members in zip(optimizer.param_groups, groups):
        for _, slots in members:
            for slot in slots:
                key = None if slot.group is None else id(slot.group)
                buckets.setdefault(key, []).append((slot, group["momentum"]))
    full: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for members in buckets.values():
            full.update(_consolidate(optimizer, members, device))
    param_groups = []
    for group, members in zip(optimizer.param_groups, groups):
        entry = {key: value for key, value in group.items() if key != "params"}
        entry["params"] = [slot.fqn for _, slots in members for slot in slots]
        param_groups.append(entry)
    return {"state": {fqn: full[fqn] for g in param_groups for fqn in g["params"]}, "param_groups": param_groups}


def _consolidate(optimizer: SM3, members: list[tuple[_Slot, float]], device: torch.device) -> dict[str, dict]:
    """Full state of the parameters reduced over one group (or held whole): one MAX, at most one SUM all-reduce.

    ``members``: each parameter's slot with its param group's momentum. The
    buckets are laid out by the group's plan, the same on every rank.
    """
    group = members[0][0].group
    if group is None:
        plan = [normalize_shape(slot.shape) for slot, _ in members]
        ids = list(range(len(members)))
    else:
        plan = [normalize_shape(shape) for shape in members[0][0].plan]
        ids = [slot.tensor_id for slot, _ in members]
    acc_start = [0]
    for shape in plan:
        acc_start.append(acc_start[-1] + sum(shape))
    n_acc = acc_start[-1]
    # MAX bucket: every mu_d of the plan, then per tensor its step count and whether it has momentum
    maxima = torch.zeros(n_acc + 2 * len(plan), dtype=torch.float32, device=device)
    flags = maxima[n_acc:].view(len(plan), 2)
    for (slot, momentum), k in zip(members, ids):
        state = optimizer.state.get(slot.tensor)
        if momentum > 0 or (state and MOMENTUM_KEY in state):
            flags[k, 1] = 1.0
        if not state:
            continue
        flags[k, 0].copy_(state[STEP_KEY])
        if slot.piece is None:
            continue
        base = acc_start[k]
        for d, (lo, hi) in enumerate(slot.piece.ranges):
            key = accumulator_key(d, slot.key_index)
            acc = state.get(key)
            if not isinstance(acc, Tensor) or acc.shape != (hi - lo,):
                found = tuple(acc.shape) if isinstance(acc, Tensor) else None
                raise ValueError(
                    f"{slot.fqn}: optimizer state {key!r} has shape {found}, expected ({hi - lo},) for this rank's "
                    f"piece of a parameter of shape {slot.shape}"
                )
            maxima[base + lo : base + hi].copy_(acc)
            base += plan[k][d]
    _reduce(maxima, "max", group)
    # SUM bucket: the momentum of every tensor that has it; each element has one holder, the others add 0 bits
    dtype = optimizer.momentum_dtype
    mom_start: dict[int, int] = {}
    n_mom = 0
    for k, has_momentum in enumerate(flags[:, 1].tolist()):
        if has_momentum:
            mom_start[k] = n_mom
            n_mom += math.prod(plan[k])
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.zeros(-(-n_mom * itemsize // 4) * 4, dtype=torch.uint8, device=device)
    momenta = raw.view(dtype)[:n_mom]
    for (slot, _), k in zip(members, ids):
        state = optimizer.state.get(slot.tensor)
        if not state or slot.piece is None or MOMENTUM_KEY not in state or k not in mom_start:
            continue
        buf = state[MOMENTUM_KEY].reshape(-1)
        n = slot.stop - slot.start
        momenta[mom_start[k] + slot.start : mom_start[k] + slot.stop].copy_(buf[slot.offset : slot.offset + n])
    if n_mom:
        _reduce(raw.view(torch.int32), "sum", group)
    out = {}
    for (slot, _), k in zip(members, ids):
        entry: dict[str, Any] = {STEP_KEY: flags[k, 0].to("cpu", copy=True)}
        if k in mom_start:
            entry[MOMENTUM_KEY] = momenta[mom_start[k] : mom_start[k] + math.prod(plan[k])].clone().view(slot.shape)
        base = acc_start[k]
        for d, n in enumerate(plan[k]):
            entry[accumulator_key(d)] = maxima[base : base + n].clone()
            base += n
        out[slot.fqn] = entry
    return out


def _reduce(bucket: Tensor, op: str, group: Any) -> None:
    if group is not None:
        all_reduce_(bucket, op, group)


def fsdp1_load_optim_state_dict(model: nn.Module, optimizer: SM3, state_dict: Mapping[str, Any]) -> None:
    """Load a consolidated state (:func:`fsdp1_optim_state_dict`, saved at any world size) into ``optimizer``.

    Every rank takes its pieces of the full tensors; nothing is communicated.
    The whole dict is checked before anything changes: a parameter missing
    from it or unknown to the model, a tensor of another shape (a checkpoint
    of another model) or a momentum dtype other than the optimizer's raises
    ``ValueError`` naming the parameter, with the optimizer untouched. The
    param groups' hyperparameters are loaded too, as ``load_state_dict`` does.
    """
    who = "fsdp1_load_optim_state_dict"
    groups = _param_groups(model, optimizer, who)
    saved_state, saved_groups = state_dict.get("state"), state_dict.get("param_groups")
    if not isinstance(saved_state, Mapping) or not isinstance(saved_groups, list):
        raise ValueError(f"{who}: not an optimizer state dict (it needs 'state' and 'param_groups')")
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"{who}: the checkpoint has {len(saved_groups)} param groups but the optimizer has {len(groups)}"
        )
    if not all(isinstance(g, Mapping) for g in saved_groups):
        raise ValueError(f"{who}: not an optimizer state dict (its param groups are not dicts)")
    check_hyperparameters(saved_groups, who)
    names = []
    for gi, (saved, members) in enumerate(zip(saved_groups, groups)):
        mine = [slot.fqn for _, slots in members for slot in slots]
        theirs = list(saved.get("params", ()))
        unnamed = [name for name in theirs if not isinstance(name, str)]
        if unnamed:
            raise ValueError(
                f"{who}: param group {gi} lists parameters by {type(unnamed[0]).__name__}, not by name; a "
                "single-process optimizer's state_dict() is keyed by position: take its state with "
                "torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(module, optimizer) instead"
            )
        mine_set, theirs_set = set(mine), set(theirs)
        for name in mine:
            if name not in theirs_set:
                raise ValueError(f"{who}: {name} is not in the checkpoint's param group {gi}: another model?")
        for name in theirs:
            if name not in mine_set:
                raise ValueError(f"{who}: the checkpoint's param group {gi} holds {name}, which the optimizer has not")
        names.extend(mine)
    known = set(names)
    for name in saved_state:
        if name not in known:
            raise ValueError(f"{who}: the checkpoint holds state for {name}, which the optimizer has not")
    missing = [name for name in names if name not in saved_state]
    if missing and len(missing) < len(names):
        raise ValueError(f"{who}: the checkpoint holds no state for {missing[0]} but does for other parameters")
    if not missing:
        for saved, members in zip(saved_groups, groups):
            for _, ss in members:
                for slot in ss:
                    _check_saved(slot, saved_state[slot.fqn], optimizer.momentum_dtype, float(saved["momentum"]), who)
    local: dict[int, dict[str, Any]] = {}
    packed = []
    index = 0
    for saved, members in zip(saved_groups, groups):
        packed.append({**{k: v for k, v in saved.items() if k != "params"}, "params": []})
        for t, ss in members:
            packed[-1]["params"].append(index)
            if not missing:
                local[index] = _local_state(t, ss, saved_state, optimizer.momentum_dtype, who)
            index += 1
    optimizer.load_state_dict({"state": local, "param_groups": packed})


def _check_saved(slot: _Slot, saved: Any, momentum_dtype: torch.dtype, momentum: float, who: str) -> None:
    shape = normalize_shape(slot.shape)
    if not isinstance(saved, Mapping):
        raise ValueError(f"{who}: {slot.fqn}: saved state is a {type(saved).__name__}, not a dict")
    expected = {STEP_KEY, MOMENTUM_KEY, *(accumulator_key(d) for d in range(len(shape)))}
    for key, value in saved.items():
        if key not in expected:
            raise ValueError(
                f"{who}: {slot.fqn}: unexpected saved state {key!r} for a parameter of shape {slot.shape} "
                "(another model, or not SM3 state)"
            )
        if key == STEP_KEY:
            continue
        want = slot.shape if key == MOMENTUM_KEY else (shape[int(key[3:])],)
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(want):
            found = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"{who}: {slot.fqn}: saved {key!r} has shape {found}, but the parameter's shape is {slot.shape} "
                f"(expected {tuple(want)}): the checkpoint comes from another model"
            )
        if key == MOMENTUM_KEY and value.dtype != momentum_dtype:
            raise ValueError(
                f"{who}: {slot.fqn}: saved momentum is {value.dtype} but the optimizer has momentum_dtype="
                f"{momentum_dtype}"
            )
    for d in range(len(shape)):
        if accumulator_key(d) not in saved:
            raise ValueError(f"{who}: {slot.fqn}: saved state lacks {accumulator_key(d)!r}")
    if STEP_KEY not in saved:
        raise ValueError(f"{who}: {slot.fqn}: saved state lacks {STEP_KEY!r}")
    if momentum > 0.0 and MOMENTUM_KEY not in saved:
        raise ValueError(f"{who}: {slot.fqn}: saved state lacks {MOMENTUM_KEY!r} (its param group has momentum)")


def _local_state(
    tensor: Tensor, slots: list[_Slot], saved_state: Mapping[str, Any], momentum_dtype: torch.dtype, who: str
) -> dict[str, Any]:
    """This rank's state of one optimizer tensor: its pieces of the saved full tensors."""
    with_momentum = {MOMENTUM_KEY in saved_state[slot.fqn] for slot in slots}
    if len(with_momentum) > 1:
        raise ValueError(f"{who}: {[s.fqn for s in slots]} share one flat parameter but not all have momentum")
    steps = [saved_state[slot.fqn][STEP_KEY] for slot in slots]
    entry: dict[str, Any] = {STEP_KEY: torch.tensor(max(float(s) for s in steps), dtype=torch.float32)}
    if with_momentum == {True}:
        momentum = torch.zeros(tensor.numel(), dtype=momentum_dtype, device=tensor.device)
        for slot in slots:
            if slot.piece is not None:
                full = saved_state[slot.fqn][MOMENTUM_KEY].reshape(-1)
                momentum[slot.offset : slot.offset + slot.stop - slot.start].copy_(full[slot.start : slot.stop])
        entry[MOMENTUM_KEY] = momentum.view(tensor.shape)
    for slot in slots:
        if slot.piece is None:
            continue
        for d, (lo, hi) in enumerate(slot.piece.ranges):
            entry[accumulator_key(d, slot.key_index)] = saved_state[slot.fqn][accumulator_key(d)][lo:hi]
    return entry
