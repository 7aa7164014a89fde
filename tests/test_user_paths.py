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

from tests.common import count_collectives, counts_between, run_distributed, run_each
from tests.deepspeed_models import ENV, HYPER, Net, _config, _describe_state, _full_params, loss_of, reference

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


def _deepspeed_run(stage: int, route: str, counts: dict[str, int]) -> dict:
    """``route``: ``config`` (``"type": "SM3"``), ``client`` (``optimizer=SM3(...)``) or ``default-clipping``
    (``client`` with DeepSpeed's default ``gradient_clipping``), 5 steps; ``counts``: the collectives through
    sm3_dist.comm (``count_collectives``), read at ``initialize`` and over steps 2-5."""
    from sm3_dist import SM3

    torch.manual_seed(0)
    model = Net()
    before = dict(counts)
    if route == "config":
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(stage))
    else:
        config = _client_config(stage)
        if route == "default-clipping":
            del config["gradient_clipping"]
        engine, *_ = deepspeed.initialize(model=model, optimizer=SM3(model.parameters(), **HYPER), config=config)
    comm = {"initialize": counts_between(before, counts)}
    base, calls = engine.basic_optimizer, [0]
    sm3_step = base.step

    def counted_step(*args, **kwargs):  # ZeRO-3 steps SM3 once per sub-group
        calls[0] += 1
        return sm3_step(*args, **kwargs)

    base.step = counted_step
    for step in range(STEPS):
        if step == 1:
            before = dict(counts)
        engine.backward(loss_of(engine, "net", step, scale=4.0 if route == "default-clipping" else 1.0))
        engine.step()
    comm["step"] = counts_between(before, counts, per=STEPS - 1)
    comm["sm3_steps"] = calls[0] / STEPS
    del base.step
    out = _summary(engine)
    out["clipping"] = engine.gradient_clipping()
    out["comm"] = comm
    engine.destroy()
    return out


def _checkpoint_run(stage: int, root: str) -> dict:
    """A user-built SM3 under ZeRO: 3 steps, ``save_checkpoint``, a fresh engine and SM3 ``load_checkpoint``, 2 more."""
    from sm3_dist import SM3

    path = os.path.join(root, f"client-zero{stage}")
    engines = []
    for phase in ("save", "load"):
        torch.manual_seed(0)
        model = Net()
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=SM3(model.parameters(), **HYPER), config=_client_config(stage)
        )
        if phase == "load":
            engine.load_checkpoint(path)
        for step in range(3) if phase == "save" else range(3, STEPS):
            engine.backward(loss_of(engine, "net", step))
            engine.step()
        if phase == "save":
            engine.save_checkpoint(path)
        engines.append(engine)
    out = _summary(engines[1])
    out["path"] = path
    for engine in engines:
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


def _session(rank: int, world: int, root: str) -> dict:
    counts = count_collectives()
    runs = {
        f"{route}-zero{s}": (lambda s=s, r=route: _deepspeed_run(s, r, counts))
        for s in (0, 1, 2, 3)
        for route in ("config", "client")
    }
    runs["default-clipping-zero2"] = lambda: _deepspeed_run(2, "default-clipping", counts)
    for stage in (2, 3):
        runs[f"checkpoint-zero{stage}"] = lambda s=stage: _checkpoint_run(s, root)
    runs["accelerate-zero2"] = _accelerate_run
    runs["unexplained"] = _unexplained_swap
    return run_each(runs)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("user-paths"))
    return run_distributed(_session, 2, root, env=ENV, timeout=600)


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


USER_BUILT = [(f"client-zero{s}", f"config-zero{s}") for s in (0, 1, 2, 3)]
USER_BUILT += [("accelerate-zero2", "config-zero2")]


@pytest.mark.slow
@pytest.mark.parametrize(("run", "config_run"), USER_BUILT, ids=[r for r, _ in USER_BUILT])
def test_user_built_sm3_under_zero_holds_the_config_routes_state_and_matches_one_process(session, run, config_run):
    model, _ = reference(steps=STEPS)
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
            # maxima reduced over the data-parallel group where ZeRO partitions; stage 0 keeps whole tensors
            assert tensor["reduced"] == (run != "client-zero0")
            # per dimension: no accumulator longer than a dimension (a flat partition read as a vector: numel)
            assert all(v.numel() <= longest_dim for k, v in tensor["state"].items() if "mu_" in k)


@pytest.mark.slow
@pytest.mark.parametrize("run", [f"{route}-zero{s}" for s in (0, 1, 2, 3) for route in ("config", "client")])
def test_collectives_sm3_adds_under_deepspeed(session, run):
    """Every collective through sm3_dist.comm (``count_collectives``) under DeepSpeed: none at ``initialize``; per
    SM3 step under ZeRO 1-3 one MAX all-reduce of the accumulator maxima (fp32, the sum of the dimensions) and one
    of the 4-byte non-finite flag (ZeRO-3 steps SM3 once per sub-group: twice here, ``sub_group_size`` 40); none at
    stage 0, whose whole tensors need no reduction."""
    dims = sum(sum(p.shape or (1,)) for p in Net().parameters())
    for rank, result in enumerate(_pick(session, run)):
        comm = result["comm"]
        assert comm["initialize"] == {}, rank
        n = comm["sm3_steps"]
        assert n == (2 if run.endswith("zero3") else 1), rank
        expected = {
            "MaxReducer.launch: all_reduce MAX": n,
            "MaxReducer.launch: all_reduce MAX bytes": n * 4 * dims,
            "all_reduce_flag_: all_reduce MAX": n,
            "all_reduce_flag_: all_reduce MAX bytes": n * 4,
        }
        assert comm["step"] == ({} if run.endswith("zero0") else expected), rank


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_user_built_sm3_checkpoint_resumes_exactly(session, stage):
    """DeepSpeed's save_checkpoint / load_checkpoint with a plain SM3: the load is checked against the recovered
    layouts and the resumed run equals the uninterrupted one."""
    for resumed, straight in zip(_pick(session, f"checkpoint-zero{stage}"), _pick(session, f"client-zero{stage}")):
        assert resumed["base"] == "SM3"
        for name, value in resumed["params"].items():
            assert torch.equal(value, straight["params"][name]), name
        assert _same_state(resumed["state"], straight["state"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_user_built_sm3_checkpoint_converts_to_universal(session, stage, tmp_path):
    """A plain SM3's ZeRO state carries the piece record too: ``to_universal`` rebuilds the global state."""
    from sm3_dist.integrations.deepspeed import to_universal

    path = _pick(session, f"checkpoint-zero{stage}")[0]["path"]
    to_universal(os.path.join(path, "global_step3"), str(tmp_path / "universal"))
    model, opt = reference(steps=3)
    carrier = torch.load(tmp_path / "universal" / "zero" / "optimizer_state.pt", weights_only=False)
    carrier = carrier["param_groups"][0]["sm3_universal"]
    params = [p for g in opt.param_groups for p in g["params"]]
    for tid, name in enumerate(carrier["names"]):
        p = dict(model.named_parameters())[name]
        saved = torch.load(tmp_path / "universal" / "zero" / name / "fp32.pt", weights_only=False)["param"]
        assert torch.equal(saved, p.detach()), name
        for d, mu in enumerate(carrier["accumulators"][tid]):
            assert torch.equal(mu, opt.state[params[tid]][f"mu_{d}"]), (name, d)


@pytest.mark.slow
def test_a_tensor_swapped_in_that_nothing_explains_is_refused_before_any_update(session):
    for result in _pick(session, "unexplained"):
        message = result["message"]
        assert message is not None, "SM3 stepped a flat tensor it was not built on"
        assert "not one of the parameters SM3 was built on" in message
        assert "per-element accumulators" in message
        assert result["unchanged"] and result["state"] == 0


@pytest.mark.slow
def test_deepspeed_clips_to_norm_one_unless_the_config_says_otherwise(session):
    """README: a DeepSpeed run equals plain SM3 with ``"gradient_clipping": 0``; DeepSpeed's default is 1.0."""
    for result in _pick(session, "default-clipping-zero2"):
        assert result["clipping"] == 1.0
        unclipped = _scaled_reference(clip=None)
        clipped = _scaled_reference(clip=1.0)
        assert any(not torch.allclose(v, unclipped[n]) for n, v in result["params"].items())
        for name, value in result["params"].items():  # DeepSpeed computes the norm in its own order: close
            torch.testing.assert_close(value, clipped[name], rtol=1e-5, atol=1e-6)


def _scaled_reference(clip: float | None) -> dict:
    """Single-process SM3 on the default-clipping run's loss (scaled so the gradient norm exceeds 1)."""
    from sm3_dist import SM3

    torch.manual_seed(0)
    model = Net()
    opt = SM3(model.parameters(), **HYPER)
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(model, "net", step, scale=4.0).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def test_deepspeed_shm_buffers_of_one_port_are_removed(tmp_path):
    from sm3_dist.integrations.shm import remove_deepspeed_shm

    mine = [tmp_path / f"deepspeed_allreduce_buffer_{k}_127.0.0.1_29512_{r}" for k in range(2) for r in range(2)]
    others = [tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_29513_0", tmp_path / "unrelated_29512_0"]
    for path in mine + others:
        path.write_bytes(b"x")
    removed = remove_deepspeed_shm(29512, directory=str(tmp_path))
    assert sorted(removed) == sorted(str(p) for p in mine)
    assert all(not p.exists() for p in mine) and all(p.exists() for p in others)
    with pytest.raises(ValueError, match="MASTER_PORT is not set"):
        os.environ.pop("MASTER_PORT", None)
        remove_deepspeed_shm(directory=str(tmp_path))


# ---------------------------------------------------------------------- registration whatever imported what

IMPORT_ORDERS = {
    "sm3_dist-then-deepspeed": "import sm3_dist, deepspeed",
    "deepspeed-then-sm3_dist": "import deepspeed, sm3_dist",
}


@pytest.mark.parametrize("order", list(IMPORT_ORDERS), ids=list(IMPORT_ORDERS))
def test_deepspeed_builds_sm3_from_a_config_without_importing_the_integration(order):
    """A fresh interpreter imports only ``sm3_dist`` and ``deepspeed`` (in ``order``), never
    ``sm3_dist.integrations.deepspeed``, whose import registers by itself: ``deepspeed.initialize`` must still build
    SM3 from ``"type": "SM3"``, so only the post-import hook that ``import sm3_dist`` installs can have registered it."""
    code = (
        f"{IMPORT_ORDERS[order]}\n"
        "import os, sys, torch, torch.distributed as dist\n"
        "from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS\n"
        "from sm3_dist.comm import end_process, free_port\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()), RANK='0', WORLD_SIZE='1',\n"
        "                  LOCAL_RANK='0', LOCAL_WORLD_SIZE='1', LOCAL_SIZE='1')\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "model = torch.nn.Linear(3, 2)\n"
        "config = {'train_micro_batch_size_per_gpu': 1, 'steps_per_print': 10**9, 'zero_optimization': {'stage': 0},\n"
        "          'optimizer': {'type': 'SM3', 'params': {'lr': 0.1, 'momentum': 0.9}}}\n"
        "engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)\n"
        "built = type(engine.basic_optimizer)\n"
        "print('built', built.__module__, built.__name__)\n"
        "assert isinstance(engine.basic_optimizer, sm3_dist.SM3), built\n"
        "assert torch.optim.SM3 is built\n"
        "assert sm3_dist.SM3 in ZERO_SUPPORTED_OPTIMIZERS and built in ZERO_SUPPORTED_OPTIMIZERS\n"
        "engine.destroy()\n"
        "dist.destroy_process_group()\n"
        "end_process(0)\n"  # gloo's workers may still hold DeepSpeed's tensors: no interpreter finalization
    )
    env = {**os.environ, **ENV}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "built sm3_dist.integrations.deepspeed.optimizer DeepSpeedSM3" in done.stdout


# ---------------------------------------------------------------------- HF Trainer, tiny GPT-2, DeepSpeed ZeRO-2


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


HF_SM3 = {"lr": 0.05, "momentum": 0.9}


def _hf_config(section: str | None) -> dict | None:
    """``section``: the config's optimizer section: ``"SM3"`` (momentum as in :data:`HF_SM3`), ``"SM3-other"`` (another
    momentum), ``"AdamW"``, or None (no section); ``"none"``: no DeepSpeed at all."""
    if section == "none":
        return None
    cfg = {
        # explicit sizes: on CPU accelerate reports one process to transformers, which would fill "auto" for 1
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    if section == "SM3":
        cfg["optimizer"] = {"type": "SM3", "params": {"lr": "auto", "momentum": HF_SM3["momentum"]}}
    elif section == "SM3-other":
        cfg["optimizer"] = {"type": "SM3", "params": {"lr": "auto", "momentum": 0.5}}
    elif section == "AdamW":
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}
    return cfg


HF_ROUTES = {
    # route: (the DeepSpeed config's optimizer section or "none" for no DeepSpeed, how SM3 is handed to Trainer)
    "config": ("SM3", None),
    "cls": (None, "cls"),
    "instance": (None, "instance"),
    "instance+section": ("SM3", "instance"),
    "instance+adamw-section": ("AdamW", "instance"),
    "instance+other-sm3-section": ("SM3-other", "instance"),
    "no-deepspeed-instance": ("none", "instance"),
    "no-deepspeed-default": ("none", None),
}


def _hf_run(route: str, tmp: str) -> dict:
    """``route`` (:data:`HF_ROUTES`): ``config`` (the config entry), ``cls`` (``optimizer_cls_and_kwargs``),
    ``instance`` (``optimizers=(SM3(...), None)`` without an optimizer section), ``instance+section`` (with an SM3
    section of the same hyperparameters), ``instance+adamw-section`` (an AdamW section),
    ``instance+other-sm3-section`` (an SM3 section with another momentum); ``no-deepspeed-*``: DDP, no DeepSpeed,
    ``optimizers=(SM3(...), None)`` or nothing (Trainer's default AdamW)."""
    from accelerate.state import AcceleratorState
    from sm3_dist.integrations.transformers import RequireSM3, stepped_optimizer
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from sm3_dist import SM3

    AcceleratorState._reset_state(True)
    unset_hf_deepspeed_config()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # accelerate sets it for a DeepSpeed plugin and keeps it
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    args = TrainingArguments(
        output_dir=tmp,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=HF_SM3["lr"],
        max_grad_norm=0.0,
        deepspeed=_hf_config(HF_ROUTES[route][0]),
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs = {}
    given = None
    if HF_ROUTES[route][1] == "cls":
        kwargs["optimizer_cls_and_kwargs"] = (SM3, HF_SM3)
    elif HF_ROUTES[route][1] == "instance":
        given = SM3(model.parameters(), **HF_SM3)
        kwargs["optimizers"] = (given, None)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[RequireSM3()], **kwargs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        trainer.train()
        error = None
    except RuntimeError as err:
        error = str(err)
    engine = trainer.model_wrapped
    base = getattr(engine, "basic_optimizer", None)
    if base is None and trainer.optimizer is not None:  # no DeepSpeed: accelerate's wrapper around the optimizer
        base = stepped_optimizer(trainer.optimizer)
    keys = sorted({k for s in base.state.values() for k in s}) if base is not None else []
    out = dict(error=error, base=type(base).__name__, keys=keys, steps=trainer.state.global_step)
    out["stepped_given"] = given is not None and base is given
    out["changed"] = any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    if error is not None:
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            out["unchanged"] = all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    if hasattr(engine, "destroy"):
        engine.destroy()
    AcceleratorState._reset_state(True)
    unset_hf_deepspeed_config()
    return out


def _hf_session(rank: int, world: int, tmp: str) -> dict:
    out = {}
    for route in HF_ROUTES:
        try:
            out[route] = _hf_run(route, tmp)
        except Exception:
            out[route] = dict(failure=traceback.format_exc())
    return out


@pytest.fixture(scope="module")
def hf_session(tmp_path_factory):
    pytest.importorskip("transformers")
    tmp = str(tmp_path_factory.mktemp("hf"))
    return run_distributed(_hf_session, 2, tmp, env=ENV, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["config", "cls", "instance+section", "no-deepspeed-instance"])
def test_hf_trainer_trains_sm3(hf_session, route):
    for result in _pick(hf_session, route):
        assert result["error"] is None, result["error"]
        assert result["steps"] == 3 and result["changed"]
        assert result["base"] in ("SM3", "DeepSpeedSM3")
        assert "exp_avg" not in result["keys"] and "momentum_buffer" in result["keys"]
        assert any(k.startswith("piece") or k.startswith("mu_") for k in result["keys"])
        if route == "no-deepspeed-instance":  # without DeepSpeed, Trainer steps the very SM3 it was given
            assert result["stepped_given"]


@pytest.mark.slow
def test_hf_trainer_stops_before_the_first_step_when_it_discards_sm3(hf_session):
    for result in _pick(hf_session, "instance"):
        message = result["error"]
        assert message is not None, "HF Trainer trained something else than the SM3 it was given"
        assert "HF Trainer is about to step AdamW, not SM3" in message
        assert "deepspeed_init discards the optimizer" in message
        assert "optimizer_cls_and_kwargs=(SM3" in message
        assert result["steps"] == 0 and result["unchanged"]


REQUIRE_SM3_STOPS = {
    # a config section that builds another optimizer than the SM3 given to Trainer
    "instance+adamw-section": [
        "HF Trainer is about to step AdamW, not SM3",
        "the config's \"optimizer\" section names 'AdamW'",
    ],
    # a config section that builds an SM3 whose hyperparameters differ from the given SM3's
    "instance+other-sm3-section": [
        'HF Trainer is about to step an SM3 that the DeepSpeed config\'s "optimizer" section built',
        "its hyperparameters differ: momentum: 0.5 instead of 0.9",
    ],
    # no DeepSpeed, no SM3 handed to Trainer: its default optimizer
    "no-deepspeed-default": ["HF Trainer is about to step AdamW, not SM3", "the Trainer built it from args.optim"],
}


@pytest.mark.slow
@pytest.mark.parametrize("route", list(REQUIRE_SM3_STOPS))
def test_require_sm3_stops_before_the_first_step(hf_session, route):
    for result in _pick(hf_session, route):
        message = result["error"]
        assert message is not None, f"{route}: HF Trainer stepped {result['base']} for {result['steps']} steps"
        for part in REQUIRE_SM3_STOPS[route]:
            assert part in message, message
        assert result["steps"] == 0 and result["unchanged"]
