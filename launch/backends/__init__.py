"""The backends of the training job: one class per setup, all with the interface of :class:`Backend`.

:data:`BACKENDS` maps a plan's ``(setup, accelerate plugin)`` to its class; it is
the one place that tells the setups apart.
"""

from __future__ import annotations

import torch
from sm3_dist.launch.backends.accelerate import AccelerateDeepSpeedBackend, AccelerateFSDPBackend
from sm3_dist.launch.backends.base import Backend, Parts, make_optimizer
from sm3_dist.launch.backends.ddp import DDPBackend, ShardedSM3Backend
from sm3_dist.launch.backends.deepspeed import DeepSpeedBackend
from sm3_dist.launch.backends.fsdp2 import FSDP2Backend
from sm3_dist.launch.config import Plan

__all__ = ["BACKENDS", "Backend", "Parts", "backend_for", "make_optimizer"]

BACKENDS: dict[tuple[str, str | None], type[Backend]] = {
    ("ddp", None): DDPBackend,
    ("sharded", None): ShardedSM3Backend,
    ("fsdp2", None): FSDP2Backend,
    ("deepspeed", None): DeepSpeedBackend,
    ("fsdp2", "fsdp"): AccelerateFSDPBackend,
    ("deepspeed", "deepspeed"): AccelerateDeepSpeedBackend,
}
"""``(--setup, accelerate plugin or None)`` -> the backend class that runs it."""


def backend_for(plan: Plan, device: torch.device) -> Backend:
    """The backend that runs ``plan`` on ``device``."""
    return BACKENDS[plan.backend](plan, device)
