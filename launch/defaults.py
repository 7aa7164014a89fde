"""SM3's recommended setting and each optimizer's default peak learning rate: the one source of truth.

``sm3-dist train``'s defaults, the shipped DeepSpeed configs (``launch/deepspeed/*.json``, their
``SM3WarmupCooldown`` scheduler entry) and README's snippets all say what :data:`SM3_RECOMMENDED`,
:data:`SCHEDULE` and :func:`default_lr` say; ``tests/test_defaults_agree.py`` holds them to it.

**Measured** with ``sm3-dist quality`` on the tiny model (2 layers x 128), the
stdlib corpus, batch 8 x 64 bytes, 1,500 steps, quadratic warm-up over 5% and a
linear cool-down over the last 10%, on CPU::

    sm3-dist quality --data stdlib --batch-size 8 --eval-every 150 \\
        --variants cooldown,sm3:cooldown+ema+bc --lrs sm3:cooldown+ema+bc=1e-3,2e-3,3e-3,1e-2

:data:`TINY_LR` holds each optimizer's best rate of that sweep (seed 0; the
tables are in README.md, "Training quality"): AdamW 1.4e-3 (of 3e-4, 1.4e-3,
6.5e-3, 3e-2), Adafactor 0.065 (of 3e-3, 0.014, 0.065, 0.3), SM3 0.046 (of
0.01, 0.046, 0.22, 1) and SM3 with ``beta=0.999, bias_correction=True`` 3e-3
(of 1e-3, 2e-3, 3e-3, 1e-2: 2e-3 was 0.03% ahead on seed 0, 3e-3 ahead on the
mean of two seeds). At ``beta=0.99``, SM3's best form, 4e-3 was best (3e-3, 4e-3, 6e-3, 8e-3; four seeds at
4e-3) but 6e-3 diverged on one of two seeds (seed 1: 1.96 against 1.77).

**SM3's default, 4e-3, and its margin** were then measured at ``sm3-dist train``'s own batch (16 x 128 bytes),
1,000 steps, stdlib corpus, with ``sm3-dist quality --margin`` (docs/quality.md, "Stability margin"). Without an
update clip, 4e-3 reached held-out 1.646 and 1.643 (seeds 0 and 1) and twice it 1.660 and 1.900: a gradient
spike late in the warm-up lifted whole rows and columns of SM3's accumulators on seed 1 and the run never caught
up. With ``update_clip=1.0`` (each coordinate of ``g / sqrt(nu_hat)`` clipped to ``[-1, 1]`` before momentum,
local to each element: exact under sharding) 4e-3 reaches 1.650 and 1.647 and twice it 1.644 and 1.619, **within
5% on both seeds** (better, as AdamW at twice its default is); 4x is 1.657 and 1.973 (not safe on seed 1), and
half the default 1.755 and 1.735. So the clip is part of :data:`SM3_RECOMMENDED` and the default stays 4e-3,
a factor of 2 below the edge. Below 2,048 tokens per step take a lower rate (2e-3 at 512).
SM3's two forms take rates an order of magnitude apart:
the running sum of squares (``beta=0``, the paper's SM3-II, whose steps shrink
like ``1/sqrt(t)`` by themselves) and the moving average (``beta > 0``, steps
like Adam's), so the default depends on ``beta``. Adagrad was not swept: its
value is the previous default.

**Measured one size up, extrapolated beyond**: the rate at other widths and batch sizes.
Adam-like optimizers (AdamW, Adagrad and both SM3 forms, whose steps are
normalised per coordinate) take ``lr ~ 1 / width`` (the hidden matrices'
fan-in; muP's rule for Adam): ``lr(size) = TINY_LR * 128 / n_embd``. At 12 x 768
that gives AdamW 2.3e-4, well under the 3e-3 whose held-out loss rose from step
350 on at that size (batch 32 x 256 on one H200), and SM3 0.0077 where 0.1 had
beaten 0.3. ``torch.optim.Adafactor`` scales each step by the parameter's RMS
and caps the rate at ``1/sqrt(t)``, so its rate is relative and kept the same
at every width. Larger batches usually take somewhat larger rates; the sweep's
batch (512 tokens) is a quarter of ``sm3-dist train``'s default (2,048), so
these defaults err low. Measured at ``small`` (6 x 384, three times the tiny
width; batch 16 x 128, 1,000 steps, seed 0, docs/quality.md "One size up"):
AdamW's default 4.7e-4 reached held-out 1.4330 and twice it 1.4459 (the rule
holds); SM3's 1.3e-3 reached 1.4485 and twice it 1.4290 (the rule errs low by
up to 2x, and the margin holds: 2x within 5% of 1x). Adafactor's unscaled
0.065 reached 1.4833 and twice it 1.6468. ``sm3-dist quality
--device cuda --model-size gpt2`` on a GPU measures the next size.
"""

from __future__ import annotations

__all__ = [
    "REFERENCE_WIDTH",
    "SCHEDULE",
    "SM3_PAPER",
    "SM3_RECOMMENDED",
    "TINY_LR",
    "WIDTH_EXPONENT",
    "deepspeed_sm3_params",
    "default_lr",
]

SM3_RECOMMENDED = {"momentum": 0.9, "beta": 0.99, "bias_correction": True, "eps": 1e-30, "update_clip": 1.0}
"""SM3's measured best form, the default of ``sm3-dist train`` and of the shipped DeepSpeed configs: the moving
average of squared gradients (``beta=0.99``) with Adam-style bias correction, momentum 0.9, and each coordinate of
the preconditioned update clipped to ``[-1, 1]`` (the stability margin above). The
:class:`sm3_dist.SM3` class keeps the paper's rule as its own defaults (:data:`SM3_PAPER`, ``momentum=0``): pass
these explicitly, ``SM3(params, lr=..., **SM3_RECOMMENDED)``."""

SM3_PAPER = {"beta": 0.0, "bias_correction": False}
"""The paper's SM3-II (the running sum of squared gradients, no correction): ``sm3-dist train --beta 0``. It takes
a rate an order of magnitude larger (:data:`TINY_LR` ``"sm3"``)."""

SCHEDULE = {"warmup_fraction": 0.05, "power": 2.0, "cooldown_fraction": 0.1}
"""The learning-rate schedule of every optimizer in ``sm3-dist train`` (and the shipped ``SM3WarmupCooldown``
scheduler entry): a quadratic warm-up over the first 5% of the steps and a linear cool-down to zero over the last
10% (:func:`sm3_dist.schedules.warmup_cooldown`, whose own default has no cool-down)."""

REFERENCE_WIDTH = 128
"""The width (``n_embd``) of the ``tiny`` model, where :data:`TINY_LR` was measured."""

TINY_LR = {
    "sm3": 0.046,
    "sm3-ema": 4e-3,
    "adamw": 1.4e-3,
    "adafactor": 0.065,
    "adagrad": 0.05,
}
"""Default peak rate at the tiny model. ``sm3``: ``beta=0``; ``sm3-ema``: ``beta > 0`` with bias correction (and the
recommended update clip), half the best measured rate with the clip and the best without it (the module docstring
gives the margin). Adagrad was not swept: its value is the previous default."""

WIDTH_EXPONENT = {"sm3": 1.0, "sm3-ema": 1.0, "adamw": 1.0, "adagrad": 1.0, "adafactor": 0.0}
"""``lr ~ width ** -exponent``: 1 for Adam-like steps, 0 for Adafactor's parameter-relative steps."""


def default_lr(optimizer: str, model_size: str | int = "tiny", *, beta: float | None = None) -> float:
    """The default peak learning rate of ``optimizer`` for a ``launch.model`` size (or a width given as an int).

    ``beta`` is SM3's (default :data:`SM3_RECOMMENDED`'s): ``beta > 0`` (the moving-average form) takes an
    Adam-like rate, ``beta=0`` (the paper's running sum) a larger one.
    """
    from sm3_dist.launch.model import SIZES

    if beta is None:
        beta = SM3_RECOMMENDED["beta"]
    if isinstance(model_size, int):
        width = model_size
    elif model_size in SIZES:
        width = SIZES[model_size].n_embd
    else:
        raise ValueError(f"unknown model size {model_size!r}: choose one of {', '.join(SIZES)} or give a width")
    if width <= 0:
        raise ValueError(f"the width must be positive, got {width}")
    key = "sm3-ema" if optimizer == "sm3" and beta > 0.0 else optimizer
    if key not in TINY_LR:
        raise ValueError(f"unknown optimizer {optimizer!r}: choose one of sm3, adamw, adafactor, adagrad")
    rate = TINY_LR[key] * (REFERENCE_WIDTH / width) ** WIDTH_EXPONENT[key]
    return float(f"{rate:.2g}")


def deepspeed_sm3_params(model_size: str | int = "tiny") -> dict:
    """The ``"optimizer": {"type": "SM3", "params": ...}`` of the shipped DeepSpeed configs: the recommended form
    at its default rate for ``model_size`` (the configs are written for the tiny model)."""
    return {"lr": default_lr("sm3", model_size), **SM3_RECOMMENDED}
