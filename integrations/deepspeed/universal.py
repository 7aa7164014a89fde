"""Universal checkpoints of SM3 state: :func:`to_universal`, DeepSpeed's ``ds_to_universal`` for SM3.

DeepSpeed's converter reads Adam's ``exp_avg``/``exp_avg_sq`` by name and
stops with ``KeyError: 'exp_avg'`` on SM3 state (nothing is written, nothing
is lost silently). :func:`to_universal` writes per-parameter fp32 weights and
momentum in DeepSpeed's universal layout and carries the global accumulators
in the optimizer's param groups (:data:`UNIVERSAL_KEY`), so that
``engine.load_checkpoint`` with ``"checkpoint": {"load_universal": true}``
resumes at another data-parallel size (ZeRO-1/2/3) with every accumulator;
:class:`~sm3_dist.integrations.deepspeed.DeepSpeedSM3` takes them from there at
its next step (load universal checkpoints with ``DeepSpeedSM3``: the config
entry, or built yourself). It reads the piece record :data:`LAYOUT_KEY` that the
``state_dict`` of ``DeepSpeedSM3`` and of a plain ``SM3`` under ZeRO carries.
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sm3_dist.layout import Piece, flat_range_piece, normalize_shape
from sm3_dist.state import MOMENTUM_KEY, STEP_KEY, accumulator_key

__all__ = ["LAYOUT_KEY", "UNIVERSAL_KEY", "to_universal"]

LAYOUT_KEY = "sm3_layout"
"""Key the optimizer's ``state_dict`` adds under ZeRO: ``{"plan": global shapes by tensor id, "pieces": {state
index: [(tensor id, flat start, flat stop, offset in the partition), ...]}}``."""
UNIVERSAL_KEY = "sm3_universal"
"""Param-group key under which :func:`to_universal` hands the global accumulators to the optimizer."""


def layout_record(optimizer: Any, specs: dict, plan: Sequence[tuple[int, ...]]) -> dict | None:
    """The :data:`LAYOUT_KEY` record of ``optimizer``'s ZeRO partitions (``None``: it holds none)."""
    pieces: dict[int, list[tuple[int, int, int, int]]] = {}
    index: dict[int, int] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in index:
                continue
            index[id(p)] = len(index)
            spec = specs.get(p)
            if spec is not None and spec.group is not None:
                pieces[index[id(p)]] = [_piece_record(piece) for piece in spec.layout.pieces]
    if not pieces:
        return None
    return {"plan": [tuple(s) for s in plan], "pieces": pieces}


def _has_accumulators(state: dict[str, Any]) -> bool:
    return any(key.startswith(("mu_", "piece")) for key in state)


def _checked_carrier(carrier: dict[str, Any], plan: Sequence[tuple[int, ...]], momentum_dtype: torch.dtype) -> dict:
    saved = tuple(tuple(s) for s in carrier["plan"])
    if saved != tuple(tuple(s) for s in plan):
        raise ValueError(
            f"the universal checkpoint holds SM3 accumulators for parameters of shapes {list(saved)}, but this "
            f"optimizer's trainable parameters have shapes {list(plan)}: it comes from another model"
        )
    dtype = carrier.get("momentum_dtype")
    if dtype is not None and dtype != str(momentum_dtype):
        raise ValueError(
            f"the universal checkpoint's momentum is {dtype} but this optimizer has momentum_dtype={momentum_dtype}"
        )
    return carrier


def _piece_record(piece: Piece) -> tuple[int, int, int, int]:
    start = _ravel(piece.blocks[0].starts, piece.shape)
    return (piece.tensor_id, start, start + piece.numel, piece.offset)


def _ravel(index: Sequence[int], shape: Sequence[int]) -> int:
    flat = 0
    for i, n in zip(index, shape):
        flat = flat * n + i
    return flat


def _unravel(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    index = []
    for n in reversed(tuple(shape) or (1,)):
        index.append(flat % n)
        flat //= n
    return tuple(reversed(index))


_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def to_universal(input_folder: str, output_folder: str) -> None:
    """Convert a DeepSpeed ZeRO-1/2/3 checkpoint holding :class:`DeepSpeedSM3` state into a universal checkpoint.

    The SM3 counterpart of DeepSpeed's ``ds_to_universal.py --input_folder ... --output_folder ...``
    (``input_folder`` is one tag folder, e.g. ``ckpt/global_step10``), which fails on SM3 state
    with ``KeyError: 'exp_avg'``: it reads Adam's two moments and nothing else. Data parallelism
    only (one model-parallel rank). The output is DeepSpeed's own layout, which
    ``engine.load_checkpoint(...)`` with ``"checkpoint": {"load_universal": true}`` reads at any
    data-parallel size:

    * ``zero/<name>/fp32.pt`` and the momentum, per parameter: ``momentum_buffer.pt`` (ZeRO-1/2,
      whose loader restores every per-parameter file), ``exp_avg.pt`` (ZeRO-3, whose loader reads
      only Adam's names; ``exp_avg_sq.pt`` is a one-element placeholder); ``step.pt``.
    * SM3's accumulators are not parameter-shaped, so DeepSpeed's loader cannot slice them. The
      global accumulators (``sum of dims`` floats per parameter, rebuilt from every rank's
      touched ranges) go into the param groups of ``zero/optimizer_state.pt`` under
      :data:`UNIVERSAL_KEY`; DeepSpeed copies param-group entries onto the optimizer, and at its
      next step :class:`DeepSpeedSM3` takes each partition's ranges from there (and the momentum
      back to its dtype). A partition left without accumulators raises instead of restarting them.

    Raises ``ValueError`` if the checkpoint was not saved by :class:`DeepSpeedSM3`, or if
    DeepSpeed's own partition map disagrees with SM3's layout (DeepSpeed 0.19 with
    ``round_robin_gradients``, whose universal checkpoints are wrong for any optimizer).
    """
    from deepspeed.checkpoint import constants as ds

    optim_files: dict[int, str] = {}
    for path in glob.glob(os.path.join(input_folder, "*_optim_states.pt")):
        match = _OPTIM_FILE.search(os.path.basename(path))
        if match is None:
            continue
        if int(match.group(2)) != 0:
            raise NotImplementedError(f"{path}: model-parallel checkpoints (mp_rank > 0) are not supported")
        optim_files[int(match.group(1))] = path
    if not optim_files:
        raise FileNotFoundError(f"no ZeRO optimizer state files (*zero_pp_rank_*_optim_states.pt) in {input_folder}")
    world = len(optim_files)
    if sorted(optim_files) != list(range(world)):
        raise ValueError(f"{input_folder}: optimizer state files of data-parallel ranks {sorted(optim_files)}")
    states = [
        torch.load(optim_files[r], map_location="cpu", weights_only=False)[ds.OPTIMIZER_STATE_DICT]
        for r in range(world)
    ]
    stage = int(states[0].get(ds.ZERO_STAGE, 1))
    model_pattern = "mp_rank_*_model_states.pt" if stage <= 2 else "zero_pp_rank_*_mp_rank_*_model_states.pt"
    model_files = sorted(glob.glob(os.path.join(input_folder, model_pattern)))
    if not model_files:
        raise FileNotFoundError(f"no model state files ({model_pattern}) in {input_folder}")
    shapes: dict[str, tuple[int, ...]] = {}
    param_shapes = torch.load(model_files[0], map_location="cpu", weights_only=False)[ds.PARAM_SHAPES]
    for group_shapes in param_shapes:
        shapes.update({name: tuple(shape) for name, shape in group_shapes.items()})

    fp32: dict[str, Tensor] = {}
    momentum: dict[str, Tensor] = {}
    covered = dict.fromkeys(shapes, 0)
    accumulators: dict[int, list[Tensor]] = {}
    names: dict[int, str] = {}
    plan = None
    steps, momentum_dtype = set(), None
    for rank, sd in enumerate(states):
        where = f"{optim_files[rank]}"
        base = sd[ds.BASE_OPTIMIZER_STATE] if stage <= 2 else sd[ds.OPTIMIZER_STATE_DICT]
        if not isinstance(base, dict) or LAYOUT_KEY not in base:
            raise ValueError(
                f"{where}: the optimizer state was not saved by sm3_dist's SM3 under ZeRO (no {LAYOUT_KEY!r} "
                "record); for other optimizers use DeepSpeed's ds_to_universal"
            )
        record = base[LAYOUT_KEY]
        if plan is None:
            plan = [tuple(s) for s in record["plan"]]
        for flat_fp32, index, names_at in _partitions(sd, base, stage, world, rank, param_shapes, ds):
            state = base["state"].get(index, {})
            pieces = record["pieces"].get(index, [])
            several = len(pieces) > 1
            flat_momentum = state.get(MOMENTUM_KEY)
            if STEP_KEY in state:
                steps.add(float(state[STEP_KEY]))
            if flat_momentum is not None:
                momentum_dtype = flat_momentum.dtype
            for j, (tid, start, stop, offset) in enumerate(pieces):
                found = names_at.get(offset)
                if found is None or found[1] != stop - start or normalize_shape(shapes[found[0]]) != plan[tid]:
                    raise ValueError(
                        f"{where}: DeepSpeed's partition map ({found}) disagrees with SM3's layout (parameter "
                        f"{tid} of shape {plan[tid]}, elements [{start}, {stop}) at offset {offset}); DeepSpeed "
                        "0.19's map is wrong under round_robin_gradients, and such a checkpoint cannot be converted"
                    )
                name = found[0]
                if names.setdefault(tid, name) != name:
                    raise ValueError(f"{where}: parameter {tid} is {names[tid]} on one rank and {name} on another")
                n = stop - start
                numel = math.prod(plan[tid])
                fp32.setdefault(name, torch.zeros(numel, dtype=torch.float32))[start:stop] = flat_fp32[
                    offset : offset + n
                ]
                if flat_momentum is not None:
                    buf = momentum.setdefault(name, torch.zeros(numel, dtype=flat_momentum.dtype))
                    buf[start:stop] = flat_momentum.view(-1)[offset : offset + n]
                covered[name] += n
                mus = accumulators.setdefault(tid, [torch.zeros(m, dtype=torch.float32) for m in plan[tid]])
                for d, (lo, hi) in enumerate(flat_range_piece(plan[tid], start, stop).ranges):
                    value = state[accumulator_key(d, j if several else None)]
                    # every rank holds the reduced (global) values of the entries it touches: equal where they overlap
                    mus[d][lo:hi] = torch.maximum(mus[d][lo:hi], value)
    missing = {
        name: (covered[name], math.prod(shape))
        for name, shape in shapes.items()
        if covered[name] != math.prod(normalize_shape(shape))
    }
    if missing:
        raise ValueError(
            f"{input_folder}: parameters not covered exactly once by the partitions (found, expected): {missing}"
        )
    if len(steps) > 1:
        raise ValueError(f"{input_folder}: the ranks' SM3 step counters differ: {sorted(steps)}")
    step = torch.tensor(steps.pop() if steps else 0.0)

    zero_dir = os.path.join(output_folder, "zero")
    for name, shape in shapes.items():
        folder = os.path.join(zero_dir, name)
        os.makedirs(folder, exist_ok=True)
        torch.save({ds.PARAM: fp32[name].view(shape)}, os.path.join(folder, "fp32.pt"))
        if stage <= 2:
            if name in momentum:
                torch.save({ds.PARAM: momentum[name].view(shape)}, os.path.join(folder, f"{MOMENTUM_KEY}.pt"))
        else:
            numel = math.prod(normalize_shape(shape))
            placeholder = torch.zeros(1).expand(numel)
            torch.save({ds.PARAM: momentum.get(name, placeholder)}, os.path.join(folder, "exp_avg.pt"))
            torch.save({ds.PARAM: placeholder}, os.path.join(folder, "exp_avg_sq.pt"))
        torch.save(step.clone(), os.path.join(folder, "step.pt"))

    carrier = {
        "plan": plan,
        "names": [names.get(tid) for tid in range(len(plan))],
        "accumulators": accumulators,
        "step": float(step),
        "momentum_dtype": str(momentum_dtype) if momentum_dtype is not None else None,
    }
    base0 = states[0][ds.BASE_OPTIMIZER_STATE] if stage <= 2 else states[0][ds.OPTIMIZER_STATE_DICT]
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [], UNIVERSAL_KEY: carrier}
        for g in base0["param_groups"]
    ]
    if stage <= 2:
        sharded = (ds.BASE_OPTIMIZER_STATE, ds.PARAM_SLICE_MAPPINGS, ds.SINGLE_PARTITION_OF_FP32_GROUPS)
        out = {k: v for k, v in states[0].items() if k not in sharded}
    else:
        out = {k: v for k, v in states[0].items() if k not in (ds.OPTIMIZER_STATE_DICT, ds.FP32_FLAT_GROUPS)}
        out[ds.OPTIMIZER_STATE_DICT] = {"state": {0: {STEP_KEY: step.clone()}}, "param_groups": groups}
    out[ds.PARAM_GROUPS] = groups
    torch.save(out, os.path.join(zero_dir, "optimizer_state.pt"))
    for path in glob.glob(os.path.join(input_folder, "*model_states.pt")):
        shutil.copy2(path, output_folder)
    root, tag = os.path.split(os.path.abspath(output_folder))
    with open(os.path.join(root, "latest_universal"), "w") as f:
        f.write(tag)


def _partitions(sd, base, stage, world, rank, param_shapes, ds):
    """Per flat fp32 partition of one rank: (the partition, its index in the SM3 state, {offset: (name, numel)})."""
    if stage <= 2:
        fp32_groups = sd[ds.SINGLE_PARTITION_OF_FP32_GROUPS]
        mappings = sd[ds.PARAM_SLICE_MAPPINGS]
        for gi, group in enumerate(base["param_groups"]):
            (index,) = group["params"]
            names_at = {address.start: (name, address.numel) for name, address in mappings[gi].items()}
            yield fp32_groups[gi].view(-1), index, names_at
        return
    flats = sd[ds.FP32_FLAT_GROUPS]
    indices = [index for group in base["param_groups"] for index in group["params"]]
    if len(indices) != len(flats) or len(flats) != len(param_shapes):
        raise ValueError(
            f"ZeRO-3 checkpoint with {len(flats)} sub-groups, {len(param_shapes)} shape lists and {len(indices)} "
            "optimizer tensors"
        )
    for flat, index, group_shapes in zip(flats, indices, param_shapes):
        names_at, offset = {}, 0
        for name, shape in group_shapes.items():
            numel = math.prod(normalize_shape(shape))
            ps = math.ceil(numel / world)
            local = max(0, min(ps, numel - rank * ps))
            names_at[offset] = (name, local)
            offset += ps
        yield flat.view(-1), index, names_at


_WARNED: set[str] = set()
