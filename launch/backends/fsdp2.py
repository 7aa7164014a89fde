"""``--setup fsdp2``: ``fully_shard`` on every transformer block and the root, over a 1-D mesh of all ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from sm3_dist.launch.backends.base import DCPBackend, Parts, make_optimizer
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from sm3_dist.averaging import polyak

__all__ = ["FSDP2Backend"]


def _shard(model: torch.nn.Module, mesh) -> None:
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


class FSDP2Backend(DCPBackend):
    """SM3 (or a baseline) built on the sharded DTensor parameters; state saved and resharded by DCP."""

    def _build(self, model: torch.nn.Module) -> Parts:
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        ema = None
        if self.args.polyak is not None:
            # FSDP modules cannot be deep-copied: average a copy made before sharding, sharded the same way
            ema = polyak(model, decay=self.args.polyak)
            _shard(ema.module, mesh)
        _shard(model, mesh)
        optimizer = make_optimizer(self.args.optimizer, model.parameters(), self.args)
        return Parts(model=model, module=model, optimizer=optimizer, state_optimizer=optimizer, ema=ema)

    def after_eval(self) -> None:
        self.parts.model.reshard()  # the root keeps its parameters unsharded after a forward with no backward

    def full_weights(self) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.parts.model, options=options)
