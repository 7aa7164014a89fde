"""The hyperparameters of the SM3 update rule, as one frozen value every kernel takes."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["UpdateRule"]


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
