"""Polyak averaging of parameters for evaluation and serving, on ``torch.optim.swa_utils``.

SM3's authors recommend evaluating with averaged parameters (or, at no memory
cost, a cool-down; see :mod:`sm3_dist.schedules`). :func:`polyak` returns a
``torch.optim.swa_utils.AveragedModel`` that keeps an exponential moving
average of the weights (and buffers); call ``averaged.update_parameters(model)``
after each optimizer step, and evaluate with ``averaged`` itself
(``averaged(inputs)``, ``averaged.module``) or, to reuse code that holds
``model``, inside ``with averaged_weights(model, averaged): ...``, which swaps
the averaged values into ``model`` and restores the trained ones on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["averaged_weights", "polyak"]


def polyak(model: nn.Module, decay: float = 0.999, *, use_buffers: bool = True) -> AveragedModel:
    """An EMA of ``model``'s weights: ``avg = decay * avg + (1 - decay) * w`` at each update."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=use_buffers)


@contextmanager
def averaged_weights(model: nn.Module, averaged: AveragedModel) -> Iterator[nn.Module]:
    """Temporarily load the averaged parameters and buffers into ``model``."""
    live = list(model.parameters()) + (list(model.buffers()) if averaged.use_buffers else [])
    avg = list(averaged.module.parameters()) + (list(averaged.module.buffers()) if averaged.use_buffers else [])
    if len(live) != len(avg):
        raise ValueError("the averaged model does not have the same parameters and buffers as the model")
    saved = [t.detach().clone() for t in live]
    try:
        with torch.no_grad():
            for t, a in zip(live, avg):
                t.copy_(a)
        yield model
    finally:
        with torch.no_grad():
            for t, s in zip(live, saved):
                t.copy_(s)
