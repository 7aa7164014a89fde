""":class:`DeepSpeedSM3`: :class:`sm3_dist.SM3` that knows the model parameters its ZeRO partitions came from."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from sm3_dist.integrations.deepspeed.layouts import (
    common_shape,
    find_engine,
    global_shape,
    hp_mapping_layout,
    layout_error,
    zero3_layout,
)
from sm3_dist.integrations.deepspeed.registration import momentum_dtype_from_config
from sm3_dist.integrations.deepspeed.universal import (
    LAYOUT_KEY,
    UNIVERSAL_KEY,
    _checked_carrier,
    _has_accumulators,
    _unravel,
    layout_record,
)
from torch import Tensor

from sm3_dist.layout import TensorLayout, normalize_shape
from sm3_dist.optimizer import SM3
from sm3_dist.placement import ShardSpec, UnsupportedLayoutError
from sm3_dist.state import MOMENTUM_KEY, STEP_KEY, accumulator_key

__all__ = ["DeepSpeedSM3"]


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
        self._engine = find_engine()
        self._universal: dict[str, Any] | None = None
        self.register_step_pre_hook(_restore_universal_state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this rank's state, checked first as :meth:`sm3_dist.SM3.load_state_dict` does.

        The :data:`LAYOUT_KEY` record, if present, must describe parameters of this optimizer's shapes. State
        that DeepSpeed's universal loader fills (param groups carrying :data:`UNIVERSAL_KEY`) may lack the
        accumulators and hold the momentum as ``exp_avg``: they are rebuilt at the next step.
        """
        record = state_dict.get(LAYOUT_KEY) if isinstance(state_dict, dict) else None
        if record is not None:
            saved = [tuple(s) for s in record.get("plan", ())]
            if saved != [tuple(s) for s in self._global_plan()]:
                raise ValueError(
                    f"the state holds SM3 state for trainable parameters of shapes {saved}, but this optimizer's "
                    f"have shapes {list(self._global_plan())}: it comes from another model"
                )
        state_dict = {k: v for k, v in state_dict.items() if k != LAYOUT_KEY}
        universal = any(UNIVERSAL_KEY in g for g in state_dict.get("param_groups", ()) if isinstance(g, dict))
        if universal:
            self._load_check_options = {"partial": True, "extra_keys": ("exp_avg", "exp_avg_sq")}
        # torch replaces the param_group dicts on load; keep each group's model parameters, in group order.
        before = [self._model_params.get(id(group)) for group in self.param_groups]
        try:
            super().load_state_dict(state_dict)
        finally:
            self.__dict__.pop("_load_check_options", None)
        self._model_params = {id(g): params for g, params in zip(self.param_groups, before) if params is not None}
        self._universal = None

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        record = layout_record(self, self._specs, self._global_plan())
        if record is not None:
            state_dict[LAYOUT_KEY] = record
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
                    return f"{self._param_name(p)} at index {_unravel(flat, global_shape(p))}"
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
        return f"{name} (shape {global_shape(p)})"

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
        if tensor.shape == common_shape(params, tensor):
            return None  # an fp32 copy of one whole parameter (the unfused fp16 wrapper)
        raise self._error(tensor, "no ZeRO partition metadata (_hp_mapping or ds_tensor) explains it")

    def _group_model_params(self, tensor: Tensor) -> tuple[Tensor, ...]:
        for group in self.param_groups:
            if any(p is tensor for p in group["params"]):
                return self._model_params.get(id(group), ())
        return ()

    def _global_plan(self) -> tuple[tuple[int, ...], ...]:
        if self._plan is None:
            self._plan = tuple(normalize_shape(global_shape(p)) for p in self._trainable)
        return self._plan

    def _hp_mapping_spec(self, tensor: Tensor, params: Sequence[Tensor]) -> ShardSpec:
        try:
            pieces, group = hp_mapping_layout(tensor, params, self._tensor_ids)
        except UnsupportedLayoutError as err:
            raise self._error(tensor, str(err), "1 or 2") from None
        return ShardSpec(TensorLayout(pieces=pieces, numel=tensor.numel()), group=group, plan=self._global_plan())

    def _zero3_spec(self, tensor: Tensor, params: Sequence[Tensor]) -> ShardSpec:
        try:
            pieces, group = zero3_layout(tensor, params, self._tensor_ids)
        except UnsupportedLayoutError as err:
            raise self._error(tensor, str(err), "3") from None
        return ShardSpec(TensorLayout(pieces=pieces, numel=tensor.numel()), group=group, plan=self._global_plan())

    def _error(self, tensor: Tensor, reason: str, stage_hint: str = "unknown") -> UnsupportedLayoutError:
        engine = self._engine() if self._engine is not None else None
        stage = engine.zero_optimization_stage() if engine is not None else stage_hint
        return layout_error(tensor, reason, stage)


def _restore_universal_state(optimizer: DeepSpeedSM3, args: Any, kwargs: Any) -> None:
    optimizer._restore_universal()
