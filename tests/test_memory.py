"""``sm3-dist memory``: the model's predicted optimizer-state bytes against real optimizer instances."""

from __future__ import annotations

import math
import os

import pytest
import torch

from sm3_dist import memory
from sm3_dist.memory import (
    GIB,
    OPTIMIZERS,
    SIZES,
    ActivationModel,
    activation_bytes_per_token,
    measure_optimizer_state,
    measure_sm3_on_layouts,
    optimizer_state_bytes,
    rank_counts,
    rank_memory,
    resolve_size,
    state_bytes,
)
from tests.spawn import run_distributed

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
    return memory._params_with_grads(shape for _, shape in config.param_shapes())


def _sharded_sm3(rank, world):
    from sm3_dist import ShardedSM3

    out = {}
    for name in SM3_VARIANTS:
        opt = ShardedSM3(_params(TINY), **memory._sm3_kwargs(name))
        opt.step()
        opt.state_dict()
        out[name] = optimizer_state_bytes(opt)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_sm3_state_matches_model(world):
    predicted = rank_counts(TINY, "ddp-sharded", world)
    for rank, measured in enumerate(run_distributed(_sharded_sm3, world)):
        for name, value in measured.items():
            assert value == state_bytes(name, predicted[rank]), (rank, name)


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
            opt = SM3(params, **memory._sm3_kwargs(name))
        else:
            opt = memory._make_optimizer(name, params)
        if name == "adafactor":
            # torch 2.13's Adafactor allocates its state, then fails on the DTensor math; the bytes are still real
            with pytest.raises(RuntimeError, match="placement"):
                opt.step()
        else:
            opt.step()
        if name.startswith("sm3"):
            opt.state_dict()
        out[name] = optimizer_state_bytes(opt)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_state_matches_model(world):
    predicted = rank_counts(TINY, "fsdp2", world)
    for rank, measured in enumerate(run_distributed(_fsdp2, world)):
        for name, value in measured.items():
            assert value == state_bytes(name, predicted[rank]), (rank, name)


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
        kwargs = memory._sm3_kwargs(name)
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
    return optimizer_state_bytes(base)


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
    assert config.numel <= owned <= config.numel + world * (len(config.param_shapes()) + memory.ZERO_ALIGNMENT)


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
    """34h + 5as bytes per token per layer with 16-bit activations, eager attention and dropout."""
    config = SIZES["1.5B"]
    act = ActivationModel(seq_len=1024, checkpointing=False, flash_attention=False, dropout=True)
    h, a, s = config.n_embd, config.n_head, 1024
    layer = memory._layer_bytes_per_token(config, act, 2)
    assert layer == 34 * h + 5 * a * s
    total = activation_bytes_per_token(config, act, "bf16-mixed")
    assert total == config.n_layer * layer + (2 * h + h + 4 * h) + config.vocab_size * 10


def test_checkpointing_and_flash_shrink_activations():
    config = SIZES["1.5B"]
    sizes = [
        activation_bytes_per_token(config, ActivationModel(checkpointing=ck, flash_attention=fl))
        for ck, fl in ((False, False), (False, True), (True, True))
    ]
    assert sizes[0] > sizes[1] > sizes[2]


def test_max_micro_batch_grows_with_budget_and_sm3():
    config, act = SIZES["1.5B"], ActivationModel()
    adam = [memory.max_micro_batch(config, "zero1", 8, "adam", b * GIB, act) for b in (16, 40, 80)]
    sm3 = [memory.max_micro_batch(config, "zero1", 8, "sm3", b * GIB, act) for b in (16, 40, 80)]
    assert adam == sorted(adam) and all(s >= a for s, a in zip(sm3, adam))
    assert memory.max_micro_batch(config, "ddp", 1, "adam", 16 * GIB, act) == -1


# ------------------------------------------------------------------ the command


def test_command_writes_tables_and_valid_pngs(tmp_path, capsys):
    out = tmp_path / "out"
    rc = memory.main(
        ["--sizes", "tiny", "--world-sizes", "1,2,4", "--budgets", "1,4", "--measure", "tiny", "--out", str(out)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Validation" in printed and "MISMATCH" not in printed
    for name in ("memory.csv", "fit.csv", "largest-model.csv", "validation.csv", "memory.json"):
        assert (out / name).stat().st_size > 0, name
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


BAD_INPUTS = [
    (["--sizes", "7B-please"], "unknown model size '7B-please'"),
    (["--setups", "zero4"], "unknown setup 'zero4'"),
    (["--optimizers", "lion"], "unknown optimizer 'lion'"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--world-sizes", "0"], "world sizes must be integers >= 1"),
    (["--sizes", "1.5B", "--world-sizes", "1,8", "--budgets", "0.3"], "smaller than the parameters alone"),
    (["--budgets", "-3"], "budgets must be positive"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS)
def test_bad_input_exits_2_with_a_clear_message(argv, message, tmp_path, capsys):
    rc = memory.main([*argv, "--measure", "none", "--no-plots", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
