r"""The SM3 update, as plain functions on local tensors.

SM3-II (Anil, Gupta, Koren, Singer, "Memory-Efficient Adaptive Optimization",
NeurIPS 2019, arXiv:1901.11150, Algorithm SM3-II) with the cover of
codimension-1 slices. For a tensor of shape :math:`(n_1, \dots, n_p)` there is
one accumulator vector :math:`\mu_d \in \mathbb{R}^{n_d}` per dimension; for a
rank-0 or rank-1 tensor this is one accumulator per element (diagonal AdaGrad).

.. math::
   \begin{aligned}
   &g \leftarrow g_{\text{raw}} / \text{grad\_scale};\quad
    g \leftarrow -g \text{ if maximize};\quad g \leftarrow g + \lambda\,w \\
   &\nu[i_1..i_p] \leftarrow \min_d \mu_d[i_d] + g[i_1..i_p]^2
       &&(\beta = 0) \\
   &\nu[i_1..i_p] \leftarrow \beta \min_d \mu_d[i_d] + (1-\beta)\, g[i_1..i_p]^2
       &&(\beta > 0) \\
   &\mu_d[k] \leftarrow \max_{i:\, i_d = k} \nu[i] \quad \text{for every } d \\
   &\hat\nu \leftarrow \nu / \text{nu\_divisor}
       \quad(\text{bias correction: } 1 - \beta^t;\ \hat\nu = \nu \text{ without}) \\
   &u \leftarrow g \cdot 1/\sqrt{\hat\nu + \epsilon}
       \quad (\epsilon = 0:\ u = 0 \text{ where } \nu = 0,\ \text{the 0/0 = 0 convention}) \\
   &m \leftarrow \text{momentum} \cdot m + (1 - \text{momentum})\, u;\quad u \leftarrow m
       &&(\text{momentum} > 0) \\
   &w \leftarrow w - \text{lr} \cdot u
   \end{aligned}

The maxima are *returned*, or accumulated where the caller says
(``maxima_out``): a caller holding a whole tensor assigns them to the
accumulators, a caller holding a shard combines them with the other shards' by
an exact ``all_reduce(MAX)`` first. Everything here runs on the tensors it is
given and never communicates, so a sharded step computes exactly what a
single-process step computes for the same elements.

Rounding is kept independent of where a shard boundary falls and of the
kernel: every elementwise step is a single correctly rounded operation (no
``addcmul``, ``lerp`` or ``alpha=`` forms, whose vectorised loops may fuse a
multiply-add that their scalar tail loops do not; ``sqrt`` then ``reciprocal``,
never the approximate ``rsqrt`` of GPUs), and reductions are only ``min``/``max``.

**One kernel interface.** Every kernel takes the same arguments: the blocks
(``params``, ``grads``, ``momentum_buffers``, ``accumulators``), the
:class:`~sm3_dist.rule.UpdateRule`, and the keywords of :data:`STEP_KEYWORDS`
(``lr``, ``nu_divisor``, ``maxima_out``, ``keep_max``, ``found_inf``,
``grad_scale``). There are three kinds: a per-tensor loop (the readable
reference), a ``foreach`` kernel that batches the elementwise work across
tensors, and a *fused* kernel per device type, looked up in the registry of
:mod:`sm3_dist.fused` (:func:`fused_kernel`; CPU: the one-pass C++ kernel of
:mod:`sm3_dist.native_plan`; CUDA: the Triton kernel of :mod:`sm3_dist._triton`
where Triton imports), as ``torch.optim`` keeps its fused kernels.
:func:`default_kernel` is the one place that picks a kernel when the caller does
not. Every fused kernel is bitwise equal to the per-tensor loop. The checks for
inf and NaN in gradients (:func:`first_nonfinite`, :func:`nonfinite_`) are in
:mod:`sm3_dist.nonfinite`; this module's namespace carries them, and the
registry's public names, as part of the functional API.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch
from torch import Tensor

from sm3_dist import fused
from sm3_dist.fused import FusedKernel, default_kernel, fused_kernel, register_fused_kernel, require_fused_kernel
from sm3_dist.nonfinite import first_nonfinite, nonfinite_
from sm3_dist.rule import UpdateRule

__all__ = [
    "STEP_KEYWORDS",
    "FusedKernel",
    "default_kernel",
    "finalize_",
    "first_nonfinite",
    "fused_kernel",
    "nonfinite_",
    "register_fused_kernel",
    "sm3",
    "sm3_sparse_rows_",
    "store_maxima",
]

STEP_KEYWORDS = ("lr", "nu_divisor", "maxima_out", "keep_max", "found_inf", "grad_scale")
"""The keywords every kernel takes besides the blocks and the rule (see :func:`sm3`)."""

HOST_READ_DEVICES = {"cpu"}
"""Device types whose flags a step reads on the host (free there). Elsewhere a ``found_inf`` stays on the
device and the kernels read it; tests empty this set to run that path on CPU."""


# ---------------------------------------------------------------------------------------------- the math


def _min_over_covers(accumulators: Sequence[Tensor], shape: torch.Size) -> Tensor:
    """``min_d mu_d[i_d]`` broadcast to ``shape``, as a new tensor."""
    ndim = len(shape)
    if ndim <= 1:
        return accumulators[0].clone().view(shape)
    views = [acc.view([-1 if d == k else 1 for k in range(ndim)]) for d, acc in enumerate(accumulators)]
    out = torch.minimum(views[0], views[1])
    for view in views[2:]:
        out = torch.minimum(out, view)
    return out.expand(shape).contiguous() if out.shape != shape else out


def _maxima(nu: Tensor) -> tuple[Tensor, ...]:
    """``max over i with i_d = k of nu[i]``, for every dimension ``d``."""
    ndim = nu.ndim
    if ndim <= 1:
        return (nu.reshape(-1),)
    return tuple(nu.amax(dim=tuple(k for k in range(ndim) if k != d)) for d in range(ndim))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 parameters compute (and keep their state) in float64; every other dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalar(value: float | Tensor | None) -> float | Tensor | None:
    """A one-element tensor of any shape as a 0-d tensor (a Python number as it is)."""
    if isinstance(value, Tensor) and value.ndim:
        if value.numel() != 1:
            raise ValueError(f"expected a one-element tensor, got shape {tuple(value.shape)}")
        return value.reshape(())
    return value


def _rsqrt_(t: Tensor) -> Tensor:
    """``1 / sqrt(t)`` in place, correctly rounded twice: CPU's ``rsqrt`` is exactly that (its ``sqrt`` of large
    tensors is not), GPUs' ``rsqrt`` is an approximation while their ``sqrt`` and division are exact."""
    return t.rsqrt_() if t.is_cpu else t.sqrt_().reciprocal_()


def _divisor(value: float | Tensor | None, like: Tensor) -> float | Tensor | None:
    """A divisor rounded once to ``like``'s dtype, as a number on CPU and as a tensor on ``like``'s device
    elsewhere (CUDA divides by a host scalar as a multiplication by its reciprocal, which is not the correctly
    rounded quotient)."""
    if value is None:
        return None
    if not isinstance(value, Tensor):
        if like.dtype != torch.float64:
            value = struct.unpack("f", struct.pack("f", value))[0]
        return value if like.is_cpu else torch.full((), value, dtype=like.dtype, device=like.device)
    # rounded to like's dtype here: a 0-d fp64 divisor of a 0-d fp32 tensor would otherwise promote the quotient
    return value.to(like.device, like.dtype, non_blocking=True)


def _gradient(g: Tensor, w: Tensor, rule: UpdateRule, grad_scale: Tensor | None) -> Tensor:
    """``g / grad_scale``, negated to maximize, plus ``weight_decay * w`` (``g`` and ``w`` in the compute dtype)."""
    if grad_scale is not None:
        g = g / _divisor(grad_scale, g)
    if rule.maximize:
        g = -g
    if rule.weight_decay != 0.0:
        g = g + w * rule.weight_decay
    return g


def _nu(accumulators: Sequence[Tensor], g: Tensor, rule: UpdateRule) -> Tensor:
    """``nu = min_d mu_d + g^2`` (running sum), or ``beta * min_d mu_d + (1 - beta) * g^2``, as a new tensor."""
    nu = _min_over_covers(accumulators, g.shape)
    if rule.beta > 0.0:
        nu.mul_(rule.beta)
        nu.add_((g * g).mul_(1.0 - rule.beta))
    else:
        nu.add_(g * g)
    return nu


def _preconditioned(g: Tensor, nu: Tensor, rule: UpdateRule, nu_divisor: float | Tensor | None) -> Tensor:
    """``u = g / sqrt(nu_hat + eps)`` with ``nu_hat = nu / nu_divisor``; with ``eps = 0``, 0 where ``nu_hat = 0``
    (the 0/0 = 0 convention). A new tensor; ``nu`` is left as it is."""
    nu_hat = nu if nu_divisor is None else nu / _divisor(nu_divisor, nu)
    if rule.eps > 0.0:
        return _rsqrt_(nu_hat + rule.eps).mul_(g)
    return torch.where(nu_hat > 0, g * _rsqrt_(nu_hat.clone()), torch.zeros((), dtype=g.dtype, device=g.device))


def _single_block(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    accumulators: Sequence[Tensor],
    rule: UpdateRule,
    lr: float | Tensor,
    nu_divisor: float | Tensor | None,
    grad_scale: Tensor | None,
) -> tuple[Tensor, ...]:
    """One block, eager. Updates ``param`` and ``momentum_buffer`` in place; returns the maxima."""
    cdt = _compute_dtype(param.dtype)
    w = param if param.dtype == cdt else param.to(cdt)
    g = _gradient(grad.to(cdt), w, rule, grad_scale)
    nu = _nu(accumulators, g, rule)
    maxima = _maxima(nu)
    update = _preconditioned(g, nu, rule, nu_divisor)
    if momentum_buffer is not None:
        m = momentum_buffer if momentum_buffer.dtype == cdt else momentum_buffer.to(cdt)
        m.mul_(rule.momentum).add_(update.mul_(1.0 - rule.momentum))
        if m is not momentum_buffer:
            momentum_buffer.copy_(m)
        update = m * lr
    else:
        update.mul_(lr)
    if w is param:
        param.sub_(update)
    else:
        param.copy_(w.sub_(update))
    return maxima


# ---------------------------------------------------------------------------------------------- kernels
# Each kernel: (params, grads, momentum_buffers, accumulators, *, rule, lr, nu_divisor, grad_scale) -> maxima per
# block. The common wrapper (:func:`sm3`) validates, gates on ``found_inf`` and stores into ``maxima_out``.


def _single_tensor_sm3(params, grads, momentum_buffers, accumulators, *, rule, lr, nu_divisor, grad_scale):
    return [
        _single_block(p, g, m, accs, rule, lr, nu_divisor, grad_scale)
        for p, g, m, accs in zip(params, grads, momentum_buffers, accumulators)
    ]


def _foreach_sm3(params, grads, momentum_buffers, accumulators, *, rule, lr, nu_divisor, grad_scale):
    """The elementwise work batched across blocks with ``torch._foreach_*``.

    Blocks whose parameter, gradient and momentum are not all of one compute
    dtype (fp32 or fp64) run through the per-block kernel; the rest are batched
    by dtype. Same arithmetic, op for op, as the per-tensor kernel.
    """
    results: list[tuple[Tensor, ...] | None] = [None] * len(params)
    batches: dict[torch.dtype, list[int]] = {}
    for i, (p, g, m) in enumerate(zip(params, grads, momentum_buffers)):
        if p.dtype in (torch.float32, torch.float64) and g.dtype == p.dtype and (m is None or m.dtype == p.dtype):
            batches.setdefault(p.dtype, []).append(i)
        else:
            results[i] = _single_block(p, g, m, accumulators[i], rule, lr, nu_divisor, grad_scale)
    for batch in batches.values():
        for chunk in _chunks(batch, params):
            _foreach_batch(
                chunk, params, grads, momentum_buffers, accumulators, results, rule, lr, nu_divisor, grad_scale
            )
    return results


_CPU_CHUNK_ELEMS = 1 << 18


def _chunks(batch: list[int], params: Sequence[Tensor]) -> list[list[int]]:
    """On CPU, consecutive runs of blocks of at most ~1 MiB of fp32 each (one block alone if larger), so that
    each ``_foreach`` op works on what the previous one left in cache; elsewhere one run of all of them."""
    if not batch or not params[batch[0]].is_cpu:
        return [batch] if batch else []
    chunks: list[list[int]] = []
    size = _CPU_CHUNK_ELEMS
    for i in batch:
        n = params[i].numel()
        if size + n > _CPU_CHUNK_ELEMS:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += n
    return chunks


def _foreach_batch(batch, params, grads, momentum_buffers, accumulators, results, rule, lr, nu_divisor, grad_scale):
    ps = [params[i] for i in batch]
    gs = [grads[i] for i in batch]
    if grad_scale is not None:
        gs = torch._foreach_div(gs, _divisor(grad_scale, gs[0]))
    if rule.maximize:
        gs = torch._foreach_neg(gs)
    if rule.weight_decay != 0.0:
        gs = torch._foreach_add(gs, torch._foreach_mul(ps, rule.weight_decay))
    nus = [_min_over_covers(accumulators[i], g.shape) for i, g in zip(batch, gs)]
    squares = torch._foreach_mul(gs, gs)
    if rule.beta > 0.0:
        torch._foreach_mul_(nus, rule.beta)
        torch._foreach_mul_(squares, 1.0 - rule.beta)
    torch._foreach_add_(nus, squares)
    for i, nu in zip(batch, nus):
        results[i] = _maxima(nu)
    nu_hats = nus if nu_divisor is None else torch._foreach_div(nus, _divisor(nu_divisor, nus[0]))
    if rule.eps > 0.0:
        updates = torch._foreach_add(nu_hats, rule.eps)
        if updates[0].is_cpu:
            torch._foreach_rsqrt_(updates)
        else:
            torch._foreach_sqrt_(updates)
            torch._foreach_reciprocal_(updates)
        torch._foreach_mul_(updates, gs)
    else:
        zero = torch.zeros((), dtype=ps[0].dtype, device=ps[0].device)
        updates = [torch.where(nu > 0, g * _rsqrt_(nu.clone()), zero) for nu, g in zip(nu_hats, gs)]
    with_momentum = [momentum_buffers[i] for i in batch if momentum_buffers[i] is not None]
    if with_momentum:
        torch._foreach_mul_(with_momentum, rule.momentum)
        torch._foreach_mul_(updates, 1.0 - rule.momentum)
        torch._foreach_add_(with_momentum, updates)
        updates = torch._foreach_mul(with_momentum, lr)
    else:
        torch._foreach_mul_(updates, lr)
    torch._foreach_sub_(ps, updates)


def _fused_sm3(params, grads, momentum_buffers, accumulators, *, rule, lr, nu_divisor, grad_scale, found_inf):
    """One-off step of the device's fused kernel: a plan built for these blocks, zeroed maxima buffers, one step.

    Blocks the kernel cannot take as they are (a non-contiguous tensor) go
    through contiguous working copies that are written back; blocks of a dtype
    the kernel lacks but the per-tensor kernel has (see :class:`FusedKernel`)
    run per tensor.
    """
    kernel = require_fused_kernel(params)
    results: list[tuple[Tensor, ...] | None] = [None] * len(params)
    taken, copies = [], []
    for i, (p, g, m) in enumerate(zip(params, grads, momentum_buffers)):
        if p.numel() == 0:
            results[i] = tuple(
                torch.zeros(n, dtype=a.dtype, device=a.device) for n, a in zip(p.shape or (1,), accumulators[i])
            )
        elif kernel.takes(p, g, m):
            taken.append(i)
        else:
            results[i] = _single_block(p, g, m, accumulators[i], rule, lr, nu_divisor, grad_scale)
    if not taken:
        return results
    ps, gs, ms, accs = [], [], [], []
    for i in taken:
        p, g, m = params[i], grads[i], momentum_buffers[i]
        pc, mc = _contiguous(p), None if m is None else _contiguous(m)
        if pc is not p or (m is not None and mc is not m):
            copies.append((p, pc, m, mc))
        ps.append(pc)
        gs.append(_contiguous(g))
        ms.append(mc)
        accs.append([_contiguous(a) for a in accumulators[i]])
    outs = [[torch.zeros(a.numel(), dtype=torch.float32, device=a.device) for a in block] for block in accs]
    plan = kernel.build(ps, ms, accs, outs)
    if plan is None:
        raise RuntimeError(f"the fused SM3 kernel for {kernel.device_type} refused blocks it reported it takes")
    plan.step(gs, rule, lr=lr, nu_divisor=nu_divisor, found_inf=found_inf, grad_scale=grad_scale)
    for p, pc, m, mc in copies:
        if pc is not p:
            p.copy_(pc)
        if m is not None and mc is not m:
            m.copy_(mc)
    for i, block in zip(taken, outs):
        results[i] = tuple(block)
    return results


def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


# ---------------------------------------------------------------------------------------------- the common entry


def sm3(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    accumulators: Sequence[Sequence[Tensor]],
    *,
    rule: UpdateRule,
    lr: float | Tensor,
    nu_divisor: float | Tensor | None = None,
    maxima_out: Sequence[Sequence[Tensor]] | None = None,
    keep_max: bool = False,
    found_inf: Tensor | None = None,
    grad_scale: Tensor | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> list[tuple[Tensor, ...]] | None:
    """One SM3 step on a list of dense blocks; returns each block's maxima per dimension.

    ``params[i]``, ``grads[i]`` and ``momentum_buffers[i]`` (``None`` when
    momentum is 0) are views of one dense block, all of the same shape (any
    strides); ``accumulators[i][d]`` is the 1-D slice of ``mu_d`` that the
    block's indices along ``d`` cover (fp32, fp64 for fp64 parameters; read
    only). The parameter and momentum are updated in place (computed in fp32,
    or fp64 for fp64 parameters, written back in their own dtypes); the returned
    ``maxima[i][d]`` are the new values of that slice of ``mu_d`` as far as this
    block can see them.

    ``lr`` is a number or a one-element tensor (any shape), ``nu_divisor`` the
    bias-correction divisor (:meth:`UpdateRule.nu_divisor`; ``None``: none),
    ``grad_scale`` a one-element tensor the raw gradients are divided by (a
    ``GradScaler``'s scale), ``found_inf`` a one-element tensor: where it is
    nonzero the parameters and momentum stay bitwise unchanged and the maxima
    are the accumulators as they were (nothing is accumulated under
    ``keep_max``). Off CPU it is read on the device, without a host
    synchronization.

    With ``maxima_out`` the maxima are written into ``maxima_out[i][d]`` instead
    and ``None`` is returned: assigned, or under ``keep_max`` the elementwise max
    of the old values and the new maxima (so zeroed outputs shared by several
    blocks collect their maxima). ``maxima_out[i]`` may be ``accumulators[i]``
    itself: every accumulator is read before any maximum is written.

    ``foreach``/``fused`` choose the kernel as in :func:`default_kernel`.
    """
    for i, (p, g, accs) in enumerate(zip(params, grads, accumulators)):
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has shape {tuple(p.shape)}")
        if len(accs) != max(g.ndim, 1) or any(a.numel() != n for a, n in zip(accs, g.shape or (1,))):
            raise ValueError(
                f"accumulators[{i}] have lengths {[a.numel() for a in accs]}, expected {list(g.shape or (1,))}"
            )
    if maxima_out is not None and len(maxima_out) != len(params):
        raise ValueError(f"maxima_out has {len(maxima_out)} entries for {len(params)} blocks")
    kind = default_kernel(params, foreach=foreach, fused=fused)
    lr, nu_divisor, grad_scale, found_inf = _scalar(lr), _scalar(nu_divisor), _scalar(grad_scale), _scalar(found_inf)
    gate = None
    if found_inf is not None:
        if found_inf.device.type in HOST_READ_DEVICES:  # reading it costs nothing here
            if bool(found_inf):
                if maxima_out is None:
                    return [tuple(a.clone() for a in accs) for accs in accumulators]
                if not keep_max:
                    store_maxima(
                        [o for outs in maxima_out for o in outs], [a.clone() for accs in accumulators for a in accs]
                    )
                return None
            found_inf = None
        elif kind != "fused":
            gate, found_inf = found_inf, None
    args = dict(rule=rule, lr=lr, nu_divisor=nu_divisor, grad_scale=grad_scale)
    if gate is not None:
        maxima = _gated(kind, params, grads, momentum_buffers, accumulators, gate, args)
    elif kind == "fused":
        maxima = _fused_sm3(params, grads, momentum_buffers, accumulators, found_inf=found_inf, **args)
    elif kind == "foreach":
        maxima = _foreach_sm3(params, grads, momentum_buffers, accumulators, **args)
    else:
        maxima = _single_tensor_sm3(params, grads, momentum_buffers, accumulators, **args)
    flag = found_inf if found_inf is not None else gate
    if flag is not None:  # skipped on the device: the maxima are the accumulators as they were, nothing collected
        skip = flag != 0
        if maxima_out is None:
            return [
                tuple(torch.where(skip, a, new) for a, new in zip(accs, block))
                for accs, block in zip(accumulators, maxima)
            ]
        for outs, accs, block in zip(maxima_out, accumulators, maxima):
            for o, a, new in zip(outs, accs, block):
                o.copy_(torch.where(skip, o, torch.maximum(o, new)) if keep_max else torch.where(skip, a, new))
        return None
    if maxima_out is None:
        return maxima
    outs = [o for block in maxima_out for o in block]
    store_maxima(outs, [m for block in maxima for m in block], keep_max)
    return None


def _gated(kind, params, grads, momentum_buffers, accumulators, found_inf, args):
    """A non-fused kernel on an accelerator with a device-side ``found_inf``: it runs on working copies, which
    replace the originals only where the flag is clear (no host synchronization, one extra pass)."""
    work_p = [p.clone() for p in params]
    work_m = [None if m is None else m.clone() for m in momentum_buffers]
    kernel = _foreach_sm3 if kind == "foreach" else _single_tensor_sm3
    maxima = kernel(work_p, grads, work_m, accumulators, **args)
    skip = found_inf != 0
    for p, w, m, wm in zip(params, work_p, momentum_buffers, work_m):
        p.copy_(torch.where(skip, p, w))
        if m is not None:
            m.copy_(torch.where(skip, m, wm))
    return maxima


def store_maxima(accumulators: list[Tensor], maxima: list[Tensor], keep_max: bool = False) -> None:
    """``accumulators[k] <- maxima[k]`` (their elementwise max under ``keep_max``).

    Destinations may overlap (several blocks of one shard collecting their
    maxima by max): batched on CPU, whose ``_foreach`` ops run tensor by
    tensor, one op per destination elsewhere.
    """
    if not accumulators:
        return
    plain = all(type(t) is Tensor for t in accumulators) and len({t.device for t in accumulators}) == 1
    if plain and (accumulators[0].is_cpu or not keep_max):
        if keep_max:
            torch._foreach_maximum_(accumulators, maxima)
        else:
            torch._foreach_copy_(accumulators, maxima)
        return
    for acc, value in zip(accumulators, maxima):
        if keep_max:
            torch.maximum(acc, value, out=acc)
        else:
            acc.copy_(value)


def finalize_(
    accumulators: Sequence[Tensor],
    maxima: Sequence[Tensor],
    *,
    keep_max: bool,
    found_inf: Tensor | None = None,
    zero_maxima: bool = True,
) -> None:
    """``accumulators <- maxima`` (their max under ``keep_max``) unless ``found_inf`` is set; then the maxima are
    zeroed for the next step. The device's fused kernel does it in one launch where it has a ``finalize``."""
    if not accumulators:
        return
    kernel = fused.fused_kernel(accumulators[0].device.type)
    if (
        kernel is not None
        and kernel.finalize is not None
        and all(t.dtype == torch.float32 and t.is_contiguous() for t in (*accumulators, *maxima))
    ):  # the fused finalize takes contiguous fp32 state; float64 state (per-tensor and foreach kernels) does not
        kernel.finalize(accumulators, maxima, keep_max=keep_max, found_inf=found_inf, zero_maxima=zero_maxima)
        return
    if found_inf is not None and found_inf.device.type in HOST_READ_DEVICES:
        if not bool(found_inf):
            store_maxima(list(accumulators), list(maxima), keep_max)
    elif found_inf is not None:
        skip = _scalar(found_inf) != 0
        for acc, new in zip(accumulators, maxima):
            acc.copy_(torch.where(skip, acc, torch.maximum(acc, new) if keep_max else new))
    else:
        store_maxima(list(accumulators), list(maxima), keep_max)
    if zero_maxima:
        torch._foreach_zero_(list(maxima))


def sm3_sparse_rows_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    accumulators: Sequence[Tensor],
    *,
    rule: UpdateRule,
    lr: float | Tensor,
    nu_divisor: float | Tensor | None = None,
    grad_scale: Tensor | None = None,
) -> None:
    """SM3 for a sparse COO gradient (``nn.Embedding(sparse=True)``): only touched rows change.

    ``nu`` is formed for the touched rows only; ``mu_0`` is assigned at those
    rows and every other ``mu_d`` (d >= 1) keeps the larger of its value and the
    touched rows' maxima (with beta = 0 that is what the dense rule gives for
    all-zero rows, since SM3-II's running-sum accumulators never decrease).
    Momentum decays on touched rows only. Updates ``param``, ``momentum_buffer``
    and ``accumulators`` in place.
    """
    lr, nu_divisor, grad_scale = _scalar(lr), _scalar(nu_divisor), _scalar(grad_scale)
    cdt = _compute_dtype(param.dtype)
    grad = grad.coalesce()
    rows = grad.indices()[0]
    w_rows = param[rows].to(cdt)
    values = _gradient(grad.values().to(cdt), w_rows, rule, grad_scale)
    nu = _nu([accumulators[0].index_select(0, rows), *accumulators[1:]], values, rule)
    maxima = _maxima(nu)
    accumulators[0].index_copy_(0, rows, maxima[0])
    for acc, new in zip(accumulators[1:], maxima[1:]):
        torch.maximum(acc, new, out=acc)
    update = _preconditioned(values, nu, rule, nu_divisor)
    if momentum_buffer is not None:
        m_rows = momentum_buffer[rows].to(cdt)
        m_rows.mul_(rule.momentum).add_(update.mul_(1.0 - rule.momentum))
        momentum_buffer.index_copy_(0, rows, m_rows.to(momentum_buffer.dtype))
        update = m_rows * lr
    else:
        update.mul_(lr)
    param.index_copy_(0, rows, w_rows.sub_(update).to(param.dtype))
