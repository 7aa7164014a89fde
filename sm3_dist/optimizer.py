r"""``sm3_dist.SM3``: the SM3-II optimizer, single-process or with sharded state."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sm3_dist import functional
from sm3_dist.comm import MaxReducer, any_rank_true
from sm3_dist.placement import LayoutGuard, ShardSpec, SpecResolver, UnsupportedLayoutError, default_spec, to_local

__all__ = ["MOMENTUM_KEY", "SM3", "STEP_KEY", "accumulator_key"]

STEP_KEY = "step"
SKIPPED_KEY = "skipped_steps"
MOMENTUM_KEY = "momentum_buffer"


def accumulator_key(dim: int, piece_index: int | None = None) -> str:
    """State key of ``mu_dim``; a tensor holding pieces of several parameters adds the piece's index."""
    return f"mu_{dim}" if piece_index is None else f"piece{piece_index}.mu_{dim}"


_MOMENTUM_DTYPES = (torch.float32, torch.bfloat16)
NONFINITE_POLICIES = ("skip", "raise", "ignore")


class SM3(Optimizer):
    r"""SM3-II (Anil, Gupta, Koren, Singer, NeurIPS 2019, arXiv:1901.11150), optionally with sharded state.

    For a parameter of shape :math:`(n_1, \dots, n_p)` the state is one
    accumulator :math:`\mu_d` of length :math:`n_d` per dimension (the cover of
    codimension-1 slices), so it costs :math:`\sum_d n_d` floats instead of
    :math:`\prod_d n_d`; rank-0 and rank-1 parameters get one accumulator per
    element. Each step:

    .. math::
       \begin{aligned}
       &\nu[i] = \min_d \mu_d[i_d] + g[i]^2
          \quad\text{or, with } \beta > 0,\quad \beta \min_d \mu_d[i_d] + (1-\beta) g[i]^2 \\
       &\mu_d[k] = \max_{i:\, i_d = k} \nu[i] \\
       &u = g / \sqrt{\nu + \epsilon} \quad (\epsilon = 0:\ u = 0 \text{ where } \nu = 0) \\
       &m = \text{momentum}\cdot m + (1-\text{momentum})\, u;\quad w = w - \text{lr}\cdot m
       \end{aligned}

    The math itself is in :mod:`sm3_dist.functional`.

    **Sharded state.** Constructed on FSDP2 (DTensor) parameters, or given a
    ``shard_resolver`` by an integration (FSDP1, DeepSpeed ZeRO), each rank keeps
    momentum for its local elements and accumulator entries for the index
    ranges its local piece touches. The partial maxima of all tensors go into
    one ``all_reduce(MAX)`` per process group per step, launched after the
    local update and awaited before the next step (or ``state_dict``) reads the
    accumulators. Max is exact and associative, so the sharded run is
    bit-for-bit the single-process run.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 0.1, as the PyTorch ports).
        momentum: momentum in ``[0, 1)`` (default 0, as the original and the ports). 0 allocates no buffer.
        beta: 0 for SM3's running sum of squares (default); ``0 < beta < 1`` for the exponential moving
            average variant, where ``mu_d`` is *assigned* the new maxima as in the original TF code, so the
            average can decrease.
        eps: added to ``nu`` before the inverse square root (default 1e-30, as the PyTorch ports);
            ``eps=0`` is the original rule (update 0 where ``nu == 0``).
        weight_decay: L2 penalty added to the gradient before it is accumulated (default 0).
        maximize: maximize the objective instead of minimizing it.
        foreach: batch the elementwise work across tensors with ``torch._foreach_*`` ops.
        fused: run each tensor's update through one ``torch.compile``-d kernel.
            With neither set: on CPU the one-pass native fused kernel where it builds (bitwise equal to the
            per-tensor kernel), else the per-tensor loop; on CUDA the foreach kernel, as ``torch.optim`` does.
        momentum_dtype: ``torch.float32`` (default) or ``torch.bfloat16``: the dtype the momentum buffer is
            stored in (computed in fp32, rounded to nearest even when stored). Accumulators are always fp32.
        ema_keeps_max: with ``beta > 0``, keep ``mu_d = max(mu_d, new maxima)`` as the PyTorch ports do
            (the average then never decreases). Default False: the original rule.
        nonfinite: what to do when a gradient holds an inf or NaN, which would poison SM3's running
            accumulators for good. ``"skip"`` (default): every rank skips the step together (one
            one-element all-reduce decides); parameters, momentum and accumulators stay bitwise unchanged
            and ``skipped_steps`` counts it. ``"raise"``: every rank raises ``FloatingPointError``, naming
            the parameter on the rank that holds it. ``"ignore"``: no check (saves one read of the gradients).
        shard_resolver: an integration's hook turning a framework's shard metadata into a
            :class:`~sm3_dist.placement.ShardSpec` (``None`` for tensors it does not own).

    Differences from the original TensorFlow implementation: ``eps`` defaults to 1e-30 (set 0 for
    the original), and ``beta``/``weight_decay``/``maximize`` are additions the ports also offer.
    Parameters may be fp32, bf16 or fp16; the state is fp32 (momentum optionally bf16).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 0.1,
        momentum: float = 0.0,
        beta: float = 0.0,
        eps: float = 1e-30,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        momentum_dtype: torch.dtype = torch.float32,
        ema_keeps_max: bool = False,
        nonfinite: str = "skip",
        shard_resolver: SpecResolver | None = None,
    ) -> None:
        _check_hyperparameters(lr=lr, momentum=momentum, beta=beta, eps=eps, weight_decay=weight_decay)
        if foreach and fused:
            raise ValueError("foreach and fused cannot both be True: choose one kernel")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if momentum_dtype not in _MOMENTUM_DTYPES:
            raise ValueError(f"momentum_dtype must be torch.float32 or torch.bfloat16, got {momentum_dtype}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            beta=beta,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
        # a counter, not a hyperparameter: in every group from the start, so that a checkpoint template made
        # from a fresh optimizer (dcp.load fills only the keys it has) carries it
        defaults[SKIPPED_KEY] = 0
        super().__init__(params, defaults)
        self.momentum_dtype = momentum_dtype
        self.ema_keeps_max = ema_keeps_max
        self.nonfinite = nonfinite
        self._shard_resolver = LayoutGuard(self, shard_resolver)  # the user's resolver, then the swap rule
        self._specs: dict[Tensor, ShardSpec] = {}
        self._checked: dict[Tensor, float] = {}
        """The momentum each parameter's state was last checked against (checked again after a load)."""
        self._dense: dict[int, _DenseGroup] = {}
        """Param groups (by index) of whole, plain, dense parameters: what their fast path reuses."""
        self._reducers: dict[Any, MaxReducer] = {}
        # (stored accumulator, its region of a reducer's buffer) awaiting the reduced maxima
        self._pending: list[tuple[Tensor, Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                reason = _unsupported_dtype(p)
                if reason is not None:
                    raise TypeError(f"SM3 does not support {reason} parameters ({_describe(p)})")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in ("lr", "momentum", "beta", "eps", "weight_decay"):
            if key in param_group:
                _check_hyperparameters(**{key: param_group[key]})
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ copying and pickling

    _CACHES = ("_specs", "_checked", "_dense", "_reducers", "_pending")
    """What the optimizer derives from its parameters and rebuilds on the next step; never copied."""
    _HOOKS = (
        "_optimizer_step_pre_hooks",
        "_optimizer_step_post_hooks",
        "_optimizer_state_dict_pre_hooks",
        "_optimizer_state_dict_post_hooks",
        "_optimizer_load_state_dict_pre_hooks",
        "_optimizer_load_state_dict_post_hooks",
    )

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy``, ``pickle`` and ``torch.save`` of the optimizer keep.

        ``torch.optim.Optimizer`` keeps only ``defaults``, ``state`` and ``param_groups``; SM3 also keeps
        its own settings (``momentum_dtype``, ``ema_keeps_max``, ``nonfinite``, the ``shard_resolver``,
        which must then be picklable itself) and drops what it derives from the parameters (layouts,
        reducers, the dense fast path), which the copy rebuilds on its first step. Hooks are not kept, as
        in ``torch.optim``. A pending all-reduce of accumulator maxima is finished first, so the copy
        holds the reduced accumulators.
        """
        if getattr(self, "_pending", None) or getattr(self, "_reducers", None):
            self._wait_for_maxima()
        skip = set(self._CACHES) | set(self._HOOKS)
        return {key: value for key, value in self.__dict__.items() if key not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # also what Optimizer.load_state_dict calls with just "state" and "param_groups": caches that exist
        # are kept there (load_state_dict resets what it must); a fresh copy gets empty ones
        super().__setstate__(state)
        self.__dict__.setdefault("_specs", {})
        self.__dict__.setdefault("_checked", {})
        self.__dict__.setdefault("_dense", {})
        self.__dict__.setdefault("_reducers", {})
        self.__dict__.setdefault("_pending", [])
        self.__dict__.setdefault("momentum_dtype", torch.float32)
        self.__dict__.setdefault("ema_keeps_max", False)
        self.__dict__.setdefault("nonfinite", "skip")
        self.__dict__.setdefault("_shard_resolver", None)
        # a param group saved before a flag existed (maximize, foreach, fused, ...) gets this optimizer's
        # default; "differentiable" is torch's own default, which SM3 does not take
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key != "differentiable":
                    group.setdefault(key, value)

    # ------------------------------------------------------------------ layouts and state

    def _spec(self, p: Tensor, name: str) -> ShardSpec:
        spec = self._specs.get(p)
        if spec is None:
            spec = self._shard_resolver(p) if self._shard_resolver is not None else None
            if spec is None:
                spec = default_spec(p, name)
            local_numel = to_local(p).numel()
            if spec.layout.numel != local_numel:
                raise UnsupportedLayoutError(
                    f"{name}: its layout describes {spec.layout.numel} local elements but the tensor has {local_numel}"
                )
            self._specs[p] = spec
        return spec

    def _assign_plans(self) -> None:
        """Give every reduced tensor a slot in its group's buffer, identically on every rank."""
        self._checked.clear()
        self._dense.clear()
        auto: dict[Any, list[tuple[Tensor, ShardSpec]]] = {}
        declared: dict[Any, tuple[tuple[int, ...], ...]] = {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                spec = self._spec(p, f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})")
                if spec.group is None:
                    continue
                key = _group_key(spec.group)
                if spec.plan is None:
                    auto.setdefault(key, []).append((p, spec))
                else:
                    if declared.setdefault(key, spec.plan) != spec.plan:
                        raise UnsupportedLayoutError("tensors reduced over one process group declare different plans")
        for key, members in auto.items():
            if key in declared:
                raise UnsupportedLayoutError("a process group mixes declared and automatic reduction plans")
            shapes = []
            for p, spec in members:
                (piece,) = spec.layout.pieces
                self._specs[p] = replace(
                    spec, layout=replace(spec.layout, pieces=(replace(piece, tensor_id=len(shapes)),))
                )
                shapes.append(piece.shape)
            declared[key] = tuple(shapes)
        groups = {}
        for spec in self._specs.values():
            if spec.group is not None:
                groups[_group_key(spec.group)] = spec.group
        device = _first_device(self.param_groups)
        self._reducers = {key: MaxReducer(groups[key], declared[key], device) for key in groups}

    def _init_state(self, p: Tensor, spec: ShardSpec, momentum: float) -> None:
        state = self.state[p]
        local = to_local(p)
        wrap = spec.wrap_state or (lambda t, dim: t)
        state[STEP_KEY] = torch.tensor(0.0, dtype=torch.float32)
        if momentum > 0.0:
            state[MOMENTUM_KEY] = wrap(torch.zeros_like(local, dtype=self.momentum_dtype), None)
        several = len(spec.layout.pieces) > 1
        for j, piece in enumerate(spec.layout.pieces):
            for d, (lo, hi) in enumerate(piece.ranges):
                acc = torch.zeros(hi - lo, dtype=torch.float32, device=local.device)
                state[accumulator_key(d, j if several else None)] = wrap(acc, d)
        self._checked[p] = momentum

    def _check_state(self, p: Tensor, spec: ShardSpec, momentum: float, name: str) -> None:
        state = self.state[p]
        several = len(spec.layout.pieces) > 1
        for j, piece in enumerate(spec.layout.pieces):
            for d, (lo, hi) in enumerate(piece.ranges):
                key = accumulator_key(d, j if several else None)
                acc = to_local(state.get(key))
                if acc is None or acc.shape != (hi - lo,):
                    found = None if acc is None else tuple(acc.shape)
                    raise ValueError(
                        f"{name}: optimizer state {key!r} has shape {found}, expected ({hi - lo},) for a parameter "
                        f"of shape {piece.shape}: the state comes from another model or another sharding"
                    )
        if momentum > 0.0:
            buf = to_local(state.get(MOMENTUM_KEY))
            local = to_local(p)
            if buf is None or buf.shape != local.shape:
                raise ValueError(f"{name}: momentum buffer missing or of another shape than the parameter")
            if buf.dtype != self.momentum_dtype:
                raise ValueError(
                    f"{name}: momentum buffer is {buf.dtype} but the optimizer was built with "
                    f"momentum_dtype={self.momentum_dtype}"
                )
        self._checked[p] = momentum

    # ------------------------------------------------------------------ step

    def _wait_for_maxima(self) -> None:
        """Finish the previous step's all-reduce and store the reduced accumulators."""
        if not self._pending:
            for reducer in self._reducers.values():
                reducer.wait()
            return
        for reducer in self._reducers.values():
            reducer.wait()
        for acc, reduced in self._pending:
            if self.ema_keeps_max:
                torch.maximum(acc, reduced, out=acc)
            else:
                acc.copy_(reduced)
        self._pending = []

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._wait_for_maxima()
        if not self._specs or any(p not in self._specs for g in self.param_groups for p in g["params"]):
            self._assign_plans()
        if self.nonfinite != "ignore" and self._found_nonfinite():
            return loss
        for reducer in self._reducers.values():
            reducer.zero_()
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group)
        for reducer in self._reducers.values():
            reducer.launch()
        return loss

    def _name(self, gi: int, pi: int, p: Tensor) -> str:
        """How errors name a parameter: its position, and the global shape of what it holds."""
        pieces = self._specs[p].layout.pieces if p in self._specs else ()
        shape = pieces[0].shape if len(pieces) == 1 else tuple(p.shape)
        return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(shape)})"

    def _found_nonfinite(self) -> bool:
        """Whether any rank's gradient holds an inf/NaN; raises under ``nonfinite="raise"``."""
        named, grads = [], []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    g = to_local(p.grad)
                    g = g.coalesce().values() if g.is_sparse else g
                    if g.numel():
                        grads.append(g)
                        named.append(self._name(gi, pi, p))
        bad = functional.first_nonfinite(grads)
        local_bad = None if bad is None else named[bad]
        groups = {_group_key(s.group): s.group for s in self._specs.values() if s.group is not None}
        found = local_bad is not None
        for group in groups.values():
            found = any_rank_true(found, group, _first_device(self.param_groups)) or found
        if not found:
            return False
        if self.nonfinite == "raise":
            where = f"in {local_bad}" if local_bad is not None else "on another rank"
            raise FloatingPointError(f"SM3: non-finite gradient {where}{_rank_suffix()}; no state was changed")
        for group in self.param_groups:
            group[SKIPPED_KEY] = group.get(SKIPPED_KEY, 0) + 1
        return True

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (kept in ``param_groups``, so checkpoints carry it)."""
        return max((group.get(SKIPPED_KEY, 0) for group in self.param_groups), default=0)

    def _step_group(self, gi: int, group: dict[str, Any]) -> None:
        momentum = group["momentum"]
        dense = self._dense.get(gi)
        inputs = dense.inputs(group, momentum) if dense is not None else None
        if inputs is not None:
            params, grads, bufs, accs = inputs
            dense.count_step(params)
            if params and not self._native_batch_step(dense, group, params, grads, bufs, accs):
                self._kernel(group, params, grads, bufs, accs, maxima_out=accs)
            return
        params, grads, bufs, accs, targets, steps = [], [], [], [], [], []
        finalize: list[tuple[list[Tensor], list[Tensor]]] = []  # (stored accumulators, new maxima) of local pieces
        plan: list[tuple[Tensor, dict, tuple[str, ...]]] | None = []  # the group as whole dense tensors, if it is
        for pi, p in enumerate(group["params"]):
            spec = self._specs[p]
            state = self.state[p]
            if not state:
                self._init_state(p, spec, momentum)
            elif self._checked.get(p) != momentum:
                self._check_state(p, spec, momentum, self._name(gi, pi, p))
            if plan is not None:
                entry = _dense_entry(p, spec, state)
                if entry is None:
                    plan = None
                else:
                    plan.append(entry)
            if p.grad is None:
                continue
            grad = to_local(p.grad)
            local = to_local(p)
            if grad.shape != local.shape:
                raise ValueError(
                    f"{self._name(gi, pi, p)}: gradient of shape {tuple(grad.shape)} does not match the parameter"
                )
            if grad.is_complex():
                raise TypeError(f"{self._name(gi, pi, p)}: complex gradients are not supported")
            steps.append(state[STEP_KEY])
            buf = to_local(state.get(MOMENTUM_KEY))
            if (buf is None) != (momentum == 0.0):  # state replaced behind the optimizer's back
                self._check_state(p, spec, momentum, self._name(gi, pi, p))
            pieces = spec.layout.pieces
            several = len(pieces) > 1
            if grad.is_sparse:
                plan = None
                self._sparse_step(local, grad, buf, spec, state, group, self._name(gi, pi, p))
                continue
            if not local.is_contiguous() or not grad.is_contiguous():
                raise UnsupportedLayoutError(
                    f"{self._name(gi, pi, p)}: SM3 needs contiguous local parameters and gradients"
                )
            if _whole_block(spec, local.shape):
                # the whole parameter as one block (the single-process case): no views to cut
                stored = [to_local(state[accumulator_key(d)]) for d in range(pieces[0].ndim)]
                params.append(local)
                grads.append(grad)
                bufs.append(buf)
                accs.append(stored)
                targets.append(("assign", stored, None))
                continue
            reducer = self._reducers.get(_group_key(spec.group)) if spec.group is not None else None
            flat_p, flat_g = local.view(-1), grad.view(-1)
            flat_m = buf.view(-1) if buf is not None else None
            for j, piece in enumerate(pieces):
                stored = [to_local(state[accumulator_key(d, j if several else None)]) for d in range(piece.ndim)]
                if reducer is not None:
                    slots = [reducer.slot(piece.tensor_id, d) for d in range(piece.ndim)]
                    self._pending.extend((acc, slot[lo:hi]) for acc, slot, (lo, hi) in zip(stored, slots, piece.ranges))
                    target = slots
                    origin = [0] * piece.ndim
                elif len(piece.blocks) == 1 and piece.is_full:
                    target = None
                    origin = [0] * piece.ndim
                else:
                    target = [torch.zeros(hi - lo, dtype=torch.float32, device=local.device) for lo, hi in piece.ranges]
                    origin = [lo for lo, _ in piece.ranges]
                    finalize.append((stored, target))
                for block in piece.blocks:
                    if block.numel == 0:
                        continue
                    view = slice(block.offset, block.offset + block.numel)
                    params.append(flat_p[view].view(block.lengths))
                    grads.append(flat_g[view].view(block.lengths))
                    bufs.append(flat_m[view].view(block.lengths) if flat_m is not None else None)
                    accs.append(
                        [
                            acc[s - lo : s - lo + n]
                            for acc, s, n, (lo, _) in zip(stored, block.starts, block.lengths, piece.ranges)
                        ]
                    )
                    if target is None:
                        targets.append(("assign", stored, None))
                    else:
                        targets.append(("max", target, [s - o for s, o in zip(block.starts, origin)]))
        _increment(steps)
        if plan is not None and len(plan) == len(group["params"]):
            self._dense[gi] = _DenseGroup(group["params"], momentum, plan)
        if not params:
            self._finalize_local(finalize)
            return
        maxima = self._kernel(group, params, grads, bufs, accs)
        assigned: list[Tensor] = []
        values: list[Tensor] = []
        for (mode, dest, starts), block_maxima in zip(targets, maxima):
            if mode == "assign":
                assigned += dest
                values += block_maxima
            else:
                for buf_d, start, new in zip(dest, starts, block_maxima):
                    region = buf_d[start : start + new.numel()]
                    torch.maximum(region, new, out=region)
        functional.store_maxima(assigned, values, self.ema_keeps_max)
        self._finalize_local(finalize)

    def _native_batch_step(self, dense: _DenseGroup, group: dict[str, Any], params, grads, bufs, accs) -> bool:
        """The dense fast path through the group's :class:`~sm3_dist.functional.NativeBatch`, if it fits."""
        if not self._kernel_choice(group, params)[1]:
            return False
        batch = dense.batch
        if batch is None or not batch.holds(params, bufs, accs):
            batch = dense.batch = functional.NativeBatch.build(params, bufs, accs, keep_max=self.ema_keeps_max)
            if batch is None:
                return False
        return batch.step(grads, **_update_rule(group))

    def _kernel(self, group: dict[str, Any], params, grads, bufs, accs, maxima_out=None) -> list[tuple[Tensor, ...]]:
        foreach, fused = self._kernel_choice(group, params)
        return functional.sm3(
            params,
            grads,
            bufs,
            accs,
            **_update_rule(group),
            foreach=foreach,
            fused=fused,
            maxima_out=maxima_out,
            keep_max=self.ema_keeps_max,
        )

    def _finalize_local(self, finalize: list[tuple[list[Tensor], list[Tensor]]]) -> None:
        functional.store_maxima(
            [a for stored, _ in finalize for a in stored], [v for _, new in finalize for v in new], self.ema_keeps_max
        )

    def _sparse_step(self, local, grad, buf, spec, state, group, name) -> None:
        if spec.group is not None or len(spec.layout.pieces) != 1 or not spec.layout.pieces[0].is_full:
            raise UnsupportedLayoutError(
                f"{name}: sparse gradients are supported for whole (unsharded) parameters only"
            )
        functional.sm3_sparse_rows_(
            local,
            grad,
            buf,
            [to_local(state[accumulator_key(d)]) for d in range(spec.layout.pieces[0].ndim)],
            **_update_rule(group),
        )

    @staticmethod
    def _kernel_choice(group: dict[str, Any], params: list[Tensor]) -> tuple[bool, bool]:
        foreach, fused = group["foreach"], group["fused"]
        if fused:
            return False, True
        if foreach is None and fused is None:
            if all(p.device.type == "cpu" for p in params) and functional.native_available():
                return False, True  # the one-pass native kernel: bitwise the eager kernel, and the fastest on CPU
            foreach = all(p.device.type == "cuda" for p in params)
        return bool(foreach), False

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        self._wait_for_maxima()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, keeping each tensor's saved dtype (fp32 accumulators, fp32/bf16 momentum).

        ``torch.optim.Optimizer`` would cast state to the parameter's dtype,
        which for bf16 parameters would round the fp32 accumulators.
        """
        self._wait_for_maxima()
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(
                f"the optimizer state holds {len(saved_ids)} parameters but this optimizer has {len(params)}: "
                "it comes from another model"
            )
        for pid in saved_ids:
            buf = state_dict["state"].get(pid, {}).get(MOMENTUM_KEY)
            if isinstance(buf, Tensor) and buf.dtype != self.momentum_dtype:
                raise ValueError(
                    f"the checkpoint's momentum is {buf.dtype} but this optimizer has momentum_dtype="
                    f"{self.momentum_dtype}"
                )
        self._checked.clear()
        self._dense.clear()
        super().load_state_dict(state_dict)
        for pid, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(pid, {}).items():
                if isinstance(value, Tensor):
                    # a copy, so training on does not write into the caller's dict; the step count stays on CPU
                    device = value.device if key == STEP_KEY else to_local(p).device
                    self.state[p][key] = value.to(device=device, copy=True)


class _DenseGroup:
    """A param group of whole, plain, dense parameters whose state was checked, as the fast path reuses it.

    It keeps each parameter's ``(param, state, accumulator keys)`` and the
    group's native batch; each step reads only the gradients and the state
    tensors, and :meth:`inputs` answers ``None`` (the general path then runs and
    checks everything) when something it cannot see through has changed.
    The step counts of the group live in one tensor, every state's ``"step"``
    a 0-d view of its element, so that counting a step is one addition.
    """

    def __init__(self, params: list[Tensor], momentum: float, entries: list[tuple[Tensor, dict, tuple[str, ...]]]):
        self.params = params
        self.momentum = momentum
        self.entries = entries
        self.batch: functional.NativeBatch | None = None
        self.counts = torch.tensor([float(state[STEP_KEY]) for _, state, _ in entries], dtype=torch.float32)
        self.count_views = list(self.counts.unbind())
        for (_, state, _), view in zip(entries, self.count_views):
            state[STEP_KEY] = view

    def inputs(self, group: dict[str, Any], momentum: float) -> tuple[list, list, list, list] | None:
        if group["params"] is not self.params or len(self.params) != len(self.entries) or momentum != self.momentum:
            return None
        params, grads, bufs, accs = [], [], [], []
        for (p, state, keys), count in zip(self.entries, self.count_views):
            g = p.grad
            if g is None:
                continue
            buf = state.get(MOMENTUM_KEY)
            if type(g) is not Tensor or g.is_sparse or g.shape != p.shape or (buf is None) != (momentum == 0.0):
                return None
            if state[STEP_KEY] is not count:
                return None
            params.append(p)
            grads.append(g)
            bufs.append(buf)
            accs.append([state[k] for k in keys])
        return params, grads, bufs, accs

    def count_step(self, stepped: list[Tensor]) -> None:
        if len(stepped) == len(self.entries):
            self.counts.add_(1.0)
        elif stepped:
            ids = {id(p) for p in stepped}
            _increment([c for (p, _, _), c in zip(self.entries, self.count_views) if id(p) in ids])


def _update_rule(group: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a param group that the update rule in :mod:`sm3_dist.functional` takes."""
    return {key: group[key] for key in ("lr", "momentum", "beta", "eps", "weight_decay", "maximize")}


def _dense_entry(p: Tensor, spec: ShardSpec, state: dict) -> tuple[Tensor, dict, tuple[str, ...]] | None:
    """``(param, state, accumulator keys)`` of a whole plain tensor stepped as one block; else ``None``."""
    if type(p) not in (Tensor, torch.nn.Parameter) or not _whole_block(spec, p.shape):
        return None
    return p, state, tuple(accumulator_key(d) for d in range(spec.layout.pieces[0].ndim))


def _whole_block(spec: ShardSpec, local_shape: torch.Size) -> bool:
    """Whether this rank holds the whole parameter, unreduced, as one block of its local shape."""
    pieces = spec.layout.pieces
    if spec.group is not None or len(pieces) != 1:
        return False
    piece = pieces[0]
    return piece.is_full and len(piece.blocks) == 1 and piece.blocks[0].lengths == tuple(local_shape)


def _increment(steps: list[Tensor]) -> None:
    """Count one step in every step tensor (one batched add for the usual plain CPU scalars)."""
    if all(type(t) is Tensor for t in steps):
        if steps:
            torch._foreach_add_(steps, 1.0)
    else:
        for t in steps:
            t += 1


def _check_hyperparameters(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, Tensor):
            if name != "lr":
                raise ValueError(f"Invalid {name}: a tensor ({name} must be a Python number; only lr may be a tensor)")
            # any 1-element shape ((), (1,), (1, 1), ...) is usable: every kernel reads it as a scalar
            if value.numel() != 1:
                raise ValueError(
                    f"Tensor {name} must be 1-element (a scalar of any shape), got shape {tuple(value.shape)}"
                )
            if not value.is_floating_point():
                raise ValueError(f"Tensor {name} must be a real floating-point tensor, got dtype {value.dtype}")
            if value.is_meta:
                raise ValueError(f"Tensor {name} is on the meta device and holds no value")
            value = value.item()
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"Invalid {name}: {value!r} (a finite number is required)")
        if name in ("lr", "eps", "weight_decay") and value < 0.0:
            raise ValueError(f"Invalid {name}: {value} (must be >= 0)")
        if name in ("momentum", "beta") and not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid {name}: {value} (must be in [0, 1))")


def _unsupported_dtype(p: Tensor) -> str | None:
    if p.is_complex():
        return "complex"
    if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"{p.dtype} (float32, bfloat16 and float16 are supported)"
    return None


def _describe(p: Tensor) -> str:
    return f"a parameter of shape {tuple(p.shape)} and dtype {p.dtype}"


def _rank_suffix() -> str:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return f" (rank {dist.get_rank()})"
    return ""


def _group_key(group: Any) -> Any:
    return id(group) if group is not None else None


def _first_device(param_groups: list[dict[str, Any]]) -> torch.device:
    for group in param_groups:
        for p in group["params"]:
            local = to_local(p)
            return local.device
    return torch.device("cpu")


def local_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of this rank's local optimizer state tensors (DTensors counted by their local shard)."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor) and key != STEP_KEY:
                local = to_local(value)
                total += local.numel() * local.element_size()
    return total
