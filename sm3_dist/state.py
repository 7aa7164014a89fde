"""SM3's per-parameter state: its key names, the dtypes it is kept in, its creation and its check against a
parameter's layout, and its size.

``state[p]`` holds plain tensors (DTensors under FSDP2, wrapped by the layout's ``wrap_state``): ``"step"``, a
float32 count; ``"momentum_buffer"`` when momentum is on; and one accumulator ``mu_d`` per dimension of each
piece of the parameter this rank holds (:func:`accumulator_key`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sm3_dist.functional import _compute_dtype
from sm3_dist.placement import ShardSpec, to_local

__all__ = [
    "MOMENTUM_DTYPES",
    "MOMENTUM_KEY",
    "SKIPPED_KEY",
    "STEP_KEY",
    "accumulator_key",
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
    state_dtype = _compute_dtype(local.dtype)
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
