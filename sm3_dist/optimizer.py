r"""``sm3_dist.SM3``: the SM3-II optimizer, single-process or with sharded state."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sm3_dist.block_plan import (
    BlockRef,
    Finalizer,
    GroupPlan,
    PieceRef,
    block_refs,
    block_views,
    fused_plan_for,
    maxima_targets,
    plan_signature,
    stack_step_counts,
)
from sm3_dist.comm import MaxReducer
from sm3_dist.kernels import dispatch
from sm3_dist.kernels.math import sm3_sparse_rows_
from sm3_dist.kernels.registry import default_kernel
from sm3_dist.kernels.rule import UpdateRule, check_hyperparameter_values
from sm3_dist.nonfinite_steps import NonfiniteSteps
from sm3_dist.placement import (
    LayoutGuard,
    ShardSpec,
    SpecResolver,
    UnsupportedLayoutError,
    default_spec,
    first_device,
    group_key,
    to_local,
)
from sm3_dist.state import (
    MOMENTUM_DTYPES,
    MOMENTUM_KEY,
    SKIPPED_KEY,
    STEP_KEY,
    accumulator_key,
    check_state,
    init_state,
    unsupported_dtype,
)

__all__ = ["NONFINITE_POLICIES", "SM3"]

NONFINITE_POLICIES = ("skip", "raise", "ignore")


class SM3(NonfiniteSteps, Optimizer):
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
       &u = g / \sqrt{\hat\nu + \epsilon} \quad (\epsilon = 0:\ u = 0 \text{ where } \nu = 0;\
          \hat\nu = \nu, \text{ or } \nu / (1 - \beta^t) \text{ with bias correction}) \\
       &m = \text{momentum}\cdot m + (1-\text{momentum})\, u;\quad w = w - \text{lr}\cdot m
       \end{aligned}

    The math itself is in :mod:`sm3_dist.kernels.math`.

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
        fused: the device's fused kernel, one pass over memory for all blocks of a group (CPU: the one-pass
            C++ kernel; CUDA: the Triton kernel); an error on a device without one, and for float64
            parameters (fp16 parameters run per tensor inside the CPU fused step). With neither set: the
            device's fused kernel where it is available, else foreach on accelerators and the per-tensor loop
            on CPU, as ``torch.optim`` chooses. Every kernel computes bitwise the same result
            (:func:`sm3_dist.kernels.registry.default_kernel` decides).
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
        bias_correction: with ``beta > 0``, divide ``nu`` by ``1 - beta ** step`` for the update only, as
            Adam corrects its zero-initialised second moment (the accumulators keep the plain average, so the
            state is unchanged); ``step`` is the parameter's step count. Default False.
        update_clip: 0 (default, the paper's rule) or a bound ``c > 0``: each coordinate of the preconditioned
            update ``g / sqrt(nu_hat + eps)`` is clipped to ``[-c, c]`` before momentum. SM3's ``nu`` bounds
            each coordinate's own average from above, so ``|u| <= 1`` for all but a few coordinates (about
            1.5% per step on the tiny GPT-2) and the clip acts on those whose gradient jumps above its recent
            average (up to ``sqrt(1 / (1 - beta))`` with the moving average): a gradient spike, an
            intermittent gradient. ``c = 1`` is part of the recommended setting
            (``sm3_dist.launch.defaults.SM3_RECOMMENDED``). Per element, so sharded steps stay bitwise equal
            to single-process ones.
        capturable: keep step counts on the parameters' device even for CPU parameters and never read a
            device value on the host inside ``step`` (as ``torch.optim.Adam(capturable=True)``), so that a
            step on an accelerator can be captured in a CUDA graph (give ``lr`` as a device tensor then).
            On accelerators step counts live on the device in any case.

    Differences from the original TensorFlow implementation: ``eps`` defaults to 1e-30 (set 0 for
    the original), and ``beta``/``weight_decay``/``maximize`` are additions the ports also offer.
    Parameters may be fp32, bf16 or fp16 with fp32 state (momentum optionally bf16), or fp64 with fp64
    state (unsharded; per-tensor and foreach kernels only). Parameters and gradients may be
    non-contiguous (the fused kernels work on contiguous copies of those, written back).

    On an accelerator, ``nonfinite="skip"`` and ``"ignore"`` never synchronize with the host inside
    ``step``: the non-finite check sets a device flag (MAX-reduced across ranks without waiting on the
    host) that the kernels read, leaving everything bitwise unchanged where it is set; ``skipped_steps``
    reads the device counter when asked.
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
        bias_correction: bool = False,
        capturable: bool = False,
        update_clip: float = 0.0,
    ) -> None:
        check_hyperparameter_values(
            lr=lr, momentum=momentum, beta=beta, eps=eps, weight_decay=weight_decay, update_clip=update_clip
        )
        if foreach and fused:
            raise ValueError("foreach and fused cannot both be True: choose one kernel")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if momentum_dtype not in MOMENTUM_DTYPES:
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
            bias_correction=bool(bias_correction),
            capturable=bool(capturable),
            update_clip=float(update_clip),
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
        self._dense: dict[int | str, Any] = {}
        """Each param group's block plan (by index), rebuilt when what it was built for changes; and under
        ``"nonfinite"`` the device's prepared non-finite check."""
        self._reducers: dict[Any, MaxReducer] = {}
        # (finalizer of reduced accumulators, that step's device found_inf) awaiting the reduced maxima
        self._pending: list[tuple[Finalizer, Tensor | None]] = []
        # torch.amp.GradScaler hands over grad_scale and found_inf instead of unscaling the gradients itself
        self._step_supports_amp_scaling = True
        for group in self.param_groups:
            for p in group["params"]:
                reason = unsupported_dtype(p)
                if reason is not None:
                    raise TypeError(
                        f"SM3 does not support {reason} parameters (a parameter of shape {tuple(p.shape)} and dtype {p.dtype})"
                    )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in ("lr", "momentum", "beta", "eps", "weight_decay", "update_clip"):
            if key in param_group:
                check_hyperparameter_values(**{key: param_group[key]})
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
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        differentiable = "differentiable" in defaults
        super().__setstate__(state)
        if not differentiable:  # the base class adds torch's own flag, which SM3 does not take
            self.defaults.pop("differentiable", None)
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
        # a step count saved as a Python number (as older optimizers did) becomes the float32 tensor SM3 counts in
        step_device = getattr(self, "_step_device", lambda local: torch.device("cpu"))
        for p, p_state in self.state.items():
            if isinstance(p, Tensor) and STEP_KEY in p_state and not isinstance(p_state[STEP_KEY], Tensor):
                p_state[STEP_KEY] = torch.tensor(
                    float(p_state[STEP_KEY]), dtype=torch.float32, device=step_device(to_local(p))
                )

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
                key = group_key(spec.group)
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
                groups[group_key(spec.group)] = spec.group
        device = first_device(self.param_groups)
        self._reducers = {key: MaxReducer(groups[key], declared[key], device) for key in groups}

    def _init_state(self, p: Tensor, spec: ShardSpec, momentum: float) -> None:
        local = to_local(p)
        init_state(
            self.state[p],
            local,
            spec,
            momentum,
            momentum_dtype=self.momentum_dtype,
            step_device=self._step_device(local),
        )
        self._checked[p] = momentum

    def _step_device(self, local: Tensor) -> torch.device:
        """Where a parameter's step count lives: on CPU for CPU parameters; on the parameter's device otherwise
        (and always under ``capturable``), so that a skipped step is not counted without a host synchronization."""
        host = local.device.type in dispatch.HOST_READ_DEVICES and not self._capturable
        return torch.device("cpu") if host else local.device

    def _check_state(self, p: Tensor, spec: ShardSpec, momentum: float, name: str) -> None:
        local = to_local(p)
        check_state(
            self.state[p],
            local,
            spec,
            momentum,
            name,
            momentum_dtype=self.momentum_dtype,
            step_device=self._step_device(local),
        )
        self._checked[p] = momentum

    # ------------------------------------------------------------------ step

    @property
    def _capturable(self) -> bool:
        return any(group.get("capturable", False) for group in self.param_groups)

    def _wait_for_maxima(self) -> None:
        """Finish the previous step's all-reduce and store the reduced accumulators (unless that step was skipped
        on the device: its ``found_inf`` is read there)."""
        for reducer in self._reducers.values():
            reducer.wait()
        if self._pending:
            for finalize, found_inf in self._pending:
                finalize(keep_max=self.ema_keeps_max, found_inf=found_inf, zero_maxima=False)
            self._pending = []

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step of every param group.

        Takes part in ``torch.amp.GradScaler``'s protocol for fused optimizers (``_step_supports_amp_scaling``):
        with ``grad_scale`` and ``found_inf`` set on the optimizer, every kernel divides the raw gradients by
        ``grad_scale`` itself, and a step with ``found_inf`` set changes nothing (and counts as skipped).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._wait_for_maxima()
        if not self._specs or any(p not in self._specs for g in self.param_groups for p in g["params"]):
            self._assign_plans()
        skip, found_inf = self._nonfinite_flag(getattr(self, "found_inf", None))
        if skip:
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        for reducer in self._reducers.values():
            reducer.zero_()
        one_step = None if found_inf is None else 1.0 - found_inf
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group, found_inf, one_step, grad_scale)
        for reducer in self._reducers.values():
            reducer.launch()
        return loss

    def _name(self, gi: int, pi: int, p: Tensor) -> str:
        """How errors name a parameter: its position, and the global shape of what it holds."""
        pieces = self._specs[p].layout.pieces if p in self._specs else ()
        shape = pieces[0].shape if len(pieces) == 1 else tuple(p.shape)
        return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(shape)})"

    def _signature(self, group: dict[str, Any]) -> tuple[tuple, list[Tensor | None]]:
        """What the group's plan depends on, and its local gradients (:func:`sm3_dist.block_plan.plan_signature`)."""
        return plan_signature(group, self.state)

    def _init_group(self, gi: int, group: dict[str, Any]) -> GroupPlan:
        """Initialize and check the group's state (torch's ``_init_group``) and build its block plan."""
        momentum = group["momentum"]
        stepped, sparse, steps, owners = [], [], [], []
        pieces: list[PieceRef] = []
        blocks: list[BlockRef] = []
        tensors, stored, reducers = [], [], []
        for pi, p in enumerate(group["params"]):
            spec = self._specs[p]
            name = self._name(gi, pi, p)
            if p.grad is None:  # state is made lazily, as torch.optim does: none for a parameter never stepped
                if self.state.get(p):
                    self._check_state(p, spec, momentum, name)
                continue
            state = self.state[p]
            if not state:
                self._init_state(p, spec, momentum)
            else:
                self._check_state(p, spec, momentum, name)
            grad = to_local(p.grad)
            local = to_local(p)
            if grad.shape != local.shape:
                raise ValueError(f"{name}: gradient of shape {tuple(grad.shape)} does not match the parameter")
            if grad.is_complex():
                raise TypeError(f"{name}: complex gradients are not supported")
            steps.append(state[STEP_KEY])
            owners.append(pi)
            if grad.is_sparse:
                if spec.group is not None or len(spec.layout.pieces) != 1 or not spec.layout.pieces[0].is_full:
                    raise UnsupportedLayoutError(
                        f"{name}: sparse gradients are supported for whole (unsharded) parameters only"
                    )
                sparse.append(pi)
                continue
            reduced = spec.group is not None
            if reduced and local.dtype == torch.float64:
                raise UnsupportedLayoutError(
                    f"{name}: float64 parameters are supported unsharded only (the reduction buffer is fp32)"
                )
            k = len(stepped)
            piece_refs, block_list = block_refs(k, spec.layout, local.shape, reduced)
            if not local.is_contiguous() and not all(b.whole for b in block_list):
                raise UnsupportedLayoutError(
                    f"{name}: a shard cut into blocks needs a contiguous local tensor (the blocks are views of it)"
                )
            stepped.append(pi)
            pieces += piece_refs
            blocks += block_list
            several = len(spec.layout.pieces) > 1
            tensors.append((local, to_local(state.get(MOMENTUM_KEY))))
            reducers.append(self._reducers[group_key(spec.group)] if reduced else None)
            stored.append(
                [
                    [to_local(state[accumulator_key(d, j if several else None)]) for d in range(piece.ndim)]
                    for j, piece in enumerate(spec.layout.pieces)
                ]
            )
        device = tensors[0][0].device if tensors else first_device(self.param_groups)
        targets, local_finalizer, reduced_finalizer = maxima_targets(pieces, stored, reducers, device)
        params, bufs, accs, outs = block_views(blocks, tensors, stored, targets)
        kernel = default_kernel(params, foreach=group["foreach"], fused=group["fused"])
        fused_plan, fused_blocks, other_blocks = None, (), tuple(range(len(blocks)))
        if kernel == "fused" and params:
            grads = [to_local(group["params"][pi].grad) for pi in stepped]
            block_grads = [grads[b.param] if b.whole else grads[b.param].reshape(-1) for b in blocks]
            fused_plan, fused_blocks, other_blocks = fused_plan_for(params, bufs, accs, outs, block_grads)
        counts, steps = stack_step_counts(steps)
        if counts is not None:  # every state's "step" a 0-d view of its element of the one tensor of counts
            for pi, view in zip(owners, steps):
                self.state[group["params"][pi]][STEP_KEY] = view
        # read once here (a host synchronization only when the plan is built): the counts of the parameters
        # stepped together stay equal until the set of stepped parameters changes, which rebuilds the plan
        uniform = len(steps) <= 1 or len({float(s) for s in steps}) == 1
        signature, _ = self._signature(group)
        return GroupPlan(
            signature=signature,
            kernel=kernel,
            stepped=tuple(stepped),
            sparse=tuple(sparse),
            pieces=tuple(pieces),
            blocks=tuple(blocks),
            params=tuple(params),
            momentum_buffers=tuple(bufs),
            accumulators=tuple(accs),
            maxima_out=tuple(outs),
            steps=tuple(steps),
            step_owners=tuple(owners),
            counts=counts,
            uniform_steps=uniform,
            local=local_finalizer,
            reduced=reduced_finalizer,
            fused=fused_plan,
            fused_blocks=fused_blocks,
            other_blocks=other_blocks,
            device=device,
        )

    def _step_group(
        self,
        gi: int,
        group: dict[str, Any],
        found_inf: Tensor | None,
        one_step: Tensor | None,
        grad_scale: Tensor | None,
    ) -> None:
        signature, grads = self._signature(group)
        plan = self._dense.get(gi)
        if plan is None or plan.signature != signature:
            plan = self._dense[gi] = self._init_group(gi, group)
            signature, grads = self._signature(group)
        if not plan.steps:
            return
        rule = UpdateRule.of_group(group)
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.device != plan.device and lr.is_cpu:
            lr = float(lr)  # a host scalar: read without a device synchronization
        if grad_scale is not None and grad_scale.device != plan.device:
            grad_scale = grad_scale.to(plan.device, non_blocking=True)
        plan.count_step(one_step)
        divisors = plan.nu_divisors(rule)
        block_grads = plan.block_grads([grads[pi] for pi in plan.stepped])
        for divisor, selected in divisors:
            hyper = dict(lr=lr, nu_divisor=divisor, grad_scale=grad_scale)
            if plan.fused is not None and selected is None:
                plan.fused.step([block_grads[i] for i in plan.fused_blocks], rule, found_inf=found_inf, **hyper)
                rest = plan.other_blocks
            else:
                rest = range(len(plan.blocks)) if selected is None else selected
            if rest:
                dispatch.sm3(
                    [plan.params[i] for i in rest],
                    [block_grads[i] for i in rest],
                    [plan.momentum_buffers[i] for i in rest],
                    [plan.accumulators[i] for i in rest],
                    rule=rule,
                    maxima_out=[plan.maxima_out[i] for i in rest],
                    keep_max=True,
                    found_inf=found_inf,
                    foreach=plan.kernel == "foreach",
                    fused=plan.kernel == "fused",
                    **hyper,
                )
        plan.local(keep_max=self.ema_keeps_max, found_inf=found_inf, zero_maxima=True)
        if plan.reduced.accumulators:
            self._pending.append((plan.reduced, found_inf))
        for pi in plan.sparse:
            self._sparse_step(gi, pi, group, rule, lr, grad_scale, found_inf)

    def _sparse_step(self, gi, pi, group, rule, lr, grad_scale, found_inf) -> None:
        p = group["params"][pi]
        if found_inf is not None and bool(found_inf):  # the sparse kernel is eager: it reads the flag on the host
            return
        state = self.state[p]
        spec = self._specs[p]
        step = state[STEP_KEY]
        sm3_sparse_rows_(
            to_local(p),
            to_local(p.grad),
            to_local(state.get(MOMENTUM_KEY)),
            [to_local(state[accumulator_key(d)]) for d in range(spec.layout.pieces[0].ndim)],
            rule=rule,
            lr=lr,
            nu_divisor=rule.nu_divisor(int(step)),
            grad_scale=grad_scale,
        )

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        self._wait_for_maxima()
        self._fold_skipped()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, keeping each tensor's saved dtype (fp32 accumulators, fp32/bf16 momentum).

        Everything is checked first (:func:`sm3_dist.state.check_sm3_state_dict`: param groups and
        SM3's hyperparameter names, every state key, every tensor's shape against the parameter's layout,
        the momentum dtype); state of another model or optimizer raises ``ValueError`` naming the parameter
        and leaves the optimizer as it was. ``torch.optim.Optimizer`` would cast state to the parameter's
        dtype, which for bf16 parameters would round the fp32 accumulators.
        """
        from sm3_dist.state import check_sm3_state_dict

        self._wait_for_maxima()
        check_sm3_state_dict(self, state_dict, **getattr(self, "_load_check_options", {}))
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        self._checked.clear()
        self._dense.clear()
        super().load_state_dict(state_dict)
        for pid, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(pid, {}).items():
                if isinstance(value, Tensor):
                    # a copy, so training on does not write into the caller's dict; the step count stays on CPU
                    device = value.device if key == STEP_KEY else to_local(p).device
                    self.state[p][key] = value.to(device=device, copy=True)
