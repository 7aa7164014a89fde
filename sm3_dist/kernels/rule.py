"""The hyperparameters of the SM3 update rule, as one frozen value every kernel takes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["UpdateRule", "check_hyperparameter_values"]


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateRule:
    """What one SM3 step computes, apart from the learning rate (which may be a tensor and change every step).

    Every kernel (per-tensor, foreach, native CPU, Triton) takes one of these and
    computes bitwise the same result for the same inputs.
    """

    momentum: float = 0.0
    """In ``[0, 1)``; 0 means no momentum buffer."""
    beta: float = 0.0
    """0: running sum of squares (SM3-II); ``(0, 1)``: exponential moving average."""
    eps: float = 1e-30
    """Added to ``nu`` before the inverse square root; 0 is the original rule (update 0 where ``nu == 0``)."""
    weight_decay: float = 0.0
    """L2 term added to the gradient before it is accumulated."""
    maximize: bool = False
    """Ascend instead of descend."""
    bias_correction: bool = False
    """With ``beta > 0``: divide ``nu`` by ``1 - beta ** step`` for the update only (the accumulators keep the
    uncorrected average), as Adam corrects its zero-initialised second moment. The kernels take the divisor as
    ``nu_divisor``; :meth:`nu_divisor` computes it."""
    update_clip: float = 0.0
    """0: off. ``> 0``: each coordinate of the preconditioned update ``u = g / sqrt(nu_hat + eps)`` is clipped
    to ``[-update_clip, update_clip]`` before momentum (a per-coordinate bound on the step, local to each
    element, so sharded and single-process steps stay bitwise equal)."""

    @classmethod
    def of_group(cls, group: Mapping[str, Any]) -> UpdateRule:
        """The update rule of a param group's hyperparameters (the learning rate goes to the kernels separately)."""
        return cls(
            momentum=group["momentum"],
            beta=group["beta"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            bias_correction=group.get("bias_correction", False),
            update_clip=group.get("update_clip", 0.0),
        )

    def nu_divisor(self, step: int) -> float | None:
        """``1 - beta ** step`` in double precision, or ``None`` without correction.

        Every kernel rounds it once to its compute dtype (fp32, or fp64 for fp64 parameters) and divides by
        that, so they all divide by the same value.
        """
        if not self.bias_correction or self.beta == 0.0:
            return None
        if step < 1:
            raise ValueError(f"the bias-correction divisor needs a step count >= 1, got {step}")
        return 1.0 - self.beta**step


def check_hyperparameter_values(**values: Any) -> None:
    """Raise ``ValueError`` naming the first of ``lr``, ``momentum``, ``beta``, ``eps``, ``weight_decay`` and
    ``update_clip`` given
    that is not a valid value (only ``lr`` may be a tensor: one real element, of any shape)."""
    for name, value in values.items():
        if isinstance(value, Tensor):
            if name != "lr":
                raise ValueError(f"Invalid {name}: a tensor ({name} must be a Python number; only lr may be a tensor)")
            # any 1-element shape ((), (1,), (1, 1), ...) is usable: every kernel reads it as a scalar
            if value.numel() != 1:
                raise ValueError(
                    f"Tensor {name} must be 1-element (a scalar of any shape), got shape {tuple(value.shape)}"
                )
            if not value.is_floating_point():
                raise ValueError(f"Tensor {name} must be a real floating-point tensor, got dtype {value.dtype}")
            if value.is_meta:
                raise ValueError(f"Tensor {name} is on the meta device and holds no value")
            value = value.item()
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"Invalid {name}: {value!r} (a finite number is required)")
        if name in ("lr", "eps", "weight_decay", "update_clip") and value < 0.0:
            raise ValueError(f"Invalid {name}: {value} (must be >= 0)")
        if name in ("momentum", "beta") and not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid {name}: {value} (must be in [0, 1))")
