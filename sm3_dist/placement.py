"""Where a parameter's local piece lives: its layout and the group its maxima are reduced over.

:class:`ShardSpec` is what every adapter produces. The core understands plain
tensors (the whole parameter on this process) and DTensors (FSDP2, tensor
parallel, HSDP) by itself; other frameworks (FSDP1, DeepSpeed ZeRO) hand the
optimizer a resolver that turns their shard metadata into :class:`ShardSpec`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sm3_dist.layout import TensorLayout, box_piece, full_piece

__all__ = [
    "LayoutGuard",
    "ShardSpec",
    "SpecResolver",
    "UnsupportedLayoutError",
    "dtensor_spec",
    "first_device",
    "group_key",
    "is_dtensor",
    "local_spec",
    "register_swap_explainer",
]


class UnsupportedLayoutError(ValueError):
    """A parameter's shard layout cannot be recovered; SM3 refuses to guess."""


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """How one optimizer tensor maps onto global parameters, and who shares them."""

    layout: TensorLayout
    """The pieces of global parameters the local tensor holds."""
    group: Any = None
    """Process group over which partial maxima are MAX-reduced; ``None``: no reduction."""
    plan: tuple[tuple[int, ...], ...] | None = None
    """Global shapes by ``tensor_id`` of every tensor reduced over ``group``, the same on every rank.
    ``None``: one entry per parameter, in ``param_groups`` order (every rank holds every parameter)."""
    wrap_state: Callable[[Tensor, int | None], Tensor] | None = field(default=None, compare=False)
    """Turns a local state tensor (``dim`` = accumulator dimension, ``None`` = momentum) into the
    form the framework's checkpointing expects (a DTensor under FSDP2); ``None``: keep it local."""


SpecResolver = Callable[[Tensor], "ShardSpec | None"]
"""An adapter's hook: the spec of an optimizer tensor, or ``None`` if the adapter does not own it."""


def local_spec(param: Tensor) -> ShardSpec:
    """The whole parameter lives on this process: nothing to reduce."""
    return ShardSpec(TensorLayout(pieces=(full_piece(param.shape),), numel=param.numel()))


def dtensor_spec(param: Tensor, name: str) -> ShardSpec:
    """The spec of a DTensor parameter (FSDP2 ``fully_shard``, tensor parallel, HSDP).

    The local piece is the dense box ``compute_local_shape_and_global_offset``
    gives (uneven and empty shards included). Partial maxima are reduced over
    the mesh axes that ``Shard`` (flattened into one group when there are
    several; ``Replicate`` axes hold equal copies and need nothing). State is
    kept as DTensors on the parameter's mesh so DCP saves and reshards it:
    momentum with the parameter's placements; ``mu_d`` with ``Shard(0)`` on the
    mesh axes that shard dimension ``d`` and ``Replicate()`` on the others.
    ``Partial`` and ``_StridedShard`` raise :class:`UnsupportedLayoutError`.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh, placements = param.device_mesh, tuple(param.placements)
    for axis, placement in enumerate(placements):
        if isinstance(placement, _StridedShard):
            raise UnsupportedLayoutError(
                f"{name}: placement {placement} on mesh axis {axis} (FSDP2 over tensor parallel) is a strided "
                "shard whose local piece is not a dense box; SM3 does not support it"
            )
        if not isinstance(placement, (Shard, Replicate)):
            raise UnsupportedLayoutError(
                f"{name}: placement {placement} on mesh axis {axis} is not supported; SM3 needs Shard(d) or "
                "Replicate() (a Partial parameter has no well-defined value to update)"
            )
    local_shape, offsets = compute_local_shape_and_global_offset(param.shape, mesh, placements)
    piece = box_piece(param.shape, offsets, local_shape)
    layout = TensorLayout(pieces=(piece,), numel=param.to_local().numel())
    shard_axes = [axis for axis, p in enumerate(placements) if isinstance(p, Shard)]
    if not shard_axes:
        group = None
    elif len(shard_axes) == 1:
        group = mesh.get_group(shard_axes[0])
    else:
        group = _flattened_group(mesh, shard_axes, name)

    def wrap_state(local: Tensor, dim: int | None) -> Tensor:
        from torch.distributed.tensor import DTensor

        if dim is None:
            return DTensor.from_local(
                local, mesh, placements, shape=param.shape, stride=param.stride(), run_check=False
            )
        state_placements = tuple(
            Shard(0) if isinstance(p, Shard) and (p.dim % max(len(param.shape), 1)) == dim else Replicate()
            for p in placements
        )
        return DTensor.from_local(
            local, mesh, state_placements, shape=(piece.shape[dim],), stride=(1,), run_check=False
        )

    return ShardSpec(layout=layout, group=group, wrap_state=wrap_state)


def _flattened_group(mesh: Any, axes: list[int], name: str) -> Any:
    names = mesh.mesh_dim_names
    if names is None:
        raise UnsupportedLayoutError(
            f"{name}: sharded over {len(axes)} mesh axes of an unnamed device mesh; name the mesh dimensions "
            "(init_device_mesh(..., mesh_dim_names=...)) so the axes can be flattened into one reduction group"
        )
    # DeviceMesh caches flattened meshes on its root mesh: every call returns the same group
    return mesh[tuple(names[a] for a in axes)]._flatten().get_group()


# Attributes by which frameworks mark a parameter whose local data is a flat piece of it, and what to do instead.
_FLAT_PIECE_MARKERS = {
    "_fsdp_flattened": (
        "FSDP1 (FullyShardedDataParallel) flattened it: its local data is a 1-D piece of its flat parameter. Build "
        "SM3(..., shard_resolver=sm3_dist.integrations.fsdp1.fsdp1_shard_resolver(model))"
    ),
}


def default_spec(param: Tensor, name: str) -> ShardSpec:
    """The spec the core finds on its own: DTensor metadata, or the whole tensor.

    A parameter a framework marks as a flat piece is refused: treating it as a
    whole tensor would silently give per-element accumulators.
    """
    if is_dtensor(param):
        return dtensor_spec(param, name)
    for marker, advice in _FLAT_PIECE_MARKERS.items():
        if getattr(param, marker, False):
            raise UnsupportedLayoutError(f"{name}: {advice}")
    return local_spec(param)


# ---------------------------------------------------------------------- tensors swapped in by a wrapper

SwapExplainer = Callable[[Tensor, Any], "ShardSpec | None"]
"""A framework adapter's hook for a tensor a wrapper put into an optimizer's param groups after construction
(called with the tensor and the optimizer): its spec, or ``None`` if the adapter does not know the tensor (it
raises if it knows it but cannot map it)."""

_EXPLAINERS: list[SwapExplainer] = []
_LAZY_EXPLAINERS = {"deepspeed": "sm3_dist.integrations.deepspeed.layouts"}
"""Framework module -> the adapter module that registers its explainer on import; loaded once the framework
itself is imported (a tensor a framework swapped in can exist only then)."""


def register_swap_explainer(explainer: SwapExplainer) -> None:
    """Add an adapter's :data:`SwapExplainer` (idempotent)."""
    if explainer not in _EXPLAINERS:
        _EXPLAINERS.append(explainer)


def explain_swapped(tensor: Tensor, optimizer: Any = None) -> ShardSpec | None:
    """The spec a registered adapter gives a tensor swapped into param groups, or ``None`` if none knows it."""
    for framework, module in _LAZY_EXPLAINERS.items():
        if framework in sys.modules:
            importlib.import_module(module)
    for explainer in _EXPLAINERS:
        spec = explainer(tensor, optimizer)
        if spec is not None:
            return spec
    return None


class LayoutGuard:
    """The ``shard_resolver`` :class:`sm3_dist.SM3` consults: the user's resolver, then the swap rule.

    SM3 never runs on a tensor whose layout it cannot explain. A tensor that a
    wrapper put into one of the param groups the optimizer was built with
    (DeepSpeed ZeRO replaces them with flat partitions, its fp16/bf16 wrappers
    with fp32 copies) is not a parameter the user handed over; treating it as a
    whole tensor would give a flat partition per-element accumulators (diagonal
    AdaGrad). Such a tensor is mapped by the framework's adapter
    (:func:`register_swap_explainer`) or refused with
    :class:`UnsupportedLayoutError`. DTensors explain themselves; param groups
    added after construction (``add_param_group``) hold the user's own tensors.
    """

    def __init__(self, optimizer: Any, resolver: SpecResolver | None) -> None:
        self.optimizer = optimizer
        self.resolver = resolver
        self.built_on = [list(group["params"]) for group in optimizer.param_groups]
        self._ids: set[int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ids": None}  # ids are not those of a copy's tensors

    def __call__(self, tensor: Tensor) -> ShardSpec | None:
        spec = self.resolver(tensor) if self.resolver is not None else None
        if spec is not None or is_dtensor(tensor):
            return spec
        if self._ids is None:
            self._ids = {id(p) for params in self.built_on for p in params}
        if id(tensor) in self._ids:
            return None
        position = next(
            (
                (gi, pi)
                for gi, group in enumerate(self.optimizer.param_groups)
                for pi, p in enumerate(group["params"])
                if p is tensor
            ),
            None,
        )
        if position is None or position[0] >= len(self.built_on):
            return None  # not in the param groups, or in a group added after construction
        spec = explain_swapped(tensor, self.optimizer)
        if spec is not None:
            return spec
        gi, pi = position
        raise UnsupportedLayoutError(
            f"param_groups[{gi}]['params'][{pi}] (shape {tuple(tensor.shape)}, dtype {tensor.dtype}) is not one of "
            f"the parameters {type(self.optimizer).__name__} was built on: a wrapper replaced them after "
            "construction, and nothing explains the layout of what it put there. SM3 will not treat it as a whole "
            "tensor (for a flat shard that would silently give per-element accumulators, i.e. diagonal AdaGrad). "
            "Under DeepSpeed ZeRO: use DeepSpeed 0.19.x (sm3_dist.integrations.deepspeed maps its partitions); "
            "with another wrapper: build the optimizer on the parameters it steps, or pass a shard_resolver"
        )


_DTENSOR_TYPE: list[type] = []


def is_dtensor(t: Tensor) -> bool:
    if not _DTENSOR_TYPE:  # imported on first use: the optimizer step asks this of every tensor
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - torch without distributed
            return False
        _DTENSOR_TYPE.append(DTensor)
    return isinstance(t, _DTENSOR_TYPE[0])


def to_local(t: Tensor | None) -> Tensor | None:
    """The local tensor of a DTensor; anything else as it is."""
    if t is not None and is_dtensor(t):
        return t.to_local()
    return t


def group_key(group: Any) -> Any:
    """A hashable key of a :attr:`ShardSpec.group` (process groups compare by identity; ``None``: not reduced)."""
    return id(group) if group is not None else None


def first_device(param_groups: Sequence[Mapping[str, Any]]) -> torch.device:
    """The device of the first parameter's local tensor (CPU when there is none)."""
    for group in param_groups:
        for p in group["params"]:
            local = to_local(p)
            return local.device
    return torch.device("cpu")
