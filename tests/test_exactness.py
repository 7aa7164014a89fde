"""The exactness table: setup x option x device, each distributed run bitwise single-process SM3.

Rows come from ``tests/exactness_cases.py`` (setups ``single``, ``sharded`` (ShardedSM3 under DDP),
``fsdp2``, ``fsdp1``, ``zero0``-``zero3``; options momentum, beta with bias correction, bf16 momentum, a
non-finite step under ``nonfinite="skip"``, ``ema_keeps_max``, ``update_clip``; devices ``cpu`` and, where
present, ``cuda``).
Each row asserts the sharded run's parameters and every state entry it stores ``torch.equal`` to
single-process SM3 fed the same global gradients; the ``single`` row asserts single-process SM3 close to
the independent float64 reference (``tests/reference.py``). One spawned world per setup and device runs
every option (:func:`tests.common.shared_result` shares it between pytest-xdist workers).
"""

from __future__ import annotations

import pytest
import torch

from sm3_dist import MOMENTUM_KEY, SM3, accumulator_key, local_state_bytes
from tests import exactness_cases as cases
from tests.common import DEVICES, make_model, named_shapes, run_distributed, shared_result
from tests.reference import ReferenceSM3

SLOW = dict.fromkeys(cases.DEEPSPEED_SETUPS, pytest.mark.slow)
"""DeepSpeed's rows: twenty engines, one after another."""
REFERENCE_KEYS = ("momentum", "beta", "eps", "weight_decay", "bias_correction", "ema_keeps_max", "update_clip")


def _world(setup: str) -> int:
    return cases.DS_WORLD if setup.startswith("zero") else cases.WORLD


def _spawn(setup: str, device: str):
    world = _world(setup)
    if device == "cuda" and torch.cuda.device_count() < world:
        pytest.skip(f"{setup} on CUDA needs {world} GPUs (NCCL, one per rank); {torch.cuda.device_count()} here")
    backend = "nccl" if device == "cuda" else "gloo"
    if setup.startswith("zero"):
        pytest.importorskip("deepspeed")
        env = {"DS_ACCELERATOR": "cuda" if device == "cuda" else "cpu"}
        return run_distributed(cases.deepspeed_worker, world, device, env=env, timeout=900, backend=backend)
    return run_distributed(cases.global_setup_worker, world, setup, device, timeout=600, backend=backend)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """The spawned world of a setup and device, run on first use (DeepSpeed's four stages share one)."""
    cache: dict[tuple[str, str], list[dict]] = {}

    def get(setup: str, device: str) -> list[dict]:
        key = ("deepspeed" if setup.startswith("zero") else setup, device)
        if key not in cache:
            cache[key] = shared_result(tmp_path_factory, f"exactness-{key[0]}-{device}", lambda: _spawn(setup, device))
        return cache[key]

    return get


def _result(worlds, setup: str, option: str, device: str) -> list[dict]:
    ranks = worlds(setup, device)
    return [r[setup, option] if setup.startswith("zero") else r[option] for r in ranks]


# ---------------------------------------------------------------------------------------------- the table


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("option", list(cases.OPTIONS))
@pytest.mark.parametrize("setup", [pytest.param(s, marks=SLOW.get(s, ())) for s in cases.SETUPS])
def test_exactness(worlds, setup, option, device):
    opt = cases.OPTIONS[option]
    if setup == "single":
        _single_close_to_reference(opt, device)
        return
    single = (cases.deepspeed_single_run if setup.startswith("zero") else cases.single_run)(opt, device)
    seen: set = set()
    for rank, result in enumerate(_result(worlds, setup, option, device)):
        what = f"{setup}/{option}/{device} rank {rank}"
        assert result["params"].keys() == single["params"].keys(), what
        for name, value in result["params"].items():
            assert torch.equal(value, single["params"][name]), f"{what}: parameter {name} differs"
        seen |= cases.assert_fragments_equal(result["fragments"], single["state"], what)
        assert result["skipped"] == single["skipped"] == len(opt.poison), what
        assert result["unchanged"] == dict.fromkeys(opt.poison, True), f"{what}: a skipped step changed something"
    assert seen == {(n, k) for n, s in single["state"].items() for k in s}, f"{setup}/{option}: state not covered"
    if option == "bf16_momentum":
        assert all(s[MOMENTUM_KEY].dtype == torch.bfloat16 for s in single["state"].values())


def _single_close_to_reference(option: cases.Option, device: str) -> None:
    """Single-process SM3 on ``device`` against the float64 reference fed the same gradients (skipped steps left
    out)."""
    run = cases.single_run(option, device)
    model = make_model()
    names, shapes = [n for n, _ in model.named_parameters()], named_shapes(model)
    ref = ReferenceSM3(
        model.parameters(), lr=cases.LR, **{k: option.kwargs[k] for k in REFERENCE_KEYS if k in option.kwargs}
    )
    for step in range(cases.STEPS):
        if step not in option.poison:
            grads = option.grads(shapes, step)
            ref.step([grads[n] for n in names])
    bf16 = option.kwargs.get("momentum_dtype") == torch.bfloat16
    # bf16 momentum rounds the stored buffer each step: the parameters follow the reference to lr * 2^-8 per step
    tol = dict(rtol=0, atol=cases.LR * cases.STEPS * 2**-8) if bf16 else dict(rtol=1e-5, atol=1e-6)
    assert run["skipped"] == len(option.poison)
    for k, name in enumerate(names):
        torch.testing.assert_close(run["params"][name].double(), ref.params[k].view_as(run["params"][name]), **tol)
        for d, acc in enumerate(ref.accumulators(k)):
            torch.testing.assert_close(run["state"][name][accumulator_key(d)].double(), acc, rtol=1e-5, atol=1e-6)
    if bf16:  # the momentum is stored in bf16, the accumulators stay fp32
        assert all(s[MOMENTUM_KEY].dtype == torch.bfloat16 for s in run["state"].values())
        assert all(v.dtype == torch.float32 for s in run["state"].values() for k, v in s.items() if k.startswith("mu_"))
    if device == "cpu" and bf16:
        fp32 = cases.single_run(cases.Option({**option.kwargs, "momentum_dtype": torch.float32}))
        assert any(not torch.equal(run["params"][n], fp32["params"][n]) for n in names), "bf16 momentum had no effect"
    if device == "cpu" and option.kwargs.get("update_clip", 0.0) > 0.0:
        unclipped = cases.single_run(cases.Option({**option.kwargs, "update_clip": 0.0}))
        assert any(not torch.equal(run["params"][n], unclipped["params"][n]) for n in names), "the clip had no effect"


# ---------------------------------------------------------------------------------------------- beside the table


@pytest.mark.parametrize("setup", cases.GLOBAL_SETUPS)
def test_nonfinite_raise_names_the_parameter_on_its_rank(worlds, setup):
    """``nonfinite="raise"`` with an inf in one rank's shard: every rank raises before changing anything; the
    rank holding it names the parameter, the others say it is on another rank."""
    name, _, _ = cases.RAISE
    index = [n for n, _ in make_model().named_parameters()].index(name)
    shape = tuple(make_model().get_parameter(name).shape)
    results = [r["raise"] for r in worlds(setup, "cpu")]
    assert sum(r["holds"] for r in results) == 1, "the non-finite entry must lie in exactly one rank's shard"
    for rank, result in enumerate(results):
        message = result["message"]
        assert message is not None, f"rank {rank} did not raise"
        assert result["unchanged"], f"rank {rank}: state changed before the error"
        assert f"(rank {rank})" in message, message
        if result["holds"]:
            assert f"param_groups[0]['params'][{index}] (shape {shape})" in message, message
        else:
            assert "another rank" in message, message


def test_bf16_momentum_takes_two_bytes_per_element():
    model = make_model()
    opt = SM3(model.parameters(), lr=cases.LR, momentum=0.9, momentum_dtype=torch.bfloat16)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    numel = sum(p.numel() for p in model.parameters())
    accumulators = sum(sum(p.shape) if p.dim() >= 2 else p.numel() for p in model.parameters())
    assert local_state_bytes(opt) == 2 * numel + 4 * accumulators
    assert all(opt.state[p][MOMENTUM_KEY].dtype == torch.bfloat16 for p in model.parameters())
