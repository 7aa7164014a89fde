"""DeepSpeed paths beyond fp32 ZeRO: bf16, gradient accumulation, clipping, CPU offload, checkpoints, schedules.

As in ``test_deepspeed.py`` every rank gets the same micro-batches, so
DeepSpeed's gradient averaging over 2 ranks is exact and the runs are compared
with ``torch.equal`` to one process, except where noted (gradient clipping:
DeepSpeed computes the global norm in its own order and precision).
"""

from __future__ import annotations

import pytest
import torch

from tests.spawn import run_distributed
from tests.test_deepspeed import ENV, HYPER, Net, _batch, _config, _full_params

deepspeed = pytest.importorskip("deepspeed")

STEPS = 6


def _loop(engine, steps, gas, dtype, start=0):
    for step in range(start, steps):
        for micro in range(gas):
            x, y = _batch(100 * step + micro)
            loss = ((engine(x.to(dtype)) - y.to(dtype)) ** 2).mean()
            engine.backward(loss)
            engine.step()


def _engine(stage, extra):
    import sm3_dist.integrations.deepspeed  # noqa: F401

    torch.manual_seed(0)
    model = Net()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=_config(stage, **extra)
    )
    return engine, scheduler


def _train(rank, world, stage, extra, gas, dtype):
    engine, scheduler = _engine(stage, extra)
    _loop(engine, STEPS, gas, dtype)
    base = engine.basic_optimizer
    base._wait_for_maxima()
    return dict(
        params={n: p.float() for n, p in _full_params(engine).items()},
        wrapper=type(engine.optimizer).__name__,
        base=type(base).__name__,
        scheduler=type(scheduler).__name__ if scheduler is not None else None,
        lr=[g["lr"] for g in base.param_groups],
        skipped=engine.skipped_steps,
    )


def _reference(gas=1, dtype=torch.float32, clip=0.0, schedule=None):
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


def _compare(results, expected, exact=True, atol=0.0):
    for rank, result in enumerate(results):
        assert result["base"] == "DeepSpeedSM3"
        for name, value in result["params"].items():
            if exact:
                assert torch.equal(value, expected[name]), f"rank {rank}: {name}"
            else:
                torch.testing.assert_close(value, expected[name], rtol=0, atol=atol)


BF16 = [
    (0, {}, "FP16_UnfusedOptimizer"),
    (1, {"data_types": {"grad_accum_dtype": "fp32"}}, "BF16_Optimizer"),
    (2, {}, "DeepSpeedZeroOptimizer"),
    (3, {}, "DeepSpeedZeroOptimizer_Stage3"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "extra", "wrapper"), BF16, ids=[f"zero{s}" for s, _, _ in BF16])
def test_bf16_matches_fp32_master_weights(stage, extra, wrapper):
    results = run_distributed(_train, 2, stage, {"bf16": {"enabled": True}, **extra}, 1, torch.bfloat16, env=ENV)
    expected, _ = _reference(dtype=torch.bfloat16)
    assert all(r["wrapper"] == wrapper for r in results)
    # The engine holds bf16 weights: compare them with the reference's fp32 master weights rounded to bf16.
    _compare(results, {n: v.to(torch.bfloat16).float() for n, v in expected.items()})


GAS = [(0, {}), (2, {}), (3, {}), (2, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "extra"), GAS, ids=["zero0", "zero2", "zero3", "zero2-offload"])
def test_gradient_accumulation_steps(stage, extra):
    results = run_distributed(_train, 2, stage, {"gradient_accumulation_steps": 2, **extra}, 2, torch.float32, env=ENV)
    expected, _ = _reference(gas=2)
    _compare(results, expected)


OFFLOAD = [(2, {"offload_optimizer": {"device": "cpu"}}), (3, {"offload_optimizer": {"device": "cpu"}})]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "zero"), OFFLOAD, ids=["zero2", "zero3"])
def test_offload_optimizer_cpu_keeps_sm3(stage, zero):
    extra = {"zero_optimization": zero, "zero_force_ds_cpu_optimizer": False}
    results = run_distributed(_train, 2, stage, extra, 1, torch.float32, env=ENV)
    expected, _ = _reference()
    _compare(results, expected)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_gradient_clipping(stage):
    """DeepSpeed sums the squared norm in fp64 (ZeRO) and divides by ``norm + 1e-6``: close, not bitwise."""
    results = run_distributed(_train, 2, stage, {"gradient_clipping": 0.05}, 1, torch.float32, env=ENV)
    expected, _ = _reference(clip=0.05)
    unclipped, _ = _reference()
    assert any(not torch.allclose(expected[n], unclipped[n]) for n in expected), "clipping never engaged"
    _compare(results, expected, exact=False, atol=1e-5)


@pytest.mark.slow
def test_scheduler_entry_warmup_cooldown():
    from sm3_dist.schedules import warmup_cooldown

    scheduler = {"type": "SM3WarmupCooldown", "params": {"total_steps": STEPS, "warmup_fraction": 0.5}}
    results = run_distributed(_train, 2, 2, {"scheduler": scheduler}, 1, torch.float32, env=ENV)
    expected, ref = _reference(schedule=lambda opt: warmup_cooldown(opt, STEPS, warmup_fraction=0.5))
    assert results[0]["scheduler"] == "LambdaLR"
    assert results[0]["lr"] == [g["lr"] for g in ref.param_groups]
    _compare(results, expected)


def _checkpoint(rank, world, stage, path):
    engine, _ = _engine(stage, {})
    _loop(engine, STEPS // 2, 1, torch.float32)
    engine.save_checkpoint(path, tag="half")
    _loop(engine, STEPS, 1, torch.float32, start=STEPS // 2)
    straight = _full_params(engine)
    resumed, _ = _engine(stage, {})
    resumed.load_checkpoint(path, tag="half")
    _loop(resumed, STEPS, 1, torch.float32, start=STEPS // 2)
    return straight, _full_params(resumed)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_checkpoint_round_trip_resumes_identically(stage, tmp_path):
    results = run_distributed(_checkpoint, 2, stage, str(tmp_path), env=ENV)
    expected, _ = _reference()
    for straight, resumed in results:
        for name in straight:
            assert torch.equal(straight[name], resumed[name]), name
            assert torch.equal(straight[name], expected[name]), name
