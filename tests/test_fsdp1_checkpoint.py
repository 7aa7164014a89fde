"""FSDP1 + SM3 checkpoints reshard: saved at world size N, loaded at M, continued identically.

:func:`~sm3_dist.integrations.fsdp1.fsdp1_optim_state_dict` consolidates every
rank's pieces into the full state of a single-process ``SM3``, keyed by
parameter FQN; :func:`~sm3_dist.integrations.fsdp1.fsdp1_load_optim_state_dict`
slices it back at any world size. Fresh process groups train in a chain of
stages at world sizes 2 -> 3 -> 2, each loading the previous stage's
checkpoint (with DCP and a ``SHARDED_STATE_DICT`` model, or with ``torch.save``
and a ``FULL_STATE_DICT`` model). After every stage the full parameters and the
consolidated state are ``torch.equal`` to an uninterrupted single-process
``SM3`` fed the same global gradients, whose state is taken in the same format
by ``get_optimizer_state_dict``; and re-consolidating right after a load
gives back the loaded dict. Momentum 0.9 with beta 0 and 0.9, original and
flat parameters, fp32 and bf16 momentum. Gradients are set directly per shard, so the
runs test the optimizer and its checkpoints, not FSDP's gradient reduction.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from sm3_dist.integrations.fsdp1 import fsdp1_load_optim_state_dict, fsdp1_optim_state_dict, fsdp1_shard_resolver
from torch import nn

from sm3_dist import MOMENTUM_KEY, SM3, STEP_KEY, accumulator_key
from tests.common import (
    SHARDED_LR,
    TinyBlock,
    flat_pieces,
    fsdp1_full_params,
    global_grads,
    make_model,
    named_shapes,
    run_distributed,
    set_fsdp1_grads,
    wrap_fsdp1,
)

# (use_orig_params, SM3 hyperparameters): the flat-parameter form shares the checkpoint format; bf16 momentum
# puts two elements, possibly of two ranks, in each 32-bit word of the momentum bucket
CONFIGS = [
    (True, dict(momentum=0.9, beta=0.0)),
    (True, dict(momentum=0.9, beta=0.9)),
    (False, dict(momentum=0.9, beta=0.9)),
    (True, dict(momentum=0.9, beta=0.0, momentum_dtype=torch.bfloat16)),
]
STAGES = [(2, range(0, 3)), (3, range(3, 6)), (2, range(6, 8))]
FORMATS = ("dcp", "torch.save")


def _save(model: nn.Module, consolidated: dict, path: str, fmt: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if fmt == "dcp":
        dcp.save({"model": get_model_state_dict(model), "optim": consolidated}, checkpoint_id=path)
        return
    model_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"model": model_sd, "optim": consolidated}, path + ".pt")
    dist.barrier()


def _load(model: nn.Module, opt: SM3, path: str, fmt: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    if fmt == "dcp":
        # a fresh optimizer's consolidated state is all zeros of the right shapes: the template DCP fills in
        state = {"model": get_model_state_dict(model), "optim": fsdp1_optim_state_dict(model, opt)}
        assert all(int(s[STEP_KEY]) == 0 for s in state["optim"]["state"].values())
        # two calls: a rank holding no element of a parameter leaves it out of its sharded model state
        # dict, and a call that misses a key reads the whole request in DCP's pre-2.4 key format
        dcp.load({"model": state["model"]}, checkpoint_id=path)
        dcp.load({"optim": state["optim"]}, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
    else:
        state = torch.load(path + ".pt", weights_only=True)
        set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))
    fsdp1_load_optim_state_dict(model, opt, state["optim"])
    return state["optim"]


def _stage(rank: int, world_size: int, path: str, steps: range) -> dict[str, list[tuple]]:
    """Per format and config: load the checkpoint written after step ``steps.start`` (if any), train, save."""
    return {fmt: [_run(index, fmt, path, steps) for index in range(len(CONFIGS))] for fmt in FORMATS}


def _run(index: int, fmt: str, path: str, steps: range) -> tuple:
    orig, hyper = CONFIGS[index]
    path = os.path.join(path, fmt.replace(".", "_"))
    # a resumed stage must not depend on its own initialization
    model = wrap_fsdp1(make_model(seed=0 if steps.start == 0 else 100 + steps.start), use_orig_params=orig)
    opt = SM3(model.parameters(), lr=SHARDED_LR, **hyper, shard_resolver=fsdp1_shard_resolver(model))
    shapes = named_shapes(make_model())
    if steps.start:
        loaded = _load(model, opt, os.path.join(path, f"{index}-{steps.start}"), fmt)
        _assert_state_equal(fsdp1_optim_state_dict(model, opt), loaded, f"{fmt}, config {index}: reconsolidated")
    for step in steps:
        set_fsdp1_grads(model, global_grads(shapes, step))
        opt.step()
    consolidated = fsdp1_optim_state_dict(model, opt)
    _save(model, consolidated, os.path.join(path, f"{index}-{steps.stop}"), fmt)
    pieces = [(name, shape, start, stop) for _, _, name, shape, start, stop, _ in flat_pieces(model)]
    return fsdp1_full_params(model), consolidated, pieces


def _reference(hyper: dict, stops: list[int]) -> dict[int, tuple[dict, dict]]:
    """Single-process SM3 on the unwrapped model: parameters and FQN-keyed state after each of ``stops``."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = make_model()
    opt = SM3(model.parameters(), lr=SHARDED_LR, **hyper)
    params = dict(model.named_parameters())
    shapes = named_shapes(model)
    out = {}
    for step in range(max(stops)):
        grads = global_grads(shapes, step)
        for name, p in params.items():
            p.grad = grads[name].clone()
        opt.step()
        if step + 1 in stops:
            state = copy.deepcopy(get_optimizer_state_dict(model, opt))
            out[step + 1] = ({n: p.detach().clone() for n, p in params.items()}, state)
    return out


def _assert_state_equal(got: dict, want: dict, what: str) -> None:
    # FQN-keyed: the order of the parameters carries no meaning (flat parameters list them in flat order)
    unordered = [[{**g, "params": sorted(g["params"])} for g in sd["param_groups"]] for sd in (got, want)]
    assert unordered[0] == unordered[1], f"{what}: param groups differ"
    assert sorted(got["state"]) == sorted(want["state"]), f"{what}: parameters differ"
    for name, entry in want["state"].items():
        assert list(got["state"][name]) == list(entry), f"{what}: {name} state keys differ"
        for key, value in entry.items():
            mine = got["state"][name][key]
            assert mine.dtype == value.dtype, f"{what}: {name} {key!r} dtype differs"
            assert torch.equal(mine.cpu(), value.cpu()), f"{what}: {name} {key!r} differs"


def _cuts_mid_row(pieces: list[tuple]) -> bool:
    for _, shape, start, stop in pieces:
        numel, row = torch.Size(shape).numel(), shape[-1] if shape else 1
        if len(shape) >= 2 and start < stop and (start, stop) != (0, numel) and (start % row or stop % row):
            return True
    return False


def test_reshards_and_continues_identically(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    path = str(tmp_path)
    stops = [steps.stop for _, steps in STAGES]
    want = [_reference(hyper, stops) for _, hyper in CONFIGS]
    for world, steps in STAGES:
        per_rank = run_distributed(_stage, world, path, steps)
        if world == 3:  # the case that makes DCP's loads need two calls (see the module docstring of fsdp)
            pieces = [p for per_fmt in per_rank for _, _, rows in per_fmt["dcp"] for p in rows]
            assert any(start == stop for *_, start, stop in pieces), "every rank holds part of every parameter"
        for rank, per_fmt in enumerate(per_rank):
            for fmt, results in per_fmt.items():
                for index, (params, consolidated, pieces) in enumerate(results):
                    what = f"{fmt}, config {index}, world {world} after step {steps.stop}, rank {rank}"
                    want_params, want_state = want[index][steps.stop]
                    assert params.keys() == want_params.keys()
                    for name, value in want_params.items():
                        assert torch.equal(params[name], value), f"{what}: parameter {name} differs"
                    _assert_state_equal(consolidated, want_state, what)
                    assert all(int(s[STEP_KEY]) == steps.stop for s in consolidated["state"].values())
                    assert _cuts_mid_row(pieces), f"{what}: no shard boundary cuts a weight mid-row"
    # the last torch.save checkpoint also resumes a single-process SM3 through DCP's FQN-keyed helper
    for index, (_, hyper) in enumerate(CONFIGS):
        saved = torch.load(os.path.join(path, "torch_save", f"{index}-{stops[-1]}.pt"), weights_only=True)
        model = make_model(seed=1)
        model.load_state_dict(saved["model"])
        opt = SM3(model.parameters(), lr=SHARDED_LR, **hyper)
        set_optimizer_state_dict(model, opt, saved["optim"])
        _assert_state_equal(get_optimizer_state_dict(model, opt), want[index][stops[-1]][1], "single process")


class OtherBlock(TinyBlock):
    """The same parameter names, one of other shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(12, 7)


def _local_state(opt: SM3) -> list[dict]:
    return [{k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]]


def _errors_worker(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    modules = {"this": TinyBlock(), "other": OtherBlock()}
    models, opts = {}, {}
    for key, module in modules.items():
        shapes = named_shapes(module)
        models[key] = model = wrap_fsdp1(module, use_orig_params=True)
        opts[key] = SM3(model.parameters(), lr=SHARDED_LR, momentum=0.9, shard_resolver=fsdp1_shard_resolver(model))
        for step in range(2):
            set_fsdp1_grads(model, global_grads(shapes, step))
            opts[key].step()
    model, opt = models["this"], opts["this"]
    good = fsdp1_optim_state_dict(model, opt)
    other = fsdp1_optim_state_dict(models["other"], opts["other"])
    before, groups_before = _local_state(opt), copy.deepcopy(opt.param_groups)
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in groups_before]

    def without(name: str) -> dict:
        bad = copy.deepcopy(good)
        del bad["state"][name]
        return bad

    extra = copy.deepcopy(good)
    extra["state"]["extra.weight"] = copy.deepcopy(good["state"]["mix"])
    bf16 = copy.deepcopy(good)
    bf16["state"]["head.weight"][MOMENTUM_KEY] = bf16["state"]["head.weight"][MOMENTUM_KEY].bfloat16()
    wrong_mu = copy.deepcopy(good)
    wrong_mu["state"]["mix"][accumulator_key(2)] = torch.zeros(5)
    by_position = {"state": {}, "param_groups": [{**good["param_groups"][0], "params": list(range(8))}]}
    renamed = copy.deepcopy(good)
    renamed["param_groups"][0]["params"][0] = "mixer"
    bad_inputs = [
        (other, r"qkv\.weight: saved 'momentum_buffer' has shape \(7, 12\).*\(9, 12\).*another model"),
        (without("head.bias"), r"no state for head\.bias"),
        (extra, r"state for extra\.weight, which the optimizer has not"),
        (bf16, r"head\.weight: saved momentum is torch\.bfloat16"),
        (wrong_mu, r"mix: saved 'mu_2' has shape \(5,\).*\(3, 4, 6\)"),
        (by_position, r"by int, not by name.*get_optimizer_state_dict"),
        (renamed, r"mix is not in the checkpoint's param group 0"),
        ({"state": {}}, "not an optimizer state dict"),
    ]
    for bad, message in bad_inputs:
        with pytest.raises(ValueError, match=message):
            fsdp1_load_optim_state_dict(model, opt, bad)
        after = _local_state(opt)
        assert len(after) == len(before)
        for a, b in zip(after, before):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"state changed by {message}"
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    with pytest.raises(TypeError, match=r"takes an sm3_dist\.SM3 optimizer"):
        fsdp1_optim_state_dict(model, torch.optim.SGD(model.parameters(), lr=0.1))
    # the good checkpoint still loads, and comes back out unchanged
    fsdp1_load_optim_state_dict(model, opt, good)
    _assert_state_equal(fsdp1_optim_state_dict(model, opt), good, "reloaded")


def test_checkpoint_of_another_model_is_refused_before_any_change():
    run_distributed(_errors_worker, 2)
