"""DeepSpeed paths beyond fp32 ZeRO: bf16, gradient accumulation, clipping, CPU offload, checkpoints, schedules,
universal checkpoints across data-parallel sizes, and accelerate's DeepSpeed plugin under offload.

As in ``test_deepspeed.py`` every rank gets the same micro-batches, so
DeepSpeed's gradient averaging over 2 ranks is exact and the runs are compared
with ``torch.equal`` to one process, except where noted (gradient clipping:
DeepSpeed computes the global norm in its own order and precision). Universal
checkpoints go from 2 to 3 ranks with :class:`tests.test_deepspeed.ExactNet`,
whose averaged gradient is exact at 3 ranks too (see ``test_deepspeed.py``), so
the resumed run must be ``torch.equal`` to the uninterrupted one.

Everything at world size 2 runs in one spawned session (which also saves the
checkpoints the universal tests convert); the universal checkpoints are
converted in the test process and loaded in one spawned session at world size 3
(each once per pytest run, also under pytest-xdist: ``shared_result``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import types

import pytest
import torch

from tests.common import run_distributed, run_each, shared_result, shared_root
from tests.deepspeed_models import ENV, HYPER, ExactNet, Net, _batch, _config, _full_params, loss_of

deepspeed = pytest.importorskip("deepspeed")

pytestmark = pytest.mark.xdist_group("deepspeed_features")

STEPS = 6


def _loop(engine, steps, gas, dtype, start=0):
    for step in range(start, steps):
        for micro in range(gas):
            x, y = _batch(100 * step + micro)
            loss = ((engine(x.to(dtype)) - y.to(dtype)) ** 2).mean()
            engine.backward(loss)
            engine.step()


def _engine(stage, extra, model_cls=Net, params=None):
    import sm3_dist.integrations.deepspeed  # noqa: F401

    torch.manual_seed(0)
    model = model_cls()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=_config(stage, params, **extra)
    )
    return engine, scheduler


def _train(stage, extra, gas=1, dtype=torch.float32):
    engine, scheduler = _engine(stage, extra)
    _loop(engine, STEPS, gas, dtype)
    base = engine.basic_optimizer
    base._wait_for_maxima()
    out = dict(
        params={n: p.float() for n, p in _full_params(engine).items()},
        wrapper=type(engine.optimizer).__name__,
        base=type(base).__name__,
        scheduler=type(scheduler).__name__ if scheduler is not None else None,
        lr=[g["lr"] for g in base.param_groups],
    )
    engine.destroy()
    return out


def _checkpoint(stage, path):
    engine, _ = _engine(stage, {})
    _loop(engine, STEPS // 2, 1, torch.float32)
    engine.save_checkpoint(path, tag="half")
    _loop(engine, STEPS, 1, torch.float32, start=STEPS // 2)
    straight = _full_params(engine)
    engine.destroy()
    resumed, _ = _engine(stage, {})
    resumed.load_checkpoint(path, tag="half")
    _loop(resumed, STEPS, 1, torch.float32, start=STEPS // 2)
    out = dict(straight=straight, resumed=_full_params(resumed))
    resumed.destroy()
    return out


# ---------------------------------------------------------------------- universal checkpoints (issue 8)

BF16_ENGINE = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
UNIVERSAL = {
    "zero1": (1, {}, {}),
    "zero2": (2, {}, {}),
    "zero3": (3, {}, {}),
    "bf16m-zero2": (2, {"momentum_dtype": "bfloat16"}, {}),
    "bf16-zero1": (1, {}, BF16_ENGINE),
}
"""Universal-checkpoint cases: name -> (ZeRO stage, SM3 params, engine config). ``bf16-zero1`` is DeepSpeed's
``BF16_Optimizer`` (``bf16_zero_pp_rank_*`` files): :class:`ExactNet`'s gradients are exact in bf16, so its fp32
master weights follow single-process fp32 SM3 and the engine's bf16 weights are those rounded."""
UNIVERSAL_HALF, UNIVERSAL_STEPS = 3, 6


def _exact_steps(engine, start, stop):
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    for step in range(start, stop):
        engine.backward(loss_of(engine, "exact", step, dtype=dtype))
        engine.step()


def _universal_source(stage, params, extra, path):
    """Save at step 3 of 6 at world size 2, then go on uninterrupted."""
    engine, _ = _engine(stage, extra, ExactNet, params)
    _exact_steps(engine, 0, UNIVERSAL_HALF)
    engine.save_checkpoint(path, tag="half")
    _exact_steps(engine, UNIVERSAL_HALF, UNIVERSAL_STEPS)
    out = dict(params=_full_params(engine))
    engine.destroy()
    return out


def _universal_resume(stage, params, extra, path):
    """Load the converted checkpoint (``latest_universal``) at this world size and finish the run."""
    engine, _ = _engine(stage, {**extra, "checkpoint": {"load_universal": True}}, ExactNet, params)
    engine.load_checkpoint(path)
    try:
        _exact_steps(engine, UNIVERSAL_HALF, UNIVERSAL_STEPS)
    except ValueError as err:
        return dict(error_message=str(err))
    base = engine.basic_optimizer
    out = dict(
        params=_full_params(engine),
        momentum_dtypes=sorted({str(s["momentum_buffer"].dtype) for s in base.state.values()}),
        steps=sorted({float(s["step"]) for s in base.state.values()}),
    )
    engine.destroy()
    return out


# ---------------------------------------------------------------------- accelerate's DeepSpeed plugin (issue 4)


def _accelerate_offload():
    """accelerate with ``offload_optimizer: cpu`` and a client SM3: kept with the flag false, swapped without it.

    ``DeepSpeedCPUAdam``'s compiled kernel is replaced by a stub (building it takes minutes on CPU); the swap
    decision and the engine are accelerate's and DeepSpeed's own. The config-entry path (``DummyOptim``) is never
    swapped."""
    import deepspeed.ops.adam.cpu_adam as cpu_adam
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin, DummyOptim
    from sm3_dist.integrations.deepspeed import DeepSpeedSM3, check_engine

    class StubBuilder:
        def load(self):
            return types.SimpleNamespace(create_adam=lambda *args: None, destroy_adam=lambda *args: None)

    cpu_adam.CPUAdamBuilder = StubBuilder
    out = {}
    for case in ("client-flag-false", "client-flag-missing", "client-flag-true", "config-flag-missing"):
        AcceleratorState._reset_state(True)
        cfg = _config(2, zero_optimization={"offload_optimizer": {"device": "cpu"}})
        if case.startswith("client"):
            del cfg["optimizer"]
        flag = case.rsplit("-", 1)[1]
        if flag != "missing":
            cfg["zero_force_ds_cpu_optimizer"] = flag == "true"
        torch.manual_seed(0)
        model = Net()
        if case.startswith("client"):
            optimizer = DeepSpeedSM3(model.parameters(), **HYPER)
        else:
            optimizer = DummyOptim(model.parameters())
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
        engine, _ = accelerator.prepare(model, optimizer)
        try:
            check_engine(engine)
        except RuntimeError as err:
            out[case] = dict(base=type(engine.basic_optimizer).__name__, error=str(err))
        else:
            _loop(engine, STEPS, 1, torch.float32)
            engine.basic_optimizer._wait_for_maxima()
            out[case] = dict(base=type(engine.basic_optimizer).__name__, error=None, params=_full_params(engine))
        engine.destroy()
    AcceleratorState._reset_state(True)
    return out


# ---------------------------------------------------------------------- the shipped configs

LAUNCH_JSONS = sorted(
    name
    for name in os.listdir(os.path.join(os.path.dirname(__file__), "..", "launch", "deepspeed"))
    if name.endswith(".json")
)
"""``fp16.json`` is built only where DeepSpeed's CPU accelerator supports fp16 (oneDNN fp16; not on most CPUs)."""


def _launch_json(name):
    """Build an engine from a shipped config (micro-batch 4), take two steps, report what it built."""
    import json

    from sm3_dist.integrations.deepspeed import check_engine

    with open(os.path.join(os.path.dirname(__file__), "..", "launch", "deepspeed", name)) as f:
        config = json.load(f)
    config.update(train_micro_batch_size_per_gpu=4, steps_per_print=10**9)
    config.pop("train_batch_size", None)
    if config.get("fp16", {}).get("enabled") and not deepspeed.get_accelerator().is_fp16_supported():
        return dict(skipped="fp16 is not supported by this CPU")
    torch.manual_seed(0)
    model = Net()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    check_engine(engine)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    _loop(engine, 2, 1, dtype)
    base = engine.basic_optimizer
    out = dict(
        stage=engine.zero_optimization_stage(),
        momentum_dtype=base.momentum_dtype,
        nonfinite=base.nonfinite,
        offload=engine.zero_cpu_offload(),
        finite=all(torch.isfinite(p).all() for p in _full_params(engine).values()),
    )
    engine.destroy()
    return out


# ---------------------------------------------------------------------- the sessions

BF16 = [
    (0, {}, "FP16_UnfusedOptimizer"),
    (1, {"data_types": {"grad_accum_dtype": "fp32"}}, "BF16_Optimizer"),
    (2, {}, "DeepSpeedZeroOptimizer"),
    (3, {}, "DeepSpeedZeroOptimizer_Stage3"),
]
GAS = {
    "zero0": (0, {}),
    "zero2": (2, {}),
    "zero3": (3, {}),
    "zero2-offload": (2, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}),
}
OFFLOAD = {"zero2": 2, "zero3": 3}
CLIP = 0.05
SCHEDULER = {"type": "SM3WarmupCooldown", "params": {"total_steps": STEPS, "warmup_fraction": 0.5}}


def _world2_runs(root):
    runs = {}
    for stage, extra, _ in BF16:
        runs[f"bf16-zero{stage}"] = lambda s=stage, e=extra: _train(
            s, {"bf16": {"enabled": True}, **e}, 1, torch.bfloat16
        )
    for name, (stage, extra) in GAS.items():
        runs[f"gas-{name}"] = lambda s=stage, e=extra: _train(s, {"gradient_accumulation_steps": 2, **e}, 2)
    for name, stage in OFFLOAD.items():
        extra = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": False}
        runs[f"offload-{name}"] = lambda s=stage, e=extra: _train(s, e)
    for stage in (0, 2):
        runs[f"clip-zero{stage}"] = lambda s=stage: _train(s, {"gradient_clipping": CLIP})
    runs["scheduler"] = lambda: _train(2, {"scheduler": SCHEDULER})
    for stage in range(4):
        runs[f"checkpoint-zero{stage}"] = lambda s=stage: _checkpoint(s, os.path.join(root, f"checkpoint-zero{s}"))
    for name, (stage, params, extra) in UNIVERSAL.items():
        path = os.path.join(root, f"universal-{name}")
        runs[f"universal-{name}"] = lambda s=stage, p=params, e=extra, d=path: _universal_source(s, p, e, d)
    rr = {"zero_optimization": {"round_robin_gradients": True}}
    runs["universal-round-robin"] = lambda: _universal_source(2, {}, rr, os.path.join(root, "universal-round-robin"))
    runs["accelerate"] = _accelerate_offload
    for name in LAUNCH_JSONS:
        runs[f"json-{name}"] = lambda n=name: _launch_json(n)
    return runs


def _world3_runs(root):
    runs = {}
    for name, (stage, params, extra) in UNIVERSAL.items():
        path = os.path.join(root, f"universal-{name}")
        runs[f"universal-{name}"] = lambda s=stage, p=params, e=extra, d=path: _universal_resume(s, p, e, d)
    runs["no-accumulators"] = lambda: _universal_resume(2, {}, {}, os.path.join(root, "no-accumulators"))
    runs["momentum-dtype"] = lambda: _universal_resume(2, {}, {}, os.path.join(root, "universal-bf16m-zero2"))
    return runs


def _session(rank, world, root):
    return run_each(_world2_runs(root) if world == 2 else _world3_runs(root))


def _pick(sessions, name):
    results = [session[name] for session in sessions]
    for rank, result in enumerate(results):
        assert "failure" not in result, f"run {name!r}, rank {rank}:\n{result['failure']}"
    return results


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    root = shared_root(tmp_path_factory) / "deepspeed-features"

    def compute():
        root.mkdir(exist_ok=True)
        return run_distributed(_session, 2, str(root), env=ENV, timeout=600)

    return str(root), shared_result(tmp_path_factory, "deepspeed-features-world2", compute)


@pytest.fixture(scope="module")
def world3(world2, tmp_path_factory):
    return shared_result(tmp_path_factory, "deepspeed-features-world3", lambda: _convert_and_resume(*world2))


def _convert_and_resume(root, sessions):
    """Convert the world-size-2 checkpoints (and a copy with the accumulators removed), load them at 3 ranks."""
    from sm3_dist.integrations.deepspeed import UNIVERSAL_KEY, to_universal

    for name in UNIVERSAL:
        _pick(sessions, f"universal-{name}")
        folder = os.path.join(root, f"universal-{name}")
        to_universal(os.path.join(folder, "half"), os.path.join(folder, "half_universal"))
    stripped = os.path.join(root, "no-accumulators")
    shutil.copytree(os.path.join(root, "universal-zero2"), stripped)
    state_path = os.path.join(stripped, "half_universal", "zero", "optimizer_state.pt")
    state = torch.load(state_path, weights_only=False)
    for group in state["param_groups"]:
        del group[UNIVERSAL_KEY]
    torch.save(state, state_path)
    return run_distributed(_session, 3, root, env=ENV, timeout=600)


def _compare(results, expected, exact=True, atol=0.0):
    for rank, result in enumerate(results):
        assert result["base"] == "DeepSpeedSM3"
        for name, value in result["params"].items():
            if exact:
                assert torch.equal(value, expected[name]), f"rank {rank}: {name}"
            else:
                torch.testing.assert_close(value, expected[name], rtol=0, atol=atol)


def _exact_reference(momentum_dtype, weight_dtype):
    """Single-process SM3 on :class:`ExactNet` from the initial weights rounded to ``weight_dtype`` (DeepSpeed's
    fp32 master weights start from the low-precision model's)."""
    from sm3_dist import SM3

    torch.manual_seed(0)
    model = ExactNet()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(weight_dtype).float())
    opt = SM3(model.parameters(), **HYPER, momentum_dtype=momentum_dtype)
    for step in range(UNIVERSAL_STEPS):
        opt.zero_grad()
        loss_of(model, "exact", step).backward()
        opt.step()
    return model


def _reference_loop(gas=1, dtype=torch.float32, clip=0.0, schedule=None):
    """One process: SM3 on fp32 master weights, the model in ``dtype`` (bf16: cast back after each step)."""
    from sm3_dist import SM3

    torch.manual_seed(0)
    model = Net()
    model.to(dtype)  # DeepSpeed's fp32 master weights start from the rounded low-precision weights
    master = [p.detach().float().requires_grad_(True) for p in model.parameters()]
    opt = SM3(master, **HYPER)
    sched = schedule(opt) if schedule is not None else None
    for step in range(STEPS):
        for p in model.parameters():
            p.grad = None
        for micro in range(gas):
            x, y = _batch(100 * step + micro)
            loss = ((model(x.to(dtype)) - y.to(dtype)) ** 2).mean()
            (loss / gas).backward()
        for m, p in zip(master, model.parameters()):
            m.grad = p.grad.float()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(master, clip)
        opt.step()
        if sched is not None:
            sched.step()
        with torch.no_grad():
            for m, p in zip(master, model.parameters()):
                p.copy_(m)
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, [m.detach() for m in master])), opt


# ---------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "extra", "wrapper"), BF16, ids=[f"zero{s}" for s, _, _ in BF16])
def test_bf16_matches_fp32_master_weights(world2, stage, extra, wrapper):
    results = _pick(world2[1], f"bf16-zero{stage}")
    expected, _ = _reference_loop(dtype=torch.bfloat16)
    assert all(r["wrapper"] == wrapper for r in results)
    # The engine holds bf16 weights: compare them with the reference's fp32 master weights rounded to bf16.
    _compare(results, {n: v.to(torch.bfloat16).float() for n, v in expected.items()})


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GAS))
def test_gradient_accumulation_steps(world2, name):
    expected, _ = _reference_loop(gas=2)
    _compare(_pick(world2[1], f"gas-{name}"), expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OFFLOAD))
def test_offload_optimizer_cpu_keeps_sm3(world2, name):
    expected, _ = _reference_loop()
    _compare(_pick(world2[1], f"offload-{name}"), expected)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_gradient_clipping(world2, stage):
    """DeepSpeed sums the squared norm in fp64 (ZeRO) and divides by ``norm + 1e-6``: close, not bitwise."""
    expected, _ = _reference_loop(clip=CLIP)
    unclipped, _ = _reference_loop()
    assert any(not torch.allclose(expected[n], unclipped[n]) for n in expected), "clipping never engaged"
    _compare(_pick(world2[1], f"clip-zero{stage}"), expected, exact=False, atol=1e-5)


@pytest.mark.slow
def test_scheduler_entry_warmup_cooldown(world2):
    from sm3_dist.schedules import warmup_cooldown

    results = _pick(world2[1], "scheduler")
    expected, ref = _reference_loop(schedule=lambda opt: warmup_cooldown(opt, STEPS, warmup_fraction=0.5))
    assert results[0]["scheduler"] == "LambdaLR"
    assert results[0]["lr"] == [g["lr"] for g in ref.param_groups]
    _compare(results, expected)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_checkpoint_round_trip_resumes_identically(world2, stage):
    expected, _ = _reference_loop()
    for result in _pick(world2[1], f"checkpoint-zero{stage}"):
        for name in result["straight"]:
            assert torch.equal(result["straight"][name], result["resumed"][name]), name
            assert torch.equal(result["straight"][name], expected[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("name", list(UNIVERSAL))
def test_universal_checkpoint_resumes_at_another_world_size(world2, world3, name):
    """Saved at 2 ranks, converted with ``to_universal``, loaded at 3: bitwise the uninterrupted 2-rank run and
    single-process SM3 (the accumulators, momentum, its dtype and the step count all carried over)."""
    _, params, extra = UNIVERSAL[name]
    momentum_dtype = torch.bfloat16 if params else torch.float32
    weight_dtype = torch.bfloat16 if extra else torch.float32
    model = _exact_reference(momentum_dtype, weight_dtype)
    straight = _pick(world2[1], f"universal-{name}")
    resumed = _pick(world3, f"universal-{name}")
    assert len(resumed) == 3
    for result in resumed:
        assert result["momentum_dtypes"] == [str(momentum_dtype)]
        assert result["steps"] == [float(UNIVERSAL_STEPS)]
    for result in [*straight, *resumed]:
        for n, p in model.named_parameters():
            assert result["params"][n].dtype == weight_dtype
            assert torch.equal(result["params"][n], p.detach().to(weight_dtype)), n


@pytest.mark.slow
def test_universal_checkpoint_without_accumulators_raises(world3):
    for result in _pick(world3, "no-accumulators"):
        assert "no SM3 accumulators" in result["error_message"]
        assert "to_universal" in result["error_message"]


@pytest.mark.slow
def test_universal_checkpoint_momentum_dtype_is_checked(world3):
    for result in _pick(world3, "momentum-dtype"):
        assert (
            "momentum is torch.bfloat16 but this optimizer has momentum_dtype=torch.float32" in result["error_message"]
        )


@pytest.mark.slow
def test_deepspeeds_own_converter_stops_on_sm3_state(world2, tmp_path):
    """DeepSpeed's ``ds_to_universal`` reads Adam's keys by name: on SM3 state it fails loudly."""
    from deepspeed.checkpoint.ds_to_universal import main

    root, _ = world2
    args = argparse.Namespace(
        input_folder=os.path.join(root, "universal-zero2", "half"),
        output_folder=str(tmp_path / "out"),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with pytest.raises(KeyError, match="exp_avg"):
        main(args)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == [], f"ds_to_universal wrote {written} before it stopped"


@pytest.mark.slow
def test_to_universal_refuses_what_it_cannot_convert(world2, tmp_path):
    from sm3_dist.integrations.deepspeed import LAYOUT_KEY, to_universal

    root, _ = world2
    with pytest.raises(FileNotFoundError, match="no ZeRO optimizer state files"):
        to_universal(str(tmp_path), str(tmp_path / "out"))
    foreign = tmp_path / "foreign"
    shutil.copytree(os.path.join(root, "universal-zero2", "half"), foreign)
    path = foreign / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    sd = torch.load(path, weights_only=False)
    del sd["optimizer_state_dict"]["base_optimizer_state"][LAYOUT_KEY]
    torch.save(sd, path)
    with pytest.raises(
        ValueError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: the optimizer state was not saved"
    ):
        to_universal(str(foreign), str(tmp_path / "out"))
    # round-robin gradients: DeepSpeed 0.19's partition map is wrong, its universal checkpoint would be too
    _pick(world2[1], "universal-round-robin")
    with pytest.raises(ValueError, match=r"disagrees with SM3's layout .* round_robin_gradients"):
        to_universal(os.path.join(root, "universal-round-robin", "half"), str(tmp_path / "out"))


@pytest.mark.slow
def test_accelerate_offload_keeps_sm3_only_with_the_flag(world2):
    """``zero_force_ds_cpu_optimizer: false`` keeps a client SM3 under offload (and it trains exactly);
    without it, or with true, accelerate swaps in DeepSpeedCPUAdam and ``check_engine`` says so."""
    expected, _ = _reference_loop()
    for rank, result in enumerate(_pick(world2[1], "accelerate")):
        for case in ("client-flag-false", "config-flag-missing"):
            assert result[case]["base"] == "DeepSpeedSM3", (rank, case)
            assert result[case]["error"] is None
            for name, value in result[case]["params"].items():
                assert torch.equal(value, expected[name]), (rank, case, name)
        for case in ("client-flag-missing", "client-flag-true"):
            assert result[case]["base"] == "DeepSpeedCPUAdam", (rank, case)
            assert "DeepSpeedCPUAdam, not SM3" in result[case]["error"]
            assert '"zero_force_ds_cpu_optimizer": false' in result[case]["error"]


@pytest.mark.slow
@pytest.mark.parametrize("name", LAUNCH_JSONS)
def test_shipped_config_builds_sm3(world2, name):
    """Every ``launch/deepspeed/*.json`` builds DeepSpeedSM3 at its ZeRO stage and trains (fp16: where supported)."""
    import json

    with open(os.path.join(os.path.dirname(__file__), "..", "launch", "deepspeed", name)) as f:
        config = json.load(f)
    params = config["optimizer"]["params"]
    results = _pick(world2[1], f"json-{name}")
    skipped = [result["skipped"] for result in results if "skipped" in result]
    if skipped:  # reported as a skip with its reason, never a silent pass
        assert config.get("fp16", {}).get("enabled") and len(skipped) == len(results), skipped
        pytest.skip(f"{name}: {skipped[0]}")
    for result in results:
        assert result["stage"] == config["zero_optimization"]["stage"]
        assert result["momentum_dtype"] == (
            torch.bfloat16 if params.get("momentum_dtype") == "bfloat16" else torch.float32
        )
        assert result["nonfinite"] == params.get("nonfinite", "skip")
        assert result["offload"] == ("offload_optimizer" in config["zero_optimization"])
        assert result["finite"]
