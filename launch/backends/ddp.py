"""``--setup ddp`` and ``--setup sharded``: torch DDP, with the optimizer on every rank or ``ShardedSM3``."""

from __future__ import annotations

from typing import ClassVar

import torch
from sm3_dist.launch.backends.base import DCPBackend, Parts, make_optimizer
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DDPBackend", "ShardedSM3Backend"]


class DDPBackend(DCPBackend):
    """DDP averages the gradients; every rank keeps the whole optimizer state."""

    sharded_optimizer: ClassVar[bool] = False

    def _build(self, model: torch.nn.Module) -> Parts:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids)
        optimizer = make_optimizer(self.args.optimizer, ddp.parameters(), self.args, sharded=self.sharded_optimizer)
        return Parts(model=ddp, module=model, optimizer=optimizer, state_optimizer=optimizer)


class ShardedSM3Backend(DDPBackend):
    """DDP with :class:`sm3_dist.ShardedSM3`: each rank keeps and updates a slice of SM3's state."""

    sharded_optimizer = True
