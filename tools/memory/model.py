r"""The per-rank memory model of data-parallel training: model states (pure arithmetic, no torch).

What one data-parallel rank holds while it trains a GPT-2-style model, in bytes,
for each optimizer (Adam, AdamW, Adagrad, Adafactor, SM3 with and without
momentum, SM3 with bf16 momentum) and setup (DDP, DeepSpeed ZeRO-1/2/3, FSDP2):

* **params**: the model's parameters as the setup stores them,
* **grads**: their gradients,
* **master**: fp32 master weights (mixed precision only, where DeepSpeed keeps them),
* **state**: the optimizer's state tensors (scalar step counters, 4 bytes per
  tensor, are left out, as :func:`sm3_dist.local_state_bytes` leaves them out),
* **working**: ZeRO-3/FSDP2 only: the layers gathered for compute,

the bytes a rank holds before any activation exists.

**Where each byte comes from** (``N`` ranks; ``P`` parameters; ``e`` = 2 for
``bf16-mixed``, 4 for ``fp32`` and ``bf16-autocast``):

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

Activations and the budget arithmetic are in :mod:`sm3_dist.tools.memory.activations`.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from sm3_dist.layout import box_piece, flat_range_piece

__all__ = [
    "BUDGETS_GIB",
    "GIB",
    "OPTIMIZERS",
    "PRECISIONS",
    "SETUPS",
    "SIZES",
    "WORLD_SIZES",
    "GPT2Config",
    "RankCounts",
    "RankMemory",
    "family_config",
    "flat_bounds",
    "job_config",
    "rank_counts",
    "rank_memory",
    "relative_error",
    "resolve_size",
    "state_bytes",
]

GIB = 1024**3
SETUPS = ("ddp", "ddp-sharded", "zero1", "zero2", "zero3", "fsdp2")
OPTIMIZERS = ("adam", "adamw", "adagrad", "adafactor", "sm3", "sm3-momentum", "sm3-bf16-momentum")
PRECISIONS = ("fp32", "bf16-mixed", "bf16-autocast")
"""bf16-autocast keeps fp32 parameters, gradients and state (``torch.autocast`` computes in bf16)."""
WORLD_SIZES = (1, 2, 4, 8, 64, 1024)
BUDGETS_GIB = (16, 40, 80)
ZERO3_PERSISTENCE_THRESHOLD = 100_000
"""DeepSpeed's ``stage3_param_persistence_threshold`` default: smaller parameters stay whole on every rank."""
ZERO_ALIGNMENT = 2
"""DeepSpeed ZeRO-1/2 pads each flat group to a multiple of ``ZERO_ALIGNMENT * world_size`` elements."""
SM3_MOMENTUM = 0.9


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


def job_config(n_layer: int, n_embd: int, n_head: int, seq_len: int, vocab_size: int = 256) -> GPT2Config:
    """The training job's GPT-2 (:mod:`sm3_dist.launch.model`: byte vocabulary, ``seq_len`` positions)."""
    return GPT2Config(
        name=f"{n_layer}x{n_embd}",
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab_size,
        n_positions=seq_len,
    )


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


def relative_error(predicted: float, measured: float) -> float:
    """``|predicted - measured| / measured`` (0 when both are 0, inf when only the measurement is)."""
    if measured == 0:
        return 0.0 if predicted == 0 else math.inf
    return abs(predicted - measured) / measured


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
