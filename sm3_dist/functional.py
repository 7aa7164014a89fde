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

The maxima are *returned* (or written where the caller says, ``maxima_out``): a
caller holding a whole tensor assigns them to the accumulators, a caller holding
a shard combines them with the other shards' by an exact ``all_reduce(MAX)``
first. Everything here runs on the
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
from array import array
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sm3_dist import _native

__all__ = ["NativeBatch", "first_nonfinite", "sm3", "sm3_sparse_rows_", "store_maxima"]


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
    for chunk in _chunks(batch, params):
        _foreach_batch(chunk, params, grads, momentum_buffers, accumulators, results, **hyper)
    return results  # type: ignore[return-value]


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


def _foreach_batch(
    batch: list[int],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    accumulators: Sequence[Sequence[Tensor]],
    results: list,
    *,
    lr: float | Tensor,
    momentum: float,
    beta: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
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
        p.is_cpu
        and g.is_cpu
        and p.dtype in _NATIVE_DTYPES
        and g.dtype == p.dtype
        and p.is_contiguous()
        and g.is_contiguous()
        and p.numel() > 0
        and (m is None or (m.is_cpu and m.dtype in _NATIVE_DTYPES and m.is_contiguous()))
        and all(a.is_cpu and a.dtype == torch.float32 and a.is_contiguous() for a in accs)
    )


def _native_geometry(p: Tensor, accs: Sequence[Tensor]) -> tuple[int, int, Tensor, Tensor]:
    """A block as the kernel sees it: ``rows, cols``, the row minima ``min_(d < last) mu_d`` and ``mu_last``."""
    if p.ndim <= 1:
        inf = _POS_INF.get(p.device)
        if inf is None:
            inf = _POS_INF[p.device] = torch.full((1,), float("inf"), dtype=torch.float32)
        return 1, p.numel(), inf, accs[0]
    if p.ndim == 2:
        return p.shape[0], p.shape[1], accs[0], accs[1]
    rowmin = _min_over_covers(accs[:-1], p.shape[:-1]).reshape(-1)
    return rowmin.numel(), p.shape[-1], rowmin, accs[-1]


def _block_meta(p, g, m, rowmin: int, colacc: int, rowmax: int, colmax: int, rows: int, cols: int, keep_max: int):
    """One block's :data:`~sm3_dist._native.META_FIELDS` entries of the kernel's argument array."""
    momentum_ptr = 0 if m is None else m.data_ptr()
    kinds = [_NATIVE_DTYPES[p.dtype], _NATIVE_MOMENTUM[None if m is None else m.dtype], int(keep_max)]
    return [p.data_ptr(), g.data_ptr(), momentum_ptr, rowmin, colacc, rowmax, colmax, rows, cols, *kinds]


def _native_run(lib, meta: array, nblocks: int, lr, momentum, beta, eps, weight_decay, maximize) -> None:
    """One call of the native kernel on ``nblocks`` blocks described by ``meta``."""
    hyper = (ctypes.c_double * 8)(
        float(lr), momentum, 1.0 - momentum, beta, 1.0 - beta, eps, weight_decay, -1.0 if maximize else 1.0
    )
    flags = (
        (_native.FLAG_WD if weight_decay != 0.0 else 0)
        | (_native.FLAG_BETA if beta > 0.0 else 0)
        | (_native.FLAG_EPS if eps > 0.0 else 0)
    )
    status = lib.sm3_native_step(
        meta.buffer_info()[0], nblocks, ctypes.addressof(hyper), flags, torch.get_num_threads(), _NATIVE_TILE_ELEMS
    )
    if status != 0:
        raise RuntimeError(f"native SM3 kernel failed with status {status}")


class NativeBatch:
    """Repeated native steps of one fixed list of whole dense CPU blocks, maxima written into their accumulators.

    What stays the same from step to step (shapes, dtypes, the kernel's
    argument array) is prepared once; each :meth:`step` re-reads the data
    pointers and checks what could have changed (a parameter's ``.data``
    swapped, a gradient's dtype or layout) before calling the kernel, and
    returns ``False`` without touching anything when the batch no longer fits.
    It computes exactly what :func:`sm3` with ``fused=True`` and
    ``maxima_out=accumulators`` computes.
    """

    def __init__(self, lib, params, momentum_buffers, accumulators, keep_max: bool) -> None:
        self._lib = lib
        self._params = list(params)
        self._buffers = list(momentum_buffers)
        self._accumulators = [list(accs) for accs in accumulators]
        self._dtypes = [p.dtype for p in params]
        self._sink = torch.empty(1, dtype=torch.float32)  # the row maximum of rank-1 blocks
        meta = []
        for p, m, accs in zip(self._params, self._buffers, self._accumulators):
            # the maxima go into the accumulators themselves; the pointers are read again every step
            rows, cols, rowmin, colacc = _native_geometry(p, accs)
            rowmax = rowmin.data_ptr() if p.ndim == 2 else self._sink.data_ptr()
            meta += _block_meta(
                p, p, m, rowmin.data_ptr(), colacc.data_ptr(), rowmax, colacc.data_ptr(), rows, cols, keep_max
            )
        self._meta = array("q", meta)
        self._rank2 = [i for i, p in enumerate(self._params) if p.ndim == 2]

    @classmethod
    def build(cls, params, momentum_buffers, accumulators, keep_max: bool = False) -> NativeBatch | None:
        """A batch for these blocks, or ``None`` when the native kernel is off or cannot take them all."""
        lib = _native.load() if params and all(p.is_cpu for p in params) else None
        if lib is None:
            return None
        for p, m, accs in zip(params, momentum_buffers, accumulators):
            if p.ndim > 2 or not _native_eligible(p, p, m, accs):
                return None
        return cls(lib, params, momentum_buffers, accumulators, keep_max)

    def holds(self, params, momentum_buffers, accumulators) -> bool:
        """Whether this batch was built for exactly these tensors (the same objects, in the same order)."""
        return (
            len(params) == len(self._params)
            and all(a is b for a, b in zip(params, self._params))
            and all(a is b for a, b in zip(momentum_buffers, self._buffers))
            and all(a is b for accs, mine in zip(accumulators, self._accumulators) for a, b in zip(accs, mine))
        )

    def step(self, grads: Sequence[Tensor], *, lr, momentum, beta, eps, weight_decay, maximize) -> bool:
        params, dtypes = self._params, self._dtypes
        if len(grads) != len(params) or not all(
            g.dtype == d and p.dtype == d and g.is_contiguous() and p.is_contiguous() and g.shape == p.shape
            for g, p, d in zip(grads, params, dtypes)
        ):
            return False
        meta, n = self._meta, _native.META_FIELDS
        meta[0::n] = array("q", [p.data_ptr() for p in params])
        meta[1::n] = array("q", [g.data_ptr() for g in grads])
        meta[2::n] = array("q", [0 if m is None else m.data_ptr() for m in self._buffers])
        colacc = array("q", [accs[-1].data_ptr() for accs in self._accumulators])
        meta[4::n] = colacc
        meta[6::n] = colacc
        for i in self._rank2:
            meta[n * i + 3] = meta[n * i + 5] = self._accumulators[i][0].data_ptr()
        _native_run(self._lib, meta, len(params), lr, momentum, beta, eps, weight_decay, maximize)
        return True


def _native_outputs(outs: Sequence[Tensor], accs: Sequence[Tensor]) -> bool:
    """Whether the kernel can write a block's maxima into ``outs`` itself."""
    return len(outs) == len(accs) and all(
        o.is_cpu and o.dtype == torch.float32 and o.is_contiguous() and o.numel() == a.numel()
        for o, a in zip(outs, accs)
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
    maxima_out: Sequence[Sequence[Tensor]] | None = None,
    keep_max: bool = False,
) -> list[tuple[Tensor, ...] | None]:
    """The blocks the one-pass C++ kernel takes (CPU, contiguous, fp32/bf16); ``None`` for the others.

    Each block is viewed as ``rows x cols`` (its last dimension against the
    others, whose ``min_d mu_d`` is formed here for rank > 2); the kernel
    returns the row and column maxima, from which the maxima per dimension
    follow by exact max reductions. Blocks of rank <= 2 whose ``maxima_out``
    the kernel wrote itself (after reading every accumulator) get ``()``.
    """
    results: list[tuple[Tensor, ...] | None] = [None] * len(params)
    taken = []
    for i, (p, g, m, accs) in enumerate(zip(params, grads, momentum_buffers, accumulators)):
        if not _native_eligible(p, g, m, accs):
            continue
        direct = None
        if maxima_out is not None and p.ndim <= 2 and _native_outputs(maxima_out[i], accs):
            direct = maxima_out[i]
        taken.append((i, *_native_geometry(p, accs), direct))
    if not taken:
        return results
    # the new row and column maxima of the blocks not written in place, side by side in one buffer
    lengths = [n for _, rows, cols, _, _, direct in taken if direct is None for n in (rows, cols)]
    out = torch.empty(sum(lengths), dtype=torch.float32)
    out_ptr = out.data_ptr()
    sink = torch.empty(1, dtype=torch.float32)  # the row maximum of a rank-1 block written in place
    meta = []
    offset = 0
    for i, rows, cols, rowmin, colacc, direct in taken:
        p, g, m = params[i], grads[i], momentum_buffers[i]
        if direct is None:
            rowmax, colmax, mode = out_ptr + 4 * offset, out_ptr + 4 * (offset + rows), 0
            offset += rows + cols
        else:
            rowmax = direct[0].data_ptr() if len(direct) == 2 else sink.data_ptr()
            colmax, mode = direct[-1].data_ptr(), int(keep_max)
            results[i] = ()
        meta += _block_meta(p, g, m, rowmin.data_ptr(), colacc.data_ptr(), rowmax, colmax, rows, cols, mode)
    meta_t = array("q", meta)
    _native_run(lib, meta_t, len(taken), lr, momentum, beta, eps, weight_decay, maximize)
    views = iter(out.split(lengths))
    for i, *_, direct in taken:
        if direct is not None:
            continue
        rowmax, colmax = next(views), next(views)
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
    maxima_out: Sequence[Sequence[Tensor]] | None = None,
    keep_max: bool = False,
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
        results = _native_sm3(
            lib, params, grads, momentum_buffers, accumulators, maxima_out=maxima_out, keep_max=keep_max, **hyper
        )
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
    maxima_out: Sequence[Sequence[Tensor]] | None = None,
    keep_max: bool = False,
) -> list[tuple[Tensor, ...]] | None:
    """One SM3 step on a list of dense blocks; returns each block's maxima per dimension.

    ``params[i]``, ``grads[i]`` and ``momentum_buffers[i]`` (``None`` when
    momentum is 0) are views of one dense block, all of the same shape;
    ``accumulators[i][d]`` is the 1-D slice of ``mu_d`` that the block's indices
    along ``d`` cover (fp32, read only). The parameter and momentum are updated
    in place (computed in fp32, written back in their own dtypes); the returned
    ``maxima[i][d]`` are the new values of that slice of ``mu_d`` as far as this
    block can see them.

    With ``maxima_out`` the maxima are written into ``maxima_out[i][d]`` instead
    (their elementwise max with the old values under ``keep_max``) and ``None``
    is returned. ``maxima_out[i]`` may be ``accumulators[i]`` itself: every
    accumulator is read before any maximum is written. The outputs of one block
    must not overlap another block's accumulators or outputs.
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
    if maxima_out is not None and len(maxima_out) != len(params):
        raise ValueError(f"maxima_out has {len(maxima_out)} entries for {len(params)} blocks")
    hyper = dict(lr=lr, momentum=momentum, beta=beta, eps=eps, weight_decay=weight_decay, maximize=maximize)
    if fused:
        maxima = _fused_sm3(
            params, grads, momentum_buffers, accumulators, maxima_out=maxima_out, keep_max=keep_max, **hyper
        )
    elif foreach:
        maxima = _foreach_sm3(params, grads, momentum_buffers, accumulators, **hyper)
    else:
        maxima = _single_tensor_sm3(params, grads, momentum_buffers, accumulators, **hyper)
    if maxima_out is None:
        return maxima
    # blocks the native kernel wrote itself come back as ()
    store_maxima(
        [o for outs, new in zip(maxima_out, maxima) if new for o in outs],
        [m for new in maxima if new for m in new],
        keep_max,
    )
    return None


def store_maxima(accumulators: list[Tensor], maxima: list[Tensor], keep_max: bool = False) -> None:
    """``accumulators[k] <- maxima[k]`` (their elementwise max under ``keep_max``), batched where it can be."""
    if not accumulators:
        return
    if all(type(t) is Tensor for t in accumulators) and len({t.device for t in accumulators}) == 1:
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
