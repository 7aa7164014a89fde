"""Test-only fault injection for the training job: a run fails on purpose where the environment says.

The environment variable ``SM3_DIST_TEST_FAULT`` is read by the reliability
tests only: a comma-separated list of ``ACTION@POINT:STEP[:RANK]`` (rank 0 if
omitted). ``ACTION`` is ``kill`` (SIGKILL to the whole process group: start the
job in its own session), ``hang`` (sleep forever), ``exit`` (``os._exit(17)``)
or ``nan`` (the caller fills this rank's gradients with NaN,
:func:`poison_gradients`). ``POINT`` is ``step`` (start of a training step),
``grad`` (after backward, before the optimizer step; a backend whose gradients
are not visible there, DeepSpeed's engine, does not offer it), ``staged`` (every
rank has written its checkpoint part, no manifest yet), ``manifest`` (manifest
and marker written, not renamed) or ``renamed`` (renamed, older checkpoints not
yet removed). Unset, :func:`fault` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time

import torch

from sm3_dist.placement import to_local

__all__ = ["ACTIONS", "FAULT_ENV", "fault", "parse", "poison_gradients"]

FAULT_ENV = "SM3_DIST_TEST_FAULT"
ACTIONS = ("kill", "hang", "exit", "nan")


def parse(spec: str) -> list[tuple[str, str, int, int]]:
    """``(action, point, step, rank)`` of each item of a ``SM3_DIST_TEST_FAULT`` value; ValueError if malformed."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            action, rest = item.split("@", 1)
            point, *numbers = rest.split(":")
            step, rank = int(numbers[0]), int(numbers[1]) if len(numbers) > 1 else 0
        except (ValueError, IndexError):
            raise ValueError(f"{FAULT_ENV}: {item!r} is not ACTION@POINT:STEP[:RANK]") from None
        if action not in ACTIONS:
            raise ValueError(f"{FAULT_ENV}: unknown action {action!r} in {item!r}")
        faults.append((action, point, step, rank))
    return faults


def fault(point: str, step: int, rank: int) -> bool:
    """Act on ``SM3_DIST_TEST_FAULT`` at ``point`` of ``step`` on ``rank``.

    ``kill``, ``hang`` and ``exit`` do not return; ``nan`` returns True (the caller
    poisons its gradients). Without the variable (every real run) it returns False.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    for action, at, at_step, at_rank in parse(spec):
        if (at, at_step, at_rank) != (point, step, rank):
            continue
        print(f"{FAULT_ENV}: {action} at {point} of step {step} on rank {rank}", flush=True)
        if action == "kill":
            os.killpg(os.getpgrp(), signal.SIGKILL)
        elif action == "hang":
            while True:
                time.sleep(3600)
        elif action == "exit":
            os._exit(17)
        elif action == "nan":
            return True
    return False


def poison_gradients(module: torch.nn.Module) -> None:
    """Fill this rank's local part of every gradient of ``module`` with NaN."""
    for p in module.parameters():
        if p.grad is not None:
            to_local(p.grad).fill_(float("nan"))
