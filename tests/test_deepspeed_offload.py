"""ZeRO-Offload (``"offload_optimizer": {"device": "cpu"}``) steps SM3's CPU partitions through the native kernel.

For ZeRO stages 1, 2 and 3, SM3 built by DeepSpeed from the config's ``"optimizer"`` entry and a user-built
:class:`sm3_dist.SM3` handed to ``deepspeed.initialize`` each train a few steps at world size 2 under CPU
offload; every optimizer step must go through :meth:`NativePlan.step` (the one-pass C++ kernel), and the
per-tensor loop (``single_tensor_sm3`` / ``single_block``) and the ``foreach`` kernel must never run. One spawned
world per route, its three stages in turn (each once per pytest run, also under pytest-xdist).
"""

from __future__ import annotations

import pytest
import torch

from tests.common import native_library, run_distributed, run_each, shared_result
from tests.deepspeed_models import ENV, HYPER, Net, _batch, _config

deepspeed = pytest.importorskip("deepspeed")

pytestmark = pytest.mark.xdist_group("deepspeed_offload")

STAGES = (1, 2, 3)
ROUTES = ("config", "client")
STEPS = 3


def _counting(monkeypatch_targets: list[tuple[object, str]], counts: dict[str, int]) -> None:
    for owner, name in monkeypatch_targets:
        original = getattr(owner, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(owner, name, counted)


def _offload_run(stage: int, route: str) -> dict:
    import sm3_dist.integrations.deepspeed  # noqa: F401

    from sm3_dist import SM3

    torch.manual_seed(0)
    model = Net()
    config = _config(
        stage, zero_optimization={"offload_optimizer": {"device": "cpu"}}, zero_force_ds_cpu_optimizer=False
    )
    client = None
    if route == "client":
        config.pop("optimizer")
        client = SM3(model.parameters(), **HYPER)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), optimizer=client, config=config
    )
    counts: dict[str, int] = {}
    _COUNTS.clear()
    for step in range(STEPS):
        x, y = _batch(step)
        engine.backward(((engine(x) - y) ** 2).mean())
        engine.step()
    counts.update(_COUNTS)
    out = dict(
        counts=counts,
        offload=bool(engine.zero_cpu_offload()),
        base=type(engine.basic_optimizer).__name__,
        stage=engine.zero_optimization_stage(),
    )
    engine.destroy()
    return out


_COUNTS: dict[str, int] = {}


def _session(rank: int, world: int, route: str) -> dict:
    from sm3_dist.kernels import dispatch, math
    from sm3_dist.kernels.cpu.native_step import NativePlan

    _counting(
        [
            (NativePlan, "step"),
            (math, "single_block"),
            (math, "single_tensor_sm3"),
            (math, "foreach_sm3"),
            (dispatch, "single_block"),
            (dispatch, "single_tensor_sm3"),
            (dispatch, "foreach_sm3"),
        ],
        _COUNTS,
    )
    return run_each({f"zero{stage}": (lambda s=stage: _offload_run(s, route)) for stage in STAGES})


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    cache: dict[str, list[dict]] = {}

    def get(route: str) -> list[dict]:
        if route not in cache:
            cache[route] = shared_result(
                tmp_path_factory,
                f"deepspeed-offload-{route}",
                lambda: run_distributed(_session, 2, route, env=ENV, timeout=600),
            )
        return cache[route]

    return get


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("route", ROUTES)
def test_offload_steps_through_the_native_kernel(worlds, route, stage):
    native_library()
    for rank, session in enumerate(worlds(route)):
        result = session[f"zero{stage}"]
        assert "failure" not in result, f"{route}, ZeRO-{stage}, rank {rank}:\n{result['failure']}"
        assert result["offload"] and result["stage"] == stage, result
        assert result["base"] in ("SM3", "DeepSpeedSM3"), result
        counts = result["counts"]
        per_tensor = {k: v for k, v in counts.items() if k != "step"}
        assert not per_tensor, f"{route}, ZeRO-{stage}, rank {rank}: the per-tensor loop ran: {per_tensor}"
        assert counts.get("step", 0) >= STEPS, f"{route}, ZeRO-{stage}, rank {rank}: {counts}"
