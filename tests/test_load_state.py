"""``load_state_dict`` checks everything before it changes anything, for every optimizer kind.

A table of bad state dicts (another model, transposed shapes, Adam's state
stepped and never stepped, a missing key, a momentum of another dtype, another
number of param groups) goes into :class:`sm3_dist.SM3`, :class:`sm3_dist.ShardedSM3`,
``DeepSpeedSM3`` and the FSDP1 helpers (``fsdp1_load_optim_state_dict``, 2
ranks). Each must raise ``ValueError`` naming the parameter (or the param
group) and what differs, leave every state tensor and param group as it was,
and a step afterwards must equal the step of a twin that never tried the load.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sm3_dist import SM3, ShardedSM3
from tests.common import fill_grads, run_distributed

HYPER = {"lr": 0.1, "momentum": 0.9}


class Transposed(nn.Module):
    """``nn.Linear(5, 3)``'s parameter names and element counts, the weight transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 3))
        self.bias = nn.Parameter(torch.randn(3))


def _target_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(5, 3)


def _stepped(model: nn.Module, opt) -> dict:
    fill_grads(model.parameters(), 1)
    opt.step()
    return opt.state_dict()


def _sm3_state(model=None, **options) -> dict:
    model = model if model is not None else _target_model()
    return _stepped(model, SM3(model.parameters(), **{**HYPER, **options}))


def _missing_key() -> dict:
    state = _sm3_state()
    del state["state"][0]["mu_1"]
    return state


def _two_groups() -> dict:
    model = _target_model()
    return _stepped(model, SM3([{"params": [model.weight]}, {"params": [model.bias]}], **HYPER))


BAD = {
    # case: (state dict, what the message must say beyond the parameter)
    "another-model": (lambda: _sm3_state(nn.Linear(4, 3)), r"has shape \(4,\), expected \(5,\)|shape \(3, 4\)"),
    "transposed": (lambda: _sm3_state(Transposed()), r"has shape \(5,\), expected \(3,\)|shape \(5, 3\)"),
    "adam-stepped": (
        lambda: _stepped(m := _target_model(), torch.optim.Adam(m.parameters())),
        r"param group 0 lacks SM3's hyperparameters \['momentum', 'beta'\].*another optimizer",
    ),
    "adam-never-stepped": (
        lambda: torch.optim.Adam(_target_model().parameters()).state_dict(),
        r"param group 0 lacks SM3's hyperparameters \['momentum', 'beta'\].*another optimizer",
    ),
    "missing-key": (_missing_key, r"lacks \[?'mu_1'"),
    "momentum-dtype": (lambda: _sm3_state(momentum_dtype=torch.bfloat16), r"torch\.bfloat16.*momentum_dtype"),
    "group-count": (_two_groups, r"has 2 param group.*1"),
}
PARAMETER = {
    # how each case names where it differs, per optimizer kind (group-level cases name the group)
    "another-model": r"params'\]\[0\] \(shape \(3, 5\)|weight",
    "transposed": r"params'\]\[0\] \(shape \(3, 5\)|weight",
    "missing-key": r"params'\]\[0\] \(shape \(3, 5\)|weight",
    "momentum-dtype": r"params'\]\[0\] \(shape \(3, 5\)|weight",
}


def _deepspeed_sm3(params, **options):
    ds = pytest.importorskip("sm3_dist.integrations.deepspeed")
    return ds.DeepSpeedSM3(params, **options)


KINDS = {"SM3": SM3, "ShardedSM3": ShardedSM3, "DeepSpeedSM3": _deepspeed_sm3}


def _snapshot(opt) -> tuple[dict, list[dict]]:
    return copy.deepcopy(opt.state_dict()["state"]), [
        {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups
    ]


def _same(a: tuple[dict, list[dict]], b: tuple[dict, list[dict]]) -> bool:
    (sa, ga), (sb, gb) = a, b
    return (
        ga == gb
        and sa.keys() == sb.keys()
        and all(sa[k].keys() == sb[k].keys() and all(torch.equal(sa[k][key], sb[k][key]) for key in sa[k]) for k in sa)
    )


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
def test_bad_state_is_refused_and_changes_nothing(kind, case):
    build, message = BAD[case]
    bad = build()
    model, twin = _target_model(), _target_model()
    opt, twin_opt = KINDS[kind](model.parameters(), **HYPER), KINDS[kind](twin.parameters(), **HYPER)
    for m, o in ((model, opt), (twin, twin_opt)):
        _stepped(m, o)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=message) as err:
        opt.load_state_dict(bad)
    if case in PARAMETER:
        assert err.match(PARAMETER[case])
    assert _same(before, _snapshot(opt)), "a refused load changed the optimizer"
    for m, o in ((model, opt), (twin, twin_opt)):  # a step afterwards equals a step without the failed load
        fill_grads(m.parameters(), 2)
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
def test_good_state_still_loads(kind):
    """The checks refuse nothing SM3 itself writes: a loaded state steps exactly as the saved optimizer."""
    model, twin = _target_model(), _target_model()
    source = KINDS[kind](model.parameters(), **HYPER)
    _stepped(model, source)
    twin.load_state_dict(model.state_dict())
    target = KINDS[kind](twin.parameters(), **HYPER)
    target.load_state_dict(copy.deepcopy(source.state_dict()))
    for m, o in ((model, source), (twin, target)):
        fill_grads(m.parameters(), 2)
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_float64_state_loads_and_other_dtypes_are_refused(momentum):
    """float64 parameters keep float64 state; it loads back, and float32 state for them is refused."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    source = SM3(model.parameters(), lr=0.1, momentum=momentum, foreach=False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    source.step()
    twin = copy.deepcopy(model)
    saved = copy.deepcopy(source.state_dict())
    assert saved["state"][0]["mu_0"].dtype == torch.float64
    target = SM3(twin.parameters(), lr=0.1, momentum=momentum, foreach=False)
    target.load_state_dict(copy.deepcopy(saved))
    for m, o in ((model, source), (twin, target)):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.5)
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    narrowed = copy.deepcopy(saved)
    narrowed["state"][0]["mu_0"] = narrowed["state"][0]["mu_0"].float()
    fresh = SM3(copy.deepcopy(twin).parameters(), lr=0.1, momentum=momentum, foreach=False)
    with pytest.raises(ValueError, match=r"params'\]\[0\].*'mu_0' is torch.float32, expected torch.float64"):
        fresh.load_state_dict(narrowed)
    assert not fresh.state


# ---------------------------------------------------------------------- the FSDP1 helpers, 2 ranks


def _by_name(state: dict, names: list[str]) -> dict:
    """A position-keyed state dict keyed by parameter name, as ``fsdp1_optim_state_dict`` writes it."""
    ids = [pid for g in state["param_groups"] for pid in g["params"]]
    lookup = dict(zip(ids, names))
    return {
        "state": {lookup[pid]: s for pid, s in state["state"].items()},
        "param_groups": [{**g, "params": [lookup[pid] for pid in g["params"]]} for g in state["param_groups"]],
    }


def _fsdp1_session(rank: int, world: int) -> dict:
    from sm3_dist.integrations.fsdp1 import fsdp1_load_optim_state_dict, fsdp1_shard_resolver
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out = {}
    for case, (build, _) in BAD.items():
        bad = _by_name(build(), ["weight", "bias"])
        models, opts = [], []
        for _ in range(2):
            model = FSDP(_target_model(), use_orig_params=True, device_id=torch.device("cpu"))
            opt = SM3(model.parameters(), **HYPER, shard_resolver=fsdp1_shard_resolver(model))
            fill_grads(model.module.parameters(), 1)
            fill_grads(model.parameters(), 1)
            opt.step()
            models.append(model)
            opts.append(opt)
        before = _snapshot(opts[0])
        try:
            fsdp1_load_optim_state_dict(models[0], opts[0], bad)
            message = None
        except ValueError as err:
            message = str(err)
        unchanged = _same(before, _snapshot(opts[0]))
        for model, opt in zip(models, opts):
            fill_grads(model.parameters(), 2)
            opt.step()
        equal = all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))
        out[case] = dict(message=message, unchanged=unchanged, equal=equal)
    return out


@pytest.fixture(scope="module")
def fsdp1_results():

    return run_distributed(_fsdp1_session, 2, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_fsdp1_helpers_refuse_bad_state_and_change_nothing(fsdp1_results, case):
    import re

    _, message = BAD[case]
    for rank, result in enumerate(fsdp1_results):
        found = result[case]["message"]
        assert found is not None, f"rank {rank}: {case} loaded"
        assert re.search(message, found, re.S), f"rank {rank}: {found}"
        if case in PARAMETER:
            assert re.search(PARAMETER[case], found), found
        assert result[case]["unchanged"] and result[case]["equal"], (rank, case)
