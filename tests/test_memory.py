"""``sm3-dist memory``: the model's bytes against real optimizers, the storages autograd keeps and whole steps."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import pytest
import torch
from sm3_dist.tools import memory
from sm3_dist.tools.memory import activations, cuda, measure, saved, step
from sm3_dist.tools.memory.activations import ActivationModel, activation_bytes, activation_bytes_per_token
from sm3_dist.tools.memory.measure import make_optimizer, measure_optimizer_state, measure_sm3_on_layouts
from sm3_dist.tools.memory.model import (
    GIB,
    OPTIMIZERS,
    SIZES,
    ZERO_ALIGNMENT,
    rank_counts,
    rank_memory,
    resolve_size,
    state_bytes,
)

from sm3_dist import local_state_bytes
from tests.common import run_distributed

TINY = SIZES["tiny"]
SM3_VARIANTS = [o for o in OPTIMIZERS if o.startswith("sm3")]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("size", ["124M", "355M", "774M", "1.5B"])
def test_shapes_match_transformers_gpt2_on_meta(size):
    transformers = pytest.importorskip("transformers")
    config = SIZES[size]
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head)
        )
    got = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    assert got == list(config.param_shapes())
    assert config.numel == sum(p.numel() for p in model.parameters())


def test_named_sizes_and_custom():
    assert resolve_size("gpt2-xl") is SIZES["1.5B"]
    assert resolve_size("124m") is SIZES["124M"]
    custom = resolve_size("32x2560")
    assert (custom.n_layer, custom.n_embd, custom.n_head) == (32, 2560, 40)


# ------------------------------------------------------------------ single process: every optimizer


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_single_process_state_matches_model(optimizer):
    predicted = state_bytes(optimizer, rank_counts(TINY, "ddp", 1)[0])
    assert measure_optimizer_state(TINY, optimizer) == predicted


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam", "adafactor", "sm3-bf16-momentum"])
def test_gpt2_124m_state_matches_model(optimizer):
    config = SIZES["124M"]
    predicted = state_bytes(optimizer, rank_counts(config, "ddp", 1)[0])
    assert measure_optimizer_state(config, optimizer) == predicted


# ------------------------------------------------------------------ sharded layouts, one process


@pytest.mark.parametrize("setup", ["ddp-sharded", "zero1", "zero2", "zero3", "fsdp2"])
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("optimizer", [*SM3_VARIANTS, "adam"])
def test_sm3_state_on_each_ranks_layout_matches_model(setup, world, optimizer):
    predicted = rank_counts(TINY, setup, world)
    for rank in range(world):
        measured = measure_sm3_on_layouts(TINY, setup, world, rank, optimizer)
        assert measured == state_bytes(optimizer, predicted[rank]), (setup, world, rank)


def test_flat_partitions_cut_weights_mid_row():
    """The tiny config's ZeRO/ShardedSM3 slices straddle weights, so the touched-range geometry is exercised."""
    full = rank_counts(TINY, "ddp", 1)[0].sm3_accumulators
    for setup in ("ddp-sharded", "zero1"):
        touched = [c.sm3_accumulators for c in rank_counts(TINY, setup, 3)]
        assert sum(touched) > full  # a straddled dimension's entries are stored on two ranks


# ------------------------------------------------------------------ multi-process: ShardedSM3, FSDP2, DeepSpeed


def _params(config):
    return measure.params_with_grads(shape for _, shape in config.param_shapes())


def _sharded_sm3(rank, world):
    from sm3_dist import ShardedSM3

    out = {}
    for name in SM3_VARIANTS:
        opt = ShardedSM3(_params(TINY), **measure.sm3_kwargs(name))
        opt.step()
        opt.state_dict()
        out[name] = local_state_bytes(opt)
    return out


class _Params(torch.nn.Module):
    """The config's parameters as one module per block, registered in GPT-2's order; a trivial forward."""

    def __init__(self, config) -> None:
        super().__init__()
        self.tensors = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(shape) * 0.02) for _, shape in config.param_shapes()]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((p.float() ** 2).sum() for p in self.tensors) * x.mean()


def _fsdp2(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sm3_dist import SM3

    torch.manual_seed(0)
    out = {}
    mesh = init_device_mesh("cpu", (world,))
    for name in [*SM3_VARIANTS, "adam", "adafactor"]:
        model = _Params(TINY)
        fully_shard(model, mesh=mesh)
        model(torch.ones(2)).backward()
        params = list(model.parameters())
        if name.startswith("sm3"):
            opt = SM3(params, **measure.sm3_kwargs(name))
        else:
            opt = make_optimizer(name, params)
        if name == "adafactor":
            # torch 2.13's Adafactor allocates its state, then fails on the DTensor math; the bytes are still real
            with pytest.raises(RuntimeError, match="placement"):
                opt.step()
        else:
            opt.step()
        if name.startswith("sm3"):
            opt.state_dict()
        out[name] = local_state_bytes(opt)
    return out


MEASURED = {"ddp-sharded": _sharded_sm3, "fsdp2": _fsdp2}
"""Per setup of the model, the worker that measures each optimizer's real state bytes on every rank."""


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("setup", list(MEASURED))
def test_measured_state_matches_model(setup, world):
    predicted = rank_counts(TINY, setup, world)
    for rank, measured in enumerate(run_distributed(MEASURED[setup], world)):
        for name, value in measured.items():
            assert value == state_bytes(name, predicted[rank]), (setup, rank, name)


def _deepspeed(rank, world, stage, name):
    import deepspeed
    import sm3_dist.integrations.deepspeed  # noqa: F401  (registers "SM3")

    torch.manual_seed(0)
    model = _Params(TINY)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
    }
    if name.startswith("sm3"):
        kwargs = measure.sm3_kwargs(name)
        kwargs.pop("momentum_dtype", None)
        config["optimizer"] = {"type": "SM3", "params": kwargs}
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    engine.backward(engine(torch.ones(2)))
    engine.step()
    base = engine.basic_optimizer
    if name.startswith("sm3"):
        base._wait_for_maxima()  # the step's all-reduce of maxima (ZeRO-3 empties param_groups between steps)
    return local_state_bytes(base)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("name", ["sm3-momentum", "adam"])
def test_deepspeed_engine_state_matches_model(stage, name):
    pytest.importorskip("deepspeed")
    world = 2
    predicted = rank_counts(TINY, f"zero{stage}", world)
    measured = run_distributed(_deepspeed, world, stage, name, env={"DS_ACCELERATOR": "cpu"})
    assert measured == [state_bytes(name, c) for c in predicted]


# ------------------------------------------------------------------ the model's arithmetic


def test_adam_matches_the_zero_paper_formulas():
    """Rajbhandari et al. 2020: (2 + 2 + 12)P, 4P + 12P/N, 2P + 14P/N for Adam in mixed precision."""
    config, n = SIZES["1.5B"], 8
    p = config.numel
    expected = {"ddp": 16 * p, "zero1": 4 * p + 12 * p / n, "zero2": 2 * p + 14 * p / n}
    for setup, value in expected.items():
        got = rank_memory(config, setup, n, "adam", "bf16-mixed").total
        assert math.isclose(got, value, rel_tol=1e-6), setup


@pytest.mark.parametrize("setup", ["ddp-sharded", "zero1", "zero2", "zero3", "fsdp2"])
@pytest.mark.parametrize("world", [1, 2, 8, 64, 1024])
def test_owned_elements_cover_the_model(setup, world):
    config = SIZES["124M"]
    owned = sum(c.owned for c in rank_counts(config, setup, world))
    assert config.numel <= owned <= config.numel + world * (len(config.param_shapes()) + ZERO_ALIGNMENT)


def test_sm3_state_under_sharding_is_far_below_adam():
    config = SIZES["1.5B"]
    for setup in ("ddp-sharded", "zero1", "zero2", "zero3", "fsdp2"):
        adam = rank_memory(config, setup, 8, "adam", "bf16-mixed").state
        sm3 = rank_memory(config, setup, 8, "sm3", "bf16-mixed").state
        assert sm3 < adam / 100, setup
    # per-parameter sharding (ZeRO-3, FSDP2): every rank keeps each weight's trailing-dim accumulator whole,
    # so SM3's per-rank state stops shrinking at O(sum of trailing dims), a few MiB for GPT-2 1.5B
    for setup in ("zero3", "fsdp2"):
        assert rank_memory(config, setup, 1024, "sm3", "bf16-mixed").state < 3 * 2**20


def test_activation_formula_is_korthikanti_for_eager_attention():
    """34h + 5as bytes per token per layer with 16-bit activations, eager attention, dropout and a fused GELU
    (plus the LayerNorm statistics, 4 per LayerNorm); transformers' gelu_new keeps 24h more."""
    config = SIZES["1.5B"]
    h, a, s = config.n_embd, config.n_head, 1024
    fused = ActivationModel(seq_len=s, checkpointing=False, attention="eager", dropout=True, fused_gelu=True)
    layer = sum(v for _, v in activations._layer_terms(config, fused, "bf16-mixed"))
    assert layer == 34 * h + 5 * a * s + 8
    gelu_new = ActivationModel(seq_len=s, checkpointing=False, attention="eager", dropout=True)
    assert sum(v for _, v in activations._layer_terms(config, gelu_new, "bf16-mixed")) == layer + 24 * h
    kept = activation_bytes(config, fused, "bf16-mixed")
    outside = 8 * (s + 1) / s + 8 + h + (2 * h + 4 + 2 * h) + 4 * config.vocab_size
    assert kept.per_sample == round(s * (config.n_layer * layer + outside))
    # the backward's transient gradients: the loss's (fp32 log-softmax output and input, bf16 logits) at its start
    assert kept.loss_grad_per_sample == s * config.vocab_size * 10
    assert activation_bytes_per_token(config, fused, "bf16-mixed") == round(
        config.n_layer * layer + outside + 10 * config.vocab_size
    )


def test_checkpointing_and_flash_shrink_activations():
    config = SIZES["1.5B"]
    sizes = [
        activation_bytes_per_token(config, ActivationModel(checkpointing=ck, attention=att))
        for ck, att in ((False, "eager"), (False, "flash"), (True, "flash"))
    ]
    assert sizes[0] > sizes[1] > sizes[2]


BAD_ACTIVATION_MODELS = [
    (dict(attention="xformers"), "unknown attention 'xformers'"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(seq_len=0), "seq_len must be >= 1"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ACTIVATION_MODELS)
def test_bad_activation_model_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ActivationModel(**kwargs)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        activation_bytes(SIZES["tiny"], ActivationModel(), "fp16")


def test_max_micro_batch_grows_with_budget_and_sm3():
    config, act = SIZES["1.5B"], ActivationModel()
    adam = [activations.max_micro_batch(config, "zero1", 8, "adam", b * GIB, act) for b in (16, 40, 80)]
    sm3 = [activations.max_micro_batch(config, "zero1", 8, "sm3", b * GIB, act) for b in (16, 40, 80)]
    assert adam == sorted(adam) and all(s >= a for s, a in zip(sm3, adam))
    assert activations.max_micro_batch(config, "ddp", 1, "adam", 16 * GIB, act) == -1


# ------------------------------------------------------------------ the command


def test_command_writes_tables_and_valid_pngs(tmp_path, capsys):
    out = tmp_path / "out"
    rc = memory.main(
        ["--sizes", "tiny", "--world-sizes", "1,2,4", "--budgets", "1,4", "--measure", "tiny", "--out", str(out)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Validation" in printed and "MISMATCH" not in printed
    assert "activation bytes" in printed and "whole training steps" in printed
    for name in (
        "memory.csv",
        "fit.csv",
        "largest-model.csv",
        "validation.csv",
        "activation-validation.csv",
        "step-validation.csv",
        "memory.json",
    ):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "memory.json").read_text())
    assert result["activation_validation"] and all(r["ok"] for r in result["activation_validation"])
    assert result["step_validation"] and all(r["ok"] for r in result["step_validation"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["max-params.png", "memory-tiny.png"]
    for name in pngs:
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(os.fspath(path))
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_command_fails_naming_each_measurement_that_disagrees_beyond_its_tolerance(tmp_path, capsys, monkeypatch):
    """One measurement of each kind made to disagree with the model (the optimizer state 10% above it, an
    activation and a whole-step peak twice what was measured): exit 1, each named under FAILED. With tolerances
    above those errors the same run passes, so the tolerances are what decides."""
    from sm3_dist.tools.memory.measure import Check

    def state_validation(level, optimizers):  # the real one spawns ShardedSM3 on 2 processes: one check will do
        return [Check(what="tiny single-process sm3 (measured 10% above the model)", predicted=1000, measured=1100)]

    def inflated(fn, scale):
        done = {}  # measured once: the second run below reuses it

        def measured(*args, **kwargs):
            key = repr((args, kwargs))
            if key not in done:
                done[key] = fn(*args, **kwargs)
            out = done[key]
            return (out[0] * scale, out[1]) if isinstance(out, tuple) else out * scale

        return measured

    monkeypatch.setattr(measure, "validate", state_validation)
    monkeypatch.setattr(saved, "QUICK_ACTIVATION_TABLE", saved.QUICK_ACTIVATION_TABLE[:1])
    monkeypatch.setattr(saved, "measure_activations", inflated(saved.measure_activations, 2))
    monkeypatch.setattr(step, "QUICK_STEP_TABLE", step.QUICK_STEP_TABLE[:1])
    monkeypatch.setattr(step, "measure_step_cpu", inflated(step.measure_step_cpu, 2))
    argv = ["--sizes", "tiny", "--world-sizes", "2", "--budgets", "1", "--measure", "tiny", "--no-plots"]

    assert memory.main([*argv, "--out", str(tmp_path / "strict")]) == 1
    printed = capsys.readouterr().out
    failed = printed[printed.index("FAILED: 3 measurement(s) disagree with the model beyond their tolerance:") :]
    lines = failed.splitlines()[1:]
    assert len(lines) == 3, failed
    assert lines[0].strip() == "optimizer state: tiny single-process sm3 (measured 10% above the model)"
    case = saved.QUICK_ACTIVATION_TABLE[0]
    assert lines[1].strip().startswith(f"activations: ['{case.n_layer}x{case.n_embd}', {case.seq_len}, {case.batch}")
    case = step.QUICK_STEP_TABLE[0]
    assert lines[2].strip().startswith(f"whole step: ['{case.n_layer}x{case.n_embd}', '{case.seq_len} x {case.batch}'")
    result = json.loads((tmp_path / "strict" / "memory.json").read_text())
    assert [r["ok"] for r in result["activation_validation"] + result["step_validation"]] == [False, False]

    loose = ["--tolerance", "0.2", "--activation-tolerance", "0.6", "--step-tolerance", "0.6"]
    assert memory.main([*argv, *loose, "--out", str(tmp_path / "loose")]) == 0
    assert "FAILED" not in capsys.readouterr().out


BAD_INPUTS = [
    (["--sizes", "7B-please"], "unknown model size '7B-please'"),
    (["--setups", "zero4"], "unknown setup 'zero4'"),
    (["--optimizers", "lion"], "unknown optimizer 'lion'"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--world-sizes", "0"], "world sizes must be integers >= 1"),
    (["--sizes", "1.5B", "--world-sizes", "1,8", "--budgets", "0.3"], "smaller than the parameters alone"),
    (["--budgets", "-3"], "budgets must be positive"),
    (["--activation-tolerance", "0"], "--activation-tolerance must be positive"),
    (["--precision", "fp32,bf16"], "unknown precision 'bf16'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS)
def test_bad_input_exits_2_with_a_clear_message(argv, message, tmp_path, capsys):
    rc = memory.main([*argv, "--measure", "none", "--no-plots", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ activations measured (the storages autograd keeps)


def test_saved_storages_count_aliases_once_and_only_live_ones():
    x = torch.randn(4, 6, requires_grad=True)
    with saved.SavedStorages() as counted:
        qkv = x * 2  # saves nothing (a scalar factor)
        q, k, v = qkv.split(2, dim=1)
        y = (q * k).sum()  # saves q and k: two views of one storage of 4 x 6 floats
        z = x.exp()  # saves its result
        dropped = z.sin()  # saves z (already counted)
        del dropped
    assert counted.live == 4 * 6 * 4 + 4 * 6 * 4
    del y, q, k, v, qkv
    assert counted.live == 4 * 6 * 4  # q and k freed with their graph
    w = torch.randn(3, requires_grad=True)
    with saved.SavedStorages(exclude=[w]) as only_inputs:
        out = (w * torch.randn(3)).sum()
    assert only_inputs.live == 3 * 4 and out.requires_grad  # the parameter left out, the other factor counted


@pytest.mark.parametrize(
    "case",
    saved.QUICK_ACTIVATION_TABLE,
    ids=lambda c: (
        f"{c.config.name}-s{c.seq_len}-"
        f"{c.precision}-{'ckpt' if c.checkpointing else 'full'}-{c.attention}{'-dropout' * c.dropout}"
    ),
)
def test_activation_model_matches_saved_storages(case):
    if case.precision != "fp32" and not saved.autocast_supported("cpu"):
        pytest.skip("this CPU's autocast does not run bf16")
    (check,) = saved.validate_activations([case])
    assert check.ok(0.05), check.row()
    if case.checkpointing:
        assert 0 < check.measured_recompute == check.predicted_recompute


def test_activation_checks_cover_three_sizes_two_lengths_checkpointing_and_precisions():
    table = saved.ACTIVATION_TABLE
    assert len({c.config.name for c in table}) >= 3 and len({c.seq_len for c in table}) >= 2
    assert {c.checkpointing for c in table} == {False, True}
    assert {c.precision for c in table} == {"fp32", "bf16-mixed", "bf16-autocast"}


def test_checkpoint_blocks_keeps_results_and_saves_memory():
    from sm3_dist.launch.model import build_model, checkpoint_blocks

    windows = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    results = []
    for ckpt in (False, True):
        model = build_model("tiny", n_positions=32).train()
        if ckpt:
            checkpoint_blocks(model)
        with saved.SavedStorages(exclude=list(model.parameters())) as kept:
            loss = saved.training_loss(model, windows, "fp32")
        held = kept.live
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()], held))
    (loss0, grads0, kept0), (loss1, grads1, kept1) = results
    assert torch.equal(loss0, loss1)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads0, grads1))
    assert kept1 < kept0 / 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(dropout=1.0), "dropout must be in"), (dict(attention="flash3"), "unknown attention"), (dict(), None)],
)
def test_build_model_options(kwargs, message):
    from sm3_dist.launch.model import build_model

    if message:
        with pytest.raises(ValueError, match=message):
            build_model("tiny", n_positions=16, **kwargs)
    else:
        assert build_model("tiny", n_positions=16).config.use_cache is False


# ------------------------------------------------------------------ whole steps


@pytest.mark.parametrize("case", step.QUICK_STEP_TABLE, ids=lambda c: c.optimizer)
def test_step_peak_on_cpu_matches_prediction(case):
    measured = step.measure_step_cpu(case)
    predicted = step.predict_step(case, "cpu")
    assert abs(predicted.peak - measured) / measured < 0.05, (predicted, measured)
    # the measurement is the allocator's: more than the states and the activations alone
    assert measured > predicted.params + predicted.state + predicted.activations


def test_step_prediction_phases():
    base = step.StepCase(n_layer=6, n_embd=384, n_head=6, seq_len=64, batch=1)
    adamw, sm3 = (step.predict_step(replace(base, optimizer=o)) for o in ("adamw", "sm3"))
    assert adamw.peak == adamw.optimizer_step == 5 * adamw.params  # params, grads, exp_avg, exp_avg_sq, sqrt(v)
    assert sm3.state < sm3.params / 100 and sm3.peak < adamw.peak / 2
    wide = step.predict_step(step.StepCase(n_layer=2, n_embd=128, n_head=4, seq_len=256, batch=64))
    assert wide.peak == max(wide.backward_start, wide.block_backward) > wide.optimizer_step


@pytest.mark.parametrize(
    ("threshold", "start", "limit", "expected"),
    [(0, 1, 100, 0), (1, 1, 100, 1), (7, 1, 100, 7), (8, 1, 100, 8), (9, 1, 100, 9), (1000, 1, 100, 100),
     (64, 1, 64, 64), (37, 5, 4096, 37), (4, 5, 10, 4)],
)  # fmt: skip
def test_largest_fitting_finds_the_threshold(threshold, start, limit, expected):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= threshold

    assert step.largest_fitting(fits, start=start, limit=limit) == expected
    assert len(calls) <= 2 * math.log2(max(limit, 2)) + 2
    assert all(start <= n <= limit for n in calls)


def test_largest_fitting_refuses_bad_bounds():
    with pytest.raises(ValueError, match="need 1 <= start <= limit"):
        step.largest_fitting(lambda n: True, start=0)
    with pytest.raises(ValueError, match="need 1 <= start <= limit"):
        step.largest_fitting(lambda n: True, start=8, limit=4)


def test_cuda_study_path_on_cpu(tmp_path):
    """The --measure-cuda path end to end on CPU: allocator peaks, searches against a budget predicate."""
    cases = step.QUICK_STEP_TABLE
    budget = 64 * 2**20
    search_base = step.StepCase(n_layer=2, n_embd=128, n_head=4, seq_len=64, batch=1)

    def fits(case):  # what a device with 10% less room than the model thinks would allow
        return step.predict_step(case, "cpu").peak <= 0.9 * budget

    searches = (("micro-batch", search_base, "batch", 4096), ("depth", search_base, "n_layer", 256))
    rc = cuda.run_cuda_study(
        str(tmp_path), budget_gib=budget / 2**30, device="cpu", peak_cases=cases, search_cases=searches,
        measure=step.measure_step_cpu, fits=fits,
    )  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "cuda-memory.json").read_text())
    assert [p["optimizer"] for p in result["peaks"]] == [c.optimizer for c in cases]
    assert all(abs(p["rel_error"]) < 0.05 for p in result["peaks"])
    by = {(s["search"], s["optimizer"]): s for s in result["searches"]}
    for what in ("micro-batch", "depth"):
        for o in ("adamw", "sm3"):
            s = by[what, o]
            assert 1 <= s["measured"] <= s["predicted"]
        assert by[what, "sm3"]["predicted"] > by[what, "adamw"]["predicted"]
    text = (tmp_path / "cuda-memory.md").read_text()
    assert "| micro-batch of 2x128" in text and "SM3 / AdamW" in text


def test_measure_cuda_without_a_device_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = memory.main(["--measure-cuda", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "--measure-cuda needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_matches_prediction():
    case = step.StepCase(n_layer=4, n_embd=256, n_head=4, seq_len=128, batch=8, optimizer="sm3")
    measured = step.measure_step_cuda(case)
    assert abs(step.predict_step(case, "cuda").peak - measured) / measured < 0.10
    assert cuda.fits_cuda(case)
