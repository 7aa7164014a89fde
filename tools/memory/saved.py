"""Activation bytes measured: the storages autograd keeps for the backward pass of the training job's GPT-2.

:class:`SavedStorages` counts, through ``torch.autograd.graph.saved_tensors_hooks``,
every storage a saved tensor lives in, once (saved tensors alias: ``q``, ``k``
and ``v`` are views of one projection output), parameters left out, and only
while the storage is alive (a weak reference to each storage tells). The
forward pass is the job's (:mod:`sm3_dist.launch.model` and the loss of
``launch/train.py``); :func:`validate_activations` compares it with
:func:`sm3_dist.tools.memory.activations.activation_bytes`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from sm3_dist.tools.memory.activations import ActivationModel, activation_bytes
from sm3_dist.tools.memory.model import GPT2Config, job_config, relative_error

__all__ = [
    "ACTIVATION_TABLE",
    "QUICK_ACTIVATION_TABLE",
    "ActivationCase",
    "ActivationCheck",
    "SavedStorages",
    "autocast_supported",
    "measure_activations",
    "training_loss",
    "validate_activations",
]


class SavedStorages:
    """Bytes of the distinct live storages autograd saves while active (a context manager).

    ``exclude``: tensors whose storages are not counted (the parameters). ``live``
    is what is held now; ``peak`` the most held at any moment a tensor was saved.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, tuple[int, weakref.ref]] = {}
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes and ptr not in self._exclude:
            known = self._storages.get(ptr)
            if known is None or known[1]() is None:  # new, or an address reused after a storage was freed
                self._storages[ptr] = (nbytes, weakref.ref(storage))
                self.peak = max(self.peak, self.live)
        return tensor

    @property
    def live(self) -> int:
        return sum(n for n, ref in self._storages.values() if ref() is not None)

    def __enter__(self) -> SavedStorages:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def autocast_supported(device: str = "cpu") -> bool:
    """Whether ``torch.autocast`` runs bf16 on ``device`` (a bf16 matmul under autocast gives bf16)."""
    try:
        with torch.autocast(device, dtype=torch.bfloat16):
            out = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
        return out.dtype == torch.bfloat16
    except (RuntimeError, AssertionError):
        return False


def training_loss(model: torch.nn.Module, windows: torch.Tensor, precision: str) -> torch.Tensor:
    """The training job's loss on ``windows`` of ``s + 1`` tokens, in ``precision``."""
    import torch.nn.functional as F

    device = windows.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
        logits = model(input_ids=windows[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())


def build_gpt(config: GPT2Config, *, dropout: bool, attention: str, precision: str, device: str = "cpu"):
    """The job's model with ``config``'s shape, on ``device``, in ``precision`` (bf16-mixed: the model in bf16)."""
    from sm3_dist.launch.model import ModelSize, build_model

    shape = ModelSize(n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head)
    model = build_model(
        shape,
        n_positions=config.n_positions,
        vocab_size=config.vocab_size,
        dropout=0.1 if dropout else 0.0,
        attention="eager" if attention == "eager" else "sdpa",
    )
    if precision == "bf16-mixed":
        model.to(torch.bfloat16)
    return model.to(device).train()


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationCase:
    """One configuration of the validation table."""

    n_layer: int
    n_embd: int
    n_head: int
    seq_len: int
    batch: int = 2
    precision: str = "fp32"
    checkpointing: bool = False
    attention: str = "flash"
    dropout: bool = False

    @property
    def config(self) -> GPT2Config:
        return job_config(self.n_layer, self.n_embd, self.n_head, self.seq_len, 256)

    def model(self, device: str = "cpu") -> ActivationModel:
        return ActivationModel(
            seq_len=self.seq_len,
            checkpointing=self.checkpointing,
            attention=self.attention,
            dropout=self.dropout,
            device=device,
        )


def measure_activations(case: ActivationCase, *, seed: int = 0, device: str = "cpu") -> tuple[int, int]:
    """(kept, recompute): bytes autograd keeps after the forward pass, and the most a recomputed layer holds.

    ``recompute`` is 0 without checkpointing. Both count distinct live storages, parameters left out.
    """
    from sm3_dist.launch.model import checkpoint_blocks

    torch.manual_seed(seed)
    model = build_gpt(
        case.config, dropout=case.dropout, attention=case.attention, precision=case.precision, device=device
    )
    if case.checkpointing:
        checkpoint_blocks(model)
    windows = torch.randint(0, 256, (case.batch, case.seq_len + 1), device=device)
    params = list(model.parameters())
    with SavedStorages(exclude=params) as saved:
        loss = training_loss(model, windows, case.precision)
    kept = saved.live
    recompute = 0
    if case.checkpointing:
        with SavedStorages(exclude=params) as during:
            loss.backward()
        recompute = during.peak
    return kept, recompute


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationCheck:
    """One row of the activation validation: modeled against measured bytes."""

    case: ActivationCase
    predicted: int
    """Kept bytes the model predicts (plus the recomputed layer with checkpointing)."""
    measured: int
    """Distinct storages autograd holds (plus the most one recomputed layer held)."""
    predicted_recompute: int = 0
    measured_recompute: int = 0

    @property
    def rel_error(self) -> float:
        return relative_error(self.predicted, self.measured)

    def ok(self, tolerance: float = 0.05) -> bool:
        return self.rel_error <= tolerance

    def row(self) -> dict[str, Any]:
        """The check as one flat table row."""
        return dict(
            **asdict(self.case),
            predicted=self.predicted,
            measured=self.measured,
            predicted_recompute=self.predicted_recompute,
            measured_recompute=self.measured_recompute,
            rel_error=self.rel_error,
        )


_SHAPES = ((2, 128, 4), (4, 256, 4), (6, 384, 6))
"""Three of the job's shapes (``tiny``, one between, ``small``)."""


def _table(
    shapes: Sequence[tuple[int, int, int]], seq_lens: Sequence[int], precisions: Sequence[str]
) -> tuple[ActivationCase, ...]:
    cases = [
        ActivationCase(n_layer=n, n_embd=h, n_head=a, seq_len=s, precision=p, checkpointing=ck)
        for p in precisions
        for n, h, a in shapes
        for s in seq_lens
        for ck in (False, True)
    ]
    n, h, a = shapes[0] if shapes[0][0] > 1 else shapes[1]
    cases += [
        ActivationCase(n_layer=n, n_embd=h, n_head=a, seq_len=s, attention=att, dropout=drop, checkpointing=ck)
        for att, drop in (("eager", False), ("flash", True))
        for s in seq_lens
        for ck in (False, True)
    ]
    return tuple(cases)


ACTIVATION_TABLE = _table(_SHAPES, (64, 256), ("fp32", "bf16-mixed", "bf16-autocast"))
"""The validation table: 3 shapes x 2 sequence lengths x checkpointing off/on x 3 precisions, and eager
attention and dropout at the smallest shape."""
QUICK_ACTIVATION_TABLE = _table(((1, 64, 2), (2, 64, 4), (2, 128, 4)), (16, 64), ("fp32", "bf16-autocast"))
"""The same rows at smaller shapes and sequences, two precisions (a few seconds)."""


def validate_activations(
    cases: Sequence[ActivationCase] = ACTIVATION_TABLE, progress: Callable[[str], None] | None = None
) -> list[ActivationCheck]:
    """Measure every case on CPU and compare with the model (bf16 cases only where CPU autocast runs bf16)."""
    bf16 = autocast_supported("cpu")
    checks = []
    for case in cases:
        if case.precision != "fp32" and not bf16:
            continue
        if progress is not None:
            progress(f"{case.n_layer}x{case.n_embd} s={case.seq_len} {case.precision}")
        modeled = activation_bytes(case.config, case.model("cpu"), case.precision)
        kept, recompute = measure_activations(case)
        predicted_recompute = modeled.peak(case.batch) - modeled.kept(case.batch)
        checks.append(
            ActivationCheck(
                case=case,
                predicted=modeled.peak(case.batch),
                measured=kept + recompute,
                predicted_recompute=predicted_recompute,
                measured_recompute=recompute,
            )
        )
    return checks
