"""One run of ``sm3-dist quality``: a compact single-process training loop and what it measures.

A run trains ``launch.model``'s GPT on ``launch.data``'s batches with one
optimizer at one learning rate, variant and seed, and evaluates the held-out
loss (nats per byte) every ``eval_every`` steps and at the end, both of the
trained weights and of their Polyak average (:func:`sm3_dist.averaging.polyak`).
Every optimizer gets the same schedule family (:func:`sm3_dist.schedules.warmup_cooldown`:
quadratic warm-up over ``warmup_fraction`` of the steps, then constant, or with
the ``cooldown`` variant a linear decay to zero over the last
``cooldown_fraction``). On one CPU thread a run is a pure function of its
:class:`Setup` and :class:`RunSpec`: the model's initial weights and every batch
come from the seed (on CUDA up to the nondeterminism of its kernels).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from sm3_dist.launch.defaults import SM3_RECOMMENDED

__all__ = ["OPTIMIZERS", "VARIANT_TOKENS", "RunSpec", "Setup", "Variant", "parse_variant", "run"]

OPTIMIZERS = ("sm3", "adamw", "adafactor", "adagrad")

VARIANT_TOKENS = {
    "warmup": "warm-up only, then a constant rate (every optimizer; the base the other tokens modify)",
    "cooldown": "linear cool-down to 0 over the last cooldown_fraction of the steps (every optimizer)",
    "ema": "SM3: exponential moving average of squared gradients, beta = Setup.beta, instead of the running sum",
    "bc": "SM3 with ema: Adam-style bias correction, nu / (1 - beta^t) in the update",
    "keepmax": "SM3 with ema: the accumulators never decrease (ema_keeps_max, the PyTorch ports' rule)",
    "bf16": "SM3: momentum stored in bfloat16",
    "nomom": "SM3: no momentum",
    "clip": "clip the gradients' global L2 norm to 1.0 before each step (every optimizer)",
    "uclip": f"SM3: each coordinate of the preconditioned update clipped to [-c, c] before momentum (update_clip=c, "
    f"the recommended {SM3_RECOMMENDED['update_clip']:g})",
}
"""The tokens a variant is made of (joined with ``+``), and what each changes."""
_ORDER = tuple(VARIANT_TOKENS)
_SM3_ONLY = frozenset({"ema", "bc", "keepmax", "bf16", "nomom", "uclip"})
CLIP_NORM = 1.0
"""The global gradient norm the ``clip`` variant clips to."""
UPDATE_CLIP = SM3_RECOMMENDED["update_clip"]
"""SM3's ``update_clip`` in the ``uclip`` variant: the recommended one (launch/defaults.py)."""


@dataclass(frozen=True, slots=True)
class Variant:
    """A set of variant tokens, in canonical order."""

    tokens: tuple[str, ...]

    @property
    def name(self) -> str:
        return "+".join(self.tokens) if self.tokens else "warmup"

    def has(self, token: str) -> bool:
        return token in self.tokens

    def applies_to(self, optimizer: str) -> bool:
        """Whether every token means something for ``optimizer`` (SM3's options only for SM3)."""
        return optimizer == "sm3" or not _SM3_ONLY.intersection(self.tokens)


def parse_variant(text: str) -> Variant:
    """``"cooldown+ema+bc"`` -> a :class:`Variant`; unknown tokens and contradictions are errors."""
    tokens = [t.strip() for t in text.split("+")]
    if not text.strip() or any(not t for t in tokens):
        raise ValueError(f"empty variant token in {text!r}")
    unknown = [t for t in tokens if t not in VARIANT_TOKENS]
    if unknown:
        raise ValueError(f"unknown variant token(s) {unknown} in {text!r}: choose from {', '.join(VARIANT_TOKENS)}")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"repeated token in variant {text!r}")
    chosen = set(tokens) - {"warmup"}
    for token in ("bc", "keepmax"):
        if token in chosen and "ema" not in chosen:
            raise ValueError(f"variant {text!r}: {token} needs the moving average (ema)")
    if {"bf16", "nomom"} <= chosen:
        raise ValueError(f"variant {text!r}: bf16 momentum with no momentum")
    return Variant(tuple(t for t in _ORDER if t in chosen))


@dataclass(frozen=True, slots=True)
class Setup:
    """What every run of one sweep shares (a results file holds runs of one setup only)."""

    data: str
    """``default``, ``stdlib`` or a file path (see :func:`sm3_dist.launch.data.load_corpus`)."""
    model_size: str = "tiny"
    steps: int = 1500
    batch_size: int = 16
    seq_len: int = 64
    eval_every: int = 100
    eval_windows: int = 128
    """Held-out windows per evaluation, evenly spread over the held-out text."""
    warmup_fraction: float = 0.05
    cooldown_fraction: float = 0.1
    """Used by the ``cooldown`` variant."""
    momentum: float = 0.9
    """SM3's momentum (unless ``nomom``)."""
    beta: float = 0.999
    """SM3's moving-average decay with ``ema``."""
    polyak_decay: float = 0.0
    """Decay of the Polyak average of the weights; 0 means ``1 - 10 / steps`` (a time constant of 10% of the run)."""
    device: str = "cpu"
    """Where runs train: ``cpu`` (deterministic, one thread per worker) or ``cuda`` (one run at a time)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if (
            not 0.0 <= self.warmup_fraction + self.cooldown_fraction <= 1.0
            or min(self.warmup_fraction, self.cooldown_fraction) < 0.0
        ):
            raise ValueError("warmup_fraction and cooldown_fraction must be in [0, 1] and add up to at most 1")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {self.beta}")
        if not 0.0 <= self.polyak_decay < 1.0:
            raise ValueError(f"polyak_decay must be in [0, 1), got {self.polyak_decay}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")

    @property
    def polyak(self) -> float:
        return self.polyak_decay or max(0.0, 1.0 - 10.0 / self.steps)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One point of a sweep."""

    optimizer: str
    variant: str
    """A canonical variant name (:attr:`Variant.name`)."""
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.optimizer}|{self.variant}|lr={self.lr:.6g}|seed={self.seed}"


def make_optimizer(spec: RunSpec, setup: Setup, params):
    """The optimizer of ``spec`` (weight decay 0 for all, as ``sm3-dist train``)."""
    import torch

    variant = parse_variant(spec.variant)
    if not variant.applies_to(spec.optimizer):
        raise ValueError(f"variant {spec.variant!r} is for SM3 only, not {spec.optimizer}")
    if spec.optimizer == "sm3":
        import inspect

        import sm3_dist

        kwargs = dict(
            lr=spec.lr,
            momentum=0.0 if variant.has("nomom") else setup.momentum,
            beta=setup.beta if variant.has("ema") else 0.0,
            momentum_dtype=torch.bfloat16 if variant.has("bf16") else torch.float32,
            ema_keeps_max=variant.has("keepmax"),
        )
        if variant.has("uclip"):
            kwargs["update_clip"] = UPDATE_CLIP
        if variant.has("bc"):
            if "bias_correction" not in inspect.signature(sm3_dist.SM3).parameters:
                raise RuntimeError("this sm3_dist.SM3 has no bias_correction option: the bc variant cannot run")
            kwargs["bias_correction"] = True
        return sm3_dist.SM3(params, **kwargs)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    if spec.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=spec.lr, weight_decay=0.0)
    if spec.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=spec.lr, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {spec.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")


_CORPORA: dict = {}


def corpus_for(data: str):
    """The corpus of ``data`` (cached per process)."""
    from sm3_dist.launch.data import load_corpus

    if data not in _CORPORA:
        _CORPORA[data] = load_corpus(None if data == "default" else data)
    return _CORPORA[data]


def _held_out_loss(model, windows, chunk: int = 64) -> float:
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for part in windows.split(chunk):
            logits = model(input_ids=part[:, :-1]).logits
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), part[:, 1:].flatten(), reduction="sum"))
            count += part[:, 1:].numel()
    model.train()
    return total / count


def run(spec: RunSpec, setup: Setup, on_step: Callable[[], None] | None = None) -> dict:
    """Train and evaluate one run; returns its record (JSON-ready). ``on_step`` is called after every step.

    A non-finite training or held-out loss ends the run early with ``"diverged": true``
    and ``final`` ``None``.
    """
    import torch
    import torch.nn.functional as F
    from sm3_dist.launch.data import spread_windows, train_batch
    from sm3_dist.launch.model import build_model

    from sm3_dist.averaging import averaged_weights, polyak
    from sm3_dist.schedules import warmup_cooldown

    variant = parse_variant(spec.variant)
    if variant.name != spec.variant:
        raise ValueError(f"variant {spec.variant!r} is not in canonical form {variant.name!r}")
    start = time.perf_counter()
    corpus = corpus_for(setup.data)
    torch.manual_seed(spec.seed)
    device = torch.device(setup.device)
    model = build_model(setup.model_size, n_positions=setup.seq_len, seed=spec.seed).to(device)
    model.train()
    optimizer = make_optimizer(spec, setup, model.parameters())
    scheduler = warmup_cooldown(
        optimizer,
        setup.steps,
        warmup_fraction=setup.warmup_fraction,
        cooldown_fraction=setup.cooldown_fraction if variant.has("cooldown") else 0.0,
    )
    averaged = polyak(model, setup.polyak)
    windows = spread_windows(corpus.held_out, seq_len=setup.seq_len, count=setup.eval_windows).to(device)
    evals: list[list[float]] = []
    train_losses: list[float] = []
    grad_norms: list[float] = []
    update_rms: list[float] = []
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    diverged = False
    step = 0
    for step in range(1, setup.steps + 1):
        batch = train_batch(
            corpus.train, step=step - 1, global_batch=setup.batch_size, seq_len=setup.seq_len, seed=spec.seed
        ).to(device)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        if variant.has("clip"):
            norm = torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        grad_norms.append(float(norm))
        rate = optimizer.param_groups[0]["lr"]
        before = [p.detach().clone() for p in params]
        optimizer.step()
        with torch.no_grad():
            moved = sum(float((p - b).float().square().sum()) for p, b in zip(params, before))
        update_rms.append(math.sqrt(moved / numel) / rate if rate > 0 else 0.0)
        del before
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        averaged.update_parameters(model)
        value = float(loss.detach())
        train_losses.append(value)
        if not math.isfinite(value):
            diverged = True
            break
        if on_step is not None:
            on_step()
        if step % setup.eval_every == 0 or step == setup.steps:
            live = _held_out_loss(model, windows)
            with averaged_weights(model, averaged):
                avg = _held_out_loss(model, windows)
            evals.append([step, live, avg])
            if not math.isfinite(live):
                diverged = True
                break
    tail = train_losses[-max(1, setup.eval_every) :]
    return {
        **asdict(spec),
        "steps_run": step,
        "diverged": diverged,
        "final": None if diverged else evals[-1][1],
        "final_polyak": None if diverged else evals[-1][2],
        "train_tail": sum(tail) / len(tail),
        "evals": evals,
        "grad_norm": [round(v, 5) for v in grad_norms],
        "update_rms": [round(v, 5) for v in update_rms],
        "corpus": corpus.name,
        "seconds": round(time.perf_counter() - start, 2),
        "torch": torch.__version__,
    }
