"""The paths users take with their own scripts: a user-built SM3 under DeepSpeed ZeRO and accelerate, HF Trainer.

Under ZeRO a plain :class:`sm3_dist.SM3` handed to ``deepspeed.initialize``
(or to accelerate's DeepSpeed plugin, which calls it) gets its parameters
replaced by flat partitions after construction. It must then hold exactly the
state the config route (:class:`~sm3_dist.integrations.deepspeed.DeepSpeedSM3`)
holds, the same bytes, and step like single-process SM3 (every rank gets the
same batch, so DeepSpeed's gradient averaging over 2 ranks is exact and the
parameters are compared with ``torch.equal``; see ``test_deepspeed.py``);
never per-element accumulators. A tensor swapped in that nothing explains is
refused before the first update.

HF Trainer (tiny GPT-2 from a config, 2 ranks, DeepSpeed ZeRO-2): the config
route and ``optimizer_cls_and_kwargs=(SM3, ...)`` train SM3;
``optimizers=(SM3(...), None)``, which transformers discards under DeepSpeed,
stops before the first step with :class:`~sm3_dist.integrations.transformers.RequireSM3`,
naming the cause and the fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback

import pytest
import torch

from tests.spawn import run_distributed
from tests.test_deepspeed import ENV, HYPER, Net, _config, _describe_state, _full_params, _reference, loss_of

deepspeed = pytest.importorskip("deepspeed")

pytestmark = pytest.mark.xdist_group("user_paths")

STEPS = 5


def _client_config(stage: int, **extra) -> dict:
    cfg = _config(stage, **extra)
    del cfg["optimizer"]
    return cfg


def _summary(engine) -> dict:
    from sm3_dist import local_state_bytes

    base = engine.basic_optimizer
    base._wait_for_maxima()
    return dict(
        base=type(base).__name__,
        params=_full_params(engine),
        state=_describe_state(base),
        state_bytes=local_state_bytes(base),
    )


def _deepspeed_run(stage: int, route: str) -> dict:
    """``route``: ``config`` (``"type": "SM3"``) or ``client`` (``optimizer=SM3(...)``), 5 steps."""
    from sm3_dist import SM3

    torch.manual_seed(0)
    model = Net()
    if route == "config":
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(stage))
    else:
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=SM3(model.parameters(), **HYPER), config=_client_config(stage)
        )
    for step in range(STEPS):
        engine.backward(loss_of(engine, "net", step))
        engine.step()
    out = _summary(engine)
    engine.destroy()
    return out


def _accelerate_run() -> dict:
    """accelerate's DeepSpeed plugin (ZeRO-2, no optimizer section), a user-built SM3, accelerate's own loop."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin

    from sm3_dist import SM3

    AcceleratorState._reset_state(True)
    torch.manual_seed(0)
    model = Net()
    opt = SM3(model.parameters(), **HYPER)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=_client_config(2)))
    engine, opt = accelerator.prepare(model, opt)
    for step in range(STEPS):
        accelerator.backward(loss_of(engine, "net", step))
        opt.step()
        opt.zero_grad()
    out = _summary(engine)
    engine.destroy()
    AcceleratorState._reset_state(True)
    return out


def _unexplained_swap() -> dict:
    """A wrapper that swaps tensors into SM3's param groups which no adapter knows: refused before any update."""
    from sm3_dist import SM3, UnsupportedLayoutError

    model = Net()
    opt = SM3(model.parameters(), **HYPER)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_()
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.ones_like(flat)
    before = flat.detach().clone()
    try:
        opt.step()
    except UnsupportedLayoutError as err:
        return dict(message=str(err), unchanged=torch.equal(before, flat.detach()), state=len(opt.state))
    return dict(message=None)


def _session(rank: int, world: int) -> dict:
    runs = {
        f"{route}-zero{s}": (lambda s=s, r=route: _deepspeed_run(s, r))
        for s in (1, 2, 3)
        for route in ("config", "client")
    }
    runs["accelerate-zero2"] = _accelerate_run
    runs["unexplained"] = _unexplained_swap
    out = {}
    for name, run in runs.items():
        try:
            out[name] = run()
        except Exception:
            out[name] = dict(failure=traceback.format_exc())
    return out


@pytest.fixture(scope="module")
def session():
    return run_distributed(_session, 2, env=ENV, timeout=600)


def _pick(session, name):
    results = [ranks[name] for ranks in session]
    for rank, result in enumerate(results):
        assert "failure" not in result, f"{name}, rank {rank}:\n{result['failure']}"
    return results


def _same_state(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["pieces"] == y["pieces"]
        and x["state"].keys() == y["state"].keys()
        and all(torch.equal(x["state"][k], y["state"][k]) for k in x["state"])
        for x, y in zip(a, b)
    )


USER_BUILT = [("client-zero1", "config-zero1"), ("client-zero2", "config-zero2"), ("client-zero3", "config-zero3")]
USER_BUILT += [("accelerate-zero2", "config-zero2")]


@pytest.mark.slow
@pytest.mark.parametrize(("run", "config_run"), USER_BUILT, ids=[r for r, _ in USER_BUILT])
def test_user_built_sm3_under_zero_holds_the_config_routes_state_and_matches_one_process(session, run, config_run):
    model, _ = _reference(steps=STEPS)
    expected = {n: p.detach() for n, p in model.named_parameters()}
    for result, config in zip(_pick(session, run), _pick(session, config_run)):
        assert result["base"] == "SM3"
        for name, value in result["params"].items():
            assert torch.equal(value, expected[name]), f"{run}: {name} differs from single-process SM3"
        # the same per-dimension state as DeepSpeedSM3 from the config, byte for byte; never per element
        assert result["state_bytes"] == config["state_bytes"]
        assert _same_state(result["state"], config["state"])
        longest_dim = max(max(p.shape, default=1) for p in model.parameters())
        for tensor in result["state"]:
            assert tensor["reduced"]  # maxima reduced over the data-parallel group
            # per dimension: no accumulator longer than a dimension (a flat partition read as a vector: numel)
            assert all(v.numel() <= longest_dim for k, v in tensor["state"].items() if "mu_" in k)


@pytest.mark.slow
def test_a_tensor_swapped_in_that_nothing_explains_is_refused_before_any_update(session):
    for result in _pick(session, "unexplained"):
        message = result["message"]
        assert message is not None, "SM3 stepped a flat tensor it was not built on"
        assert "not one of the parameters SM3 was built on" in message
        assert "per-element accumulators" in message
        assert result["unchanged"] and result["state"] == 0


# ---------------------------------------------------------------------- registration whatever imported what

IMPORT_ORDERS = {
    "sm3_dist-then-deepspeed": "import sm3_dist, deepspeed",
    "deepspeed-then-sm3_dist": "import deepspeed, sm3_dist",
}


@pytest.mark.parametrize("order", list(IMPORT_ORDERS), ids=list(IMPORT_ORDERS))
def test_deepspeed_knows_sm3_without_importing_the_integration(order):
    code = (
        f"{IMPORT_ORDERS[order]}\n"
        "import torch\n"
        "from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS\n"
        "from sm3_dist.integrations.deepspeed import DeepSpeedSM3\n"
        "assert torch.optim.SM3 is DeepSpeedSM3\n"
        "assert sm3_dist.SM3 in ZERO_SUPPORTED_OPTIMIZERS and DeepSpeedSM3 in ZERO_SUPPORTED_OPTIMIZERS\n"
        "print('registered')\n"
    )
    env = {**os.environ, **ENV}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered" in done.stdout
