r"""``sm3_dist.ShardedSM3``: SM3 for plain data parallelism (DDP), with ZeRO-1-style sharded state.

Every rank holds every parameter in full (as under ``DistributedDataParallel``)
and the same averaged gradient. The row-major flattenings of all parameters, in
``param_groups`` order and concatenated, are split into one balanced contiguous
slice per rank (:class:`FlatPartition`). A rank owns the slice's elements: it
keeps momentum for them and accumulator entries for the index ranges they
touch, and it updates only them. A slice boundary may cut a parameter anywhere,
mid-row included; the piece of a parameter a rank owns is a flat range
``[start, stop)`` of it, which :func:`sm3_dist.layout.flat_range_piece` splits
into dense blocks for the math.

One step:

1. an inner :class:`sm3_dist.SM3`, built on detached flat views of the owned
   ranges, updates them in place in the parameters' storage; its partial
   accumulator maxima go into one bucketed ``all_reduce(MAX)`` per step (every
   rank declares every parameter, possibly as an empty piece, so the reduction
   plan is the same on every rank), awaited at the start of the next step;
2. the updated slices are all-gathered, one ``all_gather`` per parameter dtype
   and device per step, so every rank again holds the full updated parameters.

Max is exact and associative, so the result is bit-for-bit the single-process
:class:`sm3_dist.SM3` fed the same gradients, at any world size.

``state_dict()`` is consolidated (full momentum and full accumulators per
parameter, in exactly the format of a single-process :class:`sm3_dist.SM3`), so
a checkpoint saved at one world size loads at any other, and into a plain
``SM3``; it works with ``torch.distributed.checkpoint`` and its
``get_optimizer_state_dict``/``set_optimizer_state_dict`` helpers unchanged.
``state_dict`` and ``load_state_dict`` are collectives: every rank calls them.

All communication goes through :mod:`sm3_dist.comm`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from sm3_dist.comm import MaxReducer, all_gather_flat
from sm3_dist.layout import TensorLayout, flat_range_piece, normalize_shape
from sm3_dist.optimizer import SM3
from sm3_dist.placement import ShardSpec, is_dtensor
from sm3_dist.state import MOMENTUM_KEY, SKIPPED_KEY, STEP_KEY, accumulator_key, check_groups, check_param_state

__all__ = ["CommVolume", "FlatPartition", "ShardedSM3"]


@dataclass(frozen=True, slots=True)
class FlatPartition:
    """Balanced contiguous slices of the concatenated row-major flattening of all parameters."""

    numels: tuple[int, ...]
    """Number of elements of each parameter, in ``param_groups`` order."""
    world_size: int
    """Number of slices (ranks)."""

    @property
    def total(self) -> int:
        return sum(self.numels)

    def bounds(self) -> tuple[int, ...]:
        """Global offsets ``b_0 = 0 <= b_1 <= ... <= b_W = total``; rank ``r`` owns ``[b_r, b_{r+1})``.

        Slice sizes differ by at most one element.
        """
        return tuple(r * self.total // self.world_size for r in range(self.world_size + 1))

    def owned(self, rank: int) -> tuple[tuple[int, int], ...]:
        """Per parameter, the flat range ``[start, stop)`` of it that ``rank`` owns (empty: ``start == stop``)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a partition over {self.world_size} ranks")
        bounds = self.bounds()
        lo, hi = bounds[rank], bounds[rank + 1]
        ranges = []
        offset = 0
        for n in self.numels:
            start = min(max(lo - offset, 0), n)
            stop = min(max(hi - offset, 0), n)
            ranges.append((start, max(start, stop)))
            offset += n
        return tuple(ranges)


@dataclass(frozen=True, slots=True)
class CommVolume:
    """What one :meth:`ShardedSM3.step` sends through collectives, summed over its calls."""

    allreduce_bytes: int
    """Bytes of the ``all_reduce(MAX)`` of accumulator maxima (the reducer's fp32 buffer; 0 on one rank)."""
    allreduce_calls: int
    """Number of those all-reduces (0 or 1)."""
    allgather_bytes: int
    """Bytes of the gathered parameters: world size times each rank's padded slice, summed over buckets."""
    allgather_calls: int
    """Number of parameter all-gathers (one per parameter dtype and device; 0 on one rank)."""


class ShardedSM3(Optimizer):
    r"""SM3-II with its state and update work partitioned across data-parallel ranks (ZeRO stage 1).

    For use in ``DistributedDataParallel`` training loops: build it on the
    model's parameters on every rank, call ``step()`` after the gradients have
    been averaged. Each rank updates its own balanced flat slice of the
    parameters and the updated slices are all-gathered, so on return every
    rank holds the full updated parameters. The update is SM3-II exactly as in
    :class:`sm3_dist.SM3` (Anil et al. 2019, arXiv:1901.11150), and bit-for-bit
    equal to it.

    Per rank, the state is momentum for the owned elements (if ``momentum > 0``)
    plus, per parameter and dimension ``d``, the entries of ``mu_d`` in the
    index range its owned elements touch. ``self.state[p]`` holds this rank's
    local state (a ``mu_d`` covers only that range, the momentum only the owned
    elements, flattened); :meth:`state_dict` consolidates it.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer. The parameters are
            partitioned once, at construction: later ``add_param_group`` calls or edits of
            ``param_groups[i]['params']`` are errors.
        process_group: the data-parallel group (default: the default group if ``torch.distributed`` is
            initialized, else a single process with nothing to communicate).
        **sm3_kwargs: hyperparameters of :class:`sm3_dist.SM3` (``lr``, ``momentum``, ``beta``, ``eps``,
            ``weight_decay``, ``maximize``, ``foreach``, ``fused``, ``momentum_dtype``, ``ema_keeps_max``);
            per-group values in ``params`` work as usual, and LR schedulers change ``param_groups``.

    Every rank must call ``step``, ``state_dict`` and ``load_state_dict`` (they contain collectives)
    with the same parameters and the same gradients (``None`` on all ranks or on none), which DDP
    guarantees. Sparse gradients are not supported (use :class:`sm3_dist.SM3`, unsharded).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        process_group: dist.ProcessGroup | None = None,
        **sm3_kwargs: Any,
    ) -> None:
        if "shard_resolver" in sm3_kwargs:
            raise TypeError(
                "ShardedSM3 takes no shard_resolver: it derives each parameter's layout from its own "
                "partition; use sm3_dist.SM3 with a resolver for framework-sharded parameters"
            )
        self._building = True
        super().__init__(params, {})
        self._building = False
        self._params: list[Tensor] = [p for g in self.param_groups for p in g["params"]]
        self._names = [
            f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}, dtype {p.dtype})"
            for gi, g in enumerate(self.param_groups)
            for pi, p in enumerate(g["params"])
        ]
        for p, name in zip(self._params, self._names):
            _check_param(p, name)
        self._group_params = [tuple(g["params"]) for g in self.param_groups]

        self.process_group, self.world_size, self.rank = _resolve_group(process_group)
        self.partition = FlatPartition(numels=tuple(p.numel() for p in self._params), world_size=self.world_size)
        self._ranges = [self.partition.owned(r) for r in range(self.world_size)]
        self._plan = tuple(normalize_shape(p.shape) for p in self._params)
        reduce_group = self.process_group if self.world_size > 1 else None

        self._views: list[Tensor] = []
        self._pieces = []
        specs: dict[Tensor, ShardSpec] = {}
        for k, (p, (start, stop)) in enumerate(zip(self._params, self._ranges[self.rank])):
            view = p.detach().view(-1)[start:stop]
            piece = flat_range_piece(self._plan[k], start, stop, tensor_id=k)
            specs[view] = ShardSpec(
                layout=TensorLayout(pieces=(piece,), numel=stop - start), group=reduce_group, plan=self._plan
            )
            self._views.append(view)
            self._pieces.append(piece)
        views = iter(self._views)
        inner_groups = [
            {**{key: v for key, v in g.items() if key != "params"}, "params": [next(views) for _ in g["params"]]}
            for g in self.param_groups
        ]
        self._inner = SM3(inner_groups, **sm3_kwargs, shard_resolver=specs.get)
        self.defaults = dict(self._inner.defaults)
        for outer, inner in zip(self.param_groups, self._inner.param_groups):
            for key, value in inner.items():
                if key != "params":
                    outer.setdefault(key, value)
        self._buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for k, p in enumerate(self._params):
            self._buckets.setdefault((p.dtype, p.device), []).append(k)
        self._refresh_state()

    # ------------------------------------------------------------------ introspection

    @property
    def skipped_steps(self) -> int:
        """Steps every rank skipped together for a non-finite gradient (``nonfinite="skip"``)."""
        return self._inner.skipped_steps

    @property
    def momentum_dtype(self) -> torch.dtype:
        return self._inner.momentum_dtype

    def owned_ranges(self, rank: int | None = None) -> tuple[tuple[int, int], ...]:
        """Per parameter (``param_groups`` order), the flat range ``[start, stop)`` that ``rank`` owns."""
        return self._ranges[self.rank if rank is None else rank]

    def comm_volume(self) -> CommVolume:
        """The collectives one ``step`` issues and their sizes."""
        if self.world_size == 1:
            return CommVolume(allreduce_bytes=0, allreduce_calls=0, allgather_bytes=0, allgather_calls=0)
        reduce_numel = sum(sum(shape) for shape in self._plan)
        gather_bytes, gather_calls = 0, 0
        for (dtype, _), indices in self._buckets.items():
            chunk = self._chunk(indices)
            if chunk:
                gather_bytes += self.world_size * chunk * torch.empty((), dtype=dtype).element_size()
                gather_calls += 1
        return CommVolume(
            allreduce_bytes=4 * reduce_numel,
            allreduce_calls=1 if reduce_numel else 0,
            allgather_bytes=gather_bytes,
            allgather_calls=gather_calls,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_building", False):
            raise ValueError(
                "ShardedSM3 partitions its parameters once, at construction; adding a param group would "
                "re-partition the optimizer state. Build a new ShardedSM3 with all groups instead (its "
                "state_dict loads across such changes only if the parameters are the same)"
            )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_param_groups()
        grads = []
        for k, (p, view, (start, stop)) in enumerate(zip(self._params, self._views, self._ranges[self.rank])):
            name = self._names[k]
            if not _aliases(view, p, start) or not p.is_contiguous():
                raise RuntimeError(
                    f"{name}: the parameter's storage was replaced or made non-contiguous after ShardedSM3 was "
                    "built (e.g. `p.data = ...` or moving the model); build the optimizer after the model is final "
                    "(under accelerate: after accelerator.prepare(model))"
                )
            g = p.grad
            if g is None:
                grads.append(None)
                continue
            if g.is_sparse or g.layout != torch.strided:
                raise TypeError(
                    f"{name}: ShardedSM3 does not support sparse gradients ({g.layout}); use dense gradients "
                    "(nn.Embedding(sparse=False)) or the unsharded sm3_dist.SM3"
                )
            if g.shape != p.shape:
                raise ValueError(f"{name}: gradient of shape {tuple(g.shape)} does not match the parameter")
            grads.append(g.reshape(-1)[start:stop])
        for outer, inner in zip(self.param_groups, self._inner.param_groups):
            for key, value in outer.items():
                if key != "params":
                    inner[key] = value
        for view, g in zip(self._views, grads):
            view.grad = g
        try:
            # the inner SM3's own step, without torch's step-hook wrapper: global step hooks fire once, for this
            # optimizer (torch.optim.Optimizer wraps every subclass's step to call them)
            inner_step = type(self._inner).step
            getattr(inner_step, "__wrapped__", inner_step)(self._inner)
        finally:
            for view in self._views:
                view.grad = None
        for outer, inner in zip(self.param_groups, self._inner.param_groups):
            if SKIPPED_KEY in inner:
                outer[SKIPPED_KEY] = inner[SKIPPED_KEY]
        if self.world_size > 1:
            for (dtype, device), indices in self._buckets.items():
                self._gather(
                    indices,
                    local=lambda k: self._views[k],
                    full=lambda k: self._params[k].detach().view(-1),
                    dtype=dtype,
                    device=device,
                    skip_own=True,
                )
        self._refresh_state()
        return loss

    def _check_param_groups(self) -> None:
        current = [tuple(g["params"]) for g in self.param_groups]
        if len(current) != len(self._group_params) or any(
            len(a) != len(b) or any(x is not y for x, y in zip(a, b)) for a, b in zip(current, self._group_params)
        ):
            raise ValueError(
                "ShardedSM3: param_groups' parameters changed after construction (the optimizer state is "
                "partitioned over the original parameters); build a new ShardedSM3 instead. If a wrapper swapped "
                "them (DeepSpeed ZeRO puts its flat partitions there), ShardedSM3 is the wrong optimizer: ZeRO "
                "shards the state itself, so pass sm3_dist.SM3"
            )

    def _chunk(self, indices: list[int]) -> int:
        return max(sum(b - a for a, b in (self._ranges[r][k] for k in indices)) for r in range(self.world_size))

    def _gather(
        self,
        indices: list[int],
        *,
        local: Callable[[int], Tensor],
        full: Callable[[int], Tensor],
        dtype: torch.dtype,
        device: torch.device,
        skip_own: bool,
    ) -> None:
        """All-gather every rank's owned ranges of tensors ``indices`` (one collective) into ``full(k)``."""
        chunk = self._chunk(indices)
        if chunk == 0:
            return
        send = torch.zeros(chunk, dtype=dtype, device=device)
        offset = 0
        for k in indices:
            a, b = self._ranges[self.rank][k]
            send[offset : offset + b - a].copy_(local(k))
            offset += b - a
        received = torch.empty(self.world_size * chunk, dtype=dtype, device=device)
        all_gather_flat(send, received, self.process_group)
        for r in range(self.world_size):
            if skip_own and r == self.rank:
                continue
            offset = r * chunk
            for k in indices:
                a, b = self._ranges[r][k]
                if b > a:
                    full(k)[a:b].copy_(received[offset : offset + b - a])
                offset += b - a

    def _refresh_state(self) -> None:
        """Expose the inner optimizer's per-rank state under the user's parameters."""
        self.state = defaultdict(
            dict, {p: self._inner.state[v] for p, v in zip(self._params, self._views) if self._inner.state.get(v)}
        )

    # ------------------------------------------------------------------ copying and pickling

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy``, ``pickle`` and ``torch.save`` of the optimizer keep.

        The param groups (parameters and hyperparameters), the SM3 settings and this rank's state, per
        parameter. The flat views, the partition and the inner :class:`sm3_dist.SM3` are rebuilt from the
        copy's own parameters, so that its views alias its parameters (``copy.deepcopy`` clones each
        ``nn.Parameter``). A process group cannot be pickled: a copy of an optimizer over the default group
        rebuilds on the default group and must land on the same rank of a group of the same size; one
        over another group cannot be copied (save its ``state_dict()`` instead). Hooks are not kept, as in
        ``torch.optim``.
        """
        if self.world_size > 1 and self.process_group is not dist.group.WORLD:
            raise TypeError(
                "a ShardedSM3 over a process group other than the default one cannot be copied or pickled (a "
                "process group cannot be); save and load its state_dict() instead"
            )
        import inspect

        inner = self._inner
        inner._wait_for_maxima()
        accepted = inspect.signature(SM3).parameters
        settings = {key: value for key, value in self.defaults.items() if key in accepted}
        settings.update(
            momentum_dtype=inner.momentum_dtype, ema_keeps_max=inner.ema_keeps_max, nonfinite=inner.nonfinite
        )
        return {
            "param_groups": self.param_groups,
            "sm3_settings": settings,
            "world_size": self.world_size,
            "rank": self.rank,
            "local_state": [dict(inner.state[v]) if inner.state.get(v) else None for v in self._views],
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "local_state" not in state:  # not from __getstate__: the base class's protocol
            super().__setstate__(state)
            return
        groups = [dict(group) for group in state["param_groups"]]
        ShardedSM3.__init__(self, groups, None, **state["sm3_settings"])
        if (self.world_size, self.rank) != (state["world_size"], state["rank"]):
            raise ValueError(
                f"this ShardedSM3 was saved as rank {state['rank']} of {state['world_size']} and is restored as rank "
                f"{self.rank} of {self.world_size} of the default process group: its state is a different shard; "
                "load a state_dict() instead"
            )
        for view, saved in zip(self._views, state["local_state"]):
            if saved:
                self._inner.state[view] = saved
        self._refresh_state()

    # ------------------------------------------------------------------ checkpoints

    def _pack_groups(self) -> list[dict[str, Any]]:
        packed, index = [], 0
        for g in self.param_groups:
            entry = {key: value for key, value in g.items() if key != "params"}
            entry["params"] = list(range(index, index + len(g["params"])))
            index += len(g["params"])
            packed.append(entry)
        return packed

    def state_dict(self) -> dict[str, Any]:
        """The consolidated state, identical on every rank and in the format of a single-process ``SM3``.

        A collective: every rank must call it. Momentum is all-gathered (one collective per dtype) and the
        accumulators are combined by one ``all_reduce(MAX)``: every rank holding an entry holds the same
        value, and the others contribute 0. ``register_state_dict_pre_hook``/``post_hook`` hooks run as usual.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        inner = self._inner.state_dict()["state"]
        device = self._views[0].device if self._views else torch.device("cpu")
        state: dict[int, dict[str, Any]] = {}
        with torch.no_grad():
            if self.world_size > 1 and inner:
                reducer = MaxReducer(self.process_group, self._plan, device)
                reducer.zero_()
                for k, piece in enumerate(self._pieces):
                    if k not in inner:
                        continue
                    for d, (lo, hi) in enumerate(piece.ranges):
                        reducer.slot(k, d)[lo:hi].copy_(inner[k][accumulator_key(d)])
                reducer.launch()
                reducer.wait()
            momentum_full: dict[int, Tensor] = {}
            with_momentum = [k for k in sorted(inner) if MOMENTUM_KEY in inner[k]]
            for k in with_momentum:
                momentum_full[k] = torch.zeros(
                    self._params[k].numel(), dtype=inner[k][MOMENTUM_KEY].dtype, device=device
                )
                a, b = self._ranges[self.rank][k]
                momentum_full[k][a:b].copy_(inner[k][MOMENTUM_KEY])
            if self.world_size > 1:
                by_dtype: dict[torch.dtype, list[int]] = {}
                for k in with_momentum:
                    by_dtype.setdefault(momentum_full[k].dtype, []).append(k)
                for dtype, indices in by_dtype.items():
                    self._gather(
                        indices,
                        local=lambda k: inner[k][MOMENTUM_KEY],
                        full=lambda k: momentum_full[k],
                        dtype=dtype,
                        device=device,
                        skip_own=True,
                    )
            for k in sorted(inner):
                entry: dict[str, Any] = {STEP_KEY: inner[k][STEP_KEY].clone()}
                if k in momentum_full:
                    entry[MOMENTUM_KEY] = momentum_full[k].view(self._params[k].shape)
                for d in range(len(self._plan[k])):
                    if self.world_size > 1:
                        entry[accumulator_key(d)] = reducer.slot(k, d).clone()
                    else:
                        entry[accumulator_key(d)] = inner[k][accumulator_key(d)].clone()
                state[k] = entry
        state_dict = {"state": state, "param_groups": self._pack_groups()}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a consolidated state (from a ``ShardedSM3`` at any world size, or a single-process ``SM3``)."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        saved_state = state_dict.get("state") if isinstance(state_dict, dict) else None
        if not isinstance(saved_state, dict):
            raise ValueError("not an optimizer state_dict: it needs 'state' and 'param_groups'")
        check_groups(groups, [len(g["params"]) for g in self.param_groups])
        saved_ids = [pid for g in groups for pid in g["params"]]
        strays = [pid for pid in saved_state if pid not in set(saved_ids)]
        if strays:
            raise ValueError(f"the state dict holds state for {strays}, which none of its param groups lists")
        momenta = [float(g["momentum"]) for g in groups for _ in g["params"]]
        for k, pid in enumerate(saved_ids):  # everything is checked before anything changes
            check_param_state(
                self._names[k],
                saved_state.get(pid),
                {accumulator_key(d): (n,) for d, n in enumerate(self._plan[k])},
                tuple(self._params[k].shape),
                momenta[k],
                self.momentum_dtype,
            )
        inner_state: dict[int, dict[str, Any]] = {}
        for k, pid in enumerate(saved_ids):
            saved = saved_state.get(pid)
            if not saved:
                continue
            (a, b), entry = self._ranges[self.rank][k], {}
            for key, value in saved.items():
                if key == STEP_KEY:
                    entry[key] = value.clone() if isinstance(value, Tensor) else torch.tensor(float(value))
                elif key == MOMENTUM_KEY:
                    entry[key] = value.reshape(-1)[a:b].clone()
                else:
                    lo, hi = self._pieces[k].ranges[int(key[3:])]
                    entry[key] = value[lo:hi].clone()
            inner_state[k] = entry
        inner_groups = [
            {**{key: v for key, v in sg.items() if key != "params"}, "params": list(range(i, i + len(sg["params"])))}
            for i, sg in zip(_starts(groups), groups)
        ]
        self._inner.load_state_dict({"state": inner_state, "param_groups": inner_groups})
        for outer, saved in zip(self.param_groups, groups):
            for key, value in saved.items():
                if key != "params":
                    outer[key] = value
        self._refresh_state()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _aliases(view: Tensor, p: Tensor, start: int) -> bool:
    """Whether ``view`` still lies in ``p``'s storage at flat offset ``start`` (empty views included)."""
    return (
        view.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
        and view.storage_offset() == p.storage_offset() + start
    )


def _starts(groups: list[dict[str, Any]]) -> list[int]:
    starts, index = [], 0
    for g in groups:
        starts.append(index)
        index += len(g["params"])
    return starts


def _check_param(p: Tensor, name: str) -> None:
    if is_dtensor(p):
        raise TypeError(
            f"{name}: a DTensor (FSDP2/tensor-parallel) parameter; ShardedSM3 is for replicated DDP "
            "parameters, use sm3_dist.SM3 on sharded parameters"
        )
    if p.layout != torch.strided:
        raise TypeError(f"{name}: ShardedSM3 needs dense (strided) parameters, got {p.layout}")
    if p.is_complex() or p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: SM3 supports float32, bfloat16 and float16 parameters")
    if not p.is_contiguous():
        raise ValueError(f"{name}: ShardedSM3 needs contiguous parameters (its slices are flat views)")


def _resolve_group(process_group: Any) -> tuple[Any, int, int]:
    initialized = dist.is_available() and dist.is_initialized()
    if process_group is None:
        if not initialized:
            return None, 1, 0
        process_group = dist.group.WORLD
    elif not initialized:
        raise ValueError("ShardedSM3 was given a process_group but torch.distributed is not initialized")
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError("this process is not a member of the process_group given to ShardedSM3")
    return process_group, dist.get_world_size(process_group), rank
