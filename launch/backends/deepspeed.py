"""``--setup deepspeed``: ``deepspeed.initialize`` from a JSON config, SM3 registered as ``"type": "SM3"``.

DeepSpeed itself is imported only when a DeepSpeed run is built (it is an optional dependency).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from sm3_dist.integrations.shm import remove_deepspeed_shm
from sm3_dist.launch.backends.base import Backend, Parts, make_optimizer
from sm3_dist.launch.config import DS_OPTIMIZER_TYPES

from sm3_dist import comm

__all__ = ["DeepSpeedBackend", "fill_config"]


def fill_config(config: dict, args: argparse.Namespace, world_size: int) -> tuple[dict, bool]:
    """``config`` with this run's batch sizes and optimizer; True if DeepSpeed builds the optimizer from it."""
    config = json.loads(json.dumps(config))
    config["train_batch_size"] = args.batch_size
    config["train_micro_batch_size_per_gpu"] = args.batch_size // world_size
    config["gradient_accumulation_steps"] = 1
    for key in ("bf16", "fp16"):
        section = config.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = False
    if getattr(args, "clip_grad_norm", 0.0) > 0:
        config["gradient_clipping"] = args.clip_grad_norm
    elif config.get("gradient_clipping") == "auto":
        config.pop("gradient_clipping")
    config.pop("scheduler", None)  # the job's own warm-up schedule drives the learning rate
    section = config.get("optimizer")
    wanted = DS_OPTIMIZER_TYPES[args.optimizer]
    if args.optimizer == "sm3" and not (isinstance(section, dict) and section.get("type") == wanted):
        section = config["optimizer"] = {"type": wanted, "params": {}}
    from_config = isinstance(section, dict) and str(section.get("type", "")).lower() == wanted.lower()
    if from_config:
        params = section.setdefault("params", {})
        params["lr"] = args.lr
        if "weight_decay" in params or args.weight_decay:
            params["weight_decay"] = args.weight_decay
        if args.optimizer == "sm3":
            params["momentum"] = args.momentum
            params["beta"] = args.beta
            params["bias_correction"] = bool(args.bias_correction)
            params["update_clip"] = args.update_clip
            if args.momentum_dtype != "float32":
                params["momentum_dtype"] = args.momentum_dtype
        for key in [k for k, v in params.items() if v == "auto"]:
            params.pop(key)
    else:
        config.pop("optimizer", None)
        if args.optimizer in ("adagrad", "adafactor"):
            config["zero_allow_untested_optimizer"] = True
    return config, from_config


class DeepSpeedBackend(Backend):
    """A DeepSpeed engine: it reduces gradients inside ``backward`` and checkpoints in its own format."""

    gradients_visible = False

    def _build(self, model: torch.nn.Module) -> Parts:
        import sm3_dist.integrations.deepspeed as sm3_deepspeed  # registers "type": "SM3"

        engine, optimizer = self._initialize(model)
        self._release_shared_memory()
        if self.args.optimizer == "sm3":
            sm3_deepspeed.check_engine(engine)
        return Parts(model=engine, module=engine.module, optimizer=optimizer, state_optimizer=engine.basic_optimizer)

    def _initialize(self, model: torch.nn.Module) -> tuple[Any, Any]:
        import deepspeed

        world = torch.distributed.get_world_size()
        config, from_config = fill_config(self.plan.deepspeed_config, self.args, world)
        client = None if from_config else make_optimizer(self.args.optimizer, model.parameters(), self.args)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=list(model.parameters()), optimizer=client, config=config
        )
        return engine, optimizer

    def _release_shared_memory(self) -> None:
        """Unlink the job's DeepSpeed CPU all-reduce buffers from ``/dev/shm`` once every rank has mapped them.

        DeepSpeed's CPU communication (``DS_ACCELERATOR=cpu``, all ranks on one host) creates a 66 MB buffer
        per rank and never removes it: every run, and every killed one, would leave them behind and fill the
        host's shared memory. The mappings stay valid after the unlink.
        """
        if self.device.type != "cpu":
            return
        comm.barrier()  # every rank has opened every other rank's buffer in deepspeed.initialize
        remove_deepspeed_shm(os.environ.get("MASTER_PORT", "0"))

    def backward(self, loss: torch.Tensor) -> None:
        self.parts.model.backward(loss)

    def step(self) -> None:
        self.parts.model.step()

    def step_metrics(self) -> dict[str, Any]:
        return {"overflow_skipped_steps": int(getattr(self.parts.model, "skipped_steps", 0))}

    def save(self, path: Path) -> dict[str, Any]:
        ema = self.parts.ema
        self.parts.model.save_checkpoint(str(path), tag="deepspeed", client_state={}, save_latest=False)
        return {"polyak": ema.state_dict()} if ema is not None else {}

    def load(self, path: Path) -> None:
        load_path, _ = self.parts.model.load_checkpoint(str(path), tag="deepspeed")
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {path}")

    def full_weights(self) -> dict[str, torch.Tensor]:
        engine = self.parts.model
        if engine.zero_optimization_stage() == 3:
            return engine._zero3_consolidated_16bit_state_dict()
        return engine.module.state_dict()
