"""SM3 on FSDP1 (``FullyShardedDataParallel``) flat shards, exact against single-process SM3.

The layout of each original parameter comes from FSDP's shard metadata through
:func:`sm3_dist.integrations.fsdp1.fsdp1_shard_resolver`. Every rank feeds its
local pieces of the same global gradients; after the steps the gathered
parameters and each rank's accumulator entries are ``torch.equal`` to a plain
``sm3_dist.SM3`` on unsharded copies. The sizes make shard boundaries cut
weights mid-row, and the tests assert that they do.
"""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch
from sm3_dist.integrations.fsdp1 import fsdp1_shard_resolver

from sm3_dist import MOMENTUM_KEY, SM3, UnsupportedLayoutError, accumulator_key, local_state_bytes
from tests.common import FSDP1_PREFIX as PREFIX
from tests.common import (
    SHARDED_HYPER,
    SHARDED_LR,
    SHARDED_STEPS,
    flat_pieces,
    fsdp1_full_params,
    global_grads,
    hull,
    make_model,
    run_distributed,
    set_fsdp1_grads,
    train_with_reference,
    wrap_fsdp1,
)


def _orig_params_worker(rank: int, world_size: int) -> list[tuple[str, tuple[int, ...], int, int]]:

    for hyper in SHARDED_HYPER:
        ref_model = make_model()
        fsdp_model = wrap_fsdp1(copy.deepcopy(ref_model), use_orig_params=True)
        opt = SM3(fsdp_model.parameters(), lr=SHARDED_LR, **hyper, shard_resolver=fsdp1_shard_resolver(fsdp_model))
        ref = SM3(ref_model.parameters(), lr=SHARDED_LR, **hyper)
        local = {n.replace(PREFIX, ""): p for n, p in fsdp_model.named_parameters()}
        ref_params = dict(ref_model.named_parameters())
        assert local.keys() == ref_params.keys()
        span = {}  # name -> (start, stop) of the parameter's flattening held here
        rows = flat_pieces(fsdp_model)
        assert sorted(row[2] for row in rows) == sorted(ref_params)
        for _, param, name, _, start, stop, _ in rows:
            assert param is local[name]
            assert param.shape == (stop - start,), f"{name}: an FSDP1 original parameter is a 1-D view of its piece"
            span[name] = (start, stop)
        train_with_reference(opt, functools.partial(set_fsdp1_grads, fsdp_model), ref_model, ref, SHARDED_STEPS)
        opt.state_dict()  # waits for the last all-reduce of maxima
        expected_bytes = 0
        for name, p in local.items():
            r = ref_params[name]
            start, stop = span[name]
            state, ref_state = opt.state[p], ref.state[r]
            for d, (lo, hi) in enumerate(hull(tuple(r.shape), start, stop)):
                acc = state[accumulator_key(d)]
                assert torch.equal(acc, ref_state[accumulator_key(d)][lo:hi]), f"{hyper}: {name} mu_{d} differs"
                expected_bytes += 4 * (hi - lo)
            if hyper["momentum"] > 0:
                buf = ref_state[MOMENTUM_KEY].flatten()[start:stop]
                assert torch.equal(state[MOMENTUM_KEY], buf), f"{hyper}: {name} momentum differs"
                expected_bytes += 4 * (stop - start)
            else:
                assert MOMENTUM_KEY not in state
        assert local_state_bytes(opt) == expected_bytes
        for name, p in fsdp1_full_params(fsdp_model).items():
            assert torch.equal(p, ref_params[name].detach()), f"{hyper}: parameter {name} differs"
    return [(name, shape, start, stop) for (_, _, name, shape, start, stop, _) in flat_pieces(fsdp_model)]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_use_orig_params_matches_single_process(world_size):
    per_rank = run_distributed(_orig_params_worker, world_size)
    straddles = []
    for rows in per_rank:
        for fqn, shape, start, stop in rows:
            numel = torch.Size(shape).numel()
            row = shape[-1]
            if len(shape) >= 2 and start < stop and (0, numel) != (start, stop) and (start % row or stop % row):
                straddles.append(fqn)
    assert straddles, "no shard boundary cuts a weight mid-row"


def _flat_params_worker(rank: int, world_size: int) -> None:

    for hyper in SHARDED_HYPER[1:3]:
        ref_model = make_model()
        fsdp_model = wrap_fsdp1(copy.deepcopy(ref_model), use_orig_params=False)
        opt = SM3(fsdp_model.parameters(), lr=SHARDED_LR, **hyper, shard_resolver=fsdp1_shard_resolver(fsdp_model))
        ref = SM3(ref_model.parameters(), lr=SHARDED_LR, **hyper)
        ref_params = dict(ref_model.named_parameters())
        train_with_reference(opt, functools.partial(set_fsdp1_grads, fsdp_model), ref_model, ref, SHARDED_STEPS)
        opt.state_dict()
        for name, p in fsdp1_full_params(fsdp_model).items():
            assert torch.equal(p, ref_params[name].detach()), f"{hyper}: parameter {name} differs"


def test_flat_parameters_match_single_process():
    run_distributed(_flat_params_worker, 2)


def _no_shard_worker(rank: int, world_size: int) -> None:
    from torch.distributed.fsdp import ShardingStrategy

    for use_orig_params in (True, False):
        ref_model = make_model()
        fsdp_model = wrap_fsdp1(
            copy.deepcopy(ref_model), use_orig_params=use_orig_params, sharding_strategy=ShardingStrategy.NO_SHARD
        )
        opt = SM3(fsdp_model.parameters(), lr=SHARDED_LR, momentum=0.9, shard_resolver=fsdp1_shard_resolver(fsdp_model))
        ref = SM3(ref_model.parameters(), lr=SHARDED_LR, momentum=0.9)
        ref_params = dict(ref_model.named_parameters())
        for *_, shape, start, stop, _ in flat_pieces(fsdp_model):
            assert (start, stop) == (0, torch.Size(shape).numel()), "NO_SHARD holds every parameter whole"
        train_with_reference(opt, functools.partial(set_fsdp1_grads, fsdp_model), ref_model, ref, 3)
        opt.state_dict()
        for _, param, name, shape, *_ in flat_pieces(fsdp_model):
            r = ref_params[name]
            if param is not None:
                assert torch.equal(param.detach(), r.detach()), f"NO_SHARD: {name} differs"
                for d in range(len(shape)):
                    assert torch.equal(opt.state[param][accumulator_key(d)], ref.state[r][accumulator_key(d)])
        if not use_orig_params:
            for name, p in fsdp1_full_params(fsdp_model).items():
                assert torch.equal(p, ref_params[name].detach()), f"NO_SHARD flat: {name} differs"


def test_no_shard_matches_single_process():
    run_distributed(_no_shard_worker, 2)


def _resume_worker(rank: int, world_size: int, path: str, load: bool) -> None:
    """Per-rank resume at the same world size: local parameter pieces and ``optimizer.state_dict()``."""

    hyper = dict(momentum=0.9, beta=0.9)
    first, second = 3, 4
    fsdp_model = wrap_fsdp1(make_model(seed=5 if load else 0), use_orig_params=True)
    opt = SM3(fsdp_model.parameters(), lr=SHARDED_LR, **hyper, shard_resolver=fsdp1_shard_resolver(fsdp_model))
    rows = flat_pieces(fsdp_model)
    shapes = [(name, torch.Size(shape)) for _, _, name, shape, *_ in rows]
    file = os.path.join(path, f"rank{rank}.pt")
    if load:
        saved = torch.load(file, weights_only=True)
        with torch.no_grad():
            for (_, param, *_), value in zip(rows, saved["params"]):
                param.copy_(value)
        opt.load_state_dict(saved["optim"])
    for step in range(first, first + second) if load else range(first):
        grads = global_grads(shapes, step)
        for _, param, name, _, start, stop, _ in rows:
            param.grad = grads[name].flatten()[start:stop].clone()
        opt.step()
    if not load:
        torch.save({"params": [row[1].detach().clone() for row in rows], "optim": opt.state_dict()}, file)
        return
    ref_model = make_model()
    ref = SM3(ref_model.parameters(), lr=SHARDED_LR, **hyper)
    ref_params = dict(ref_model.named_parameters())
    for step in range(first + second):
        grads = global_grads(shapes, step)
        for name, r in ref_params.items():
            r.grad = grads[name].clone()
        ref.step()
    opt.state_dict()
    for _, param, name, shape, start, stop, _ in rows:
        for d, (lo, hi) in enumerate(hull(shape, start, stop)):
            acc = ref.state[ref_params[name]][accumulator_key(d)][lo:hi]
            assert torch.equal(opt.state[param][accumulator_key(d)], acc), f"resumed: {name} mu_{d} differs"
    for name, p in fsdp1_full_params(fsdp_model).items():
        assert torch.equal(p, ref_params[name].detach()), f"resumed: parameter {name} differs"


def test_resume_same_world_size(tmp_path):
    run_distributed(_resume_worker, 2, str(tmp_path), False)
    run_distributed(_resume_worker, 2, str(tmp_path), True)


def _errors_worker(rank: int, world_size: int) -> None:
    model = wrap_fsdp1(make_model(), use_orig_params=True)
    # without the resolver the 1-D views would look like whole vectors: refused
    opt = SM3(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(UnsupportedLayoutError, match=r"param_groups\[0\]\['params'\]\[0\].*FSDP1"):
        opt.step()
    # a resolver for another model
    other = wrap_fsdp1(make_model(), use_orig_params=True)
    opt = SM3(model.parameters(), lr=0.1, shard_resolver=fsdp1_shard_resolver(other))
    with pytest.raises(UnsupportedLayoutError, match="outside the model given to fsdp1_shard_resolver"):
        opt.step()
    # a flat parameter whose shard metadata is gone
    flat = model._handle.flat_param
    del flat._shard_param_infos
    opt = SM3(model.parameters(), lr=0.1, shard_resolver=fsdp1_shard_resolver(model))
    with pytest.raises(UnsupportedLayoutError, match=r"emb\.weight.*has no shard metadata"):
        opt.step()
    # a resolver for a model without FSDP
    opt = SM3(make_model().parameters(), lr=0.1, shard_resolver=fsdp1_shard_resolver(make_model()))
    with pytest.raises(UnsupportedLayoutError, match="contains no FullyShardedDataParallel module"):
        opt.step()


def test_bad_input_raises():
    run_distributed(_errors_worker, 2)
