"""Learning-rate schedules that SM3's authors recommend.

SM3 needs no decay schedule of its own: its accumulated squared gradients give
every coordinate a natural decay. What it wants is a warm-up, because early on
the preconditioned gradient is much larger than the weights:

    lr_t = lr * min(1, (t / warmup_steps) ** power)      power = 2 preferred

with ``warmup_steps`` about 5% of all steps; optionally a cool-down that
decays linearly to zero over the last 10% of steps (an alternative to Polyak
averaging that costs no memory). ``t`` counts optimizer steps from 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCooldown", "warmup_cooldown"]


@dataclass(frozen=True)
class WarmupCooldown:
    """The multiplier of the base learning rate at optimizer step ``t`` (0-based, as LambdaLR counts).

    Not slotted: ``LambdaLR.state_dict`` saves a callable's ``__dict__``.
    """

    total_steps: int
    """Steps of the whole run."""
    warmup_steps: int
    """Steps of the polynomial ramp-up; 0 disables it."""
    power: float = 2.0
    """Exponent of the ramp: 1 linear, 2 quadratic (preferred)."""
    cooldown_steps: int = 0
    """Final steps over which the rate decays linearly to zero; 0 disables it."""

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        if not 0 <= self.cooldown_steps <= self.total_steps:
            raise ValueError(
                f"cooldown_steps must be in [0, total_steps={self.total_steps}], got {self.cooldown_steps}"
            )
        if not (self.power > 0 and math.isfinite(self.power)):
            raise ValueError(f"power must be a positive number, got {self.power}")

    def __call__(self, index: int) -> float:
        step = index + 1  # the step this rate is used for, counting from 1
        factor = 1.0
        if self.warmup_steps > 0:
            factor = min(1.0, (step / self.warmup_steps) ** self.power)
        if self.cooldown_steps > 0:
            remaining = self.total_steps - step + 1
            factor *= max(0.0, min(1.0, remaining / (self.cooldown_steps + 1)))
        return factor


def warmup_cooldown(
    optimizer: Optimizer,
    total_steps: int,
    *,
    warmup_fraction: float = 0.05,
    power: float = 2.0,
    cooldown_fraction: float = 0.0,
    last_epoch: int = -1,
) -> LambdaLR:
    """A ``LambdaLR`` with SM3's warm-up (default 5% of steps, quadratic) and an optional linear cool-down.

    Call ``scheduler.step()`` once after every ``optimizer.step()``, as with any
    ``torch.optim.lr_scheduler``. ``cooldown_fraction=0.1`` decays the rate to
    zero over the last 10% of steps.
    """
    for name, value in (("warmup_fraction", warmup_fraction), ("cooldown_fraction", cooldown_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if warmup_fraction + cooldown_fraction > 1.0:
        raise ValueError(
            f"warmup_fraction + cooldown_fraction = {warmup_fraction + cooldown_fraction} exceeds the whole run"
        )
    schedule = WarmupCooldown(
        total_steps=total_steps,
        warmup_steps=round(warmup_fraction * total_steps),
        power=power,
        cooldown_steps=round(cooldown_fraction * total_steps),
    )
    return LambdaLR(optimizer, schedule, last_epoch=last_epoch)
