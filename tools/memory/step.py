"""Whole training steps measured: the peak bytes of real steps against the model's per-rank total.

On CPU the peak is read from the allocator: with ``torch.profiler``'s
``profile_memory`` every allocation and free of the CPU allocator is an event
carrying the running total of bytes allocated since profiling began, so with
the model and optimizer built inside the profiled region the largest total is
the exact peak of tensor bytes (what ``torch.cuda.max_memory_allocated`` is on
CUDA, without the caching allocator's 512-byte rounding). On CUDA it is
``torch.cuda.max_memory_allocated``.

A step is the job's (:func:`sm3_dist.tools.memory.saved.training_loss`, backward,
``optimizer.step()``, ``zero_grad(set_to_none=True)``) on one rank.
:func:`predict_step` is the model's answer (:mod:`~sm3_dist.tools.memory.model`
for the states, :mod:`~sm3_dist.tools.memory.activations` for the activations,
and the transients of the phases named there); :func:`largest_fitting` searches
the largest value a ``fits`` predicate accepts.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from sm3_dist.tools.memory.activations import ActivationModel, activation_bytes
from sm3_dist.tools.memory.model import GPT2Config, job_config, rank_memory

__all__ = [
    "QUICK_STEP_TABLE",
    "STEP_TABLE",
    "StepCase",
    "StepPrediction",
    "largest_fitting",
    "measure_step_cpu",
    "measure_step_cuda",
    "predict_step",
    "run_steps",
    "validate_steps",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class StepCase:
    """One training step's configuration (one rank, DDP-style: every state whole)."""

    n_layer: int
    n_embd: int
    n_head: int
    seq_len: int
    batch: int
    optimizer: str = "adamw"
    """``adamw`` (``torch.optim.AdamW``, foreach), ``sm3`` or ``sm3-momentum`` (:class:`sm3_dist.SM3`)."""
    precision: str = "fp32"
    """``fp32`` or ``bf16-autocast`` (fp32 parameters and states)."""
    checkpointing: bool = False
    vocab_size: int = 256

    @property
    def config(self) -> GPT2Config:
        return job_config(self.n_layer, self.n_embd, self.n_head, self.seq_len, self.vocab_size)

    def activation_model(self, device: str) -> ActivationModel:
        return ActivationModel(seq_len=self.seq_len, checkpointing=self.checkpointing, dropout=False, device=device)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepPrediction:
    """The model's bytes for one step, by phase; ``peak`` is the largest phase."""

    params: int
    grads: int
    state: int
    activations: int
    """Activations at their most (kept, plus the recomputed layer with checkpointing)."""
    backward_start: int
    """Params + state + kept activations + the loss's gradients (the first ones the backward pass makes)."""
    block_backward: int
    """Params + state + the gradients and activations held while a block's GELU runs backward (the last block;
    the first one with checkpointing, recomputed, when nearly every gradient exists) + that backward's gradients."""
    optimizer_step: int
    """Params + grads + state + the optimizer's temporaries."""

    @property
    def peak(self) -> int:
        return max(self.backward_start, self.block_backward, self.optimizer_step)


def _step_temporaries(case: StepCase, params: int) -> int:
    """Bytes an optimizer step allocates on top of its state: foreach AdamW's ``sqrt(v)`` list, one per parameter."""
    if case.optimizer == "adamw":
        return params
    return 0


def predict_step(case: StepCase, device: str = "cuda") -> StepPrediction:
    """The model's peak of one training step of ``case`` (steps after the first: the state exists).

    Three phases, the largest is the peak (fp32 gradients, as the parameters):

    * backward start: params + state + kept activations + the loss's gradients (the log-softmax output's and
      input's, ``8V`` per token; under autocast also the bf16 logits' ``2V``);
    * a block's backward at its GELU: the activations still held (without checkpointing the last block's, the
      log-softmax and the GELU output already freed; with checkpointing every kept input plus the first block,
      recomputed, its input, the token ids) + the gradients made so far (the tied embedding's and the last ``c_proj``'s; with
      checkpointing all but the first block's ``c_attn``, attention ``c_proj`` and ``c_fc``) + the three ``4h``
      gradients ``gelu_new``'s backward holds at once;
    * the optimizer step: params + grads + state + temporaries (foreach AdamW: one parameter-sized list).
    """
    states = rank_memory(case.config, "ddp", 1, case.optimizer, "fp32")
    act = activation_bytes(case.config, case.activation_model(device), case.precision)
    h, v = case.n_embd, case.vocab_size
    c = 2 if case.precision == "bf16-autocast" else 4
    tokens = case.batch * case.seq_len
    head = tokens * v * (8 + (2 if case.precision == "bf16-autocast" else 0))
    kept = act.kept(case.batch)
    backward_start = states.params + states.state + kept + head
    gelu = tokens * (12 * c * h - 4 * c * h)  # the three gradients held, the GELU output freed
    if case.checkpointing:
        r = 4  # fp32 or autocast: the residual stream is fp32
        inputs = tokens * (r * h + 16) + 8 * case.batch  # the first block's input, the token ids and targets
        held = act.peak(case.batch) - act.kept(case.batch) + act.per_batch + inputs + states.grads - 4 * 8 * h * h
    else:
        held = kept - 4 * v * tokens + 4 * (v * h + 4 * h * h)
    block_backward = states.params + states.state + held + gelu
    optimizer_step = states.params + states.grads + states.state + _step_temporaries(case, states.params)
    return StepPrediction(
        params=states.params,
        grads=states.grads,
        state=states.state,
        activations=act.peak(case.batch),
        backward_start=backward_start,
        block_backward=block_backward,
        optimizer_step=optimizer_step,
    )


def _build(case: StepCase, device: str):
    from sm3_dist.launch.model import checkpoint_blocks
    from sm3_dist.tools.memory.measure import make_optimizer
    from sm3_dist.tools.memory.saved import build_gpt

    torch.manual_seed(0)
    with torch.device(device):
        model = build_gpt(case.config, dropout=False, attention="flash", precision="fp32", device=device)
    if case.checkpointing:
        checkpoint_blocks(model)
    params = list(model.parameters())
    if case.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    else:
        optimizer = make_optimizer(case.optimizer, params)
    return model, optimizer


def run_steps(case: StepCase, device: str, steps: int = 3, model_and_optimizer=None) -> None:
    """Build the model and optimizer (unless given) and train ``steps`` steps of ``case`` on ``device``."""
    from sm3_dist.tools.memory.saved import training_loss

    model, optimizer = model_and_optimizer or _build(case, device)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        windows = torch.randint(0, case.vocab_size, (case.batch, case.seq_len + 1), generator=generator).to(device)
        loss = training_loss(model, windows, case.precision)
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _flatten(nodes) -> list:
    out, stack = [], list(nodes)
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children)
    return out


def measure_step_cpu(case: StepCase, steps: int = 3) -> int:
    """Peak CPU tensor bytes of building ``case`` and training ``steps`` steps, from the allocator's events."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_steps(case, "cpu", steps)
        gc.collect()
    allocation = torch._C._profiler._ExtraFields_Allocation
    events = [n.extra_fields for n in _flatten(prof.profiler.kineto_results.experimental_event_tree())]
    totals = [e.total_allocated for e in events if isinstance(e, allocation) and e.device.type == "cpu"]
    if not totals:
        raise RuntimeError("the profiler reported no CPU allocations")
    return max(totals)


def measure_step_cuda(case: StepCase, steps: int = 3) -> int:
    """``torch.cuda.max_memory_allocated`` of building ``case`` and training ``steps`` steps, from a clean slate."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run_steps(case, "cuda", steps)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def largest_fitting(fits: Callable[[int], bool], *, start: int = 1, limit: int = 1 << 16) -> int:
    """The largest ``n`` in ``[start, limit]`` with ``fits(n)``, for a ``fits`` that holds up to some ``n``
    and fails beyond; ``start - 1`` if ``fits(start)`` fails.

    Doubles from ``start`` until ``fits`` fails (or ``limit``), then bisects: about ``2·log2(n)`` calls.
    """
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    if not fits(start):
        return start - 1
    lo, hi = start, None  # fits(lo) holds; fits(hi) fails
    while hi is None:
        step = min(2 * lo, limit)
        if step == lo:
            return lo
        if fits(step):
            lo = step
        else:
            hi = step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _cases(shapes, optimizers, checkpointing=(False, True), precision="fp32") -> tuple[StepCase, ...]:
    return tuple(
        StepCase(n_layer=n, n_embd=h, n_head=a, seq_len=s, batch=b, optimizer=o, checkpointing=ck, precision=precision)
        for n, h, a, s, b in shapes
        for o in optimizers
        for ck in checkpointing
    )


STEP_TABLE = _cases(
    ((2, 128, 4, 64, 4), (4, 256, 4, 128, 4), (6, 384, 6, 256, 2), (6, 384, 6, 64, 1)), ("adamw", "sm3")
) + _cases(((4, 256, 4, 128, 4),), ("adamw", "sm3"), precision="bf16-autocast")
"""The CPU whole-step table: activation-bound and state-bound shapes, AdamW and SM3, checkpointing off/on, fp32
and (one shape) bf16 autocast."""
QUICK_STEP_TABLE = _cases(((2, 128, 4, 64, 4),), ("adamw", "sm3"), (False,))
"""Two small steps (a few seconds)."""


def validate_steps(cases: Sequence[StepCase] = STEP_TABLE) -> list[dict]:
    """Each case's peak measured on CPU (allocator events) beside :func:`predict_step`'s, as table rows."""
    rows = []
    for case in cases:
        measured = measure_step_cpu(case)
        predicted = predict_step(case, "cpu").peak
        rows.append(
            {
                **asdict(case),
                "predicted": predicted,
                "measured": measured,
                "rel_error": (predicted - measured) / measured,
            }
        )
    return rows
