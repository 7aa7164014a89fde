"""SM3's per-parameter state: its key names, the dtypes it is kept in, its creation and its check against a
parameter's layout, its size, and the checks of a saved state dict before it is loaded.

``state[p]`` holds plain tensors (DTensors under FSDP2, wrapped by the layout's ``wrap_state``): ``"step"``, a
float32 count; ``"momentum_buffer"`` when momentum is on; and one accumulator ``mu_d`` per dimension of each
piece of the parameter this rank holds (:func:`accumulator_key`).

``load_state_dict`` of :class:`sm3_dist.SM3`, :class:`sm3_dist.ShardedSM3`, ``DeepSpeedSM3`` and the FSDP1
helpers call :func:`check_sm3_state_dict` (or :func:`check_groups` and :func:`check_param_state`) first and
change nothing when they raise: state of another model (other shapes, transposed shapes, another parameter
count), of another optimizer (Adam's, stepped or not), with keys missing or a momentum of another dtype raises
``ValueError`` naming the parameter (or the param group) and what differs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sm3_dist.kernels.math import compute_dtype
from sm3_dist.kernels.rule import check_hyperparameter_values
from sm3_dist.placement import ShardSpec, to_local

__all__ = [
    "HYPERPARAMETERS",
    "MOMENTUM_DTYPES",
    "MOMENTUM_KEY",
    "SKIPPED_KEY",
    "STEP_KEY",
    "accumulator_key",
    "check_groups",
    "check_hyperparameters",
    "check_param_state",
    "check_sm3_state_dict",
    "check_state",
    "init_state",
    "local_state_bytes",
    "momentum_dtype_for",
    "unsupported_dtype",
]

STEP_KEY = "step"
SKIPPED_KEY = "skipped_steps"
MOMENTUM_KEY = "momentum_buffer"
MOMENTUM_DTYPES = (torch.float32, torch.bfloat16)
"""What ``momentum_dtype`` may be."""


def accumulator_key(dim: int, piece_index: int | None = None) -> str:
    """State key of ``mu_dim``; a tensor holding pieces of several parameters adds the piece's index."""
    return f"mu_{dim}" if piece_index is None else f"piece{piece_index}.mu_{dim}"


def unsupported_dtype(p: Tensor) -> str | None:
    """Why SM3 keeps no state for a parameter of this dtype, or ``None``."""
    if p.is_complex():
        return "complex"
    if p.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return f"{p.dtype} (float32, bfloat16, float16 and float64 are supported)"
    return None


def momentum_dtype_for(local: Tensor, momentum_dtype: torch.dtype) -> torch.dtype:
    """float64 parameters keep float64 momentum (unless bf16 momentum was asked for); others ``momentum_dtype``."""
    if local.dtype == torch.float64 and momentum_dtype == torch.float32:
        return torch.float64
    return momentum_dtype


def init_state(
    state: dict[str, Any],
    local: Tensor,
    spec: ShardSpec,
    momentum: float,
    *,
    momentum_dtype: torch.dtype,
    step_device: torch.device,
) -> None:
    """A parameter's fresh state: a zero step count on ``step_device``, zero momentum (when ``momentum > 0``)
    and zero accumulators for the index ranges of every piece its local tensor holds."""
    wrap = spec.wrap_state or (lambda t, dim: t)
    state[STEP_KEY] = torch.zeros((), dtype=torch.float32, device=step_device)  # no host copy
    if momentum > 0.0:
        state[MOMENTUM_KEY] = wrap(torch.zeros_like(local, dtype=momentum_dtype_for(local, momentum_dtype)), None)
    several = len(spec.layout.pieces) > 1
    state_dtype = compute_dtype(local.dtype)
    for j, piece in enumerate(spec.layout.pieces):
        for d, (lo, hi) in enumerate(piece.ranges):
            acc = torch.zeros(hi - lo, dtype=state_dtype, device=local.device)
            state[accumulator_key(d, j if several else None)] = wrap(acc, d)


def check_state(
    state: dict[str, Any],
    local: Tensor,
    spec: ShardSpec,
    momentum: float,
    name: str,
    *,
    momentum_dtype: torch.dtype,
    step_device: torch.device,
) -> None:
    """Raise ``ValueError`` naming the parameter when its state does not fit its layout (another model or
    sharding) or the optimizer's momentum settings; a step count kept as a number or elsewhere than
    ``step_device`` becomes a float32 tensor there."""
    several = len(spec.layout.pieces) > 1
    for j, piece in enumerate(spec.layout.pieces):
        for d, (lo, hi) in enumerate(piece.ranges):
            key = accumulator_key(d, j if several else None)
            acc = to_local(state.get(key))
            if acc is None or acc.shape != (hi - lo,):
                found = None if acc is None else tuple(acc.shape)
                raise ValueError(
                    f"{name}: optimizer state {key!r} has shape {found}, expected ({hi - lo},) for a parameter "
                    f"of shape {piece.shape}: the state comes from another model or another sharding"
                )
    if momentum > 0.0:
        buf = to_local(state.get(MOMENTUM_KEY))
        if buf is None or buf.shape != local.shape:
            raise ValueError(f"{name}: momentum buffer missing or of another shape than the parameter")
        if buf.dtype != momentum_dtype_for(local, momentum_dtype):
            raise ValueError(
                f"{name}: momentum buffer is {buf.dtype} but the optimizer was built with "
                f"momentum_dtype={momentum_dtype}"
            )
    step = state.get(STEP_KEY)
    if not isinstance(step, Tensor):  # a plain number from an old or hand-made state dict
        step = state[STEP_KEY] = torch.tensor(float(step or 0), dtype=torch.float32)
    if step.device != step_device:
        state[STEP_KEY] = step.to(step_device, torch.float32)


def local_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of this rank's local optimizer state tensors (DTensors counted by their local shard)."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor) and key != STEP_KEY:
                local = to_local(value)
                total += local.numel() * local.element_size()
    return total


# ---------------------------------------------------------------------------------------------- loading checks

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
            # update_clip is checked where present (a state saved before it existed takes this optimizer's)
            optional = {key: group[key] for key in ("update_clip",) if key in group}
            check_hyperparameter_values(**{key: group[key] for key in HYPERPARAMETERS}, **optional)
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
