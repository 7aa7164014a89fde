r"""The SM3 update, as plain functions on local tensors.

SM3-II (Anil, Gupta, Koren, Singer, "Memory-Efficient Adaptive Optimization",
NeurIPS 2019, arXiv:1901.11150, Algorithm SM3-II) with the cover of
codimension-1 slices. For a tensor of shape :math:`(n_1, \dots, n_p)` there is
one accumulator vector :math:`\mu_d \in \mathbb{R}^{n_d}` per dimension; for a
rank-0 or rank-1 tensor this is one accumulator per element (diagonal AdaGrad).

.. math::
   \begin{aligned}
   &g \leftarrow -g \text{ if maximize};\quad g \leftarrow g + \lambda\,w \\
   &\nu[i_1..i_p] \leftarrow \min_d \mu_d[i_d] + g[i_1..i_p]^2
       &&(\beta = 0) \\
   &\nu[i_1..i_p] \leftarrow \beta \min_d \mu_d[i_d] + (1-\beta)\, g[i_1..i_p]^2
       &&(\beta > 0) \\
   &\mu_d[k] \leftarrow \max_{i:\, i_d = k} \nu[i] \quad \text{for every } d \\
   &u \leftarrow g / \sqrt{\nu + \epsilon}
       \quad (\epsilon = 0:\ u = 0 \text{ where } \nu = 0,\ \text{the 0/0 = 0 convention}) \\
   &m \leftarrow \text{momentum} \cdot m + (1 - \text{momentum})\, u;\quad u \leftarrow m
       &&(\text{momentum} > 0) \\
   &w \leftarrow w - \text{lr} \cdot u
   \end{aligned}

The maxima are *returned*, not written: a caller holding a whole tensor assigns
them to the accumulators, a caller holding a shard combines them with the other
shards' by an exact ``all_reduce(MAX)`` first. Everything here runs on the
tensors it is given and never communicates, so a sharded step computes exactly
what a single-process step computes for the same elements.

Rounding is kept independent of where a shard boundary falls: every
elementwise step is a single correctly rounded operation (no ``addcmul``,
``lerp`` or ``alpha=`` forms, whose vectorised loops may fuse a multiply-add
that their scalar tail loops do not), and reductions are only ``min``/``max``.

Three interchangeable kernels share one keyword-only signature, chosen by
:func:`sm3`: a per-tensor loop (the readable reference), a ``foreach`` kernel
that batches the elementwise work across tensors, and a ``fused`` kernel. On
CPU the fused kernel is a one-pass C++ kernel (:mod:`sm3_dist._native`, built
at first use; it reads ``w``, ``g``, ``m`` once and writes ``w``, ``m`` once,
and is bitwise equal to the per-tensor loop); elsewhere, or when it cannot be
built (logged once), each block goes through :func:`torch.compile`.
"""

from __future__ import annotations

import ctypes
import types
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sm3_dist import _native

__all__ = ["first_nonfinite", "sm3", "sm3_sparse_rows_"]


def _min_over_covers(accumulators: Sequence[Tensor], shape: torch.Size) -> Tensor:
    """``min_d mu_d[i_d]`` broadcast to ``shape``, as a new fp32 tensor."""
    ndim = len(shape)
    if ndim == 1:
        return accumulators[0].clone()
    views = [acc.view([-1 if d == k else 1 for k in range(ndim)]) for d, acc in enumerate(accumulators)]
    out = torch.minimum(views[0], views[1])
    for view in views[2:]:
        out = torch.minimum(out, view)
    return out.expand(shape).contiguous() if out.shape != shape else out


def _maxima(nu: Tensor) -> tuple[Tensor, ...]:
    """``max over i with i_d = k of nu[i]``, for every dimension ``d``."""
    ndim = nu.ndim
    if ndim == 1:
        return (nu,)
    return tuple(nu.amax(dim=tuple(k for k in range(ndim) if k != d)) for d in range(ndim))


def _single_block(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    accumulators: Sequence[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    beta: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> tuple[Tensor, ...]:
    """One block, eager. Updates ``param`` and ``momentum_buffer`` in place; returns the maxima."""
    g = grad.float()
    if maximize:
        g = -g
    w = param if param.dtype == torch.float32 else param.float()
    if weight_decay != 0.0:
        g = g + w * weight_decay
    nu = _min_over_covers(accumulators, g.shape)
    if beta > 0.0:
        nu.mul_(beta)
        nu.add_((g * g).mul_(1.0 - beta))
    else:
        nu.add_(g * g)
    maxima = _maxima(nu)
    if eps > 0.0:
        update = (nu + eps).rsqrt_().mul_(g)
    else:
        update = torch.where(nu > 0, g * nu.rsqrt(), torch.zeros((), dtype=g.dtype, device=g.device))
    if momentum_buffer is not None:
        m = momentum_buffer if momentum_buffer.dtype == torch.float32 else momentum_buffer.float()
        m.mul_(momentum).add_(update.mul_(1.0 - momentum))
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


def _single_tensor_sm3(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    accumulators: Sequence[Sequence[Tensor]],
    **hyper,
) -> list[tuple[Tensor, ...]]:
    return [
        _single_block(p, g, m, accs, **hyper) for p, g, m, accs in zip(params, grads, momentum_buffers, accumulators)
    ]


def _foreach_sm3(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    accumulators: Sequence[Sequence[Tensor]],
    *,
    lr: float | Tensor,
    momentum: float,
    beta: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> list[tuple[Tensor, ...]]:
    """The elementwise work batched across blocks with ``torch._foreach_*``.

    Blocks whose parameter or momentum is not fp32 run through the per-block
    kernel; the rest are batched. Same arithmetic, op for op, as the eager kernel.
    """
    hyper = dict(lr=lr, momentum=momentum, beta=beta, eps=eps, weight_decay=weight_decay, maximize=maximize)
    results: list[tuple[Tensor, ...] | None] = [None] * len(params)
    batch = [
        i
        for i, (p, g, m) in enumerate(zip(params, grads, momentum_buffers))
        if p.dtype == torch.float32 and g.dtype == torch.float32 and (m is None or m.dtype == torch.float32)
    ]
    batched = set(batch)
    for i in range(len(params)):
        if i not in batched:
            results[i] = _single_block(params[i], grads[i], momentum_buffers[i], accumulators[i], **hyper)
    if not batch:
        return results  # type: ignore[return-value]
    ps = [params[i] for i in batch]
    gs = [grads[i] for i in batch]
    if maximize:
        gs = torch._foreach_neg(gs)
    if weight_decay != 0.0:
        gs = torch._foreach_add(gs, torch._foreach_mul(ps, weight_decay))
    nus = [_min_over_covers(accumulators[i], g.shape) for i, g in zip(batch, gs)]
    squares = torch._foreach_mul(gs, gs)
    if beta > 0.0:
        torch._foreach_mul_(nus, beta)
        torch._foreach_mul_(squares, 1.0 - beta)
    torch._foreach_add_(nus, squares)
    for i, nu in zip(batch, nus):
        results[i] = _maxima(nu)
    if eps > 0.0:
        updates = torch._foreach_add(nus, eps)
        torch._foreach_rsqrt_(updates)
        torch._foreach_mul_(updates, gs)
    else:
        updates = [torch.where(nu > 0, g * nu.rsqrt(), torch.zeros((), dtype=g.dtype)) for nu, g in zip(nus, gs)]
    with_momentum = [momentum_buffers[i] for i in batch if momentum_buffers[i] is not None]
    if with_momentum:
        torch._foreach_mul_(with_momentum, momentum)
        torch._foreach_mul_(updates, 1.0 - momentum)
        torch._foreach_add_(with_momentum, updates)
        updates = torch._foreach_mul(with_momentum, lr)
    else:
        torch._foreach_mul_(updates, lr)
    torch._foreach_sub_(ps, updates)
    return results  # type: ignore[return-value]


_COMPILED: dict[tuple, Callable[..., tuple[Tensor, ...]]] = {}


def _block_kernel(param, grad, momentum_buffer, accumulators, lr, momentum, beta, eps, weight_decay, maximize):
    return _single_block(
        param,
        grad,
        momentum_buffer,
        accumulators,
        lr=lr,
        momentum=momentum,
        beta=beta,
        eps=eps,
        weight_decay=weight_decay,
        maximize=maximize,
    )


def _fused_block_fn(key: tuple) -> Callable[..., tuple[Tensor, ...]]:
    """The compiled kernel for one combination of rank, dtypes and flags.

    Each combination gets its own code object, so that dynamo's per-code
    recompile limit counts shapes of one kind only (shapes are dynamic).
    """
    fn = _COMPILED.get(key)
    if fn is None:
        code = _block_kernel.__code__.replace(co_name=f"sm3_block_{len(_COMPILED)}")
        kernel = types.FunctionType(code, _block_kernel.__globals__, code.co_name)
        fn = torch.compile(kernel, fullgraph=True, dynamic=True)
        _COMPILED[key] = fn
    return fn


_NATIVE_DTYPES = {torch.float32: _native.DTYPE_F32, torch.bfloat16: _native.DTYPE_BF16}
_NATIVE_MOMENTUM = {None: 0, torch.float32: 1, torch.bfloat16: 2}
_NATIVE_TILE_ELEMS = 1 << 16
_POS_INF: dict[torch.device, Tensor] = {}


def _native_eligible(p: Tensor, g: Tensor, m: Tensor | None, accs: Sequence[Tensor]) -> bool:
    return (
        p.device.type == "cpu"
        and p.numel() > 0
        and p.dtype in _NATIVE_DTYPES
        and g.dtype == p.dtype
        and g.device.type == "cpu"
        and p.is_contiguous()
        and g.is_contiguous()
        and (m is None or (m.dtype in _NATIVE_DTYPES and m.is_contiguous() and m.device.type == "cpu"))
        and all(a.dtype == torch.float32 and a.is_contiguous() and a.device.type == "cpu" for a in accs)
    )


def _native_sm3(
    lib,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    accumulators: Sequence[Sequence[Tensor]],
    *,
    lr: float | Tensor,
    momentum: float,
    beta: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> list[tuple[Tensor, ...] | None]:
    """The blocks the one-pass C++ kernel takes (CPU, contiguous, fp32/bf16); ``None`` for the others.

    Each block is viewed as ``rows x cols`` (its last dimension against the
    others, whose ``min_d mu_d`` is formed here for rank > 2); the kernel
    returns the row and column maxima, from which the maxima per dimension
    follow by exact max reductions.
    """
    results: list[tuple[Tensor, ...] | None] = [None] * len(params)
    taken = []
    for i, (p, g, m, accs) in enumerate(zip(params, grads, momentum_buffers, accumulators)):
        if not _native_eligible(p, g, m, accs):
            continue
        if p.ndim <= 1:
            inf = _POS_INF.get(p.device)
            if inf is None:
                inf = _POS_INF[p.device] = torch.full((1,), float("inf"), dtype=torch.float32)
            rows, cols, rowmin, colacc = 1, p.numel(), inf, accs[0]
        elif p.ndim == 2:
            rows, cols, rowmin, colacc = p.shape[0], p.shape[1], accs[0], accs[1]
        else:
            rowmin = _min_over_covers(accs[:-1], p.shape[:-1]).reshape(-1)
            rows, cols, colacc = rowmin.numel(), p.shape[-1], accs[-1]
        taken.append((i, rows, cols, rowmin, colacc))
    if not taken:
        return results
    out = torch.empty(sum(r + c for _, r, c, _, _ in taken), dtype=torch.float32)
    meta = []
    maxima_views = []
    offset = 0
    for i, rows, cols, rowmin, colacc in taken:
        rowmax, colmax = out[offset : offset + rows], out[offset + rows : offset + rows + cols]
        offset += rows + cols
        maxima_views.append((i, rowmax, colmax))
        p, g, m = params[i], grads[i], momentum_buffers[i]
        meta += [
            p.data_ptr(),
            g.data_ptr(),
            0 if m is None else m.data_ptr(),
            rowmin.data_ptr(),
            colacc.data_ptr(),
            rowmax.data_ptr(),
            colmax.data_ptr(),
            rows,
            cols,
            _NATIVE_DTYPES[p.dtype],
            _NATIVE_MOMENTUM[None if m is None else m.dtype],
        ]
    meta_t = torch.tensor(meta, dtype=torch.int64)
    lr_value = float(lr)
    hyper = (ctypes.c_double * 8)(
        lr_value, momentum, 1.0 - momentum, beta, 1.0 - beta, eps, weight_decay, -1.0 if maximize else 1.0
    )
    flags = (
        (_native.FLAG_WD if weight_decay != 0.0 else 0)
        | (_native.FLAG_BETA if beta > 0.0 else 0)
        | (_native.FLAG_EPS if eps > 0.0 else 0)
    )
    status = lib.sm3_native_step(
        meta_t.data_ptr(), len(taken), ctypes.addressof(hyper), flags, torch.get_num_threads(), _NATIVE_TILE_ELEMS
    )
    if status != 0:
        raise RuntimeError(f"native SM3 kernel failed with status {status}")
    for i, rowmax, colmax in maxima_views:
        shape = params[i].shape
        if len(shape) <= 1:
            results[i] = (colmax,)
        elif len(shape) == 2:
            results[i] = (rowmax, colmax)
        else:
            results[i] = (*_maxima(rowmax.view(shape[:-1])), colmax)
    return results


def _compiled_sm3(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    accumulators: Sequence[Sequence[Tensor]],
    *,
    lr: float | Tensor,
    momentum: float,
    beta: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> list[tuple[Tensor, ...]]:
    """Each block through one :func:`torch.compile`-d kernel (compiled once per rank and flag set).

    The learning rate goes in as a 0-d tensor so that a schedule does not recompile.
    """
    lr_tensor = lr if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float32)
    out = []
    for p, g, m, accs in zip(params, grads, momentum_buffers, accumulators):
        if p.numel() == 0:
            out.append(tuple(torch.zeros(n, dtype=torch.float32, device=p.device) for n in g.shape))
            continue
        key = (g.ndim, p.dtype, g.dtype, None if m is None else m.dtype, momentum, beta, eps, weight_decay, maximize)
        fn = _fused_block_fn(key)
        out.append(fn(p, g, m, list(accs), lr_tensor.to(p.device), momentum, beta, eps, weight_decay, maximize))
    return out


def _fused_sm3(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    accumulators: Sequence[Sequence[Tensor]],
    **hyper,
) -> list[tuple[Tensor, ...]]:
    """The fused step: CPU blocks through the one-pass native kernel, the rest through :func:`torch.compile`.

    Both compute exactly what the eager kernel computes (bitwise for the native
    kernel); the compiled kernel is also what runs when the native one cannot
    be built (logged once).
    """
    results: list[tuple[Tensor, ...] | None] = [None] * len(params)
    lib = _native.load() if any(p.device.type == "cpu" for p in params) else None
    if lib is not None:
        results = _native_sm3(lib, params, grads, momentum_buffers, accumulators, **hyper)
    rest = [i for i, r in enumerate(results) if r is None]
    if rest:
        compiled = _compiled_sm3(
            [params[i] for i in rest],
            [grads[i] for i in rest],
            [momentum_buffers[i] for i in rest],
            [accumulators[i] for i in rest],
            **hyper,
        )
        for i, r in zip(rest, compiled):
            results[i] = r
    return results  # type: ignore[return-value]


_FINITE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def native_available() -> bool:
    """Whether the one-pass native CPU kernel is built (or builds now) and enabled."""
    return _native.load() is not None


def first_nonfinite(tensors: Sequence[Tensor]) -> int | None:
    """Index of the first tensor holding an inf or NaN, ``None`` if all are finite.

    On CPU, one parallel pass of the native kernel over all of them (reads only);
    elsewhere the largest absolute values, batched with ``torch._foreach_norm``.
    """
    if not tensors:
        return None
    lib = _native.load() if all(t.device.type == "cpu" for t in tensors) else None
    if lib is not None and all(t.dtype in _FINITE_KINDS and t.is_contiguous() for t in tensors):
        fields = torch.tensor(
            [[t.data_ptr() for t in tensors], [t.numel() for t in tensors], [_FINITE_KINDS[t.dtype] for t in tensors]],
            dtype=torch.int64,
        )
        index = lib.sm3_native_first_nonfinite(
            fields[0].data_ptr(),
            fields[1].data_ptr(),
            fields[2].data_ptr(),
            len(tensors),
            torch.get_num_threads(),
            _NATIVE_TILE_ELEMS,
        )
        return None if index < 0 else int(index)
    nonempty = [i for i, t in enumerate(tensors) if t.numel()]
    if not nonempty:
        return None
    norms = torch.stack(torch._foreach_norm([tensors[i] for i in nonempty], ord=float("inf"))).float()
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return None
    return nonempty[int((~finite).nonzero()[0])]


def sm3(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    accumulators: Sequence[Sequence[Tensor]],
    *,
    lr: float | Tensor,
    momentum: float,
    beta: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    foreach: bool = False,
    fused: bool = False,
) -> list[tuple[Tensor, ...]]:
    """One SM3 step on a list of dense blocks; returns each block's maxima per dimension.

    ``params[i]``, ``grads[i]`` and ``momentum_buffers[i]`` (``None`` when
    momentum is 0) are views of one dense block, all of the same shape;
    ``accumulators[i][d]`` is the 1-D slice of ``mu_d`` that the block's indices
    along ``d`` cover (fp32, read only). The parameter and momentum are updated
    in place (computed in fp32, written back in their own dtypes); the returned
    ``maxima[i][d]`` are the new values of that slice of ``mu_d`` as far as this
    block can see them.
    """
    if foreach and fused:
        raise ValueError("foreach and fused cannot both be True")
    for i, (p, g, accs) in enumerate(zip(params, grads, accumulators)):
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has shape {tuple(p.shape)}")
        if len(accs) != max(g.ndim, 1) or any(a.numel() != n for a, n in zip(accs, g.shape or (1,))):
            raise ValueError(
                f"accumulators[{i}] have lengths {[a.numel() for a in accs]}, expected {list(g.shape or (1,))}"
            )
    hyper = dict(lr=lr, momentum=momentum, beta=beta, eps=eps, weight_decay=weight_decay, maximize=maximize)
    if fused:
        return _fused_sm3(params, grads, momentum_buffers, accumulators, **hyper)
    if foreach:
        return _foreach_sm3(params, grads, momentum_buffers, accumulators, **hyper)
    return _single_tensor_sm3(params, grads, momentum_buffers, accumulators, **hyper)


def sm3_sparse_rows_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    accumulators: Sequence[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    beta: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """SM3 for a sparse COO gradient (``nn.Embedding(sparse=True)``): only touched rows change.

    ``nu`` is formed for the touched rows only; ``mu_0`` is assigned at those
    rows and every other ``mu_d`` (d >= 1) keeps the larger of its value and the
    touched rows' maxima (with beta = 0 that is what the dense rule gives for
    all-zero rows, since SM3-II's running-sum accumulators never decrease).
    Momentum decays on touched rows only. Updates ``param``, ``momentum_buffer``
    and ``accumulators`` in place.
    """
    grad = grad.coalesce()
    rows = grad.indices()[0]
    values = grad.values().float()
    if maximize:
        values = -values
    w_rows = param[rows].float()
    if weight_decay != 0.0:
        values = values + w_rows * weight_decay
    row_accumulators = [accumulators[0].index_select(0, rows), *accumulators[1:]]
    nu = _min_over_covers(row_accumulators, values.shape)
    if beta > 0.0:
        nu.mul_(beta)
        nu.add_((values * values).mul_(1.0 - beta))
    else:
        nu.add_(values * values)
    maxima = _maxima(nu)
    accumulators[0].index_copy_(0, rows, maxima[0])
    for acc, new in zip(accumulators[1:], maxima[1:]):
        torch.maximum(acc, new, out=acc)
    if eps > 0.0:
        update = (nu + eps).rsqrt_().mul_(values)
    else:
        update = torch.where(nu > 0, values * nu.rsqrt(), torch.zeros((), dtype=values.dtype))
    if momentum_buffer is not None:
        m_rows = momentum_buffer[rows].float()
        m_rows.mul_(momentum).add_(update.mul_(1.0 - momentum))
        momentum_buffer.index_copy_(0, rows, m_rows.to(momentum_buffer.dtype))
        update = m_rows * lr
    else:
        update.mul_(lr)
    param.index_copy_(0, rows, w_rows.sub_(update).to(param.dtype))
