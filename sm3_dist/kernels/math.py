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
   &u \leftarrow \min(\max(u, -c), c) \quad (\text{update\_clip } c > 0)
       &&(\text{per coordinate}) \\
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

These are the reference kernels every other kernel is held to, bitwise: the per-tensor loop
(:func:`single_tensor_sm3`, one :func:`single_block` per block), the ``foreach`` kernel
(:func:`foreach_sm3`, the same ops batched across blocks with ``torch._foreach_*``), the sparse-row
step (:func:`sm3_sparse_rows_`), and the eager non-finite scan (:func:`first_nonfinite_eager`,
:func:`nonfinite_eager_`). This module imports nothing of the package but :mod:`sm3_dist.kernels.rule`:
the fused kernels (:mod:`sm3_dist.kernels.cpu`, :mod:`sm3_dist.kernels.cuda`) import it, and
:mod:`sm3_dist.kernels.dispatch` routes a step to one of them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch
from torch import Tensor

from sm3_dist.kernels.rule import UpdateRule

__all__ = [
    "STEP_KEYWORDS",
    "as_scalar",
    "compute_dtype",
    "cover_maxima",
    "divisor",
    "first_nonfinite_eager",
    "foreach_sm3",
    "min_over_covers",
    "nonfinite_eager_",
    "same_bits",
    "single_block",
    "single_tensor_sm3",
    "sm3_sparse_rows_",
    "store_maxima",
]

STEP_KEYWORDS = ("lr", "nu_divisor", "maxima_out", "keep_max", "found_inf", "grad_scale")
"""The keywords every kernel takes besides the blocks and the rule (see :func:`sm3_dist.kernels.dispatch.sm3`)."""


# ---------------------------------------------------------------------------------------------- the math


def min_over_covers(accumulators: Sequence[Tensor], shape: torch.Size) -> Tensor:
    """``min_d mu_d[i_d]`` broadcast to ``shape``, as a new tensor."""
    ndim = len(shape)
    if ndim <= 1:
        return accumulators[0].clone().view(shape)
    views = [acc.view([-1 if d == k else 1 for k in range(ndim)]) for d, acc in enumerate(accumulators)]
    out = torch.minimum(views[0], views[1])
    for view in views[2:]:
        out = torch.minimum(out, view)
    return out.expand(shape).contiguous() if out.shape != shape else out


def cover_maxima(nu: Tensor) -> tuple[Tensor, ...]:
    """``max over i with i_d = k of nu[i]``, for every dimension ``d``."""
    ndim = nu.ndim
    if ndim <= 1:
        return (nu.reshape(-1),)
    return tuple(nu.amax(dim=tuple(k for k in range(ndim) if k != d)) for d in range(ndim))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 parameters compute (and keep their state) in float64; every other dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_scalar(value: float | Tensor | None) -> float | Tensor | None:
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


def divisor(value: float | Tensor | None, like: Tensor) -> float | Tensor | None:
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
        g = g / divisor(grad_scale, g)
    if rule.maximize:
        g = -g
    if rule.weight_decay != 0.0:
        g = g + w * rule.weight_decay
    return g


def _nu(accumulators: Sequence[Tensor], g: Tensor, rule: UpdateRule) -> Tensor:
    """``nu = min_d mu_d + g^2`` (running sum), or ``beta * min_d mu_d + (1 - beta) * g^2``, as a new tensor."""
    nu = min_over_covers(accumulators, g.shape)
    if rule.beta > 0.0:
        nu.mul_(rule.beta)
        nu.add_((g * g).mul_(1.0 - rule.beta))
    else:
        nu.add_(g * g)
    return nu


def _preconditioned(g: Tensor, nu: Tensor, rule: UpdateRule, nu_divisor: float | Tensor | None) -> Tensor:
    """``u = g / sqrt(nu_hat + eps)`` with ``nu_hat = nu / nu_divisor``; with ``eps = 0``, 0 where ``nu_hat = 0``
    (the 0/0 = 0 convention); clipped to ``[-update_clip, update_clip]`` where that is set. A new tensor;
    ``nu`` is left as it is."""
    nu_hat = nu if nu_divisor is None else nu / divisor(nu_divisor, nu)
    if rule.eps > 0.0:
        update = _rsqrt_(nu_hat + rule.eps).mul_(g)
    else:
        update = torch.where(nu_hat > 0, g * _rsqrt_(nu_hat.clone()), torch.zeros((), dtype=g.dtype, device=g.device))
    if rule.update_clip > 0.0:
        # max then min, NaN propagating (as torch.clamp): the fused kernels compute the same two operations
        update.clamp_min_(-rule.update_clip).clamp_max_(rule.update_clip)
    return update


def single_block(
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
    cdt = compute_dtype(param.dtype)
    w = param if param.dtype == cdt else param.to(cdt)
    g = _gradient(grad.to(cdt), w, rule, grad_scale)
    nu = _nu(accumulators, g, rule)
    maxima = cover_maxima(nu)
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


def single_tensor_sm3(params, grads, momentum_buffers, accumulators, *, rule, lr, nu_divisor, grad_scale):
    return [
        single_block(p, g, m, accs, rule, lr, nu_divisor, grad_scale)
        for p, g, m, accs in zip(params, grads, momentum_buffers, accumulators)
    ]


def foreach_sm3(params, grads, momentum_buffers, accumulators, *, rule, lr, nu_divisor, grad_scale):
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
            results[i] = single_block(p, g, m, accumulators[i], rule, lr, nu_divisor, grad_scale)
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
        gs = torch._foreach_div(gs, divisor(grad_scale, gs[0]))
    if rule.maximize:
        gs = torch._foreach_neg(gs)
    if rule.weight_decay != 0.0:
        gs = torch._foreach_add(gs, torch._foreach_mul(ps, rule.weight_decay))
    nus = [min_over_covers(accumulators[i], g.shape) for i, g in zip(batch, gs)]
    squares = torch._foreach_mul(gs, gs)
    if rule.beta > 0.0:
        torch._foreach_mul_(nus, rule.beta)
        torch._foreach_mul_(squares, 1.0 - rule.beta)
    torch._foreach_add_(nus, squares)
    for i, nu in zip(batch, nus):
        results[i] = cover_maxima(nu)
    nu_hats = nus if nu_divisor is None else torch._foreach_div(nus, divisor(nu_divisor, nus[0]))
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
    if rule.update_clip > 0.0:
        torch._foreach_clamp_min_(updates, -rule.update_clip)
        torch._foreach_clamp_max_(updates, rule.update_clip)
    with_momentum = [momentum_buffers[i] for i in batch if momentum_buffers[i] is not None]
    if with_momentum:
        torch._foreach_mul_(with_momentum, rule.momentum)
        torch._foreach_mul_(updates, 1.0 - rule.momentum)
        torch._foreach_add_(with_momentum, updates)
        updates = torch._foreach_mul(with_momentum, lr)
    else:
        torch._foreach_mul_(updates, lr)
    torch._foreach_sub_(ps, updates)


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
    lr, nu_divisor, grad_scale = as_scalar(lr), as_scalar(nu_divisor), as_scalar(grad_scale)
    cdt = compute_dtype(param.dtype)
    grad = grad.coalesce()
    rows = grad.indices()[0]
    w_rows = param[rows].to(cdt)
    values = _gradient(grad.values().to(cdt), w_rows, rule, grad_scale)
    nu = _nu([accumulators[0].index_select(0, rows), *accumulators[1:]], values, rule)
    maxima = cover_maxima(nu)
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


# ---------------------------------------------------------------------------------------------- inf and NaN


def abs_max(tensors: Sequence[Tensor]) -> Tensor:
    """The largest absolute value of each tensor, as one fp32 vector (batched with ``torch._foreach_norm``)."""
    return torch.stack([n.float() for n in torch._foreach_norm(list(tensors), ord=float("inf"))])


def first_nonfinite_eager(tensors: Sequence[Tensor]) -> int | None:
    """Index of the first tensor holding an inf or NaN, ``None`` if all are finite (read on the host)."""
    nonempty = [i for i, t in enumerate(tensors) if t.numel()]
    if not nonempty:
        return None
    finite = torch.isfinite(abs_max([tensors[i] for i in nonempty]))
    if bool(finite.all()):
        return None
    return nonempty[int((~finite).nonzero()[0])]


def nonfinite_eager_(tensors: Sequence[Tensor], found_inf: Tensor) -> None:
    """Set ``found_inf`` where any tensor holds an inf or NaN, on the device, without a host synchronization."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return
    bad = (~torch.isfinite(abs_max(tensors))).any().to(found_inf.dtype)
    torch.maximum(found_inf, bad.view(found_inf.shape).to(found_inf.device), out=found_inf)


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equal, NaN payloads apart (NaNs at the same places): how every kernel is held to the eager one."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().cpu(), b.detach().cpu()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return False
    ints = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16}
    ints[torch.float16] = torch.int16
    return torch.equal(a.view(ints[a.dtype])[~nan_a], b.view(ints[b.dtype])[~nan_b])
