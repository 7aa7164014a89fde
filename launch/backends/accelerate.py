"""Runs configured by ``accelerate launch`` with its FSDP or DeepSpeed plugin (the YAMLs in ``launch/accelerate``).

accelerate's DDP configs need no backend of their own: they start the processes
and the job runs ``--setup ddp``. accelerate is imported only here, when a
plugin configures the run (it is an optional dependency).
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import torch
from sm3_dist.launch.backends.base import Backend, Parts, make_optimizer
from sm3_dist.launch.backends.deepspeed import DeepSpeedBackend, fill_config

__all__ = ["AccelerateDeepSpeedBackend", "AccelerateFSDPBackend"]


def _accelerator(timeout: datetime.timedelta):
    """An ``Accelerator`` (it joins the process group, with the job's timeout)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])


class AccelerateFSDPBackend(Backend):
    """accelerate's FSDP plugin (FSDP2; CUDA only): ``accelerator.prepare``, ``backward``, ``save_state``."""

    def init_process_group(self, timeout: datetime.timedelta) -> None:
        self.accelerator = _accelerator(timeout)

    def _build(self, model: torch.nn.Module) -> Parts:
        optimizer = make_optimizer(self.args.optimizer, model.parameters(), self.args)
        prepared, wrapped = self.accelerator.prepare(model, optimizer)
        return Parts(model=prepared, module=prepared, optimizer=wrapped, state_optimizer=optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def save(self, path: Path) -> dict[str, Any]:
        self.accelerator.save_state(str(path / "accelerate"))
        return {"polyak": self.parts.ema.state_dict()} if self.parts.ema is not None else {}

    def load(self, path: Path) -> None:
        self.accelerator.load_state(str(path / "accelerate"))

    def full_weights(self) -> dict[str, torch.Tensor]:
        return self.accelerator.get_state_dict(self.parts.model)


class AccelerateDeepSpeedBackend(DeepSpeedBackend):
    """accelerate's DeepSpeed plugin: the engine built by ``accelerator.prepare`` from the YAML's config."""

    def init_process_group(self, timeout: datetime.timedelta) -> None:
        self.accelerator = _accelerator(timeout)

    def _initialize(self, model: torch.nn.Module) -> tuple[Any, Any]:
        plugin = self.accelerator.state.deepspeed_plugin
        config, from_config = fill_config(plugin.deepspeed_config, self.args, torch.distributed.get_world_size())
        plugin.deepspeed_config.clear()
        plugin.deepspeed_config.update(config)
        if from_config:
            from accelerate.utils import DummyOptim

            optimizer = DummyOptim(model.parameters(), lr=self.args.lr)
        else:
            optimizer = make_optimizer(self.args.optimizer, model.parameters(), self.args)
        return self.accelerator.prepare(model, optimizer)

    def full_weights(self) -> dict[str, torch.Tensor]:
        return self.accelerator.get_state_dict(self.parts.model)
