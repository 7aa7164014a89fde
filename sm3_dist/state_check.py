"""Checks of an optimizer state dict against an SM3 optimizer, before anything is loaded.

``load_state_dict`` of :class:`sm3_dist.SM3`, :class:`sm3_dist.ShardedSM3`,
``DeepSpeedSM3`` and the FSDP1 helpers call these first and change nothing
when they raise: state of another model (other shapes, transposed shapes,
another parameter count), of another optimizer (Adam's, stepped or not), with
keys missing or a momentum of another dtype raises ``ValueError`` naming the
parameter (or the param group) and what differs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from sm3_dist.placement import ShardSpec, to_local
from sm3_dist.rule import check_hyperparameter_values
from sm3_dist.state import MOMENTUM_KEY, STEP_KEY, accumulator_key

__all__ = ["HYPERPARAMETERS", "check_groups", "check_hyperparameters", "check_param_state", "check_sm3_state_dict"]

HYPERPARAMETERS = ("lr", "momentum", "beta", "eps", "weight_decay")
"""What every SM3 param group holds (other optimizers' groups lack some: Adam has ``betas``, no ``beta``)."""


def check_groups(saved_groups: Any, sizes: Sequence[int], who: str = "the state dict") -> None:
    """The saved param groups: as many as ``sizes``, of those sizes, each with SM3's hyperparameters."""
    if not isinstance(saved_groups, list) or not all(
        isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in saved_groups
    ):
        raise ValueError(f"{who} is not an optimizer state dict: 'param_groups' must be a list of dicts with 'params'")
    found = [len(g["params"]) for g in saved_groups]
    if found != list(sizes):
        raise ValueError(
            f"{who} has {len(found)} param group(s) of {found} parameters, this optimizer {len(sizes)} of "
            f"{list(sizes)}: it comes from another model or another grouping of the parameters"
        )
    check_hyperparameters(saved_groups, who)


def check_hyperparameters(saved_groups: Sequence[Mapping[str, Any]], who: str = "the state dict") -> None:
    """Each saved param group holds SM3's hyperparameters, with valid values."""
    for gi, group in enumerate(saved_groups):
        missing = [key for key in HYPERPARAMETERS if key not in group]
        if missing:
            others = sorted(k for k in group if k != "params")
            raise ValueError(
                f"{who}: param group {gi} lacks SM3's hyperparameters {missing} (it holds {others}): the state "
                "comes from another optimizer"
            )
        try:
            check_hyperparameter_values(**{key: group[key] for key in HYPERPARAMETERS})
        except ValueError as err:
            raise ValueError(f"{who}: param group {gi}: {err}") from None


def check_param_state(
    name: str,
    saved: Any,
    accumulators: Mapping[str, tuple[int, ...]],
    momentum_shape: tuple[int, ...] | None,
    momentum: float,
    momentum_dtype: torch.dtype,
    *,
    extra_keys: Sequence[str] = (),
    partial: bool = False,
    param_dtype: torch.dtype | None = None,
) -> None:
    """One parameter's saved state: exactly SM3's keys, each tensor of the shape and dtype the layout gives.

    ``accumulators``: expected accumulator key -> shape. ``momentum_shape``: the
    momentum buffer's expected shape. An empty (or absent) state is a parameter
    that never stepped and always passes. ``partial``: keys may be missing (a
    universal checkpoint, which the optimizer completes at its next step).
    ``param_dtype``: a float64 parameter keeps float64 accumulators (and float64
    momentum when ``momentum_dtype`` is float32); every other keeps float32 ones.
    """
    wide = param_dtype == torch.float64
    acc_dtype = torch.float64 if wide else torch.float32
    if wide and momentum_dtype == torch.float32:
        momentum_dtype = torch.float64
    if saved is None or (isinstance(saved, Mapping) and not saved):
        return
    if not isinstance(saved, Mapping):
        raise ValueError(f"{name}: saved state is a {type(saved).__name__}, not a dict")
    allowed = {STEP_KEY, MOMENTUM_KEY, *accumulators, *extra_keys}
    unexpected = sorted(str(k) for k in saved if k not in allowed)
    if unexpected:
        raise ValueError(
            f"{name}: saved state holds {unexpected}, which SM3 for this parameter does not (it holds "
            f"{sorted(allowed - set(extra_keys))}): the state comes from another optimizer or another model"
        )
    if not partial:
        missing = [key for key in (STEP_KEY, *accumulators) if key not in saved]
        if momentum > 0.0 and MOMENTUM_KEY not in saved:
            missing.append(MOMENTUM_KEY)
        if missing:
            raise ValueError(f"{name}: saved state lacks {missing}")
    step = saved.get(STEP_KEY)
    if step is not None:
        value = float(step.item()) if isinstance(step, Tensor) and step.numel() == 1 else step
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: saved step count {step!r} is not a non-negative number")
    for key, shape in accumulators.items():
        if key in saved:
            _check_tensor(
                name, key, saved[key], shape, acc_dtype, "accumulators follow float64 parameters, else float32"
            )
    if MOMENTUM_KEY in saved and momentum_shape is not None:
        _check_tensor(
            name,
            MOMENTUM_KEY,
            saved[MOMENTUM_KEY],
            momentum_shape,
            None if partial else momentum_dtype,  # a universal checkpoint's momentum is cast when completed
            f"this optimizer has momentum_dtype={momentum_dtype}",
        )


def _check_tensor(name: str, key: str, value: Any, shape: tuple[int, ...], dtype: torch.dtype | None, why: str) -> None:
    local = to_local(value) if isinstance(value, Tensor) else value
    if not isinstance(local, Tensor):
        raise ValueError(f"{name}: saved {key!r} is a {type(value).__name__}, not a tensor")
    if tuple(local.shape) != tuple(shape):
        raise ValueError(
            f"{name}: saved {key!r} has shape {tuple(local.shape)}, expected {tuple(shape)}: the state comes from "
            "another model (or another sharding)"
        )
    if dtype is not None and local.dtype != dtype:
        raise ValueError(f"{name}: saved {key!r} is {local.dtype}, expected {dtype} ({why})")


def expected_state(spec: ShardSpec) -> dict[str, tuple[int, ...]]:
    """Accumulator key -> local shape, for a tensor of layout ``spec``."""
    several = len(spec.layout.pieces) > 1
    return {
        accumulator_key(d, j if several else None): (hi - lo,)
        for j, piece in enumerate(spec.layout.pieces)
        for d, (lo, hi) in enumerate(piece.ranges)
    }


def check_sm3_state_dict(optimizer: Any, state_dict: Any, *, partial: bool = False, extra_keys=()) -> None:
    """Everything :meth:`sm3_dist.SM3.load_state_dict` loads, against ``optimizer`` and its parameters' layouts."""
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("state"), Mapping):
        raise ValueError("not an optimizer state dict: it needs 'state' (a dict) and 'param_groups' (a list)")
    groups = optimizer.param_groups
    check_groups(state_dict.get("param_groups"), [len(g["params"]) for g in groups])
    saved_state = state_dict["state"]
    listed = [pid for g in state_dict["param_groups"] for pid in g["params"]]
    strays = [pid for pid in saved_state if pid not in set(listed)]
    if strays:
        raise ValueError(f"the state dict holds state for {strays}, which none of its param groups lists")
    ids = iter(listed)
    for gi, (group, saved_group) in enumerate(zip(groups, state_dict["param_groups"])):
        for pi, p in enumerate(group["params"]):
            saved = saved_state.get(next(ids))
            if not saved:
                continue
            name = f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
            spec = _spec_of(optimizer, p, name)
            name = f"param_groups[{gi}]['params'][{pi}] (shape {_global_shape(spec, p)})"
            check_param_state(
                name,
                saved,
                expected_state(spec),
                tuple(to_local(p).shape),
                float(saved_group["momentum"]),
                optimizer.momentum_dtype,
                extra_keys=extra_keys,
                partial=partial,
                param_dtype=to_local(p).dtype,
            )


def _spec_of(optimizer: Any, p: Tensor, name: str) -> ShardSpec:
    """``p``'s layout as the optimizer resolves it, leaving its caches as they were (plans are assigned on step)."""
    cached = optimizer._specs.get(p)
    if cached is not None:
        return cached
    before = dict(optimizer._specs)
    try:
        return optimizer._spec(p, name)
    finally:
        optimizer._specs.clear()
        optimizer._specs.update(before)


def _global_shape(spec: ShardSpec, p: Tensor) -> tuple[int, ...]:
    pieces = spec.layout.pieces
    return tuple(pieces[0].shape) if len(pieces) == 1 else tuple(p.shape)
