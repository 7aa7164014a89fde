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

Checkpoints: ``engine.save_checkpoint`` stores the base optimizer's
``state_dict`` (per rank under ZeRO), which holds SM3's state keyed as in
:func:`sm3_dist.accumulator_key`; ``load_checkpoint`` at the same world size
restores it. DeepSpeed's universal-checkpoint conversion (``ds_to_universal``)
slices every optimizer state tensor shaped like the flat partition (Adam's
``exp_avg``, and SM3's momentum) per parameter, and leaves the accumulators
(``pieceJ.mu_d``, sized by the sum of dimensions) alone: SM3 accumulators do
not survive a universal-checkpoint conversion (resuming from one restarts them).

Offload: ``offload_optimizer: {"device": "cpu"}`` runs SM3 on the CPU copy of
the partition. accelerate's DeepSpeed plugin replaces an optimizer it does not
recognise with ``DeepSpeedCPUAdam`` under offload unless the config says
``"zero_force_ds_cpu_optimizer": false``; the configs in ``launch/deepspeed``
say so, and :func:`check_engine` raises if the engine's optimizer is not SM3.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sm3_dist.layout import Piece, TensorLayout, flat_range_piece, normalize_shape
from sm3_dist.optimizer import SM3
from sm3_dist.placement import ShardSpec, UnsupportedLayoutError

__all__ = [
    "SUPPORTED_DEEPSPEED",
    "DeepSpeedSM3",
    "check_deepspeed_version",
    "check_engine",
    "register",
    "warmup_cooldown_scheduler",
]

SUPPORTED_DEEPSPEED = ((0, 19, 0), (0, 20, 0))
"""Half-open range ``[low, high)`` of DeepSpeed versions this module has been checked against."""

OPTIMIZER_TYPE = "SM3"
SCHEDULER_TYPE = "SM3WarmupCooldown"


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
    if not isinstance(base, DeepSpeedSM3):
        raise RuntimeError(
            f"the DeepSpeed engine's optimizer is {type(base).__name__}, not SM3; with offload_optimizer set, "
            'accelerate swaps unknown optimizers for DeepSpeedCPUAdam unless "zero_force_ds_cpu_optimizer": false'
        )


class DeepSpeedSM3(SM3):
    """:class:`sm3_dist.SM3` that maps DeepSpeed's flat fp32 partitions back to parameter shapes.

    Takes the arguments of :class:`sm3_dist.SM3` (except ``shard_resolver``).
    Built by DeepSpeed from ``"optimizer": {"type": "SM3", "params": {...}}``
    after :func:`register`, or by the user and passed as ``optimizer=`` to
    ``deepspeed.initialize``. It remembers the model parameters it was built on;
    ZeRO then replaces ``param_groups[i]["params"]`` with its flat partitions,
    and the layouts are resolved at the first step.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], *args: Any, **kwargs: Any) -> None:
        if "shard_resolver" in kwargs:
            raise TypeError("DeepSpeedSM3 provides its own shard_resolver")
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch replaces the param_group dicts on load; keep each group's model parameters, in group order.
        before = [self._model_params.get(id(group)) for group in self.param_groups]
        super().load_state_dict(state_dict)
        self._model_params = {id(g): params for g, params in zip(self.param_groups, before) if params is not None}

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
