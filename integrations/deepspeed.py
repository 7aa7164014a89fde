"""DeepSpeed integration: ``"optimizer": {"type": "SM3", ...}`` in a DeepSpeed config, ZeRO stages 0-3.

Importing this module registers SM3 with DeepSpeed (:func:`register`, idempotent;
it can also be called explicitly). DeepSpeed has no optimizer registry, so the
hook uses the two places its engine looks an optimizer up:

* ``DeepSpeedEngine._configure_basic_optimizer`` builds an optimizer whose
  config ``type`` is not one of its own with ``getattr(torch.optim, type)``.
  :func:`register` sets ``torch.optim.SM3 = DeepSpeedSM3``; nothing of
  DeepSpeed is patched, and ``torch.optim`` gains one attribute.
* ZeRO refuses an optimizer whose exact type is not in
  ``deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS`` unless
  ``zero_allow_untested_optimizer`` is set. :func:`register` appends
  :class:`DeepSpeedSM3` to that list (the plain :class:`sm3_dist.SM3` is left
  out on purpose: under ZeRO it would see a flat partition as a vector).
* A DeepSpeed ``"scheduler"`` entry whose ``type`` DeepSpeed does not know is
  looked up in ``torch.optim.lr_scheduler``; :func:`register` sets
  ``torch.optim.lr_scheduler.SM3WarmupCooldown`` (:func:`warmup_cooldown_scheduler`, i.e.
  :func:`sm3_dist.schedules.warmup_cooldown` on the base optimizer),
  so ``"scheduler": {"type": "SM3WarmupCooldown", "params": {"total_steps": ...}}`` works.

:class:`DeepSpeedSM3` is :class:`sm3_dist.SM3` with a ``shard_resolver`` that
maps whatever flat fp32 tensors DeepSpeed's wrappers hand the base optimizer
back to parameter shapes, through :mod:`sm3_dist.layout`:

* ZeRO-1/2 and ``BF16_Optimizer``: each model parameter's ``_hp_mapping``
  (``lp_fragment_address``: where the fragment starts in the parameter;
  ``hp_fragment_address``: where it starts in the fp32 partition) and
  ``_dp_group``, cross-checked with where the parameter actually lives in the
  low-precision flat buffer (its storage offset) and the partition's bounds
  ``[rank * partition_size, (rank + 1) * partition_size)``; the layout follows
  the buffer. Round-robin gradient ordering changes these offsets, not
  ownership (DeepSpeed 0.19's ``_hp_mapping`` ignores it: see
  :func:`_hp_mapping_layout`).
* ZeRO-3: the optimizer steps one sub-group at a time on
  ``fp32_partitioned_groups_flat[k]``, which holds the partitions of the
  parameters ``fp16_groups[k]`` back to back; rank ``r`` holds
  ``[r * ps, (r + 1) * ps)`` of each parameter's flattening, ``ps =
  partition_numel()`` (the tail past ``ds_numel`` is padding), global shape
  ``ds_shape``, group ``ds_process_group``. The ZeRO-3 optimizer is found
  through ``_z3_optimizer``, which DeepSpeed sets on every module parameter.
* Stage 0 (fp32) and the unfused fp16 wrapper hand over whole parameters (or
  whole fp32 copies of them): no sharding, nothing to reduce.

Each mapped tensor is a :class:`~sm3_dist.placement.ShardSpec` whose pieces
carry the parameter's index among the optimizer's trainable parameters (the
same on every rank) and whose plan lists all their global shapes; the maxima
are reduced over DeepSpeed's data-parallel group. A flat tensor none of this
explains raises :class:`~sm3_dist.placement.UnsupportedLayoutError` naming the
DeepSpeed version and ZeRO stage: SM3 never falls back to a diagonal
(numel-sized) accumulator.

Supported DeepSpeed versions: ``SUPPORTED_DEEPSPEED`` (the private attributes
above are read in :func:`_hp_mapping_layout` and :func:`_zero3_layout` only).

Config values: ``"params"`` are :class:`sm3_dist.SM3`'s keyword arguments;
``"momentum_dtype": "bfloat16"`` (or ``"bf16"``, ``"float32"``) is turned into
the ``torch.dtype`` (:func:`momentum_dtype_from_config`; an unknown name raises
``ValueError``), and ``"nonfinite": "skip" | "raise" | "ignore"`` passes through.

Non-finite gradients. DeepSpeed 0.19 catches most of them itself, before the
base optimizer is called, and SM3 never sees them: under fp16 the loss scaler's
overflow check (every rank, all partitions) skips the step and lowers the
scale; under bf16 (``check_grad_overflow``, default true) and under fp32
ZeRO-1/2/3 (an inf/NaN global gradient norm counts as an overflow) the ZeRO
optimizer does the same. Those steps count in ``engine.skipped_steps``, not in
SM3's ``skipped_steps``: there is no double handling, because on such a step
``DeepSpeedSM3.step`` is not called at all. What reaches SM3 (stage 0 in fp32,
``zero_optimization.compute_grad_norm: false``, bf16 with
``check_grad_overflow: false``, or anything that writes the flat gradient after
DeepSpeed's check) is handled by SM3's ``nonfinite`` policy: with ``"skip"``
every rank skips together (one one-element all-reduce over the data-parallel
group), ``"raise"`` names the model parameter and the element index on the
rank whose partition holds it. (fp16 cannot run on a CPU without fp16 support
in oneDNN, so that path is exercised only on GPUs; the fp32 ZeRO-2 skip is
tested on CPU.)

Checkpoints: ``engine.save_checkpoint`` stores the base optimizer's
``state_dict`` (per rank under ZeRO), which holds SM3's state keyed as in
:func:`sm3_dist.accumulator_key` plus the piece record :data:`LAYOUT_KEY`;
``load_checkpoint`` at the same world size restores it. DeepSpeed's
universal-checkpoint converter (``ds_to_universal``) reads Adam's
``exp_avg``/``exp_avg_sq`` by name and stops with ``KeyError: 'exp_avg'`` on
SM3 state (nothing is written, nothing is lost silently). :func:`to_universal`
is the SM3 converter: per-parameter fp32 weights and momentum in DeepSpeed's
universal layout, and the global accumulators carried in the optimizer's param
groups, so that ``engine.load_checkpoint`` with ``"checkpoint":
{"load_universal": true}`` resumes at another data-parallel size (ZeRO-1/2/3)
with every accumulator. A partition whose loaded state has no accumulators
raises at the next step instead of restarting them.

Offload: ``offload_optimizer: {"device": "cpu"}`` runs SM3 on the CPU copy of
the partition. accelerate's DeepSpeed plugin replaces an optimizer it does not
recognise with ``DeepSpeedCPUAdam`` under offload unless the config says
``"zero_force_ds_cpu_optimizer": false``; the configs in ``launch/deepspeed``
say so, and :func:`check_engine` raises if the engine's optimizer is not SM3.
"""

from __future__ import annotations

import glob
import inspect
import math
import os
import re
import shutil
import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sm3_dist.layout import Piece, TensorLayout, flat_range_piece, normalize_shape
from sm3_dist.optimizer import MOMENTUM_KEY, SM3, STEP_KEY, accumulator_key
from sm3_dist.placement import ShardSpec, UnsupportedLayoutError

__all__ = [
    "SUPPORTED_DEEPSPEED",
    "DeepSpeedSM3",
    "check_deepspeed_version",
    "check_engine",
    "momentum_dtype_from_config",
    "register",
    "to_universal",
    "warmup_cooldown_scheduler",
]

SUPPORTED_DEEPSPEED = ((0, 19, 0), (0, 20, 0))
"""Half-open range ``[low, high)`` of DeepSpeed versions this module has been checked against."""

OPTIMIZER_TYPE = "SM3"
SCHEDULER_TYPE = "SM3WarmupCooldown"
LAYOUT_KEY = "sm3_layout"
"""Key :meth:`DeepSpeedSM3.state_dict` adds: ``{"plan": global shapes by tensor id, "pieces": {state index:
[(tensor id, flat start, flat stop, offset in the partition), ...]}}``."""
UNIVERSAL_KEY = "sm3_universal"
"""Param-group key under which :func:`to_universal` hands the global accumulators to :class:`DeepSpeedSM3`."""


def _parse_version(version: str) -> tuple[int, ...]:
    parts = []
    for token in version.split("+")[0].split("."):
        digits = "".join(ch for ch in token if ch.isdigit()) if not token.isdigit() else token
        if not digits:
            break
        parts.append(int(digits))
        if not token.isdigit():
            break
    return tuple(parts + [0] * (3 - len(parts)))[:3]


def check_deepspeed_version(version: str | None = None) -> str:
    """The installed DeepSpeed version; raises ``ImportError`` if it lies outside :data:`SUPPORTED_DEEPSPEED`."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    low, high = SUPPORTED_DEEPSPEED
    if not low <= _parse_version(version) < high:
        raise ImportError(
            f"sm3_dist.integrations.deepspeed supports DeepSpeed >={'.'.join(map(str, low))},"
            f"<{'.'.join(map(str, high))}, found {version}: the ZeRO partition metadata it reads "
            "(_hp_mapping, fp32_partitioned_groups_flat, ds_shape) is private to DeepSpeed and has not been "
            "checked for this version"
        )
    return version


def register() -> None:
    """Make ``"type": "SM3"`` a DeepSpeed optimizer (and ZeRO-supported), and ``SM3WarmupCooldown`` a scheduler.

    Idempotent. Raises ``ImportError`` for an unsupported DeepSpeed version and
    ``RuntimeError`` if ``torch.optim.SM3`` is already something else.
    """
    check_deepspeed_version()
    from deepspeed.runtime.zero import utils as zero_utils

    existing = getattr(torch.optim, OPTIMIZER_TYPE, None)
    if existing is not None and existing is not DeepSpeedSM3:
        raise RuntimeError(
            f"torch.optim.{OPTIMIZER_TYPE} is already {existing!r}; sm3_dist cannot register its DeepSpeed optimizer"
        )
    setattr(torch.optim, OPTIMIZER_TYPE, DeepSpeedSM3)
    if DeepSpeedSM3 not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(DeepSpeedSM3)
    setattr(torch.optim.lr_scheduler, SCHEDULER_TYPE, warmup_cooldown_scheduler)


def warmup_cooldown_scheduler(optimizer: Any, total_steps: int, **kwargs: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``"scheduler": {"type": "SM3WarmupCooldown"}`` entry: :func:`sm3_dist.schedules.warmup_cooldown`.

    DeepSpeed hands a scheduler its wrapper (a ZeRO optimizer, which is no
    ``torch.optim.Optimizer``); the schedule is attached to the base optimizer
    inside, whose ``param_groups`` the wrapper steps with.
    """
    from sm3_dist.schedules import warmup_cooldown

    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return warmup_cooldown(inner, total_steps, **kwargs)


def check_engine(engine: Any) -> None:
    """Raise if ``engine``'s base optimizer is not :class:`DeepSpeedSM3` (e.g. swapped for ``DeepSpeedCPUAdam``)."""
    base = getattr(engine, "basic_optimizer", None)
    if isinstance(base, DeepSpeedSM3):
        return
    if isinstance(base, SM3):
        raise RuntimeError(
            "the DeepSpeed engine's optimizer is a plain sm3_dist.SM3, which reads ZeRO's flat partitions as "
            "vectors (diagonal AdaGrad); build sm3_dist.integrations.deepspeed.DeepSpeedSM3 or use the config "
            'entry "optimizer": {"type": "SM3"}'
        )
    raise RuntimeError(
        f"the DeepSpeed engine's optimizer is {type(base).__name__}, not SM3; with offload_optimizer set, "
        'accelerate swaps unknown optimizers for DeepSpeedCPUAdam unless "zero_force_ds_cpu_optimizer": false'
    )


_MOMENTUM_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def momentum_dtype_from_config(value: str | torch.dtype) -> torch.dtype:
    """The ``torch.dtype`` a JSON config's ``"momentum_dtype"`` names (``"bfloat16"``, ``"bf16"``, ``"float32"``...)."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        dtype = _MOMENTUM_DTYPE_NAMES.get(value.strip().lower().removeprefix("torch."))
        if dtype is not None:
            return dtype
    raise ValueError(
        f"momentum_dtype {value!r} is not a known name: use one of {sorted(_MOMENTUM_DTYPE_NAMES)} "
        "(or a torch.dtype, torch.float32 or torch.bfloat16)"
    )


class DeepSpeedSM3(SM3):
    """:class:`sm3_dist.SM3` that maps DeepSpeed's flat fp32 partitions back to parameter shapes.

    Takes the arguments of :class:`sm3_dist.SM3` (except ``shard_resolver``);
    ``momentum_dtype`` may also be a name (``"bfloat16"``, as a JSON config
    writes it: :func:`momentum_dtype_from_config`). Built by DeepSpeed from
    ``"optimizer": {"type": "SM3", "params": {...}}`` after :func:`register`, or
    by the user and passed as ``optimizer=`` to ``deepspeed.initialize``. It
    remembers the model parameters it was built on; ZeRO then replaces
    ``param_groups[i]["params"]`` with its flat partitions, and the layouts are
    resolved at the first step.

    ``state_dict()`` adds :data:`LAYOUT_KEY`: for every flat partition, which
    range of which parameter each of its pieces holds, so that
    :func:`to_universal` can turn the per-rank state into per-parameter state.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], *args: Any, **kwargs: Any) -> None:
        if "shard_resolver" in kwargs:
            raise TypeError("DeepSpeedSM3 provides its own shard_resolver")
        if "momentum_dtype" in kwargs:
            kwargs["momentum_dtype"] = momentum_dtype_from_config(kwargs["momentum_dtype"])
        super().__init__(params, *args, shard_resolver=self._resolve, **kwargs)
        self._model_params: dict[int, tuple[Tensor, ...]] = {}
        self._model_param_ids: set[int] = set()
        trainable: list[Tensor] = []
        for group in self.param_groups:
            self._model_params[id(group)] = tuple(group["params"])
            for p in group["params"]:
                self._model_param_ids.add(id(p))
                if p.requires_grad:
                    trainable.append(p)
        self._tensor_ids = {id(p): i for i, p in enumerate(trainable)}
        self._trainable = tuple(trainable)
        self._plan: tuple[tuple[int, ...], ...] | None = None
        self._engine = _find_engine()
        self._universal: dict[str, Any] | None = None
        self.register_step_pre_hook(_restore_universal_state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = {k: v for k, v in state_dict.items() if k != LAYOUT_KEY}
        # torch replaces the param_group dicts on load; keep each group's model parameters, in group order.
        before = [self._model_params.get(id(group)) for group in self.param_groups]
        super().load_state_dict(state_dict)
        self._model_params = {id(g): params for g, params in zip(self.param_groups, before) if params is not None}
        self._universal = None

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        pieces: dict[int, list[tuple[int, int, int, int]]] = {}
        index: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in index:
                    continue
                index[id(p)] = len(index)
                spec = self._specs.get(p)
                if spec is not None and spec.group is not None:
                    pieces[index[id(p)]] = [_piece_record(piece) for piece in spec.layout.pieces]
        if pieces:
            state_dict[LAYOUT_KEY] = {"plan": [tuple(s) for s in self._global_plan()], "pieces": pieces}
        return state_dict

    # ------------------------------------------------------------------ universal checkpoints

    def _restore_universal(self) -> None:
        """Rebuild the SM3 state of partitions DeepSpeed's universal loader filled (see :func:`to_universal`)."""
        for group in self.param_groups:
            carrier = group.pop(UNIVERSAL_KEY, None)
            if carrier is not None:
                self._universal = _checked_carrier(carrier, self._global_plan(), self.momentum_dtype)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state and self._universal is None:
                    continue  # a fresh partition: SM3 initializes it
                if state and _has_accumulators(state) and "exp_avg" not in state:
                    continue
                if self._universal is None:
                    raise ValueError(
                        f"DeepSpeedSM3: the optimizer state of a ZeRO partition holds {sorted(state)} but no SM3 "
                        "accumulators. A universal checkpoint of SM3 state must be written by "
                        "sm3_dist.integrations.deepspeed.to_universal (DeepSpeed's ds_to_universal knows only Adam's "
                        "exp_avg/exp_avg_sq); continuing would silently restart the accumulators"
                    )
                spec = self._specs.get(p) or self._resolve(p)
                if spec is None or spec.group is None:
                    raise ValueError("DeepSpeedSM3: a universal checkpoint restores ZeRO partitions only")
                several = len(spec.layout.pieces) > 1
                accumulators = self._universal["accumulators"]
                for j, piece in enumerate(spec.layout.pieces):
                    for d, (lo, hi) in enumerate(piece.ranges):
                        mu = accumulators[piece.tensor_id][d][lo:hi]
                        state[accumulator_key(d, j if several else None)] = mu.to(
                            device=p.device, dtype=torch.float32, copy=True
                        )
                # ZeRO-3's universal loader reads Adam's key names only: to_universal writes the momentum as exp_avg
                momentum = state.pop("exp_avg", None)
                state.pop("exp_avg_sq", None)
                if momentum is None:
                    momentum = state.pop(MOMENTUM_KEY, None)
                if group["momentum"] > 0.0 and momentum is not None:
                    state[MOMENTUM_KEY] = momentum.to(device=p.device, dtype=self.momentum_dtype).contiguous().clone()
                state[STEP_KEY] = torch.tensor(float(self._universal["step"]), dtype=torch.float32)

    # ------------------------------------------------------------------ non-finite gradients

    def _found_nonfinite(self) -> bool:
        try:
            return super()._found_nonfinite()
        except FloatingPointError as err:
            where = self._nonfinite_location()
            if where is None:
                raise
            rank = f" (rank {dist.get_rank()})" if dist.is_initialized() else ""
            raise FloatingPointError(f"SM3: non-finite gradient in {where}{rank}; no state was changed") from err

    def _nonfinite_location(self) -> str | None:
        """The model parameter and element of this rank's first inf/NaN gradient entry, if any."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.grad.is_sparse:
                    continue
                bad = (~torch.isfinite(p.grad.reshape(-1))).nonzero()
                if not bad.numel():
                    continue
                flat = int(bad[0])
                spec = self._specs.get(p)
                if spec is None or spec.group is None:
                    return f"{self._param_name(p)} at index {_unravel(flat, _global_shape(p))}"
                for piece in spec.layout.pieces:
                    for block in piece.blocks:
                        if block.offset <= flat < block.offset + block.numel:
                            inner = _unravel(flat - block.offset, block.lengths)
                            where = tuple(s + i for s, i in zip(block.starts, inner))
                            return f"{self._param_name(self._trainable[piece.tensor_id])} at index {where}"
                return f"padding element {flat} of a ZeRO partition"
        return None

    def _param_name(self, p: Tensor) -> str:
        engine = self._engine() if self._engine is not None else None
        names = getattr(engine, "param_names", None) or {}
        name = names.get(p)
        if name is None:
            name = f"trainable parameter {self._tensor_ids.get(id(p), '?')}"
        return f"{name} (shape {_global_shape(p)})"

    # ------------------------------------------------------------------ resolver

    def _resolve(self, tensor: Tensor) -> ShardSpec | None:
        if id(tensor) in self._model_param_ids:
            return None  # a model parameter itself (stage 0, fp32): whole, nothing to reduce
        params = self._group_model_params(tensor)
        trainable = [p for p in params if p.requires_grad]
        if any(hasattr(p, "ds_id") for p in trainable):
            return self._zero3_spec(tensor, trainable)
        if any(hasattr(p, "_hp_mapping") for p in trainable):
            return self._hp_mapping_spec(tensor, trainable)
        if tensor.shape == _common_shape(params, tensor):
            return None  # an fp32 copy of one whole parameter (the unfused fp16 wrapper)
        raise self._error(tensor, "no ZeRO partition metadata (_hp_mapping or ds_tensor) explains it")

    def _group_model_params(self, tensor: Tensor) -> tuple[Tensor, ...]:
        for group in self.param_groups:
            if any(p is tensor for p in group["params"]):
                return self._model_params.get(id(group), ())
        return ()

    def _global_plan(self) -> tuple[tuple[int, ...], ...]:
        if self._plan is None:
            self._plan = tuple(normalize_shape(_global_shape(p)) for p in self._trainable)
        return self._plan

    def _hp_mapping_spec(self, tensor: Tensor, params: Sequence[Tensor]) -> ShardSpec:
        try:
            pieces, group = _hp_mapping_layout(tensor, params, self._tensor_ids)
        except UnsupportedLayoutError as err:
            raise self._error(tensor, str(err), "1 or 2") from None
        return ShardSpec(TensorLayout(pieces=pieces, numel=tensor.numel()), group=group, plan=self._global_plan())

    def _zero3_spec(self, tensor: Tensor, params: Sequence[Tensor]) -> ShardSpec:
        try:
            pieces, group = _zero3_layout(tensor, params, self._tensor_ids)
        except UnsupportedLayoutError as err:
            raise self._error(tensor, str(err), "3") from None
        return ShardSpec(TensorLayout(pieces=pieces, numel=tensor.numel()), group=group, plan=self._global_plan())

    def _error(self, tensor: Tensor, reason: str, stage_hint: str = "unknown") -> UnsupportedLayoutError:
        import deepspeed

        engine = self._engine() if self._engine is not None else None
        stage = engine.zero_optimization_stage() if engine is not None else stage_hint
        low, high = SUPPORTED_DEEPSPEED
        return UnsupportedLayoutError(
            f"DeepSpeed {deepspeed.__version__}, ZeRO stage {stage}: the optimizer tensor of shape "
            f"{tuple(tensor.shape)} is a flat partition whose layout SM3 cannot recover ({reason}). SM3 will not "
            "treat it as a vector (that would silently turn it into diagonal AdaGrad). Supported DeepSpeed: "
            f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
        )


# ---------------------------------------------------------------------- DeepSpeed metadata readers


def _hp_mapping_layout(
    tensor: Tensor, params: Sequence[Tensor], tensor_ids: dict[int, int]
) -> tuple[tuple[Piece, ...], Any]:
    """Pieces of a ZeRO-1/2 (or BF16_Optimizer) fp32 partition.

    The parameters of a group live back to back (in round-robin order, with
    optional alignment padding) in one low-precision flat buffer; this rank's
    fp32 partition is the copy of ``[rank * n, (rank + 1) * n)`` of it, ``n =
    tensor.numel()``, and its gradient is laid out the same way. The pieces
    come from that geometry (each parameter's storage offset in the buffer).
    Each parameter's ``_hp_mapping`` (``lp_fragment_address``,
    ``hp_fragment_address``) must exist and point into ``tensor``; where it
    disagrees with the geometry (DeepSpeed 0.19 with ``round_robin_gradients``)
    a warning says so, and if no parameter agrees the layout is refused.
    """
    groups = {id(getattr(p, "_dp_group", None)) for p in params}
    if len(groups) != 1 or getattr(params[0], "_dp_group", None) is None:
        raise UnsupportedLayoutError("the parameters of the group do not share one _dp_group")
    group = params[0]._dp_group
    rank = dist.get_rank(group)
    size = tensor.numel()
    part_start, part_stop = rank * size, (rank + 1) * size
    storages = {p.untyped_storage().data_ptr() for p in params}
    if len(storages) != 1:
        raise UnsupportedLayoutError("the group's parameters do not share one flat buffer")
    flat_numel = params[0].untyped_storage().nbytes() // params[0].element_size()
    if flat_numel != size * dist.get_world_size(group):
        raise UnsupportedLayoutError(
            f"the flat buffer has {flat_numel} elements, not world size x partition size "
            f"({dist.get_world_size(group)} x {size})"
        )
    pieces, disagreements = [], []
    for p in params:
        if not hasattr(p, "_hp_mapping"):
            raise UnsupportedLayoutError(f"a parameter of shape {tuple(p.shape)} of the group has no _hp_mapping")
        mapping = p._hp_mapping
        if (
            mapping is not None
            and mapping.hp_fragment.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
        ):
            raise UnsupportedLayoutError("an _hp_mapping points into another tensor than the optimizer's partition")
        start = p.storage_offset()
        lo, hi = max(start, part_start), min(start + p.numel(), part_stop)
        expected = (lo - start, hi - lo, lo - part_start) if lo < hi else None
        found = None
        if mapping is not None:
            found = (
                mapping.lp_fragment_address.start,
                mapping.lp_fragment_address.numel,
                mapping.hp_fragment_address.start,
            )
        if found != expected:
            disagreements.append(f"shape {tuple(p.shape)}: _hp_mapping {found}, flat buffer {expected}")
        if expected is not None:
            begin, numel, offset = expected
            pieces.append(flat_range_piece(p.shape, begin, begin + numel, tensor_id=tensor_ids[id(p)], offset=offset))
    if disagreements and len(disagreements) == len(params):
        raise UnsupportedLayoutError(
            "no parameter's _hp_mapping agrees with its place in the flat buffer: " + "; ".join(disagreements)
        )
    if disagreements:
        _warn_once(
            "DeepSpeed's _hp_mapping disagrees with where parameters lie in ZeRO's flat buffer (DeepSpeed 0.19 "
            "computes it in parameter order, while round_robin_gradients lays the buffer out in round-robin "
            "order). SM3 follows the buffer, which is what the fp32 partition and its gradient hold; DeepSpeed's "
            "fragment APIs (safe_get_full_fp32_param, universal checkpoints) may be wrong here. (parameter start, "
            "elements, partition start): " + "; ".join(disagreements)
        )
    pieces.sort(key=lambda piece: piece.offset)
    return tuple(pieces), group


def _zero3_layout(
    tensor: Tensor, params: Sequence[Tensor], tensor_ids: dict[int, int]
) -> tuple[tuple[Piece, ...], Any]:
    """Pieces of a ZeRO-3 sub-group's fp32 partition ``fp32_partitioned_groups_flat[k]``."""
    optimizer = getattr(params[0], "_z3_optimizer", None)
    if optimizer is None:
        raise UnsupportedLayoutError("ZeRO-3 parameters without _z3_optimizer")
    flats = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    sub_groups = getattr(optimizer, "fp16_groups", None)
    if flats is None or sub_groups is None:
        raise UnsupportedLayoutError("the ZeRO-3 optimizer has no fp32_partitioned_groups_flat / fp16_groups")
    index = next((k for k, flat in enumerate(flats) if flat is tensor), None)
    if index is None:
        raise UnsupportedLayoutError("the tensor is none of the ZeRO-3 optimizer's fp32_partitioned_groups_flat")
    members = sub_groups[index]
    groups = {id(p.ds_process_group) for p in members}
    if len(groups) != 1:
        raise UnsupportedLayoutError("a ZeRO-3 sub-group spans several partition groups")
    group = members[0].ds_process_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    pieces, offset = [], 0
    for p in members:
        numel, ps = p.ds_numel, p.partition_numel()
        if ps * world < numel or p.ds_tensor.numel() != ps:
            raise UnsupportedLayoutError(
                f"a parameter of {numel} elements has partitions of {ps} elements at world size {world}"
            )
        start, stop = min(rank * ps, numel), min((rank + 1) * ps, numel)
        if id(p) not in tensor_ids:
            raise UnsupportedLayoutError("a ZeRO-3 sub-group holds a parameter the optimizer was not built on")
        if stop > start:
            pieces.append(flat_range_piece(p.ds_shape, start, stop, tensor_id=tensor_ids[id(p)], offset=offset))
        offset += ps
    if offset != tensor.numel():
        raise UnsupportedLayoutError(
            f"the sub-group's partitions add up to {offset} elements, the fp32 partition has {tensor.numel()}"
        )
    return tuple(pieces), group


# ---------------------------------------------------------------------- universal checkpoints


def _restore_universal_state(optimizer: DeepSpeedSM3, args: Any, kwargs: Any) -> None:
    optimizer._restore_universal()


def _has_accumulators(state: dict[str, Any]) -> bool:
    return any(key.startswith(("mu_", "piece")) for key in state)


def _checked_carrier(carrier: dict[str, Any], plan: Sequence[tuple[int, ...]], momentum_dtype: torch.dtype) -> dict:
    saved = tuple(tuple(s) for s in carrier["plan"])
    if saved != tuple(tuple(s) for s in plan):
        raise ValueError(
            f"the universal checkpoint holds SM3 accumulators for parameters of shapes {list(saved)}, but this "
            f"optimizer's trainable parameters have shapes {list(plan)}: it comes from another model"
        )
    dtype = carrier.get("momentum_dtype")
    if dtype is not None and dtype != str(momentum_dtype):
        raise ValueError(
            f"the universal checkpoint's momentum is {dtype} but this optimizer has momentum_dtype={momentum_dtype}"
        )
    return carrier


def _piece_record(piece: Piece) -> tuple[int, int, int, int]:
    start = _ravel(piece.blocks[0].starts, piece.shape)
    return (piece.tensor_id, start, start + piece.numel, piece.offset)


def _ravel(index: Sequence[int], shape: Sequence[int]) -> int:
    flat = 0
    for i, n in zip(index, shape):
        flat = flat * n + i
    return flat


def _unravel(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    index = []
    for n in reversed(tuple(shape) or (1,)):
        index.append(flat % n)
        flat //= n
    return tuple(reversed(index))


_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def to_universal(input_folder: str, output_folder: str) -> None:
    """Convert a DeepSpeed ZeRO-1/2/3 checkpoint holding :class:`DeepSpeedSM3` state into a universal checkpoint.

    The SM3 counterpart of DeepSpeed's ``ds_to_universal.py --input_folder ... --output_folder ...``
    (``input_folder`` is one tag folder, e.g. ``ckpt/global_step10``), which fails on SM3 state
    with ``KeyError: 'exp_avg'``: it reads Adam's two moments and nothing else. Data parallelism
    only (one model-parallel rank). The output is DeepSpeed's own layout, which
    ``engine.load_checkpoint(...)`` with ``"checkpoint": {"load_universal": true}`` reads at any
    data-parallel size:

    * ``zero/<name>/fp32.pt`` and the momentum, per parameter: ``momentum_buffer.pt`` (ZeRO-1/2,
      whose loader restores every per-parameter file), ``exp_avg.pt`` (ZeRO-3, whose loader reads
      only Adam's names; ``exp_avg_sq.pt`` is a one-element placeholder); ``step.pt``.
    * SM3's accumulators are not parameter-shaped, so DeepSpeed's loader cannot slice them. The
      global accumulators (``sum of dims`` floats per parameter, rebuilt from every rank's
      touched ranges) go into the param groups of ``zero/optimizer_state.pt`` under
      :data:`UNIVERSAL_KEY`; DeepSpeed copies param-group entries onto the optimizer, and at its
      next step :class:`DeepSpeedSM3` takes each partition's ranges from there (and the momentum
      back to its dtype). A partition left without accumulators raises instead of restarting them.

    Raises ``ValueError`` if the checkpoint was not saved by :class:`DeepSpeedSM3`, or if
    DeepSpeed's own partition map disagrees with SM3's layout (DeepSpeed 0.19 with
    ``round_robin_gradients``, whose universal checkpoints are wrong for any optimizer).
    """
    from deepspeed.checkpoint import constants as ds

    optim_files: dict[int, str] = {}
    for path in glob.glob(os.path.join(input_folder, "*_optim_states.pt")):
        match = _OPTIM_FILE.search(os.path.basename(path))
        if match is None:
            continue
        if int(match.group(2)) != 0:
            raise NotImplementedError(f"{path}: model-parallel checkpoints (mp_rank > 0) are not supported")
        optim_files[int(match.group(1))] = path
    if not optim_files:
        raise FileNotFoundError(f"no ZeRO optimizer state files (*zero_pp_rank_*_optim_states.pt) in {input_folder}")
    world = len(optim_files)
    if sorted(optim_files) != list(range(world)):
        raise ValueError(f"{input_folder}: optimizer state files of data-parallel ranks {sorted(optim_files)}")
    states = [
        torch.load(optim_files[r], map_location="cpu", weights_only=False)[ds.OPTIMIZER_STATE_DICT]
        for r in range(world)
    ]
    stage = int(states[0].get(ds.ZERO_STAGE, 1))
    model_pattern = "mp_rank_*_model_states.pt" if stage <= 2 else "zero_pp_rank_*_mp_rank_*_model_states.pt"
    model_files = sorted(glob.glob(os.path.join(input_folder, model_pattern)))
    if not model_files:
        raise FileNotFoundError(f"no model state files ({model_pattern}) in {input_folder}")
    shapes: dict[str, tuple[int, ...]] = {}
    param_shapes = torch.load(model_files[0], map_location="cpu", weights_only=False)[ds.PARAM_SHAPES]
    for group_shapes in param_shapes:
        shapes.update({name: tuple(shape) for name, shape in group_shapes.items()})

    fp32: dict[str, Tensor] = {}
    momentum: dict[str, Tensor] = {}
    covered = dict.fromkeys(shapes, 0)
    accumulators: dict[int, list[Tensor]] = {}
    names: dict[int, str] = {}
    plan = None
    steps, momentum_dtype = set(), None
    for rank, sd in enumerate(states):
        where = f"{optim_files[rank]}"
        base = sd[ds.BASE_OPTIMIZER_STATE] if stage <= 2 else sd[ds.OPTIMIZER_STATE_DICT]
        if not isinstance(base, dict) or LAYOUT_KEY not in base:
            raise ValueError(
                f"{where}: the optimizer state was not saved by sm3_dist's DeepSpeedSM3 (no {LAYOUT_KEY!r} "
                "record); for other optimizers use DeepSpeed's ds_to_universal"
            )
        record = base[LAYOUT_KEY]
        if plan is None:
            plan = [tuple(s) for s in record["plan"]]
        for flat_fp32, index, names_at in _partitions(sd, base, stage, world, rank, param_shapes, ds):
            state = base["state"].get(index, {})
            pieces = record["pieces"].get(index, [])
            several = len(pieces) > 1
            flat_momentum = state.get(MOMENTUM_KEY)
            if STEP_KEY in state:
                steps.add(float(state[STEP_KEY]))
            if flat_momentum is not None:
                momentum_dtype = flat_momentum.dtype
            for j, (tid, start, stop, offset) in enumerate(pieces):
                found = names_at.get(offset)
                if found is None or found[1] != stop - start or normalize_shape(shapes[found[0]]) != plan[tid]:
                    raise ValueError(
                        f"{where}: DeepSpeed's partition map ({found}) disagrees with SM3's layout (parameter "
                        f"{tid} of shape {plan[tid]}, elements [{start}, {stop}) at offset {offset}); DeepSpeed "
                        "0.19's map is wrong under round_robin_gradients, and such a checkpoint cannot be converted"
                    )
                name = found[0]
                if names.setdefault(tid, name) != name:
                    raise ValueError(f"{where}: parameter {tid} is {names[tid]} on one rank and {name} on another")
                n = stop - start
                numel = math.prod(plan[tid])
                fp32.setdefault(name, torch.zeros(numel, dtype=torch.float32))[start:stop] = flat_fp32[
                    offset : offset + n
                ]
                if flat_momentum is not None:
                    buf = momentum.setdefault(name, torch.zeros(numel, dtype=flat_momentum.dtype))
                    buf[start:stop] = flat_momentum.view(-1)[offset : offset + n]
                covered[name] += n
                mus = accumulators.setdefault(tid, [torch.zeros(m, dtype=torch.float32) for m in plan[tid]])
                for d, (lo, hi) in enumerate(flat_range_piece(plan[tid], start, stop).ranges):
                    value = state[accumulator_key(d, j if several else None)]
                    # every rank holds the reduced (global) values of the entries it touches: equal where they overlap
                    mus[d][lo:hi] = torch.maximum(mus[d][lo:hi], value)
    missing = {
        name: (covered[name], math.prod(shape))
        for name, shape in shapes.items()
        if covered[name] != math.prod(normalize_shape(shape))
    }
    if missing:
        raise ValueError(
            f"{input_folder}: parameters not covered exactly once by the partitions (found, expected): {missing}"
        )
    if len(steps) > 1:
        raise ValueError(f"{input_folder}: the ranks' SM3 step counters differ: {sorted(steps)}")
    step = torch.tensor(steps.pop() if steps else 0.0)

    zero_dir = os.path.join(output_folder, "zero")
    for name, shape in shapes.items():
        folder = os.path.join(zero_dir, name)
        os.makedirs(folder, exist_ok=True)
        torch.save({ds.PARAM: fp32[name].view(shape)}, os.path.join(folder, "fp32.pt"))
        if stage <= 2:
            if name in momentum:
                torch.save({ds.PARAM: momentum[name].view(shape)}, os.path.join(folder, f"{MOMENTUM_KEY}.pt"))
        else:
            numel = math.prod(normalize_shape(shape))
            placeholder = torch.zeros(1).expand(numel)
            torch.save({ds.PARAM: momentum.get(name, placeholder)}, os.path.join(folder, "exp_avg.pt"))
            torch.save({ds.PARAM: placeholder}, os.path.join(folder, "exp_avg_sq.pt"))
        torch.save(step.clone(), os.path.join(folder, "step.pt"))

    carrier = {
        "plan": plan,
        "names": [names.get(tid) for tid in range(len(plan))],
        "accumulators": accumulators,
        "step": float(step),
        "momentum_dtype": str(momentum_dtype) if momentum_dtype is not None else None,
    }
    base0 = states[0][ds.BASE_OPTIMIZER_STATE] if stage <= 2 else states[0][ds.OPTIMIZER_STATE_DICT]
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [], UNIVERSAL_KEY: carrier}
        for g in base0["param_groups"]
    ]
    if stage <= 2:
        sharded = (ds.BASE_OPTIMIZER_STATE, ds.PARAM_SLICE_MAPPINGS, ds.SINGLE_PARTITION_OF_FP32_GROUPS)
        out = {k: v for k, v in states[0].items() if k not in sharded}
    else:
        out = {k: v for k, v in states[0].items() if k not in (ds.OPTIMIZER_STATE_DICT, ds.FP32_FLAT_GROUPS)}
        out[ds.OPTIMIZER_STATE_DICT] = {"state": {0: {STEP_KEY: step.clone()}}, "param_groups": groups}
    out[ds.PARAM_GROUPS] = groups
    torch.save(out, os.path.join(zero_dir, "optimizer_state.pt"))
    for path in glob.glob(os.path.join(input_folder, "*model_states.pt")):
        shutil.copy2(path, output_folder)
    root, tag = os.path.split(os.path.abspath(output_folder))
    with open(os.path.join(root, "latest_universal"), "w") as f:
        f.write(tag)


def _partitions(sd, base, stage, world, rank, param_shapes, ds):
    """Per flat fp32 partition of one rank: (the partition, its index in the SM3 state, {offset: (name, numel)})."""
    if stage <= 2:
        fp32_groups = sd[ds.SINGLE_PARTITION_OF_FP32_GROUPS]
        mappings = sd[ds.PARAM_SLICE_MAPPINGS]
        for gi, group in enumerate(base["param_groups"]):
            (index,) = group["params"]
            names_at = {address.start: (name, address.numel) for name, address in mappings[gi].items()}
            yield fp32_groups[gi].view(-1), index, names_at
        return
    flats = sd[ds.FP32_FLAT_GROUPS]
    indices = [index for group in base["param_groups"] for index in group["params"]]
    if len(indices) != len(flats) or len(flats) != len(param_shapes):
        raise ValueError(
            f"ZeRO-3 checkpoint with {len(flats)} sub-groups, {len(param_shapes)} shape lists and {len(indices)} "
            "optimizer tensors"
        )
    for flat, index, group_shapes in zip(flats, indices, param_shapes):
        names_at, offset = {}, 0
        for name, shape in group_shapes.items():
            numel = math.prod(normalize_shape(shape))
            ps = math.ceil(numel / world)
            local = max(0, min(ps, numel - rank * ps))
            names_at[offset] = (name, local)
            offset += ps
        yield flat.view(-1), index, names_at


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _global_shape(p: Tensor) -> tuple[int, ...]:
    shape = getattr(p, "ds_shape", None)
    return tuple(shape) if shape is not None else tuple(p.shape)


def _common_shape(params: Sequence[Tensor], tensor: Tensor) -> torch.Size | None:
    shapes = {tuple(_global_shape(p)) for p in params}
    return tensor.shape if tuple(tensor.shape) in shapes else None


def _find_engine() -> weakref.ref | None:
    """The DeepSpeed engine building this optimizer from its config, if any (used to name the stage in errors)."""
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError:  # pragma: no cover
        return None
    frame = inspect.currentframe()
    try:
        for _ in range(12):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, DeepSpeedEngine):
                return weakref.ref(owner)
            frame = frame.f_back
    finally:
        del frame
    return None


register()
