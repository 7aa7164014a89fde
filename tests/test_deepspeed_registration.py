"""DeepSpeed integration without an engine: registration, the version guard, config values, ``check_engine``."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("deepspeed")


def test_registration_is_explicit_and_idempotent():
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS
    from sm3_dist.integrations import deepspeed as integration

    from sm3_dist import SM3

    integration.register()
    integration.register()
    assert torch.optim.SM3 is integration.DeepSpeedSM3
    assert ZERO_SUPPORTED_OPTIMIZERS.count(integration.DeepSpeedSM3) == 1
    assert ZERO_SUPPORTED_OPTIMIZERS.count(SM3) == 1  # a plain SM3 gets ZeRO's partitions mapped too
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


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        (" BFloat16 ", torch.bfloat16),
        ("float32", torch.float32),
        ("fp32", torch.float32),
        (torch.bfloat16, torch.bfloat16),
        ("float16", None),
        ("int8", None),
        ("", None),
        (16, None),
    ],
)
def test_momentum_dtype_from_the_json_config(value, dtype):
    from sm3_dist.integrations.deepspeed import DeepSpeedSM3

    params = [torch.nn.Parameter(torch.ones(2, 3))]
    if dtype is None:
        with pytest.raises(ValueError, match=r"momentum_dtype .* is not a known name: use one of \['bf16', 'bfloat16'"):
            DeepSpeedSM3(params, momentum=0.9, momentum_dtype=value)
    else:
        assert DeepSpeedSM3(params, momentum=0.9, momentum_dtype=value).momentum_dtype is dtype


ENGINE_CASES = {
    "deepspeed-sm3": ("DeepSpeedSM3", {}, None),
    "plain-sm3": ("SM3", {}, None),
    "config-section": (
        "Adam",
        {"optimizer": {"type": "AdamW"}},
        r"is Adam, not SM3: the config's \"optimizer\" section names 'AdamW'.*\"type\": \"SM3\"",
    ),
    "offload-swap": (
        "DeepSpeedCPUAdam",
        {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
        r'accelerate\'s DeepSpeed plugin replaced your optimizer with DeepSpeedCPUAdam.*"zero_force_ds_cpu_optimizer": false',
    ),
    "given": ("Adam", {}, r"is Adam, not SM3: Adam is the optimizer the engine was given"),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES), ids=list(ENGINE_CASES))
def test_check_engine_names_the_cause(case):
    from types import SimpleNamespace

    from sm3_dist.integrations.deepspeed import DeepSpeedSM3, check_engine

    from sm3_dist import SM3

    kind, config, message = ENGINE_CASES[case]
    params = [torch.nn.Parameter(torch.ones(2))]
    types = {"DeepSpeedSM3": DeepSpeedSM3, "SM3": SM3, "Adam": torch.optim.Adam}
    base = types[kind](params) if kind in types else type(kind, (), {})()
    engine = SimpleNamespace(basic_optimizer=base, _config=SimpleNamespace(_param_dict=config))
    if message is None:
        check_engine(engine)
    else:
        with pytest.raises(RuntimeError, match=message):
            check_engine(engine)
