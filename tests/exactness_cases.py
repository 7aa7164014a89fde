"""The exactness table's rows: setups, options and devices, and the runs behind them (``test_exactness.py``).

In the spirit of torch's ``OptimizerInfo``: an :class:`Option` is SM3's keywords and the gradients it is fed;
a setup is a way to distribute the model and the optimizer. Every distributed setup is fed the same global
gradients as single-process ``SM3`` (its shard of them on each rank) and reports what it holds in terms of
the single-process optimizer: full parameters by name, and its state as :data:`Fragment` rows, each naming
the single-process state tensor and the part of it a rank stores. The test compares them with
``torch.equal``.

* ``sharded``: :class:`~sm3_dist.ShardedSM3` under ``DistributedDataParallel`` (flat slices cut weights
  mid-row); ``fsdp2``: ``fully_shard`` (uneven dim-0 shards, an empty one at 3 ranks, a dim-1 shard);
  ``fsdp1``: ``FullyShardedDataParallel(use_orig_params=True)`` (flat pieces). :class:`TinyBlock` at
  :data:`WORLD` ranks, gradients from :func:`tests.common.global_grads`.
* ``zero0`` .. ``zero3``: DeepSpeed's engine with ``"type": "SM3"``, :class:`~tests.deepspeed_models.Net`
  at 2 ranks, every rank fed the same batch, so DeepSpeed's average ``(g + g) / 2`` is the gradient bit for
  bit; the single-process run trains the same model on the same batches.

Each setup runs in one spawned world, all options one after another.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from sm3_dist import MOMENTUM_KEY, SM3, STEP_KEY, ShardedSM3, accumulator_key
from tests.common import (
    FSDP1_PREFIX,
    flat_pieces,
    fsdp1_full_params,
    global_grads,
    hull,
    make_model,
    named_shapes,
    set_fsdp1_grads,
    set_grads,
    wrap_fsdp1,
)

LR = 0.05
STEPS = 6
WORLD = 3
"""Ranks of the sharded, FSDP2 and FSDP1 worlds: uneven shards, an empty one, weights cut mid-row."""
DS_WORLD = 2
"""Ranks of the DeepSpeed world: ``(g + g) / 2 == g`` exactly (at 3, DeepSpeed's average may round)."""

Fragment = tuple[str, str, str, tuple[int, int] | None, torch.Tensor]
"""``(parameter name, state key, how, (lo, hi), value)``: the single-process state tensor ``state[name][key]``,
``"full"``; its entries ``[lo:hi]``, ``"range"`` (an accumulator's stored range); or its flattening's
``[lo:hi]``, ``"flat"`` (a flat piece's momentum)."""


@dataclass(frozen=True)
class Option:
    """SM3's keywords for a row, and the steps whose gradient holds a non-finite value."""

    kwargs: dict[str, Any]
    poison: dict[int, tuple[str, tuple[int, ...], float]] = field(default_factory=dict)
    """Step -> (parameter, index, value) written into the global gradient (DeepSpeed: a NaN in one rank's
    input at that step, which makes every gradient NaN)."""

    def grads(self, shapes: list[tuple[str, torch.Size]], step: int) -> dict[str, torch.Tensor]:
        grads = global_grads(shapes, step)
        if step in self.poison:
            name, index, value = self.poison[step]
            grads[name][index] = value
        return grads

    def deepspeed_params(self) -> dict[str, Any]:
        """The keywords as a DeepSpeed JSON config writes them."""
        params = dict(self.kwargs)
        if "momentum_dtype" in params:
            params["momentum_dtype"] = str(params["momentum_dtype"]).removeprefix("torch.")
        return params


OPTIONS: dict[str, Option] = {
    "momentum": Option(dict(momentum=0.9)),
    "beta+bias_correction": Option(dict(momentum=0.9, beta=0.99, bias_correction=True, weight_decay=0.01, eps=0.0)),
    "bf16_momentum": Option(dict(momentum=0.9, momentum_dtype=torch.bfloat16)),
    "nonfinite_skip": Option(
        dict(momentum=0.9, nonfinite="skip"),
        poison={2: ("head.weight", (3, 11), math.inf), 4: ("qkv.weight", (0, 5), math.nan)},
    ),
    "ema_keeps_max": Option(dict(beta=0.9, ema_keeps_max=True)),
    # per element: sharded steps clip exactly the coordinates the single-process step clips
    "update_clip": Option(dict(momentum=0.9, beta=0.99, bias_correction=True, update_clip=0.5)),
}
GLOBAL_SETUPS = ("sharded", "fsdp2", "fsdp1")
DEEPSPEED_SETUPS = ("zero0", "zero1", "zero2", "zero3")
SETUPS = ("single", *GLOBAL_SETUPS, *DEEPSPEED_SETUPS)
RAISE = ("head.weight", (3, 11), math.inf)
"""The non-finite entry of the ``nonfinite="raise"`` run every global-gradient setup also makes."""


def to_cpu(tree: Any) -> Any:
    if torch.is_tensor(tree):
        return tree.detach().cpu().clone()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


# ---------------------------------------------------------------------------------------------- single process


def single_run(option: Option, device: str = "cpu") -> dict:
    """Single-process SM3 on :class:`TinyBlock` fed the option's global gradients."""
    model = make_model().to(device)
    opt = SM3(model.parameters(), lr=LR, **option.kwargs)
    shapes = named_shapes(model)
    for step in range(STEPS):
        set_grads(model, option.grads(shapes, step))
        opt.step()
    params = {n: p for n, p in model.named_parameters()}
    state = {n: {k: v for k, v in opt.state[p].items() if torch.is_tensor(v)} for n, p in params.items()}
    return to_cpu(dict(params=params, state=state, skipped=opt.skipped_steps))


def deepspeed_single_run(option: Option, device: str = "cpu") -> dict:
    """Single-process SM3 on DeepSpeed's :class:`Net`, trained on the batches every rank of the engine sees."""
    from tests.deepspeed_models import reference

    model, opt = reference("net", STEPS, poison=option.poison, device=device, **option.kwargs)
    params = dict(model.named_parameters())
    state = {n: {k: v for k, v in opt.state[p].items() if torch.is_tensor(v)} for n, p in params.items()}
    return to_cpu(dict(params=params, state=state, skipped=opt.skipped_steps))


# ---------------------------------------------------------------------------------------------- global-gradient setups


def _marked(shape: torch.Size, index: tuple[int, ...]) -> torch.Tensor:
    marker = torch.zeros(shape)
    marker[index] = 1.0
    return marker


class Sharded:
    """ShardedSM3 over the parameters of a model under DistributedDataParallel."""

    def __init__(self, device: str, world: int, kwargs: dict) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.model = make_model().to(device)
        self.ddp = DDP(self.model, device_ids=None if device == "cpu" else [torch.cuda.current_device()])
        self.opt = ShardedSM3(self.ddp.parameters(), lr=LR, **kwargs)

    def set_grads(self, grads: dict[str, torch.Tensor]) -> None:
        set_grads(self.model, grads)

    def observe(self) -> tuple[dict, list[Fragment]]:
        names = [n for n, _ in self.model.named_parameters()]
        state = self.opt.state_dict()["state"]  # consolidated: every rank holds the full state
        frags = [
            (names[k], key, "full", None, v) for k, e in state.items() for key, v in e.items() if torch.is_tensor(v)
        ]
        return dict(self.model.named_parameters()), frags

    def holds(self, name: str, index: tuple[int, ...]) -> bool:
        names = [n for n, _ in self.model.named_parameters()]
        k = names.index(name)
        a, b = self.opt.owned_ranges()[k]
        flat = int(_marked(self.model.get_parameter(name).shape, index).flatten().argmax())
        return a <= flat < b


class FSDP2:
    """``fully_shard`` on a 1-D mesh: the attention projection on dim 1, the rest on dim 0."""

    def __init__(self, device: str, world: int, kwargs: dict) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        mesh = init_device_mesh(device, (world,))
        self.model = make_model().to(device)
        fully_shard(self.model.qkv, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
        fully_shard(self.model, mesh=mesh)
        self.opt = SM3(self.model.parameters(), lr=LR, **kwargs)

    def set_grads(self, grads: dict[str, torch.Tensor]) -> None:
        set_grads(self.model, grads)

    def observe(self) -> tuple[dict, list[Fragment]]:
        from torch.distributed.tensor import DTensor

        self.opt.state_dict()  # waits for the last all-reduce of maxima
        full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
        params = {n: full(p.detach()) for n, p in self.model.named_parameters()}
        frags = [
            (n, key, "full", None, full(v))
            for n, p in self.model.named_parameters()
            for key, v in self.opt.state[p].items()
            if torch.is_tensor(v)
        ]
        return params, frags

    def holds(self, name: str, index: tuple[int, ...]) -> bool:
        from torch.distributed.tensor import distribute_tensor

        p = self.model.get_parameter(name)
        marker = _marked(p.shape, index).to(p.device)
        return bool(distribute_tensor(marker, p.device_mesh, p.placements, src_data_rank=None).to_local().any())


class FSDP1:
    """``FullyShardedDataParallel(use_orig_params=True)``, each Linear its own unit: flat pieces cut mid-row."""

    def __init__(self, device: str, world: int, kwargs: dict) -> None:
        from sm3_dist.integrations.fsdp1 import fsdp1_shard_resolver

        self.model = wrap_fsdp1(make_model().to(device), device, use_orig_params=True)
        self.opt = SM3(self.model.parameters(), lr=LR, **kwargs, shard_resolver=fsdp1_shard_resolver(self.model))
        self.local = {n.replace(FSDP1_PREFIX, ""): p for n, p in self.model.named_parameters()}
        self.span = {name: (start, stop) for _, _, name, _, start, stop, _ in flat_pieces(self.model)}
        self.shapes = {name: shape for _, _, name, shape, _, _, _ in flat_pieces(self.model)}

    def set_grads(self, grads: dict[str, torch.Tensor]) -> None:
        set_fsdp1_grads(self.model, grads)

    def observe(self) -> tuple[dict, list[Fragment]]:
        self.opt.state_dict()  # waits for the last all-reduce of maxima
        params = fsdp1_full_params(self.model)
        frags = []
        for name, p in self.local.items():
            start, stop = self.span[name]
            ranges = hull(self.shapes[name], start, stop)
            keys = {accumulator_key(d): r for d, r in enumerate(ranges)}
            for key, v in self.opt.state[p].items():
                if key in keys:
                    frags.append((name, key, "range", keys[key], v))
                elif key == MOMENTUM_KEY:
                    frags.append((name, key, "flat", (start, stop), v))
                elif torch.is_tensor(v):
                    frags.append((name, key, "full", None, v))
        return params, frags

    def holds(self, name: str, index: tuple[int, ...]) -> bool:
        start, stop = self.span[name]
        return start <= int(_marked(self.shapes[name], index).flatten().argmax()) < stop


SETUP_CLASSES = {"sharded": Sharded, "fsdp2": FSDP2, "fsdp1": FSDP1}


def _same(a: tuple[dict, list[Fragment]], b: tuple[dict, list[Fragment]]) -> bool:
    params_a, frags_a = a
    params_b, frags_b = b
    return (
        params_a.keys() == params_b.keys()
        and all(torch.equal(params_a[n], params_b[n]) for n in params_a)
        and len(frags_a) == len(frags_b)
        and all(x[:4] == y[:4] and torch.equal(x[4], y[4]) for x, y in zip(frags_a, frags_b))
    )


def _observed(setup) -> tuple[dict, list[Fragment]]:
    params, frags = setup.observe()
    return to_cpu(params), [(*f[:4], to_cpu(f[4])) for f in frags]


def _prepare_device(rank: int, device: str) -> None:
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())


def global_setup_worker(rank: int, world: int, setup: str, device: str) -> dict:
    """Every option of :data:`OPTIONS` on one setup, then a ``nonfinite="raise"`` run."""
    _prepare_device(rank, device)
    shapes = named_shapes(make_model())
    out = {}
    for name, option in OPTIONS.items():
        run = SETUP_CLASSES[setup](device, world, option.kwargs)
        unchanged = {}
        for step in range(STEPS):
            run.set_grads(option.grads(shapes, step))
            before = _observed(run) if step in option.poison else None
            run.opt.step()
            if before is not None:
                unchanged[step] = _same(before, _observed(run))
        params, frags = _observed(run)
        out[name] = dict(params=params, fragments=frags, skipped=run.opt.skipped_steps, unchanged=unchanged)
    out["raise"] = _raise_run(SETUP_CLASSES[setup](device, world, dict(momentum=0.9, nonfinite="raise")), shapes)
    return out


def _raise_run(run, shapes: list[tuple[str, torch.Size]]) -> dict:
    name, index, value = RAISE
    run.set_grads(global_grads(shapes, 0))
    run.opt.step()
    grads = global_grads(shapes, 1)
    grads[name][index] = value
    run.set_grads(grads)
    before = _observed(run)
    try:
        run.opt.step()
        message = None
    except FloatingPointError as err:
        message = str(err)
    return dict(message=message, holds=run.holds(name, index), unchanged=_same(before, _observed(run)))


# ---------------------------------------------------------------------------------------------- DeepSpeed


def _deepspeed_fragments(base, module: torch.nn.Module) -> list[Fragment]:
    """The base optimizer's state, piece by piece (ZeRO-3 empties param_groups between steps: walk the specs).

    At stage 0 the optimizer holds the model's own parameters; at stages 1-3 flat fp32 partitions, whose
    pieces name the parameter (``tensor_id``, in the model's order) and its stored ranges."""
    by_id = {id(p): n for n, p in module.named_parameters()}
    names = list(by_id.values())
    frags: list[Fragment] = []
    for p, spec in base._specs.items():
        if p not in base.state:
            continue
        state = base.state[p]
        if id(p) in by_id:
            frags += [(by_id[id(p)], k, "full", None, v) for k, v in state.items() if torch.is_tensor(v)]
            continue
        pieces = spec.layout.pieces
        for j, piece in enumerate(pieces):
            if piece.numel == 0:
                continue
            name = names[piece.tensor_id]
            for d, lo_hi in enumerate(piece.ranges):
                key = accumulator_key(d, j if len(pieces) > 1 else None)
                frags.append((name, accumulator_key(d), "range", lo_hi, state[key]))
            if MOMENTUM_KEY in state:
                start = sum(i * s for i, s in zip(piece.blocks[0].starts, _strides(piece.shape)))
                local = state[MOMENTUM_KEY][piece.offset : piece.offset + piece.numel]
                frags.append((name, MOMENTUM_KEY, "flat", (start, start + piece.numel), local))
            frags.append((name, STEP_KEY, "full", None, state[STEP_KEY]))
    return frags


def _observe_engine(engine) -> tuple[dict, list[Fragment]]:
    from tests.deepspeed_models import _full_params

    engine.basic_optimizer._wait_for_maxima()
    return to_cpu(_full_params(engine)), to_cpu(_deepspeed_fragments(engine.basic_optimizer, engine.module))


def _strides(shape: tuple[int, ...]) -> list[int]:
    return [math.prod(shape[d + 1 :]) for d in range(len(shape))]


def deepspeed_worker(rank: int, world: int, device: str) -> dict:
    """Every option at ZeRO stages 0-3, one engine after another. A non-finite step: a NaN in rank 1's input."""
    import deepspeed
    import sm3_dist.integrations.deepspeed  # noqa: F401  (registers "SM3")

    from tests.deepspeed_models import MODELS, _config, loss_of

    os.environ["DS_ACCELERATOR"] = device  # deepspeed_models sets cpu on import
    _prepare_device(rank, device)
    out = {}
    for stage in range(4):
        for name, option in OPTIONS.items():
            torch.manual_seed(0)
            model = MODELS["net"]()
            engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=model.parameters(), config=_config(stage, option.deepspeed_params())
            )
            unchanged, skipped_before = {}, engine.skipped_steps
            for step in range(STEPS):
                engine.backward(loss_of(engine, "net", step, poison=step in option.poison and rank == 1))
                before = _observe_engine(engine) if step in option.poison else None
                engine.step()
                if before is not None:
                    unchanged[step] = _same(before, _observe_engine(engine))
            params, frags = _observe_engine(engine)
            out[f"zero{stage}", name] = dict(
                params=params,
                fragments=frags,
                skipped=engine.basic_optimizer.skipped_steps + engine.skipped_steps - skipped_before,
                unchanged=unchanged,
                wrapper=type(engine.optimizer).__name__,
            )
            engine.destroy()
    return out


def assert_fragments_equal(frags: list[Fragment], ref_state: dict[str, dict[str, torch.Tensor]], what: str) -> set:
    """Every fragment ``torch.equal`` to its part of the single-process state; the (name, key) pairs seen."""
    seen = set()
    for name, key, how, lo_hi, value in frags:
        ref = ref_state[name][key]
        if how == "range":
            ref = ref[lo_hi[0] : lo_hi[1]]
        elif how == "flat":
            ref = ref.flatten()[lo_hi[0] : lo_hi[1]]
        assert value.dtype == ref.dtype, f"{what}: {name} {key} is {value.dtype}, single-process {ref.dtype}"
        assert torch.equal(value.reshape(ref.shape), ref), f"{what}: {name} {key} {how} {lo_hi} differs"
        seen.add((name, key))
    return seen
