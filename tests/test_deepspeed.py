"""DeepSpeed: ``"type": "SM3"`` in the config, ZeRO stages 0-3 against single-process SM3.

Exactness depends on DeepSpeed's averaging of the data-parallel gradients, so
every rank is fed the same batch and the models are chosen so that the average
is the local gradient bit for bit:

* :class:`Net` (a small nonlinear model) at world size 2: ``(g + g) / 2 == g``
  exactly, so the parameters must be ``torch.equal`` to single-process
  :class:`sm3_dist.SM3`. At world size 3, ``g / 3`` summed three times (ZeRO)
  or ``(g + g + g) * fl(1/3)`` (stage 0) can round differently from ``g`` in the
  last bit, so :class:`Net` at world size 3 is compared to 1e-6: DeepSpeed's
  gradient averaging, not SM3.
* :class:`ExactNet` at world size 3: the same parameters under a loss that is
  linear in each of them, ``sum(fc1(x1) * d1) + sum(fc2(x2) * d2) + sum(mix *
  c) + sum(scale * s)``, with ``x`` small integers and ``d``, ``c``, ``s``
  small integers times ``3 / 8``. Every gradient entry is then ``3 m`` with
  ``m`` a small integer times ``1 / 8``, whatever the parameters are. ZeRO
  divides by 3 before summing: ``3m / 3 = m`` exactly, and ``m + m + m = 3m``
  exactly. Stage 0 sums first, ``9m`` (exact), and multiplies by ``fl(1/3) =
  (1/3)(1 + 2^-25)``: the product ``3m (1 + 2^-25)`` is within half an ulp of
  ``3m`` (``2^-24 / M`` relative, mantissa ``M < 2``), so it rounds to ``3m``.
  The averaged gradient is the local one at any world size, and the run must
  be ``torch.equal`` to single-process SM3.

All runs of one world size share one spawned session: one process group,
engines built one after another (:data:`RUNS`); the tests read its results
(under pytest-xdist, whichever worker needs a session first runs it and the
other loads it: :func:`shared_result`).
Non-finite gradients are injected with a step pre-hook on the base optimizer,
i.e. into one rank's flat gradient partition after DeepSpeed's reduction and
its own overflow check, right where SM3 reads it.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field

import pytest
import torch

from tests.common import run_distributed, same_bits, shared_result
from tests.deepspeed_models import (
    ENV,
    MODELS,
    STEPS,
    _config,
    _describe_state,
    _full_params,
    loss_of,
    reference,
)

deepspeed = pytest.importorskip("deepspeed")

pytestmark = pytest.mark.xdist_group("deepspeed")

# ---------------------------------------------------------------------- the spawned sessions


@dataclass(frozen=True)
class Run:
    """One DeepSpeed engine of a session."""

    name: str
    stage: int
    kind: str = "net"
    params: dict = field(default_factory=dict)
    """Extra SM3 ``"params"`` of the JSON config."""
    extra: dict = field(default_factory=dict)
    """Extra top-level config entries."""
    scenario: str = "train"
    """``train``; ``nonfinite`` (skip); ``raise``; ``poison`` (a NaN input); ``corrupt:no_metadata`` / ``:moved``."""


BF16 = {"momentum_dtype": "bfloat16"}
RUNS = {
    2: [
        *(Run(f"fp32-zero{s}", s) for s in range(4)),
        *(Run(f"bf16m-zero{s}", s, params=BF16) for s in range(4)),
        Run("round-robin", 2, extra={"zero_optimization": {"round_robin_gradients": True}}),
        Run("nonfinite", 2, params={"nonfinite": "skip"}, scenario="nonfinite"),
        Run("raise", 2, params={"nonfinite": "raise"}, scenario="raise"),
        *(Run(f"poison-zero{s}", s, scenario="poison") for s in (0, 2, 3)),
        Run("poison-zero2-no-norm", 2, scenario="poison", extra={"zero_optimization": {"compute_grad_norm": False}}),
        Run("corrupt:no_metadata", 2, scenario="corrupt:no_metadata"),
        Run("corrupt:moved", 2, scenario="corrupt:moved"),
    ],
    3: [
        *(Run(f"fp32-zero{s}", s) for s in (1, 2, 3)),
        *(Run(f"exact-zero{s}", s, kind="exact") for s in range(4)),
        *(Run(f"bf16m-zero{s}", s, kind="exact", params=BF16) for s in range(4)),
        Run("nonfinite", 2, kind="exact", params={"nonfinite": "skip"}, scenario="nonfinite"),
        Run("raise", 2, kind="exact", params={"nonfinite": "raise"}, scenario="raise"),
    ],
}


def _engine(run: Run):
    import sm3_dist.integrations.deepspeed  # noqa: F401  (registers "SM3")

    torch.manual_seed(0)
    model = MODELS[run.kind]()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=_config(run.stage, run.params, **run.extra)
    )
    return engine, model


def _train(engine, run: Run) -> dict:
    from sm3_dist import local_state_bytes

    for step in range(STEPS):
        engine.backward(loss_of(engine, run.kind, step))
        engine.step()
    base = engine.basic_optimizer
    base._wait_for_maxima()  # the last all-reduce of maxima (ZeRO-3 empties param_groups between steps)
    state = _describe_state(base)
    return dict(
        params=_full_params(engine),
        wrapper=type(engine.optimizer).__name__,
        base=type(base).__name__,
        state=state,
        state_bytes=local_state_bytes(base),
        momentum_dtype=base.momentum_dtype,
    )


def _fragment_target(engine, rank: int) -> tuple[int, str, tuple[int, ...]]:
    """An element of this rank's flat partition: its offset there, its parameter's name and its index in it.

    Read from DeepSpeed's own ``_hp_mapping`` (correct without round-robin gradients), independently of SM3."""
    model = engine.module
    candidates = [(n, p) for n, p in model.named_parameters() if p._hp_mapping is not None]
    name, p = max(candidates, key=lambda c: (c[1].dim() >= 2, c[1]._hp_mapping.lp_fragment_address.numel))
    mapping = p._hp_mapping
    k = mapping.lp_fragment_address.numel // 2
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(mapping.lp_fragment_address.start + k), p.shape))
    return mapping.hp_fragment_address.start + k, name, index


def _snapshot(engine) -> dict:
    """Full parameters, the optimizer's own tensors (fp32 partitions) and its state."""
    base = engine.basic_optimizer
    base._wait_for_maxima()
    return dict(
        params=_full_params(engine),
        partitions=[t.detach().clone() for t in base._specs],
        state=[{k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for s in base.state.values()],
    )


def _same(a: dict, b: dict) -> bool:
    return (
        all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
        and all(torch.equal(x, y) for x, y in zip(a["partitions"], b["partitions"]))
        and len(a["state"]) == len(b["state"])
        and all(
            sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
            for sa, sb in zip(a["state"], b["state"])
        )
    )


NONFINITE_PLAN = {2: ("inf", -1), 4: ("nan", 0)}
"""Step -> (value, rank) written into that rank's flat gradient partition only (-1: the last rank)."""
DEEPSPEED_SKIP_STEP = 5
"""At this step rank 1's input holds a NaN: DeepSpeed's own overflow check skips before SM3 is called."""


def _train_checking(engine, run: Run, rank: int, steps: int, nan_input_at: int, checked, on_step=None) -> dict:
    """Train ``steps`` steps, rank 1's input holding a NaN at step ``nan_input_at``; whether each step in
    ``checked`` left parameters, partitions and state bitwise unchanged; who skipped how many steps.
    ``on_step(step)`` is called before each step's backward."""
    base = engine.basic_optimizer
    unchanged, skipped_by_deepspeed = {}, engine.skipped_steps
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        engine.backward(loss_of(engine, run.kind, step, poison=step == nan_input_at and rank == 1))
        before = _snapshot(engine) if step in checked else None
        engine.step()
        if before is not None:
            unchanged[step] = _same(before, _snapshot(engine))
    base._wait_for_maxima()
    return dict(
        params=_full_params(engine),
        unchanged=unchanged,
        sm3_skipped=base.skipped_steps,
        deepspeed_skipped=engine.skipped_steps - skipped_by_deepspeed,
    )


def _nonfinite(engine, run: Run, rank: int, world: int) -> dict:
    offset, name, index = _fragment_target(engine, rank)
    current = {"step": -1}

    def inject(optimizer, args, kwargs):
        planned = NONFINITE_PLAN.get(current["step"])
        if planned is not None and rank == planned[1] % world:
            (flat,) = [p for g in optimizer.param_groups for p in g["params"]]
            flat.grad.view(-1)[offset] = float(planned[0])

    handle = engine.basic_optimizer.register_step_pre_hook(inject)
    checked = (*NONFINITE_PLAN, DEEPSPEED_SKIP_STEP)
    result = _train_checking(engine, run, rank, 8, DEEPSPEED_SKIP_STEP, checked, lambda step: current.update(step=step))
    handle.remove()
    return dict(result, target=(name, index))


POISON_STEP = 2


def _poison(engine, run: Run, rank: int) -> dict:
    """A NaN in rank 1's input at one step: every rank's averaged gradient turns NaN."""
    return _train_checking(engine, run, rank, 5, POISON_STEP, (POISON_STEP,))


def _raise(engine, run: Run, rank: int, world: int) -> dict:
    base = engine.basic_optimizer
    offset, name, index = _fragment_target(engine, rank)
    engine.backward(loss_of(engine, run.kind, 0))
    engine.step()

    def inject(optimizer, args, kwargs):
        if rank == world - 1:
            (flat,) = [p for g in optimizer.param_groups for p in g["params"]]
            flat.grad.view(-1)[offset] = float("inf")

    base.register_step_pre_hook(inject)
    engine.backward(loss_of(engine, run.kind, 1))
    before = _snapshot(engine)
    try:
        engine.step()
        message = None
    except FloatingPointError as err:
        message = str(err)
    return dict(message=message, target=(name, index), unchanged=_same(before, _snapshot(engine)))


def _everything(engine, model) -> dict:
    """The module's parameters, the base optimizer's (ZeRO's fp32 partitions), its state and its step counts."""
    base = engine.basic_optimizer
    params = [p for g in base.param_groups for p in g["params"]]
    return dict(
        module={n: p.detach().clone() for n, p in model.named_parameters()},
        partitions=[p.detach().clone() for p in params],
        state=[{k: v.clone() if torch.is_tensor(v) else v for k, v in base.state[p].items()} for p in params],
        groups=[{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
    )


def _corrupt(engine, model, how: str) -> dict:
    """The first step on partitions whose layout cannot be recovered: its message, and whether anything changed."""
    from sm3_dist import UnsupportedLayoutError

    for p in model.parameters():
        if how == "no_metadata":
            del p._hp_mapping
        elif how == "moved":
            p.data = p.data.clone()  # no longer a view of ZeRO's flat buffer
    engine.backward(loss_of(engine, "net", 0))
    before = _everything(engine, model)
    try:
        engine.step()
    except UnsupportedLayoutError as err:
        return dict(message=str(err), before=before, after=_everything(engine, model))
    return dict(message=None)


def _session(rank: int, world: int, runs: list[Run]) -> dict[str, dict]:
    out = {}
    for run in runs:
        try:
            engine, model = _engine(run)
            if run.scenario == "train":
                out[run.name] = _train(engine, run)
            elif run.scenario == "nonfinite":
                out[run.name] = _nonfinite(engine, run, rank, world)
            elif run.scenario == "raise":
                out[run.name] = _raise(engine, run, rank, world)
            elif run.scenario == "poison":
                out[run.name] = _poison(engine, run, rank)
            else:
                out[run.name] = _corrupt(engine, model, run.scenario.split(":")[1])
            engine.destroy()
        except Exception:
            out[run.name] = dict(error=traceback.format_exc())
    return out


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """The session of a world size, run on first use."""
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = shared_result(
                tmp_path_factory,
                f"deepspeed-world{world}",
                lambda: run_distributed(_session, world, RUNS[world], env=ENV, timeout=600),
            )
        return cache[world]

    return get


def _results(sessions, world: int, name: str) -> list[dict]:
    results = [session[name] for session in sessions(world)]
    for rank, result in enumerate(results):
        assert "error" not in result, f"run {name!r} at world size {world}, rank {rank}:\n{result['error']}"
    return results


WRAPPERS = {
    0: "DeepSpeedSM3",
    1: "DeepSpeedZeroOptimizer",
    2: "DeepSpeedZeroOptimizer",
    3: "DeepSpeedZeroOptimizer_Stage3",
}


# ---------------------------------------------------------------------- fp32 against single-process SM3

CASES = [
    *((s, 2, "fp32", "net") for s in range(4)),
    *((s, 3, "fp32", "net") for s in (1, 2, 3)),
    *((s, 3, "exact", "exact") for s in range(4)),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "world", "run", "kind"), CASES, ids=[f"{r}-zero{s}-world{w}" for s, w, r, _ in CASES]
)
def test_matches_single_process(sessions, stage, world, run, kind):
    results = _results(sessions, world, f"{run}-zero{stage}")
    model, _ = reference(kind)
    expected = {n: p.detach() for n, p in model.named_parameters()}
    exact = world == 2 or kind == "exact"
    for rank, result in enumerate(results):
        assert result["base"] == "DeepSpeedSM3"
        assert result["wrapper"] == WRAPPERS[stage]
        for name, value in result["params"].items():
            if exact:
                assert torch.equal(value, expected[name]), f"rank {rank}: {name} differs"
            else:
                torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)


STRADDLE = [(s, w) for w in (2, 3) for s in (1, 2, 3)]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "world"), STRADDLE, ids=[f"zero{s}-world{w}" for s, w in STRADDLE])
def test_partition_cuts_a_weight_mid_row(sessions, stage, world):
    """The exactness above is only meaningful if some partition boundary splits a row of a weight."""
    results = _results(sessions, world, f"fp32-zero{stage}")
    straddles = [
        piece for result in results for tensor in result["state"] for piece in tensor["pieces"] if piece["mid_row"]
    ]
    assert straddles, "no ZeRO partition boundary cuts a weight mid-row: choose other sizes"


WALK = [(s, 2, "fp32", "net") for s in (1, 2, 3)] + [(s, 3, "exact", "exact") for s in (1, 2, 3)]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "world", "run", "kind"), WALK, ids=[f"zero{s}-world{w}" for s, w, _, _ in WALK])
def test_state_is_local_momentum_plus_touched_accumulators(sessions, stage, world, run, kind):
    """Walk the base optimizer's state on every rank: momentum for the partition, accumulators for touched ranges."""
    from sm3_dist import MOMENTUM_KEY, STEP_KEY, accumulator_key

    results = _results(sessions, world, f"{run}-zero{stage}")
    _, ref = reference(kind)
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
                    value = tensor["state"][key]
                    assert value.shape == (hi - lo,)
                    assert value.shape[0] <= shapes[tid][d]
                    # the stored entries are exactly the single-process accumulators
                    assert torch.equal(value, ref.state[ref_params[tid]][accumulator_key(d)][lo:hi])
                    total_acc += hi - lo
            assert set(tensor["state"]) == expected_keys
            assert tensor["state"][MOMENTUM_KEY].shape == (tensor["numel"],)
            total_momentum += tensor["numel"]
        # momentum covers only the local partition (padding included), accumulators far below numel
        assert total_momentum <= math.ceil(numel / world) + 16 * len(ref_params)
        assert total_acc < numel // 2
    assert all(touched), "every parameter is held by some rank"


@pytest.mark.slow
def test_zero2_round_robin_gradients_matches(sessions):
    """DeepSpeed 0.19's own _hp_mapping is wrong here (parameter order, buffer in round-robin order): SM3 follows
    the buffer, warns, and stays exact."""
    results = _results(sessions, 2, "round-robin")
    model, _ = reference()
    for result in results:
        for name, p in model.named_parameters():
            assert torch.equal(result["params"][name], p.detach()), name


# ---------------------------------------------------------------------- bf16 momentum (issue 9)

BF16_CASES = [(s, w) for w in (2, 3) for s in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "world"), BF16_CASES, ids=[f"zero{s}-world{w}" for s, w in BF16_CASES])
def test_bf16_momentum_is_bitwise_single_process_and_two_bytes_per_element(sessions, stage, world):
    """``"momentum_dtype": "bfloat16"`` in the JSON config: torch.equal to single-process SM3 with bf16 momentum
    (world 2: :class:`Net`; world 3: :class:`ExactNet`), and 2 bytes per local element plus 4 per touched
    accumulator entry on every rank."""
    from sm3_dist import MOMENTUM_KEY, STEP_KEY

    kind = "net" if world == 2 else "exact"
    results = _results(sessions, world, f"bf16m-zero{stage}")
    model, _ = reference(kind, momentum_dtype=torch.bfloat16)
    fp32_model, _ = reference(kind)
    differs = False
    for rank, result in enumerate(results):
        assert result["momentum_dtype"] == torch.bfloat16
        assert result["wrapper"] == WRAPPERS[stage]
        for name, p in model.named_parameters():
            assert torch.equal(result["params"][name], p.detach()), f"rank {rank}: {name}"
            differs |= not torch.equal(p.detach(), dict(fp32_model.named_parameters())[name].detach())
        local_elements = sum(t["numel"] for t in result["state"])
        touched_entries = sum(hi - lo for t in result["state"] for piece in t["pieces"] for lo, hi in piece["ranges"])
        assert result["state_bytes"] == 2 * local_elements + 4 * touched_entries
        for tensor in result["state"]:
            assert tensor["state"][MOMENTUM_KEY].dtype == torch.bfloat16
            assert all(
                v.dtype == torch.float32 for k, v in tensor["state"].items() if k not in (MOMENTUM_KEY, STEP_KEY)
            )
        if stage > 0:
            numel = sum(p.numel() for p in model.parameters())
            assert local_elements <= math.ceil(numel / world) + 16 * 6  # the partition (and its padding) only
    assert differs, "bf16 momentum gave the fp32 trajectory: the option had no effect"


# ---------------------------------------------------------------------- non-finite gradients (issue 8)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_nonfinite_in_one_rank_partition_skips_on_every_rank(sessions, world):
    """An inf (step 2, last rank) and a NaN (step 4, rank 0) in one rank's gradient partition: every rank's
    parameters, fp32 partition and SM3 state stay bitwise unchanged, SM3's ``skipped_steps`` is 2 everywhere, and
    training goes on equal to single-process SM3 that never saw those batches. A NaN in rank 1's input (step 5)
    is caught by DeepSpeed's own overflow check (fp32 ZeRO-2's global-norm check) before SM3 is called: counted
    once, by DeepSpeed."""
    kind = "net" if world == 2 else "exact"
    results = _results(sessions, world, "nonfinite")
    model, _ = reference(kind, steps=8, skip=(*NONFINITE_PLAN, DEEPSPEED_SKIP_STEP))
    for rank, result in enumerate(results):
        assert result["unchanged"] == {2: True, 4: True, DEEPSPEED_SKIP_STEP: True}, f"rank {rank}"
        assert result["sm3_skipped"] == 2, f"rank {rank}"
        assert result["deepspeed_skipped"] == 1, f"rank {rank}"
        for name, p in model.named_parameters():
            assert torch.equal(result["params"][name], p.detach()), f"rank {rank}: {name}"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_nonfinite_raise_names_the_model_parameter(sessions, world):
    results = _results(sessions, world, "raise")
    for rank, result in enumerate(results):
        assert result["message"] is not None, f"rank {rank} did not raise"
        assert result["unchanged"], f"rank {rank}: state changed before the error"
        assert "no state was changed" in result["message"]
        if rank == world - 1:
            name, index = result["target"]
            assert f"in {name} (shape " in result["message"], result["message"]
            assert f"at index {index} (rank {rank})" in result["message"], result["message"]
        else:
            assert f"on another rank (rank {rank})" in result["message"], result["message"]


POISON = [("zero0", "sm3"), ("zero2", "deepspeed"), ("zero3", "deepspeed"), ("zero2-no-norm", "sm3")]


@pytest.mark.slow
@pytest.mark.parametrize(("run", "skipper"), POISON, ids=[r for r, _ in POISON])
def test_nonfinite_input_is_skipped_once_by_deepspeed_or_by_sm3(sessions, run, skipper):
    """A NaN in one rank's input. Where DeepSpeed checks the gradients itself (fp32 ZeRO-2/3: the global norm), it
    skips the step before SM3 is called and SM3 counts nothing; where it does not (stage 0 fp32,
    ``compute_grad_norm: false``), SM3 skips on every rank. Either way once, state bitwise unchanged, and the run
    goes on equal to single-process SM3 without that batch."""
    results = _results(sessions, 2, f"poison-{run}")
    model, _ = reference(steps=5, skip=(POISON_STEP,))
    for rank, result in enumerate(results):
        assert result["unchanged"] == {POISON_STEP: True}, f"rank {rank}"
        assert (result["sm3_skipped"], result["deepspeed_skipped"]) == ((1, 0) if skipper == "sm3" else (0, 1))
        for name, p in model.named_parameters():
            assert torch.equal(result["params"][name], p.detach()), f"rank {rank}: {name}"


# ---------------------------------------------------------------------- layouts that cannot be recovered


@pytest.mark.slow
def test_unrecoverable_partition_raises_naming_version_and_stage(sessions):
    for how, reason in [
        ("no_metadata", "no ZeRO partition metadata"),
        ("moved", "do not share one flat buffer"),
    ]:
        for result in _results(sessions, 2, f"corrupt:{how}"):
            message = result["message"]
            assert message is not None, f"{how}: SM3 stepped on a partition it could not map"
            assert f"DeepSpeed {deepspeed.__version__}, ZeRO stage 2" in message
            assert reason in message
            assert "diagonal" in message
            # an error before the first update: every parameter, partition, state and group entry as before
            before, after = result["before"], result["after"]
            assert before["module"].keys() == after["module"].keys()
            for name, value in before["module"].items():
                assert same_bits(value, after["module"][name]), f"{how}: {name} changed"
            assert len(before["partitions"]) == len(after["partitions"])
            for k, (a, b) in enumerate(zip(before["partitions"], after["partitions"])):
                assert same_bits(a, b), f"{how}: partition {k} changed"
            assert before["groups"] == after["groups"], f"{how}: a param group entry changed"
            for k, (a, b) in enumerate(zip(before["state"], after["state"])):
                assert a.keys() == b.keys(), f"{how}: state of partition {k} changed: {sorted(a)} -> {sorted(b)}"
                assert all(same_bits(a[key], b[key]) for key in a if torch.is_tensor(a[key])), k
