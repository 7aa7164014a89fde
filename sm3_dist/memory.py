r"""``sm3-dist memory``: a per-rank memory model of data-parallel training, checked by measurement.

What one data-parallel rank holds while it trains a GPT-2-style model, in bytes,
for each optimizer (Adam, AdamW, Adagrad, Adafactor, SM3 with and without
momentum, SM3 with bf16 momentum) and setup (DDP, DeepSpeed ZeRO-1/2/3, FSDP2):

* **params**: the model's parameters as the setup stores them,
* **grads**: their gradients,
* **master**: fp32 master weights (mixed precision only, where DeepSpeed keeps them),
* **state**: the optimizer's state tensors (scalar step counters, 4 bytes per
  tensor, are left out, as :func:`sm3_dist.local_state_bytes` leaves them out),
* **working**: ZeRO-3/FSDP2 only: the layers gathered for compute,

and an activation-memory model that turns a per-rank budget into the largest
micro-batch and the largest model that fit.

**Where each byte comes from** (``N`` ranks; ``P`` parameters; ``e`` = 2 for
``bf16-mixed``, 4 for ``fp32``):

=======  ====================  =================  ==================  ==================================
setup    params                grads              master (mixed)      elements the optimizer updates
=======  ====================  =================  ==================  ==================================
ddp      e·P                   e·P                4·P                 P (every rank)
ddp-     e·P                   e·P                4·P/N               the rank's balanced flat slice
sharded                                                               (:class:`sm3_dist.ShardedSM3`)
zero1    e·P                   e·P                4·P/N               the rank's slice of one flat group
zero2    e·P                   e·(P/N)            4·P/N               same
zero3    e·Σ ceil(n/N) + pers  e·Σ ceil(n/N)      4·Σ ceil(n/N)       each parameter's ceil(n/N) slice
fsdp2    4·(P/N) (fp32 shard)  4·(P/N)            none (the shard)    each parameter's dim-0 chunk
=======  ====================  =================  ==================  ==================================

The ZeRO-1/2 flat group is padded to a multiple of ``2·N`` elements, as
DeepSpeed pads it; ZeRO-3 partitions each parameter into ``ceil(n/N)``-element
pieces, the tail padded, and keeps parameters below the persistence threshold
(1e5 elements, DeepSpeed's default) whole on every rank; FSDP2 splits dim 0 as
``torch.chunk`` does (FSDP2's storage padded to equal chunks).

Optimizer state, per element the optimizer updates (all fp32): Adam/AdamW 8
bytes (``exp_avg``, ``exp_avg_sq``), Adagrad 4 (``sum``). Adafactor keeps, as
``torch.optim.Adafactor`` does, ``row_var`` (``shape[:-1]``) and ``col_var``
(``shape[:-2] + shape[-1:]``) for tensors of rank >= 2 and a full ``variance``
for rank <= 1; under ZeRO the basic optimizer sees one flat (rank-1) partition,
so Adafactor's state there is a full ``variance``; under FSDP2 its ``row_var``
and ``col_var`` come out replicated (whole on every rank; and in torch 2.13 its
step then fails on the DTensor math, after the state is allocated). For
``ddp-sharded`` the non-SM3 optimizers are modelled on the same balanced
slices (torch's ``ZeroRedundancyOptimizer`` assigns whole parameters, so its
slices are only roughly balanced). SM3: momentum (4 or 2 bytes
per updated element, none without momentum) plus 4 bytes per *touched
accumulator entry*: for each local piece of a parameter of shape
``(n_1, ..., n_p)``, the range of each ``mu_d`` that the piece's indices cover,
computed from the real layouts with :func:`sm3_dist.layout.flat_range_piece`
(ZeRO flat partitions) and :func:`sm3_dist.layout.box_piece` (FSDP2 dim-0
shards). Reported per-rank numbers are those of the rank with the largest total.

**Working set** (ZeRO-3, FSDP2): the largest wrapped unit (one GPT-2 block, or
the embeddings) gathered twice (compute + prefetch) and its unsharded gradient
once, in the compute dtype. Sharded SM3 (every setup but ``ddp``, world > 1)
adds its ``all_reduce(MAX)`` buffer: 4 bytes per accumulator entry of the
whole model. Communication buckets, allocator fragmentation, the
CUDA context and DeepSpeed's transient fp32 gradient partition during the step
are not modelled.

**Activations** (per token, per layer, for a GPT-2 block with hidden size
``h``, ``a`` heads, sequence length ``s``; following Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models")::

    e·16h                 LayerNorm inputs (2h), QKV input (h), Q, K, V (3h), attention output (h),
                          MLP input (h), GELU input (4h), fc2 input (4h)
  + 2h                    dropout masks after attention and MLP (1 byte each; none without dropout)
  + attention scores      eager: a·s·(e + e + 1) (softmax output, dropout output, mask; a·s·e without
                          dropout); flash/SDPA: 4a (the fp32 log-sum-exp per head)

which is Korthikanti's ``34h + 5as`` for ``e = 2``, eager attention and
dropout. With activation checkpointing each layer keeps only its input (``e·h``
per token) and one layer is recomputed at a time. Outside the layers: the
embedding output and its dropout mask, the final LayerNorm input and output,
and the logits (``V·e``) with the fp32 copy and log-softmax the loss keeps
(``V·8``; ``V·4`` when the logits are already fp32). The largest micro-batch is
``floor((budget - model states) / (s · bytes per token))``.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from sm3_dist.layout import box_piece, flat_range_piece

__all__ = [
    "BUDGETS_GIB",
    "GIB",
    "OPTIMIZERS",
    "PRECISIONS",
    "SETUPS",
    "SIZES",
    "WORLD_SIZES",
    "ActivationModel",
    "Check",
    "GPT2Config",
    "RankCounts",
    "RankMemory",
    "activation_bytes_per_token",
    "family_config",
    "flat_bounds",
    "largest_model",
    "main",
    "max_micro_batch",
    "measure_optimizer_state",
    "measure_sharded_sm3",
    "measure_sm3_on_layouts",
    "optimizer_state_bytes",
    "rank_counts",
    "rank_memory",
    "resolve_size",
    "state_bytes",
    "validate",
]

GIB = 1024**3
SETUPS = ("ddp", "ddp-sharded", "zero1", "zero2", "zero3", "fsdp2")
OPTIMIZERS = ("adam", "adamw", "adagrad", "adafactor", "sm3", "sm3-momentum", "sm3-bf16-momentum")
PRECISIONS = ("fp32", "bf16-mixed")
WORLD_SIZES = (1, 2, 4, 8, 64, 1024)
BUDGETS_GIB = (16, 40, 80)
ZERO3_PERSISTENCE_THRESHOLD = 100_000
"""DeepSpeed's ``stage3_param_persistence_threshold`` default: smaller parameters stay whole on every rank."""
ZERO_ALIGNMENT = 2
"""DeepSpeed ZeRO-1/2 pads each flat group to a multiple of ``ZERO_ALIGNMENT * world_size`` elements."""
SM3_MOMENTUM = 0.9

_SETUP_LABELS = {
    "ddp": "DDP",
    "ddp-sharded": "DDP+sharded",
    "zero1": "ZeRO-1",
    "zero2": "ZeRO-2",
    "zero3": "ZeRO-3",
    "fsdp2": "FSDP2",
}
_OPTIMIZER_LABELS = {
    "adam": "Adam",
    "adamw": "AdamW",
    "adagrad": "Adagrad",
    "adafactor": "Adafactor",
    "sm3": "SM3",
    "sm3-momentum": "SM3 + momentum",
    "sm3-bf16-momentum": "SM3 + bf16 momentum",
}


# ---------------------------------------------------------------------------------------------- model shapes


@dataclass(frozen=True, slots=True, kw_only=True)
class GPT2Config:
    """A GPT-2 architecture (Hugging Face ``GPT2LMHeadModel``, tied input/output embeddings)."""

    name: str
    """Label used in tables and file names."""
    n_layer: int
    """Number of transformer blocks."""
    n_embd: int
    """Hidden size ``h``."""
    n_head: int
    """Attention heads ``a``."""
    vocab_size: int = 50257
    """Vocabulary size ``V`` (the tied ``wte`` is ``(V, h)``)."""
    n_positions: int = 1024
    """Positions of the learned ``wpe`` embedding; also the default sequence length."""

    def block_shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """One block's parameters, as ``GPT2Block`` registers them (``Conv1D`` weights are ``(in, out)``)."""
        h = self.n_embd
        return (
            ("ln_1.weight", (h,)),
            ("ln_1.bias", (h,)),
            ("attn.c_attn.weight", (h, 3 * h)),
            ("attn.c_attn.bias", (3 * h,)),
            ("attn.c_proj.weight", (h, h)),
            ("attn.c_proj.bias", (h,)),
            ("ln_2.weight", (h,)),
            ("ln_2.bias", (h,)),
            ("mlp.c_fc.weight", (h, 4 * h)),
            ("mlp.c_fc.bias", (4 * h,)),
            ("mlp.c_proj.weight", (4 * h, h)),
            ("mlp.c_proj.bias", (h,)),
        )

    def param_shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Every parameter in ``model.parameters()`` order, with its name."""
        h = self.n_embd
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("transformer.wte.weight", (self.vocab_size, h)),
            ("transformer.wpe.weight", (self.n_positions, h)),
        ]
        for i in range(self.n_layer):
            shapes.extend((f"transformer.h.{i}.{name}", shape) for name, shape in self.block_shapes())
        shapes += [("transformer.ln_f.weight", (h,)), ("transformer.ln_f.bias", (h,))]
        return tuple(shapes)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) * k for s, k in self.shape_counts().items())

    def shape_counts(self) -> Counter:
        """Each distinct parameter shape with its multiplicity."""
        counts: Counter = Counter()
        for _, shape in self.block_shapes():
            counts[shape] += self.n_layer
        for shape in ((self.vocab_size, self.n_embd), (self.n_positions, self.n_embd), (self.n_embd,), (self.n_embd,)):
            counts[shape] += 1
        return counts

    def largest_unit_numel(self) -> int:
        """Elements of the largest unit ZeRO-3/FSDP2 gathers at once: one block, or the embeddings."""
        block = sum(math.prod(s) for _, s in self.block_shapes())
        root = (self.vocab_size + self.n_positions + 2) * self.n_embd
        return max(block, root)


SIZES = {
    "tiny": GPT2Config(name="tiny", n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128),
    "124M": GPT2Config(name="124M", n_layer=12, n_embd=768, n_head=12),
    "355M": GPT2Config(name="355M", n_layer=24, n_embd=1024, n_head=16),
    "774M": GPT2Config(name="774M", n_layer=36, n_embd=1280, n_head=20),
    "1.5B": GPT2Config(name="1.5B", n_layer=48, n_embd=1600, n_head=25),
    "2.7B": GPT2Config(name="2.7B", n_layer=32, n_embd=2560, n_head=32),
    "6.7B": GPT2Config(name="6.7B", n_layer=32, n_embd=4096, n_head=32),
    "13B": GPT2Config(name="13B", n_layer=40, n_embd=5120, n_head=40),
}
"""GPT-2 sizes, a tiny one for tests, and larger ones at GPT-3 widths (GPT-2 vocabulary and context)."""
_ALIASES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1.5B"}
_CUSTOM = re.compile(r"^(\d+)x(\d+)$")
DEFAULT_SIZES = ("124M", "355M", "774M", "1.5B")


def resolve_size(text: str) -> GPT2Config:
    """A named size (``124M``, ``gpt2-xl``, ...) or ``LAYERSxHIDDEN`` (e.g. ``48x1600``; 64-wide heads)."""
    key = text.strip()
    key = _ALIASES.get(key.lower(), key)
    for name, config in SIZES.items():
        if name.lower() == key.lower():
            return config
    match = _CUSTOM.match(key)
    if match:
        n_layer, n_embd = int(match.group(1)), int(match.group(2))
        if n_layer < 1 or n_embd < 64 or n_embd % 64:
            raise ValueError(f"custom size {text!r}: need at least 1 layer and a hidden size that is a multiple of 64")
        return GPT2Config(name=key, n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 64)
    names = ", ".join([*SIZES, *_ALIASES])
    raise ValueError(f"unknown model size {text!r}: choose from {names}, or LAYERSxHIDDEN such as 48x1600")


def family_config(n_embd: int, *, aspect: int = 128) -> GPT2Config:
    """A GPT-2-style model of hidden size ``n_embd`` with ``n_embd / aspect`` layers and 128-wide heads."""
    n_layer = max(1, round(n_embd / aspect))
    return GPT2Config(name=f"{n_layer}x{n_embd}", n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 128))


# ---------------------------------------------------------------------------------------------- per-rank geometry


@dataclass(frozen=True, slots=True, kw_only=True)
class RankCounts:
    """Element counts one rank holds."""

    params: int
    """Elements of parameter storage."""
    grads: int
    """Elements of gradient storage."""
    owned: int
    """Elements the optimizer updates (master weights and elementwise state), padding included."""
    sm3_accumulators: int
    """SM3 accumulator entries the rank's pieces touch."""
    adafactor: int
    """Elements of ``torch.optim.Adafactor`` state for the tensors the optimizer sees."""


def _adafactor_numel(shape: Sequence[int]) -> int:
    if len(shape) >= 2:
        return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
    return math.prod(shape)


def _sm3_full(shape: Sequence[int]) -> int:
    return sum(shape) if len(shape) >= 2 else math.prod(shape)


def _sm3_flat(shape: tuple[int, ...], start: int, stop: int) -> int:
    if stop <= start:
        return 0
    if start == 0 and stop == math.prod(shape):
        return _sm3_full(shape)
    if len(shape) <= 1:
        return stop - start
    return flat_range_piece(shape, start, stop).accumulator_numel


@lru_cache(maxsize=4096)
def _zero3_param(shape: tuple[int, ...], world: int) -> tuple[int, tuple[int, ...]]:
    """ZeRO-3: a parameter's partition size and the SM3 entries each rank's piece touches."""
    numel = math.prod(shape)
    size = -(-numel // world)
    return size, tuple(_sm3_flat(shape, min(r * size, numel), min((r + 1) * size, numel)) for r in range(world))


@lru_cache(maxsize=4096)
def _fsdp2_param(shape: tuple[int, ...], world: int) -> tuple[tuple[int, int, int, int], ...]:
    """FSDP2 ``Shard(0)``: per rank (padded storage, local elements, SM3 entries, Adafactor elements)."""
    chunk = -(-shape[0] // world)
    rest = math.prod(shape[1:])
    out = []
    for r in range(world):
        start = min(r * chunk, shape[0])
        rows = max(0, min((r + 1) * chunk, shape[0]) - start)
        lengths = (rows, *shape[1:])
        if len(shape) >= 2:
            sm3 = box_piece(shape, (start, *(0,) * (len(shape) - 1)), lengths).accumulator_numel
            # torch.optim.Adafactor's row_var/col_var come out Replicate(): whole on every rank (measured)
            adafactor = _adafactor_numel(shape)
        else:
            sm3 = rows
            adafactor = rows
        out.append((chunk * rest, rows * rest, sm3, adafactor))
    return tuple(out)


def flat_bounds(total: int, world: int, *, padded: bool) -> tuple[int, ...]:
    """Slice bounds of a flat buffer of ``total`` elements over ``world`` ranks (rank ``r``: ``[b_r, b_r+1)``).

    ``padded``: DeepSpeed ZeRO-1/2, the buffer padded to a multiple of ``ZERO_ALIGNMENT * world`` and cut into
    equal slices (the last ones may hold padding only). Otherwise :class:`sm3_dist.ShardedSM3`'s balanced
    slices ``r * total // world``, no padding.
    """
    if padded:
        alignment = ZERO_ALIGNMENT * world
        size = -(-total // alignment) * alignment // world
        return tuple(r * size for r in range(world + 1))
    return tuple(r * total // world for r in range(world + 1))


@lru_cache(maxsize=256)
def rank_counts(config: GPT2Config, setup: str, world: int) -> tuple[RankCounts, ...]:
    """What each of ``world`` ranks holds under ``setup`` (one entry per rank)."""
    if setup not in SETUPS:
        raise ValueError(f"unknown setup {setup!r}: choose from {', '.join(SETUPS)}")
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    shapes = [shape for _, shape in config.param_shapes()]
    total = sum(math.prod(s) for s in shapes)
    if setup == "ddp":
        one = RankCounts(
            params=total,
            grads=total,
            owned=total,
            sm3_accumulators=sum(_sm3_full(s) for s in shapes),
            adafactor=sum(_adafactor_numel(s) for s in shapes),
        )
        return (one,) * world
    if setup in ("zero1", "zero2", "ddp-sharded"):
        bounds = flat_bounds(total, world, padded=setup != "ddp-sharded")
        starts = [0]
        for s in shapes:
            starts.append(starts[-1] + math.prod(s))
        out = []
        for r in range(world):
            lo, hi = bounds[r], min(bounds[r + 1], total)
            size = bounds[r + 1] - bounds[r]
            touched = 0
            i = max(0, bisect.bisect_right(starts, lo) - 1)
            while i < len(shapes) and starts[i] < hi:
                a, b = max(lo, starts[i]), min(hi, starts[i + 1])
                touched += _sm3_flat(shapes[i], a - starts[i], b - starts[i])
                i += 1
            grads = size if setup == "zero2" else total
            out.append(RankCounts(params=total, grads=grads, owned=size, sm3_accumulators=touched, adafactor=size))
        return tuple(out)
    counts = config.shape_counts()
    if setup == "zero3":
        persistent = sum(math.prod(s) * k for s, k in counts.items() if math.prod(s) < ZERO3_PERSISTENCE_THRESHOLD)
        owned = sum(_zero3_param(s, world)[0] * k for s, k in counts.items())
        touched = [0] * world
        for s, k in counts.items():
            for r, n in enumerate(_zero3_param(s, world)[1]):
                touched[r] += n * k
        return tuple(
            RankCounts(params=owned + persistent, grads=owned, owned=owned, sm3_accumulators=t, adafactor=owned)
            for t in touched
        )
    per_rank = [[0, 0, 0, 0] for _ in range(world)]
    for s, k in counts.items():
        for r, values in enumerate(_fsdp2_param(s, world)):
            for j, v in enumerate(values):
                per_rank[r][j] += v * k
    return tuple(
        RankCounts(params=stored, grads=stored, owned=local, sm3_accumulators=sm3, adafactor=ada)
        for stored, local, sm3, ada in per_rank
    )


# ---------------------------------------------------------------------------------------------- bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class RankMemory:
    """Bytes one rank holds for the model states."""

    params: int
    grads: int
    master: int
    """fp32 master weights (mixed precision under DDP/ZeRO)."""
    state: int
    """Optimizer state tensors (step counters left out)."""
    working: int
    """Gathered layers and their unsharded gradients (ZeRO-3, FSDP2)."""
    rank: int = 0
    """The rank these bytes belong to (the one with the largest total)."""

    @property
    def total(self) -> int:
        return self.params + self.grads + self.master + self.state + self.working


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}: choose from {', '.join(choices)}")


def state_bytes(optimizer: str, counts: RankCounts) -> int:
    """Optimizer state bytes of one rank (all state fp32, SM3 momentum optionally bf16)."""
    _check_choice(optimizer, OPTIMIZERS, "optimizer")
    if optimizer in ("adam", "adamw"):
        return 8 * counts.owned
    if optimizer == "adagrad":
        return 4 * counts.owned
    if optimizer == "adafactor":
        return 4 * counts.adafactor
    momentum = {"sm3": 0, "sm3-momentum": 4, "sm3-bf16-momentum": 2}[optimizer]
    return 4 * counts.sm3_accumulators + momentum * counts.owned


def rank_memory(config: GPT2Config, setup: str, world: int, optimizer: str, precision: str = "fp32") -> RankMemory:
    """Per-rank bytes of params, grads, master weights, optimizer state and working set (the largest rank)."""
    _check_choice(precision, PRECISIONS, "precision")
    e = 2 if precision == "bf16-mixed" else 4
    mixed = precision == "bf16-mixed"
    working = 0
    if setup in ("zero3", "fsdp2") and world > 1:
        working = 3 * e * config.largest_unit_numel()
    if optimizer.startswith("sm3") and setup != "ddp" and world > 1:
        working += 4 * rank_counts(config, "ddp", 1)[0].sm3_accumulators  # the all_reduce(MAX) buffer
    best: RankMemory | None = None
    for r, c in enumerate(rank_counts(config, setup, world)):
        if setup == "fsdp2":  # the fp32 shard is the master copy; gathered copies are in `working`
            params, grads, master = 4 * c.params, 4 * c.grads, 0
        else:
            params, grads, master = e * c.params, e * c.grads, (4 * c.owned if mixed else 0)
        memory = RankMemory(
            params=params, grads=grads, master=master, state=state_bytes(optimizer, c), working=working, rank=r
        )
        if best is None or memory.total > best.total:
            best = memory
        if setup == "ddp":  # every rank holds the same
            break
    assert best is not None
    return best


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------- activations


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationModel:
    """Activation memory of a GPT-2 forward pass kept for the backward pass."""

    seq_len: int = 1024
    """Tokens per sample."""
    checkpointing: bool = True
    """Per-block activation checkpointing (each block keeps its input, one block is recomputed at a time)."""
    flash_attention: bool = True
    """Fused attention (SDPA/flash): no ``s x s`` scores are kept."""
    dropout: bool = True
    """Dropout masks (1 byte per element) after attention, after the MLP and after the embeddings."""


def _layer_bytes_per_token(config: GPT2Config, act: ActivationModel, e: int) -> int:
    h, a = config.n_embd, config.n_head
    per = e * 16 * h + (2 * h if act.dropout else 0)
    if act.flash_attention:
        per += 4 * a
    else:
        per += a * act.seq_len * (e + (e + 1 if act.dropout else 0))
    return per


def activation_bytes_per_token(config: GPT2Config, act: ActivationModel, precision: str = "bf16-mixed") -> int:
    """Activation bytes per token of a micro-batch (see the module docstring for the formula)."""
    _check_choice(precision, PRECISIONS, "precision")
    e = 2 if precision == "bf16-mixed" else 4
    h, v = config.n_embd, config.vocab_size
    layer = _layer_bytes_per_token(config, act, e)
    layers = config.n_layer * e * h + layer if act.checkpointing else config.n_layer * layer
    outside = e * h + (h if act.dropout else 0) + 2 * e * h + v * (e + (4 if e != 4 else 0) + 4)
    return layers + outside


def max_micro_batch(
    config: GPT2Config,
    setup: str,
    world: int,
    optimizer: str,
    budget_bytes: int,
    act: ActivationModel,
    precision: str = "bf16-mixed",
) -> int:
    """Largest micro-batch (samples of ``act.seq_len`` tokens) that fits; -1 if the model states alone do not."""
    states = rank_memory(config, setup, world, optimizer, precision).total
    if states > budget_bytes:
        return -1
    per_sample = act.seq_len * activation_bytes_per_token(config, act, precision)
    return (budget_bytes - states) // per_sample


_FAMILY_WIDTHS = tuple(128 * k for k in range(2, 161))
"""Hidden sizes of the model family searched: 256 to 20480 in steps of 128."""


def largest_model(
    setup: str,
    world: int,
    optimizer: str,
    budget_bytes: int,
    act: ActivationModel,
    precision: str = "bf16-mixed",
    *,
    widths: Sequence[int] = _FAMILY_WIDTHS,
) -> GPT2Config | None:
    """Largest model of :func:`family_config` (over ``widths``) that trains with micro-batch 1, or None.

    Memory grows with the width, so this is a binary search.
    """
    ordered = sorted(widths)

    def fits(width: int) -> bool:
        return max_micro_batch(family_config(width), setup, world, optimizer, budget_bytes, act, precision) >= 1

    lo, hi = 0, len(ordered)  # ordered[:lo] fit, ordered[hi:] do not
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(ordered[mid]):
            lo = mid + 1
        else:
            hi = mid
    return family_config(ordered[lo - 1]) if lo else None


# ---------------------------------------------------------------------------------------------- measurement


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of an optimizer's state tensors, scalar ``step`` counters left out (DTensors by local shard)."""
    from torch import Tensor

    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor) and key != "step":
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def _make_optimizer(name: str, params: list) -> Any:
    import torch

    from sm3_dist import SM3

    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=1e-2)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-2)
    if name == "sm3":
        return SM3(params, lr=0.1)
    if name == "sm3-momentum":
        return SM3(params, lr=0.1, momentum=SM3_MOMENTUM)
    if name == "sm3-bf16-momentum":
        import torch

        return SM3(params, lr=0.1, momentum=SM3_MOMENTUM, momentum_dtype=torch.bfloat16)
    raise ValueError(f"unknown optimizer {name!r}: choose from {', '.join(OPTIMIZERS)}")


def _params_with_grads(shapes: Iterable[Sequence[int]]) -> list:
    """fp32 parameters with gradients (their values do not change the state's size: filled, not sampled)."""
    import torch

    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.full(shape, 0.5)
        params.append(p)
    return params


def measure_optimizer_state(config: GPT2Config, optimizer: str, params: list | None = None) -> int:
    """Build ``optimizer`` on real fp32 parameters of ``config``, step once, return its state bytes.

    ``params`` (with gradients) may be passed to reuse one set of tensors across optimizers.
    """
    if params is None:
        params = _params_with_grads(shape for _, shape in config.param_shapes())
    opt = _make_optimizer(optimizer, params)
    opt.step()
    measured = optimizer_state_bytes(opt)
    opt.state.clear()
    return measured


def measure_sm3_on_layouts(config: GPT2Config, setup: str, world: int, rank: int, optimizer: str) -> int:
    """SM3's state for one rank's local pieces under ``setup``, built in one process.

    The rank's local tensors (a ZeRO-1/2 flat partition, ZeRO-3 per-parameter
    partitions, FSDP2 dim-0 chunks) are real fp32 tensors; a shard resolver
    hands :class:`sm3_dist.SM3` their layouts, as the framework adapters do,
    with no process group (nothing is reduced). SM3 then allocates its state
    as it would on that rank, and this returns its bytes.
    """

    from sm3_dist.layout import TensorLayout
    from sm3_dist.placement import ShardSpec

    shapes = [shape for _, shape in config.param_shapes()]
    specs: list[tuple[int, ShardSpec]] = []
    if setup in ("zero1", "zero2", "ddp-sharded"):
        total = sum(math.prod(s) for s in shapes)
        bounds = flat_bounds(total, world, padded=setup != "ddp-sharded")
        lo, hi = bounds[rank], min(bounds[rank + 1], total)
        size = bounds[rank + 1] - bounds[rank]
        pieces, start = [], 0
        for tid, s in enumerate(shapes):
            n = math.prod(s)
            a, b = max(lo, start), min(hi, start + n)
            if b > a:
                pieces.append(flat_range_piece(s, a - start, b - start, tensor_id=tid, offset=a - lo))
            start += n
        specs.append((size, ShardSpec(TensorLayout(pieces=tuple(pieces), numel=size))))
    elif setup == "zero3":
        for tid, s in enumerate(shapes):
            n = math.prod(s)
            size = -(-n // world)
            a, b = min(rank * size, n), min((rank + 1) * size, n)
            piece = flat_range_piece(s, a, b, tensor_id=tid)
            specs.append((size, ShardSpec(TensorLayout(pieces=(piece,), numel=size))))
    elif setup == "fsdp2":
        for tid, s in enumerate(shapes):
            chunk = -(-s[0] // world)
            start = min(rank * chunk, s[0])
            rows = max(0, min((rank + 1) * chunk, s[0]) - start)
            piece = box_piece(s, (start, *(0,) * (len(s) - 1)), (rows, *s[1:]), tensor_id=tid)
            specs.append((piece.numel, ShardSpec(TensorLayout(pieces=(piece,), numel=piece.numel))))
    else:
        return measure_optimizer_state(config, optimizer)
    params = _params_with_grads((numel,) for numel, _ in specs)
    by_tensor = {p: spec for p, (_, spec) in zip(params, specs)}
    opt = _make_optimizer(optimizer, params)
    if not optimizer.startswith("sm3"):
        opt.step()
        return optimizer_state_bytes(opt)
    from sm3_dist import SM3

    opt = SM3(params, **_sm3_kwargs(optimizer), shard_resolver=by_tensor.get)
    opt.step()
    return optimizer_state_bytes(opt)


def _sm3_kwargs(optimizer: str) -> dict[str, Any]:
    import torch

    if optimizer == "sm3":
        return dict(lr=0.1)
    if optimizer == "sm3-momentum":
        return dict(lr=0.1, momentum=SM3_MOMENTUM)
    if optimizer == "sm3-bf16-momentum":
        return dict(lr=0.1, momentum=SM3_MOMENTUM, momentum_dtype=torch.bfloat16)
    raise ValueError(f"{optimizer!r} is not an SM3 variant")


def _sharded_sm3_worker(rank: int, world: int, init_file: str, shapes: list, optimizers: list, out: str) -> None:
    import torch.distributed as dist

    from sm3_dist import ShardedSM3
    from sm3_dist.comm import end_process

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        measured = {}
        for name in optimizers:
            params = _params_with_grads(shapes)
            opt = ShardedSM3(params, **_sm3_kwargs(name))
            opt.step()
            opt.state_dict()  # waits for the last all_reduce of maxima (a collective: every rank calls it)
            measured[name] = optimizer_state_bytes(opt)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(measured, f)
    finally:
        dist.destroy_process_group()
    end_process(0)


def measure_sharded_sm3(config: GPT2Config, world: int, optimizers: Sequence[str]) -> list[dict[str, int]]:
    """State bytes of :class:`sm3_dist.ShardedSM3` on each of ``world`` CPU processes (gloo), per optimizer."""
    import tempfile

    import torch.multiprocessing as mp

    shapes = [list(shape) for _, shape in config.param_shapes()]
    names = [n for n in optimizers if n.startswith("sm3")]
    with tempfile.TemporaryDirectory() as out:
        init_file = os.path.join(out, "init")
        mp.spawn(_sharded_sm3_worker, args=(world, init_file, shapes, names, out), nprocs=world, join=True)
        results = []
        for r in range(world):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                results.append(json.load(f))
    return results


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One prediction of the model compared with a measurement."""

    what: str
    """What was measured (size, setup, world size, rank, optimizer)."""
    predicted: int
    """Optimizer-state bytes the model predicts."""
    measured: int
    """Optimizer-state bytes of the real optimizer instance."""

    @property
    def rel_error(self) -> float:
        if self.measured == 0:
            return 0.0 if self.predicted == 0 else math.inf
        return abs(self.predicted - self.measured) / self.measured

    def ok(self, tolerance: float = 0.02) -> bool:
        return self.rel_error <= tolerance


def validate(
    level: str = "full", optimizers: Sequence[str] = OPTIMIZERS, progress: Callable[[str], None] | None = None
) -> list[Check]:
    """Measure real optimizer instances and compare with the model (fp32 parameters).

    ``tiny``: the tiny config, single process, every optimizer; SM3 (and
    Adam/Adagrad) on every rank's local pieces of each sharded setup at 2 and 3
    ranks; :class:`sm3_dist.ShardedSM3` on 2 processes. ``full`` adds GPT-2
    124M, single process, every optimizer.
    """
    checks: list[Check] = []
    tiny = SIZES["tiny"]

    def add(what: str, predicted: int, measure: Callable[[], int]) -> None:
        if progress is not None:
            progress(what)
        checks.append(Check(what=what, predicted=predicted, measured=measure()))

    configs = [tiny] + ([SIZES["124M"]] if level == "full" else [])
    for config in configs:
        counts = rank_counts(config, "ddp", 1)[0]
        params = _params_with_grads(shape for _, shape in config.param_shapes())
        for name in optimizers:
            add(
                f"{config.name} single-process {name}",
                state_bytes(name, counts),
                lambda c=config, n=name, p=params: measure_optimizer_state(c, n, p),
            )
        del params
    sharded = [n for n in optimizers if n.startswith("sm3") or n in ("adam", "adagrad")]
    for world in (2, 3):
        for setup in ("ddp-sharded", "zero1", "zero2", "zero3", "fsdp2"):
            per_rank = rank_counts(tiny, setup, world)
            for rank in range(world):
                for name in sharded:
                    add(
                        f"tiny {setup} world {world} rank {rank} {name}",
                        state_bytes(name, per_rank[rank]),
                        lambda s=setup, w=world, r=rank, n=name: measure_sm3_on_layouts(tiny, s, w, r, n),
                    )
    if any(n.startswith("sm3") for n in optimizers):
        world = 2
        if progress is not None:
            progress(f"ShardedSM3 at {world} ranks")
        per_rank = rank_counts(tiny, "ddp-sharded", world)
        for rank, measured in enumerate(measure_sharded_sm3(tiny, world, optimizers)):
            for name, value in measured.items():
                checks.append(
                    Check(
                        what=f"tiny ShardedSM3 world {world} rank {rank} {name}",
                        predicted=state_bytes(name, per_rank[rank]),
                        measured=value,
                    )
                )
    return checks


# ---------------------------------------------------------------------------------------------- outputs


@dataclass(slots=True, kw_only=True)
class Report:
    """Everything one run computes."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    fit: list[dict[str, Any]] = field(default_factory=list)
    largest: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


def _gib(n: float) -> float:
    return n / GIB


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def headline_table(
    config: GPT2Config, world: int, precision: str, setups: Sequence[str], optimizers: Sequence[str]
) -> str:
    """Markdown table: per-rank GiB (total) by optimizer x setup, and what SM3 frees vs Adam."""
    header = ["optimizer", *(_SETUP_LABELS[s] for s in setups)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    totals = {(o, s): rank_memory(config, s, world, o, precision).total for o in optimizers for s in setups}
    for o in optimizers:
        lines.append(f"| {_OPTIMIZER_LABELS[o]} | " + " | ".join(f"{_gib(totals[o, s]):.2f}" for s in setups) + " |")
    if "adam" in optimizers:
        for o in ("sm3", "sm3-bf16-momentum"):
            if o in optimizers:
                freed = " | ".join(
                    f"{_gib(totals['adam', s] - totals[o, s]):.2f} ({100 * (1 - totals[o, s] / totals['adam', s]):.0f}%)"
                    for s in setups
                )
                lines.append(f"| *{_OPTIMIZER_LABELS[o]} frees vs Adam* | {freed} |")
    return "\n".join(lines)


_STYLES = {
    "adam": dict(color="tab:red", ls="-", marker="o"),
    "adamw": dict(color="tab:orange", ls=":", marker="x"),
    "adagrad": dict(color="tab:brown", ls="-", marker="s"),
    "adafactor": dict(color="tab:green", ls="--", marker="^"),
    "sm3": dict(color="tab:blue", ls="-", marker="D"),
    "sm3-momentum": dict(color="tab:purple", ls="--", marker="v"),
    "sm3-bf16-momentum": dict(color="tab:cyan", ls="-.", marker="P"),
}


def _axes_grid(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return plt, fig, flat[:n]


def _plot_memory_vs_world(
    path: str,
    config: GPT2Config,
    worlds: Sequence[int],
    setups: Sequence[str],
    optimizers: Sequence[str],
    precision: str,
) -> None:
    plt, fig, axes = _axes_grid(len(setups))
    for ax, setup in zip(axes, setups):
        for o in optimizers:
            ys = [_gib(rank_memory(config, setup, w, o, precision).total) for w in worlds]
            ax.plot(worlds, ys, ms=4, lw=1.3, label=_OPTIMIZER_LABELS[o], **_STYLES[o])
        if len(worlds) > 1:
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(_SETUP_LABELS[setup])
        ax.set_xlabel("data-parallel ranks")
        ax.set_ylabel("per-rank model states (GiB)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"GPT-2 {config.name} ({config.numel / 1e9:.2f}B params), {precision}: params + grads + master + "
        "optimizer state + working set per rank"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_max_params(
    path: str, world: int, setups: Sequence[str], optimizers: Sequence[str], precision: str, act: ActivationModel
) -> None:
    budgets = [4, 6, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160]
    plt, fig, axes = _axes_grid(len(setups))
    for ax, setup in zip(axes, setups):
        for o in optimizers:
            ys = []
            for b in budgets:
                config = largest_model(setup, world, o, b * GIB, act, precision)
                ys.append(config.numel / 1e9 if config is not None else float("nan"))
            ax.plot(budgets, ys, ms=4, lw=1.3, label=_OPTIMIZER_LABELS[o], **_STYLES[o])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{_SETUP_LABELS[setup]}, {world} ranks")
        ax.set_xlabel("per-rank budget (GiB)")
        ax.set_ylabel("largest trainable model (B params)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    ckpt = "with" if act.checkpointing else "without"
    fig.suptitle(
        f"Largest GPT-2-style model (depth = width/128) at micro-batch 1 x {act.seq_len} tokens, {precision}, "
        f"{ckpt} activation checkpointing"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- command


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sm3-dist memory",
        description="Per-rank memory of data-parallel training by optimizer and setup, the largest micro-batch "
        "and model a budget allows, and a check of the model against real optimizer instances.",
    )
    p.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="model sizes: names or LAYERSxHIDDEN")
    p.add_argument("--world-sizes", default=",".join(map(str, WORLD_SIZES)), help="data-parallel world sizes")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"from {', '.join(SETUPS)}")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"from {', '.join(OPTIMIZERS)}")
    p.add_argument(
        "--precision",
        default=",".join(PRECISIONS),
        help="fp32 and/or bf16-mixed (bf16 params/grads, fp32 master weights and state); the last one is the headline",
    )
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS_GIB)), help="per-rank budgets in GiB")
    p.add_argument("--table-world", type=int, default=8, help="world size of the terminal tables (default 8)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sample for the activation model")
    p.add_argument("--attention", choices=("flash", "eager"), default="flash", help="attention kernel")
    p.add_argument("--no-dropout", action="store_true", help="no dropout masks in the activation model")
    p.add_argument(
        "--measure",
        choices=("full", "tiny", "none"),
        default="tiny",
        help="validate against real optimizers: the tiny config on one process (every setup's layouts) and "
        "ShardedSM3 on 2 processes; full adds GPT-2 124M on one process (default tiny)",
    )
    p.add_argument("--tolerance", type=float, default=0.02, help="largest relative disagreement allowed")
    p.add_argument("--out", default="sm3-memory", help="output folder (default ./sm3-memory)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def _parse_ints(text: str, what: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in _split(text)]
    except ValueError:
        raise ValueError(f"{what} must be integers, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{what} must be integers >= {minimum}, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return _run(args)
    except ValueError as exc:
        print(f"sm3-dist memory: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    configs = [resolve_size(s) for s in _split(args.sizes)]
    if not configs:
        raise ValueError("no model size given")
    worlds = _parse_ints(args.world_sizes, "world sizes", 1)
    setups = _split(args.setups)
    for s in setups:
        _check_choice(s, SETUPS, "setup")
    optimizers = _split(args.optimizers)
    for o in optimizers:
        _check_choice(o, OPTIMIZERS, "optimizer")
    precisions = _split(args.precision)
    for p in precisions:
        _check_choice(p, PRECISIONS, "precision")
    if not setups or not optimizers or not precisions:
        raise ValueError("at least one setup, optimizer and precision is needed")
    try:
        budgets = [float(b) for b in _split(args.budgets)]
    except ValueError:
        raise ValueError(f"budgets must be numbers of GiB, got {args.budgets!r}") from None
    if not budgets or any(not b > 0 for b in budgets):
        raise ValueError(f"budgets must be positive numbers of GiB, got {args.budgets!r}")
    if args.table_world < 1 or args.seq_len < 1:
        raise ValueError("--table-world and --seq-len must be >= 1")
    headline = precisions[-1]
    table_world = args.table_world
    for config in configs:
        for precision in precisions:
            smallest = min(rank_memory(config, s, w, "sm3", precision).params for s in setups for w in worlds)
            if min(budgets) * GIB < smallest:
                raise ValueError(
                    f"a budget of {min(budgets):g} GiB is smaller than the parameters alone: {config.name} needs "
                    f"{_gib(smallest):.2f} GiB of parameters per rank ({precision}, best of the setups and world sizes given)"
                )
    act_variants = [
        ActivationModel(
            seq_len=args.seq_len,
            checkpointing=ck,
            flash_attention=args.attention == "flash",
            dropout=not args.no_dropout,
        )
        for ck in (True, False)
    ]
    report = Report()
    for config in configs:
        for precision in precisions:
            for world in worlds:
                for setup in setups:
                    for o in optimizers:
                        m = rank_memory(config, setup, world, o, precision)
                        report.rows.append(
                            dict(
                                size=config.name,
                                numel=config.numel,
                                precision=precision,
                                world_size=world,
                                setup=setup,
                                optimizer=o,
                                rank=m.rank,
                                params=m.params,
                                grads=m.grads,
                                master=m.master,
                                state=m.state,
                                working=m.working,
                                total=m.total,
                            )
                        )
            for act in act_variants:
                per_token = activation_bytes_per_token(config, act, precision)
                for setup in setups:
                    for o in optimizers:
                        for b in budgets:
                            report.fit.append(
                                dict(
                                    size=config.name,
                                    precision=precision,
                                    world_size=table_world,
                                    setup=setup,
                                    optimizer=o,
                                    budget_gib=b,
                                    checkpointing=act.checkpointing,
                                    seq_len=act.seq_len,
                                    activation_bytes_per_token=per_token,
                                    max_micro_batch=max_micro_batch(
                                        config, setup, table_world, o, int(b * GIB), act, precision
                                    ),
                                )
                            )
    act = act_variants[0]
    for setup in setups:
        for o in optimizers:
            for b in budgets:
                best = largest_model(setup, table_world, o, int(b * GIB), act, headline)
                report.largest.append(
                    dict(
                        precision=headline,
                        world_size=table_world,
                        setup=setup,
                        optimizer=o,
                        budget_gib=b,
                        checkpointing=True,
                        largest=best.name if best else None,
                        largest_numel=best.numel if best else 0,
                    )
                )
    if args.measure != "none":
        report.checks = validate(args.measure, optimizers)

    os.makedirs(args.out, exist_ok=True)
    _print_report(report, configs, setups, optimizers, budgets, headline, table_world, args.tolerance)
    _write_outputs(report, args.out, args.tolerance)
    if not args.no_plots:
        for config in configs:
            _plot_memory_vs_world(
                os.path.join(args.out, f"memory-{config.name}.png"), config, worlds, setups, optimizers, headline
            )
        _plot_max_params(os.path.join(args.out, "max-params.png"), table_world, setups, optimizers, headline, act)
    print(f"\noutputs in {os.path.abspath(args.out)} ({time.perf_counter() - started:.1f} s)")
    bad = [c for c in report.checks if not c.ok(args.tolerance)]
    if bad:
        print(f"FAILED: {len(bad)} measurement(s) disagree with the model by more than {args.tolerance:.0%}")
        return 1
    return 0


def _print_report(
    report: Report,
    configs: Sequence[GPT2Config],
    setups: Sequence[str],
    optimizers: Sequence[str],
    budgets: Sequence[float],
    headline: str,
    world: int,
    tolerance: float,
) -> None:
    for config in configs:
        print(f"\nGPT-2 {config.name} ({config.numel:,} params), {headline}, per-rank GiB at {world} ranks")
        print(headline_table(config, world, headline, setups, optimizers))
    big = configs[-1]
    print(f"\nGPT-2 {big.name}, {headline}, {world} ranks: per-rank breakdown (GiB)")
    rows = []
    for setup in setups:
        for o in optimizers:
            m = rank_memory(big, setup, world, o, headline)
            rows.append(
                [
                    f"{_SETUP_LABELS[setup]} {o}",
                    *(f"{_gib(v):.2f}" for v in (m.params, m.grads, m.master, m.state, m.working, m.total)),
                ]
            )
    print(_table(["setup optimizer", "params", "grads", "master", "state", "working", "total"], rows))
    for checkpointing in (True, False):
        fit = {
            (r["setup"], r["optimizer"], r["budget_gib"]): r["max_micro_batch"]
            for r in report.fit
            if r["size"] == big.name and r["precision"] == headline and r["checkpointing"] == checkpointing
        }
        ck = "with" if checkpointing else "without"
        print(f"\nGPT-2 {big.name}: largest micro-batch ({ck} activation checkpointing; -1: states do not fit)")
        header = ["optimizer", *(f"{_SETUP_LABELS[s]} {b:g}G" for s in setups for b in budgets)]
        print(_table(header, [[o, *(fit[s, o, b] for s in setups for b in budgets)] for o in optimizers]))
    print(f"\nLargest trainable model (B params; depth = width/128, micro-batch 1, checkpointing), {world} ranks")
    largest = {(r["setup"], r["optimizer"], r["budget_gib"]): r["largest_numel"] for r in report.largest}
    header = ["optimizer", *(f"{_SETUP_LABELS[s]} {b:g}G" for s in setups for b in budgets)]
    print(
        _table(header, [[o, *(f"{largest[s, o, b] / 1e9:.2f}" for s in setups for b in budgets)] for o in optimizers])
    )
    if report.checks:
        print(f"\nValidation: predicted vs measured optimizer-state bytes (fp32 parameters, tolerance {tolerance:.0%})")
        groups: dict[str, list[Check]] = {}
        for c in report.checks:
            key = re.sub(r" rank \d+ \S+$", "", c.what) if " rank " in c.what else c.what
            groups.setdefault(key, []).append(c)
        rows = []
        for key, checks in groups.items():
            worst = max(checks, key=lambda c: c.rel_error)
            ok = all(c.ok(tolerance) for c in checks)
            label = key if len(checks) == 1 else f"{key}: {len(checks)} rank x optimizer checks, worst"
            rows.append(
                [label, worst.predicted, worst.measured, f"{100 * worst.rel_error:.2f}%", "ok" if ok else "MISMATCH"]
            )
        print(_table(["what", "predicted", "measured", "error", ""], rows))


def _write_outputs(report: Report, out: str, tolerance: float) -> None:
    for name, rows in (("memory.csv", report.rows), ("fit.csv", report.fit), ("largest-model.csv", report.largest)):
        if rows:
            with open(os.path.join(out, name), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    checks = [{**asdict(c), "rel_error": c.rel_error, "ok": c.ok(tolerance)} for c in report.checks]
    if checks:
        with open(os.path.join(out, "validation.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(checks[0]))
            writer.writeheader()
            writer.writerows(checks)
    with open(os.path.join(out, "memory.json"), "w") as f:
        json.dump(
            {"memory": report.rows, "fit": report.fit, "largest_model": report.largest, "validation": checks},
            f,
            indent=1,
        )


if __name__ == "__main__":
    sys.exit(main())
