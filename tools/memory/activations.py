r"""Activation memory of a GPT-2 training step, and what a per-rank budget leaves for it (pure arithmetic).

The model counts the tensors autograd keeps for the backward pass of
transformers' ``GPT2LMHeadModel`` (the training job's model,
:mod:`sm3_dist.launch.model`) with the job's loss
(``cross_entropy(logits.float(), targets)``), one term per tensor, and is checked
against the storages autograd really keeps (:mod:`sm3_dist.tools.memory.saved`).

Notation: hidden size ``h``, ``a`` heads, sequence length ``s``, vocabulary
``V``, ``L`` layers; ``r`` bytes per element of the residual stream and the
LayerNorm statistics, ``c`` of the matmul inputs/outputs and pointwise ops,
``m`` of a dropout mask:

==============  ===  ===  ==========================================================
precision        r    c   what runs
==============  ===  ===  ==========================================================
fp32             4    4   fp32 parameters and compute
bf16-mixed       2    2   the model in bf16 (DeepSpeed ``bf16``, FSDP2 ``param_dtype``)
bf16-autocast    4    2   fp32 parameters under ``torch.autocast(dtype=bfloat16)``
==============  ===  ===  ==========================================================

``m`` is 1 on CUDA (``native_dropout`` keeps a bool mask) and the input's
element size on CPU (``x * noise`` keeps the noise tensor).

**Per token, per layer**::

    2r·h        LayerNorm inputs (the residual stream)        4r    their mean and rstd
    2c·h        LayerNorm outputs (the matmul inputs)          3c·h  the QKV projection output
    c·h         attention output (input of c_proj)             4c·h  MLP up-projection output
    12c·h       gelu_new's intermediates (tanh, 1 + tanh,      4c·h  GELU output (input of the
                x / 2); 0 with a fused GELU                          down-projection)
    2m·h        dropout masks after attention and MLP (with dropout)
    attention   flash (SDPA's fused kernels): 4a, the fp32 log-sum-exp per head;
                eager (or SDPA's math fallback, which CPU takes with dropout): a·s·c scores
                (a·s·(4 + c) under autocast, which runs softmax in fp32) + a·s·(m + c) with dropout

With 16-bit activations, eager attention, dropout and a fused GELU this is
Korthikanti et al.'s ``34h + 5as`` ("Reducing Activation Recomputation in Large
Transformer Models", 2022) up to the LayerNorm statistics; transformers' GPT-2
uses the unfused ``gelu_new``, whose three extra ``4h`` tensors make it
``58h`` at ``c = 2``.

**Outside the layers**, per token: the int64 token ids (``8(s + 1)/s``: the job
cuts inputs and targets from one window of ``s + 1`` tokens) and the targets' int64
copy (8), the embedding dropout mask (``m·h``), the final LayerNorm (``r·h + 2r +
c·h``), the fp32 log-softmax the loss keeps (``4V``) and, with eager attention and
checkpointing, the causal mask each block is given (``r·s``). Per micro-batch: the
int64 position ids (``8s``), the loss, and under autocast the bf16 copies of the
weights it saves (``2(12h²L + Vh)``).

**Activation checkpointing** (:func:`sm3_dist.launch.model.checkpoint_blocks`):
each layer keeps only its input (``r·h`` per token; with autocast no weight copy
is kept for the blocks), and the backward pass recomputes one layer at a time,
which briefly holds that layer's activations (and its weight copies).

**Transient gradients** (:meth:`ActivationBytes.with_gradients`): the backward
pass starts with the loss's gradients (the fp32 log-softmax output's and input's,
``8V`` per token, and ``2V`` more for 16-bit logits), which at GPT-2's vocabulary
outweigh a checkpointed model's activations; later, a block's ``gelu_new``
backward holds ``8c·h`` per token beyond the output it frees. The largest
micro-batch (:func:`max_micro_batch`) counts every model state for the whole step
and the larger of the two moments; :mod:`~sm3_dist.tools.memory.step` resolves the
phases of a single-rank step more finely and is checked against measured peaks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sm3_dist.tools.memory.model import GPT2Config, _check_choice, family_config, rank_memory

__all__ = [
    "ACTIVATION_PRECISIONS",
    "ActivationBytes",
    "ActivationModel",
    "activation_bytes",
    "activation_bytes_per_token",
    "activation_terms",
    "largest_model",
    "max_micro_batch",
]

ACTIVATION_PRECISIONS = ("fp32", "bf16-mixed", "bf16-autocast")
ATTENTIONS = ("flash", "eager")
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationModel:
    """How the forward pass runs, as far as the bytes it keeps depend on it."""

    seq_len: int = 1024
    """Tokens per sample."""
    checkpointing: bool = True
    """Per-block activation checkpointing (each block keeps its input, one block is recomputed at a time)."""
    attention: str = "flash"
    """``flash``: SDPA's fused kernels (no ``s x s`` scores kept); ``eager``: the scores are kept."""
    dropout: bool = True
    """Dropout after the embeddings, on the attention probabilities, after attention and after the MLP."""
    device: str = "cuda"
    """``cuda``: bool dropout masks and fused attention with dropout; ``cpu``: masks in the input's dtype, and
    SDPA falls back to its math kernel (scores kept) with dropout."""
    fused_gelu: bool = False
    """A fused GELU keeps only its input; transformers' GPT-2 default ``gelu_new`` keeps three more tensors."""

    def __post_init__(self) -> None:
        _check_choice(self.attention, ATTENTIONS, "attention")
        _check_choice(self.device, DEVICES, "device")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")

    @property
    def kernel(self) -> str:
        """The attention kernel that runs: SDPA on CPU takes the math path (scores kept) when there is dropout."""
        if self.attention == "eager" or (self.device == "cpu" and self.dropout):
            return "eager"
        return "flash"


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationBytes:
    """Activation bytes of one micro-batch, split by how they scale."""

    per_sample: int
    """Kept after the forward pass, per sample of ``seq_len`` tokens."""
    per_batch: int
    """Kept after the forward pass, whatever the micro-batch (position ids, autocast weight copies)."""
    recompute_per_sample: int = 0
    """Checkpointing: one layer's activations, recomputed and held during its backward pass, per sample."""
    recompute_per_batch: int = 0
    """Checkpointing with autocast: that layer's weight copies."""
    loss_grad_per_sample: int = 0
    """The gradients the loss's backward makes first, per sample: the log-softmax output's and input's (fp32,
    ``8V`` per token) and, for 16-bit logits, theirs (``2V``)."""
    gelu_grad_per_sample: int = 0
    """The gradients ``gelu_new``'s backward holds beyond its freed output, per sample (``8c·h`` per token)."""

    def kept(self, batch: int) -> int:
        """Bytes autograd holds when the forward pass ends."""
        return self.per_batch + batch * self.per_sample

    def peak(self, batch: int) -> int:
        """Kept bytes plus the recomputed layer (the most the saved activations reach in the backward pass)."""
        return self.kept(batch) + self.recompute_per_batch + batch * self.recompute_per_sample

    def with_gradients(self, batch: int) -> int:
        """The most activations and their transient gradients hold at once: at the start of the backward pass
        (kept + the loss's gradients) or in a block's GELU backward (kept + the recomputed layer + its gradients)."""
        start = self.kept(batch) + batch * self.loss_grad_per_sample
        block = self.peak(batch) + batch * self.gelu_grad_per_sample
        return max(start, block)


def _sizes(precision: str) -> tuple[int, int]:
    _check_choice(precision, ACTIVATION_PRECISIONS, "precision")
    return {"fp32": (4, 4), "bf16-mixed": (2, 2), "bf16-autocast": (4, 2)}[precision]


def _layer_terms(config: GPT2Config, act: ActivationModel, precision: str) -> list[tuple[str, float]]:
    """One layer's kept bytes per token, term by term."""
    r, c = _sizes(precision)
    h, a, s = config.n_embd, config.n_head, act.seq_len
    mask = 1 if act.device == "cuda" else c
    terms = [
        ("LayerNorm inputs", 2 * r * h),
        ("LayerNorm mean and rstd", 4 * r),
        ("LayerNorm outputs", 2 * c * h),
        ("QKV projection output", 3 * c * h),
        ("attention output", c * h),
        ("MLP up-projection output", 4 * c * h),
        ("gelu_new intermediates", 0 if act.fused_gelu else 12 * c * h),
        ("GELU output", 4 * c * h),
        ("dropout masks after attention and MLP", 2 * mask * h if act.dropout else 0),
    ]
    if act.kernel == "flash":
        terms.append(("attention log-sum-exp (fp32)", 4 * a))
    else:
        softmax = 4 + c if precision == "bf16-autocast" else c
        terms.append(("attention scores (softmax output)", a * s * softmax))
        if act.dropout:
            terms.append(("attention dropout mask and output", a * s * (mask + c)))
    return terms


def _block_weight_numel(config: GPT2Config) -> int:
    return 12 * config.n_embd**2


def activation_terms(config: GPT2Config, act: ActivationModel, precision: str = "bf16-mixed") -> dict[str, list]:
    """Every term of the model: ``layer`` (per token, one layer), ``outside`` (per token) and ``batch`` (bytes)."""
    r, c = _sizes(precision)
    h, s, v = config.n_embd, act.seq_len, config.vocab_size
    mask = 1 if act.device == "cuda" else r
    eager = act.kernel == "eager" and act.attention == "eager"
    outside = [
        ("token ids (int64, windows of s + 1)", 8 * (s + 1) / s),
        ("targets (int64)", 8),
        ("embedding dropout mask", mask * h if act.dropout else 0),
        ("final LayerNorm input, mean and rstd, output", r * h + 2 * r + c * h),
        ("log-softmax of the logits (fp32)", 4 * v),
        ("causal mask (eager attention, kept by checkpointing)", s * r if act.checkpointing and eager else 0),
    ]
    batch = [("position ids (int64)", 8 * s), ("loss", 4)]
    if precision == "bf16-autocast":
        blocks = 0 if act.checkpointing else config.n_layer * _block_weight_numel(config)
        batch.append(("autocast bf16 weight copies", c * (blocks + v * h)))
    return {"layer": _layer_terms(config, act, precision), "outside": outside, "batch": batch}


def activation_bytes(config: GPT2Config, act: ActivationModel, precision: str = "bf16-mixed") -> ActivationBytes:
    """Kept and recomputed activation bytes of a micro-batch (see the module docstring)."""
    r, c = _sizes(precision)
    terms = activation_terms(config, act, precision)
    s = act.seq_len
    layer = sum(v for _, v in terms["layer"])
    outside = sum(v for _, v in terms["outside"])
    batch = round(sum(v for _, v in terms["batch"]))
    gradients = dict(
        loss_grad_per_sample=s * config.vocab_size * (8 + (2 if c == 2 else 0)),
        gelu_grad_per_sample=s * (4 if act.fused_gelu else 8) * c * config.n_embd,
    )
    if not act.checkpointing:
        return ActivationBytes(per_sample=round(s * (config.n_layer * layer + outside)), per_batch=batch, **gradients)
    recompute_batch = c * _block_weight_numel(config) if precision == "bf16-autocast" else 0
    return ActivationBytes(
        per_sample=round(s * (config.n_layer * r * config.n_embd + outside)),
        per_batch=batch,
        recompute_per_sample=round(s * layer),
        recompute_per_batch=recompute_batch,
        **gradients,
    )


def activation_bytes_per_token(config: GPT2Config, act: ActivationModel, precision: str = "bf16-mixed") -> int:
    """Bytes per token of a micro-batch's activations and transient gradients at their most
    (:meth:`ActivationBytes.with_gradients`; the per-micro-batch constant left out)."""
    b = activation_bytes(config, act, precision)
    return round((b.with_gradients(1) - b.with_gradients(0)) / act.seq_len)


def max_micro_batch(
    config: GPT2Config,
    setup: str,
    world: int,
    optimizer: str,
    budget_bytes: int,
    act: ActivationModel,
    precision: str = "bf16-mixed",
) -> int:
    """Largest micro-batch (samples of ``act.seq_len`` tokens) that fits; -1 if the model states alone do not.

    Every model state counts for the whole step (:func:`~sm3_dist.tools.memory.model.rank_memory`), with the
    activations and their transient gradients at their most (:meth:`ActivationBytes.with_gradients`).
    """
    states = rank_memory(config, setup, world, optimizer, precision).total
    b = activation_bytes(config, act, precision)
    fixed = states + b.with_gradients(0)
    if fixed > budget_bytes:
        return -1
    per_sample = b.with_gradients(1) - b.with_gradients(0)  # linear in the batch: both phases are
    hi = max(1, (budget_bytes - fixed) // max(1, min(b.per_sample, per_sample)) + 1)
    # with_gradients is a max of two lines: bisect rather than divide (batch 0 fits: fixed is within budget)
    return _last_true(1, hi, lambda batch: states + b.with_gradients(batch) <= budget_bytes)


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

    def fits(index: int) -> bool:
        config = family_config(ordered[index])
        return max_micro_batch(config, setup, world, optimizer, budget_bytes, act, precision) >= 1

    index = _last_true(0, len(ordered), fits)
    return family_config(ordered[index]) if index >= 0 else None


def _last_true(lo: int, hi: int, holds: Callable[[int], bool]) -> int:
    """The largest ``x`` in ``[lo, hi)`` with ``holds(x)``, by bisection, for a ``holds`` that is true up to some
    point and false after it; ``lo - 1`` where it holds nowhere."""
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(mid):
            lo = mid + 1
        else:
            hi = mid
    return lo - 1
