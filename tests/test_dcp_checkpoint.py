"""Resuming SM3 under FSDP2 from torch.distributed.checkpoint (DCP), at the same and at another world size.

Train ``k`` steps, save model and optimizer with DCP through the
``torch.distributed.checkpoint.state_dict`` helpers, load them in fresh
processes (world size N -> N and N -> M), train ``m`` more steps: parameters,
accumulators, momentum and the step count are ``torch.equal`` to an
uninterrupted run of ``k + m`` steps. The optimizer state is DTensors on the
parameters' meshes, so DCP reshards it with no code of ours.
"""

from __future__ import annotations

import os

import pytest
import torch

from sm3_dist import SM3, STEP_KEY
from tests.common import SHARDED_LR, global_grads, make_model, run_distributed, set_grads

FIRST, SECOND = 4, 5
HYPER = [dict(momentum=0.9, beta=0.9), dict(momentum=0.0, beta=0.0)]


def _train(model, opt, shapes, steps: range) -> None:
    for step in steps:
        set_grads(model, global_grads(shapes, step))
        opt.step()


def _full_state(model, opt) -> tuple[dict, dict]:
    from torch.distributed.tensor import DTensor

    opt.state_dict()  # waits for the last all-reduce of maxima
    params, state = {}, {}
    for name, p in model.named_parameters():
        params[name] = p.full_tensor().detach().clone() if isinstance(p, DTensor) else p.detach().clone()
        state[name] = {
            key: (value.full_tensor() if isinstance(value, DTensor) else value).clone()
            for key, value in opt.state[p].items()
        }
    return params, state


def _run_fsdp2(rank: int, world_size: int, path: str, load: bool, steps: range) -> list[tuple[dict, dict]]:
    """One run per entry of HYPER, each with its own checkpoint under ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,))
    results = []
    for index, hyper in enumerate(HYPER):
        checkpoint = os.path.join(path, str(index))
        model = make_model(seed=100 if load else 0)  # a resumed run must not depend on its own initialization
        shapes = [(n, p.shape) for n, p in model.named_parameters()]
        fully_shard(model, mesh=mesh)
        opt = SM3(model.parameters(), lr=SHARDED_LR, **hyper)
        if load:
            model_sd, optim_sd = get_state_dict(model, opt)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=checkpoint)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            for p in model.parameters():
                for key, value in opt.state[p].items():
                    assert key == STEP_KEY or isinstance(value, DTensor), f"{key} lost its DTensor form on load"
        _train(model, opt, shapes, steps)
        if not load:
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
        results.append(_full_state(model, opt))
    return results


def _reference(hyper: dict, steps: int) -> tuple[dict, dict]:
    model = make_model()
    opt = SM3(model.parameters(), lr=SHARDED_LR, **hyper)
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    _train(model, opt, shapes, range(steps))
    return _full_state(model, opt)


def _assert_equal(got: tuple[dict, dict], want: tuple[dict, dict], what: str) -> None:
    got_params, got_state = got
    want_params, want_state = want
    assert got_params.keys() == want_params.keys()
    for name, value in want_params.items():
        assert torch.equal(got_params[name], value), f"{what}: parameter {name} differs"
        assert got_state[name].keys() == want_state[name].keys(), f"{what}: {name} state keys differ"
        for key, value in want_state[name].items():
            assert torch.equal(got_state[name][key], value), f"{what}: {name} state {key!r} differs"
        assert int(got_state[name][STEP_KEY]) == FIRST + SECOND


@pytest.mark.parametrize(("save_world", "load_worlds"), [(2, (2, 3)), (3, (2,))], ids=["2->2,3", "3->2"])
def test_resume_matches_uninterrupted(tmp_path, save_world, load_worlds):
    path = str(tmp_path)
    saved = run_distributed(_run_fsdp2, save_world, path, False, range(FIRST))
    assert all(int(s[1]["emb.weight"][STEP_KEY]) == FIRST for per_hyper in saved for s in per_hyper)
    want = [_reference(hyper, FIRST + SECOND) for hyper in HYPER]
    for world in load_worlds:
        resumed = run_distributed(_run_fsdp2, world, path, True, range(FIRST, FIRST + SECOND))
        for rank, per_hyper in enumerate(resumed):
            for hyper, got, expected in zip(HYPER, per_hyper, want):
                _assert_equal(got, expected, f"{hyper} saved at world {save_world}, resumed at {world}, rank {rank}")
