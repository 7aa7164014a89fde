"""The interface every backend implements, the optimizers the job can build, and DCP checkpoints."""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from sm3_dist.launch.config import Plan
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim.swa_utils import AveragedModel

import sm3_dist
from sm3_dist.averaging import polyak

__all__ = ["OPTIMIZER_FACTORIES", "Backend", "DCPBackend", "Parts", "make_optimizer"]


def _sm3(params: Iterable, args: argparse.Namespace, sharded: bool) -> torch.optim.Optimizer:
    kind = sm3_dist.ShardedSM3 if sharded else sm3_dist.SM3
    return kind(params, lr=args.lr, momentum=args.momentum, beta=args.beta, weight_decay=args.weight_decay,
                bias_correction=args.bias_correction, momentum_dtype=getattr(torch, args.momentum_dtype),
                update_clip=args.update_clip)  # fmt: skip


def _torch_optimizer(kind: type[torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
    return lambda params, args, sharded: kind(params, lr=args.lr, weight_decay=args.weight_decay)


OPTIMIZER_FACTORIES: dict[str, Callable[[Iterable, argparse.Namespace, bool], torch.optim.Optimizer]] = {
    "sm3": _sm3,
    "adamw": _torch_optimizer(torch.optim.AdamW),
    "adagrad": _torch_optimizer(torch.optim.Adagrad),
    "adafactor": _torch_optimizer(torch.optim.Adafactor),
}
"""``--optimizer`` name -> ``(params, args, sharded) -> optimizer``; ``sharded`` asks for ``ShardedSM3``."""


def make_optimizer(name: str, params: Iterable, args: argparse.Namespace, *, sharded: bool = False):
    """The optimizer ``name`` over ``params`` with the run's hyperparameters."""
    return OPTIMIZER_FACTORIES[name](params, args, sharded)


@dataclass(frozen=True, slots=True)
class Parts:
    """What a backend built, as the loop uses it."""

    model: torch.nn.Module
    """What the forward pass calls (DDP, an FSDP2 module, a DeepSpeed engine)."""
    module: torch.nn.Module
    """The model itself: its parameters (the Polyak average follows them) and its plain state dict."""
    optimizer: Any
    """The optimizer the backend steps (it may wrap ``state_optimizer``)."""
    state_optimizer: torch.optim.Optimizer
    """The optimizer that holds the state and ``param_groups`` (the schedule drives it)."""
    ema: AveragedModel | None = None
    """The Polyak average of the weights (``--polyak``)."""


class Backend:
    """One setup's way to distribute the model and optimizer, behind one small interface.

    A subclass builds the parts (:meth:`_build`) and says how a step, a checkpoint
    and the full weights go; the loop (:mod:`sm3_dist.launch.loop`) calls only
    these methods, so it never asks which setup runs.
    """

    gradients_visible: ClassVar[bool] = True
    """Local gradients are in ``param.grad`` between :meth:`backward` and :meth:`step` (the ``grad`` fault point)."""

    def __init__(self, plan: Plan, device: torch.device) -> None:
        self.plan = plan
        self.args = plan.args
        self.device = device
        self._parts: Parts | None = None

    # ------------------------------------------------------------------ building

    def init_process_group(self, timeout: datetime.timedelta) -> None:
        """Join the job's process group (gloo on CPU, NCCL on CUDA) unless one exists."""
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=timeout)

    def build(self, model: torch.nn.Module) -> Parts:
        """Distribute ``model`` (on this rank's device) and build its optimizer and, with ``--polyak``, average."""
        parts = self._build(model)
        if self.args.polyak is not None and parts.ema is None:
            parts = Parts(parts.model, parts.module, parts.optimizer, parts.state_optimizer,
                          polyak(parts.module, decay=self.args.polyak))  # fmt: skip
        self._parts = parts
        return parts

    def _build(self, model: torch.nn.Module) -> Parts:
        raise NotImplementedError

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            raise RuntimeError(f"{type(self).__name__}: build() has not run")
        return self._parts

    # ------------------------------------------------------------------ a step

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        """The optimizer step, gradients cleared."""
        self.parts.optimizer.step()
        self.parts.optimizer.zero_grad(set_to_none=True)

    def after_eval(self) -> None:
        """Called after each evaluation (forward passes without backward)."""

    def step_metrics(self) -> dict[str, Any]:
        """Backend-specific fields of each ``train`` record."""
        return {}

    # ------------------------------------------------------------------ state

    def save(self, path: Path) -> dict[str, Any]:
        """Write this rank's part of the framework's checkpoint into ``path`` (collective).

        Returns what ``trainer.pt`` (written by rank 0) carries besides the step and the schedule.
        """
        raise NotImplementedError

    def load(self, path: Path) -> None:
        """Load the framework's checkpoint written by :meth:`save` (collective)."""
        raise NotImplementedError

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The full model state dict (collective where the weights are sharded)."""
        return self.parts.module.state_dict()


class DCPBackend(Backend):
    """A backend whose model, optimizer and Polyak average go to ``torch.distributed.checkpoint`` (reshardable)."""

    def _dcp_state(self) -> dict[str, Any]:
        parts = self.parts
        model_sd, optim_sd = get_state_dict(parts.model, parts.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if parts.ema is not None:
            state["polyak"] = parts.ema.state_dict()
        return state

    def save(self, path: Path) -> dict[str, Any]:
        dcp.save(self._dcp_state(), checkpoint_id=str(path / "dcp"))
        return {}

    def load(self, path: Path) -> None:
        parts = self.parts
        state = self._dcp_state()
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(parts.model, parts.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if parts.ema is not None:
            parts.ema.load_state_dict(state["polyak"])
