"""DeepSpeed: ``"type": "SM3"`` in the config, ZeRO stages 0-3 against single-process SM3.

Every rank is fed the same batch, so the gradient DeepSpeed averages over the
data-parallel ranks is the local gradient itself: at world size 2 the average
``(g + g) / 2`` is exact, so the parameters must be ``torch.equal`` to
single-process :class:`sm3_dist.SM3`. At world size 3, ``(g + g + g) / 3``
(or ``g / 3`` summed three times) can round differently from ``g`` in the last
bit, so the comparison there is to 1e-6: that is DeepSpeed's gradient
averaging, not SM3 (the sharded SM3 math is exact at any world size).
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

from tests.spawn import run_distributed

deepspeed = pytest.importorskip("deepspeed")

ENV = {"DS_ACCELERATOR": "cpu"}
os.environ.update(ENV)

HYPER = {"lr": 0.05, "momentum": 0.9}
STEPS = 10
BATCH = 4


class Net(torch.nn.Module):
    """Shapes chosen so that ZeRO partition boundaries cut weights mid-row at world sizes 2 and 3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 7)
        self.mix = torch.nn.Parameter(torch.randn(2, 3, 7) * 0.3)
        self.fc2 = torch.nn.Linear(7, 3)
        self.scale = torch.nn.Parameter(torch.tensor([1.5]))  # 0-dim: DeepSpeed's broadcast rejects it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        h = h + torch.einsum("bk,ijk->bk", h, self.mix) * 0.1
        return self.fc2(h) * self.scale


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 5, generator=gen), torch.randn(BATCH, 3, generator=gen)


def _config(stage: int, **extra) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "SM3", "params": dict(HYPER)},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips to norm 1.0 unless told otherwise
    }
    if stage == 3:
        cfg["zero_optimization"]["sub_group_size"] = 40  # several sub-groups: one optimizer step each
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def _full_params(engine) -> dict[str, torch.Tensor]:
    if engine.zero_optimization_stage() == 3:
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _describe_state(opt) -> list[dict]:
    """Per optimizer tensor: its pieces (tensor_id, shape, ranges, straddle) and its state shapes."""
    out = []
    for p, spec in opt._specs.items():  # ZeRO-3 empties param_groups between steps: walk the resolved tensors
        if p in opt.state:
            pieces = []
            for piece in spec.layout.pieces:
                mid_row = piece.ndim >= 2 and any(
                    b.starts[-1] != 0 or b.lengths[-1] != piece.shape[-1] for b in piece.blocks
                )
                pieces.append(
                    dict(
                        tensor_id=piece.tensor_id,
                        shape=piece.shape,
                        ranges=piece.ranges,
                        numel=piece.numel,
                        mid_row=mid_row,
                        partial=not piece.is_full,
                    )
                )
            out.append(
                dict(
                    numel=p.numel(),
                    pieces=pieces,
                    reduced=spec.group is not None,
                    state={k: (tuple(v.shape), v.clone()) for k, v in opt.state[p].items() if torch.is_tensor(v)},
                )
            )
    return out


def _train(rank, world, stage, extra):
    import sm3_dist.integrations.deepspeed  # noqa: F401  (registers "SM3")

    torch.manual_seed(0)
    model = Net()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=_config(stage, **extra)
    )
    for step in range(STEPS):
        x, y = _batch(step)
        loss = ((engine(x) - y) ** 2).mean()
        engine.backward(loss)
        engine.step()
    base = engine.basic_optimizer
    base._wait_for_maxima()  # the last all-reduce of maxima (ZeRO-3 empties param_groups between steps)
    return dict(
        params=_full_params(engine),
        wrapper=type(engine.optimizer).__name__,
        base=type(base).__name__,
        names=[n for n, p in model.named_parameters()],
        state=_describe_state(base),
    )


def _reference(steps: int = STEPS):
    from sm3_dist import SM3

    torch.manual_seed(0)
    model = Net()
    opt = SM3(model.parameters(), **HYPER)
    for step in range(steps):
        x, y = _batch(step)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    opt.state_dict()
    return model, opt


_RUNS: dict = {}


def _run(stage: int, world: int, **extra):
    key = (stage, world, repr(sorted(extra.items())))
    if key not in _RUNS:
        _RUNS[key] = run_distributed(_train, world, stage, extra, env=ENV)
    return _RUNS[key]


CASES = [(0, 2), (1, 2), (2, 2), (3, 2), (1, 3), (2, 3), (3, 3)]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "world"), CASES, ids=[f"zero{s}-world{w}" for s, w in CASES])
def test_matches_single_process(stage, world):
    results = _run(stage, world)
    model, _ = _reference()
    expected = {n: p.detach() for n, p in model.named_parameters()}
    for rank, result in enumerate(results):
        assert result["base"] == "DeepSpeedSM3"
        assert result["wrapper"] == (
            "DeepSpeedSM3"
            if stage == 0
            else "DeepSpeedZeroOptimizer_Stage3"
            if stage == 3
            else "DeepSpeedZeroOptimizer"
        )
        for name, value in result["params"].items():
            if world == 2:
                assert torch.equal(value, expected[name]), f"rank {rank}: {name} differs"
            else:
                torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "world"), CASES[1:4], ids=[f"zero{s}-world2" for s, _ in CASES[1:4]])
def test_partition_cuts_a_weight_mid_row(stage, world):
    """The exactness above is only meaningful if some partition boundary splits a row of a weight."""
    results = _run(stage, world)
    straddles = [
        piece for result in results for tensor in result["state"] for piece in tensor["pieces"] if piece["mid_row"]
    ]
    assert straddles, "no ZeRO partition boundary cuts a weight mid-row: choose other sizes"


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "world"), CASES[1:], ids=[f"zero{s}-world{w}" for s, w in CASES[1:]])
def test_state_is_local_momentum_plus_touched_accumulators(stage, world):
    """Walk the base optimizer's state on every rank: momentum for the partition, accumulators for touched ranges."""
    from sm3_dist import MOMENTUM_KEY, STEP_KEY, accumulator_key

    results = _run(stage, world)
    _, ref = _reference()
    ref_params = [p for g in ref.param_groups for p in g["params"]]
    shapes = [tuple(p.shape) or (1,) for p in ref_params]
    numel = sum(math.prod(s) for s in shapes)
    touched = [set() for _ in ref_params]
    for rank, result in enumerate(results):
        total_acc, total_momentum = 0, 0
        for tensor in result["state"]:
            assert tensor["reduced"], "a ZeRO partition must reduce its maxima over the data-parallel group"
            several = len(tensor["pieces"]) > 1
            expected_keys = {STEP_KEY, MOMENTUM_KEY}
            for j, piece in enumerate(tensor["pieces"]):
                tid = piece["tensor_id"]
                touched[tid].add(rank)
                assert piece["shape"] == shapes[tid]
                for d, (lo, hi) in enumerate(piece["ranges"]):
                    key = accumulator_key(d, j if several else None)
                    expected_keys.add(key)
                    shape, value = tensor["state"][key]
                    assert shape == (hi - lo,)
                    assert shape[0] <= shapes[tid][d]
                    # the stored entries are exactly the single-process accumulators (world 2: bitwise)
                    ref_acc = ref.state[ref_params[tid]][accumulator_key(d)][lo:hi]
                    if world == 2:
                        assert torch.equal(value, ref_acc)
                    else:
                        torch.testing.assert_close(value, ref_acc, rtol=1e-5, atol=1e-7)
                    total_acc += hi - lo
            assert set(tensor["state"]) == expected_keys
            assert tensor["state"][MOMENTUM_KEY][0] == (tensor["numel"],)
            total_momentum += tensor["numel"]
        # momentum covers only the local partition (padding included), accumulators far below numel
        assert total_momentum <= math.ceil(numel / world) + 16 * len(ref_params)
        assert total_acc < numel // 2
    assert all(touched), "every parameter is held by some rank"


@pytest.mark.slow
def test_zero2_round_robin_gradients_matches():
    """DeepSpeed 0.19's own _hp_mapping is wrong here (parameter order, buffer in round-robin order): SM3 follows
    the buffer, warns, and stays exact."""
    results = _run(2, 2, zero_optimization={"round_robin_gradients": True})
    model, _ = _reference()
    for result in results:
        for name, p in model.named_parameters():
            assert torch.equal(result["params"][name], p.detach()), name


# ---------------------------------------------------------------------- registration and errors


def test_registration_is_explicit_and_idempotent():
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS
    from sm3_dist.integrations import deepspeed as integration

    from sm3_dist import SM3

    integration.register()
    integration.register()
    assert torch.optim.SM3 is integration.DeepSpeedSM3
    assert ZERO_SUPPORTED_OPTIMIZERS.count(integration.DeepSpeedSM3) == 1
    assert SM3 not in ZERO_SUPPORTED_OPTIMIZERS  # plain SM3 would read a flat partition as a vector
    assert torch.optim.lr_scheduler.SM3WarmupCooldown is not None


@pytest.mark.parametrize(
    ("version", "ok"),
    [("0.19.0", True), ("0.19.8", True), ("0.19.9+abc123", True), ("0.18.5", False), ("0.20.0", False), ("1.0", False)],
)
def test_version_guard(version, ok):
    from sm3_dist.integrations.deepspeed import check_deepspeed_version

    if ok:
        assert check_deepspeed_version(version) == version
    else:
        with pytest.raises(ImportError, match=rf"DeepSpeed >=0\.19\.0,<0\.20\.0, found {re.escape(version)}"):
            check_deepspeed_version(version)


def test_deepspeed_sm3_refuses_a_foreign_resolver():
    from sm3_dist.integrations.deepspeed import DeepSpeedSM3

    with pytest.raises(TypeError, match="its own shard_resolver"):
        DeepSpeedSM3([torch.nn.Parameter(torch.ones(2))], shard_resolver=lambda t: None)


def _corrupted(rank, world, how):
    import sm3_dist.integrations.deepspeed  # noqa: F401

    from sm3_dist import UnsupportedLayoutError

    torch.manual_seed(0)
    model = Net()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(2))
    for p in model.parameters():
        if how == "no_metadata":
            del p._hp_mapping
        elif how == "moved":
            p.data = p.data.clone()  # no longer a view of ZeRO's flat buffer
    x, y = _batch(0)
    engine.backward(((engine(x) - y) ** 2).mean())
    try:
        engine.step()
    except UnsupportedLayoutError as err:
        return str(err)
    return None


@pytest.mark.slow
def test_unrecoverable_partition_raises_naming_version_and_stage():
    import sm3_dist.integrations.deepspeed  # noqa: F401

    for how, reason in [
        ("no_metadata", "no ZeRO partition metadata"),
        ("moved", "do not share one flat buffer"),
    ]:
        messages = run_distributed(_corrupted, 2, how, env=ENV)
        for message in messages:
            assert message is not None, f"{how}: SM3 stepped on a partition it could not map"
            assert f"DeepSpeed {deepspeed.__version__}, ZeRO stage 2" in message
            assert reason in message
            assert "diagonal" in message
