"""Registration with DeepSpeed, the config's values, and the engine check.

DeepSpeed has no optimizer registry; :func:`register` uses the places its
engine looks an optimizer up:

* ``DeepSpeedEngine._configure_basic_optimizer`` builds an optimizer whose
  config ``type`` is not one of its own with ``getattr(torch.optim, type)``:
  ``torch.optim.SM3 = DeepSpeedSM3`` (``torch.optim`` gains one attribute;
  nothing of DeepSpeed is patched).
* ZeRO refuses an optimizer whose exact type is not in
  ``deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS`` unless
  ``zero_allow_untested_optimizer`` is set: :class:`DeepSpeedSM3` and the plain
  :class:`sm3_dist.SM3` are appended (both get ZeRO's partitions mapped back to
  parameter shapes).
* A ``"scheduler"`` entry whose ``type`` DeepSpeed does not know is looked up
  in ``torch.optim.lr_scheduler``: ``SM3WarmupCooldown``
  (:func:`warmup_cooldown_scheduler`).

``import sm3_dist`` registers as soon as DeepSpeed is imported too, in either
order (:mod:`sm3_dist.integrations`), so a script need not import this package.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from sm3_dist.integrations.deepspeed.layouts import SUPPORTED_DEEPSPEED

from sm3_dist.optimizer import SM3

__all__ = [
    "OPTIMIZER_TYPE",
    "SCHEDULER_TYPE",
    "SUPPORTED_DEEPSPEED",
    "check_deepspeed_version",
    "check_engine",
    "momentum_dtype_from_config",
    "register",
    "warmup_cooldown_scheduler",
]

OPTIMIZER_TYPE = "SM3"
SCHEDULER_TYPE = "SM3WarmupCooldown"


def _parse_version(version: str) -> tuple[int, ...]:
    parts = []
    for token in version.split("+")[0].split("."):
        digits = "".join(ch for ch in token if ch.isdigit()) if not token.isdigit() else token
        if not digits:
            break
        parts.append(int(digits))
        if not token.isdigit():
            break
    return tuple(parts + [0] * (3 - len(parts)))[:3]


def check_deepspeed_version(version: str | None = None) -> str:
    """The installed DeepSpeed version; raises ``ImportError`` if it lies outside :data:`SUPPORTED_DEEPSPEED`."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    low, high = SUPPORTED_DEEPSPEED
    if not low <= _parse_version(version) < high:
        raise ImportError(
            f"sm3_dist.integrations.deepspeed supports DeepSpeed >={'.'.join(map(str, low))},"
            f"<{'.'.join(map(str, high))}, found {version}: the ZeRO partition metadata it reads "
            "(_hp_mapping, fp32_partitioned_groups_flat, ds_shape) is private to DeepSpeed and has not been "
            "checked for this version"
        )
    return version


def register() -> None:
    """Make ``"type": "SM3"`` a DeepSpeed optimizer, ZeRO-supported, and ``SM3WarmupCooldown`` a scheduler.

    ``torch.optim.SM3`` becomes :class:`DeepSpeedSM3`; it and the plain
    :class:`sm3_dist.SM3` join ``ZERO_SUPPORTED_OPTIMIZERS``, so
    ``deepspeed.initialize(model, optimizer=SM3(...))`` needs no
    ``zero_allow_untested_optimizer`` (both get their ZeRO layouts mapped).

    Idempotent. Raises ``ImportError`` for an unsupported DeepSpeed version and
    ``RuntimeError`` if ``torch.optim.SM3`` is already something else.
    """
    check_deepspeed_version()
    import sm3_dist.integrations.deepspeed.layouts  # noqa: F401  (maps ZeRO's partitions for a plain SM3)
    from deepspeed.runtime.zero import utils as zero_utils
    from sm3_dist.integrations.deepspeed.optimizer import DeepSpeedSM3

    existing = getattr(torch.optim, OPTIMIZER_TYPE, None)
    if existing is not None and existing is not DeepSpeedSM3:
        raise RuntimeError(
            f"torch.optim.{OPTIMIZER_TYPE} is already {existing!r}; sm3_dist cannot register its DeepSpeed optimizer"
        )
    setattr(torch.optim, OPTIMIZER_TYPE, DeepSpeedSM3)
    for supported in (DeepSpeedSM3, SM3):  # a plain SM3 gets the same layouts (layouts.explain_swapped)
        if supported not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
            zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(supported)
    setattr(torch.optim.lr_scheduler, SCHEDULER_TYPE, warmup_cooldown_scheduler)


def warmup_cooldown_scheduler(optimizer: Any, total_steps: int, **kwargs: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``"scheduler": {"type": "SM3WarmupCooldown"}`` entry: :func:`sm3_dist.schedules.warmup_cooldown`.

    DeepSpeed hands a scheduler its wrapper (a ZeRO optimizer, which is no
    ``torch.optim.Optimizer``); the schedule is attached to the base optimizer
    inside, whose ``param_groups`` the wrapper steps with.
    """
    from sm3_dist.schedules import warmup_cooldown

    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return warmup_cooldown(inner, total_steps, **kwargs)


def check_engine(engine: Any) -> None:
    """Raise ``RuntimeError`` naming the cause if ``engine``'s base optimizer is not SM3.

    A :class:`DeepSpeedSM3` or a plain :class:`sm3_dist.SM3` passes (both map
    ZeRO's partitions). Anything else names what put it there: the config's
    ``"optimizer"`` section, accelerate's swap for ``DeepSpeedCPUAdam`` under
    optimizer offload, or the caller (HF Trainer discards
    ``Trainer(optimizers=(SM3(...), None))`` under DeepSpeed).
    """
    base = getattr(engine, "basic_optimizer", None)
    if isinstance(base, SM3):
        return
    raise RuntimeError(_diagnose(base, _engine_config(engine)))


def _engine_config(engine: Any) -> dict:
    config = getattr(getattr(engine, "_config", None), "_param_dict", None)
    if not isinstance(config, dict):
        config = getattr(engine, "config", None)
    return config if isinstance(config, dict) else {}


def _diagnose(base: Any, config: dict) -> str:
    found = type(base).__name__ if base is not None else "no optimizer"
    head = f"the DeepSpeed engine's optimizer is {found}, not SM3: "
    section = config.get("optimizer")
    if isinstance(section, dict) and str(section.get("type", "")).lower() != OPTIMIZER_TYPE.lower():
        return head + (
            f'the config\'s "optimizer" section names {section.get("type")!r}, and DeepSpeed builds that (accelerate '
            "and HF Trainer then hand DeepSpeed a placeholder and drop any optimizer of your own). Fix: "
            '"optimizer": {"type": "SM3", "params": {...}} in the config, or remove the section and pass SM3'
        )
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if str(offload.get("device", "none")).lower() != "none" and found.startswith("DeepSpeedCPU"):
        return head + (
            f'optimizer offload is on and the config does not say "zero_force_ds_cpu_optimizer": false, so '
            f"accelerate's DeepSpeed plugin replaced your optimizer with {found}. Fix: add "
            '"zero_force_ds_cpu_optimizer": false to the config (SM3 then steps the CPU copy of the partition)'
        )
    cause = f"{found} is the optimizer the engine was given"
    if "transformers" in sys.modules and section is None:
        cause += (
            '. Under DeepSpeed without an "optimizer" section, HF Trainer discards '
            "Trainer(optimizers=(SM3(...), None)) and builds args.optim instead. Fix: "
            'Trainer(..., optimizer_cls_and_kwargs=(SM3, {"lr": ...})), or "optimizer": {"type": "SM3"} in the '
            "DeepSpeed config"
        )
    else:
        cause += '. Fix: pass optimizer=SM3(model.parameters(), ...) or use "optimizer": {"type": "SM3"}'
    return head + cause


_MOMENTUM_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def momentum_dtype_from_config(value: str | torch.dtype) -> torch.dtype:
    """The ``torch.dtype`` a JSON config's ``"momentum_dtype"`` names (``"bfloat16"``, ``"bf16"``, ``"float32"``...)."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        dtype = _MOMENTUM_DTYPE_NAMES.get(value.strip().lower().removeprefix("torch."))
        if dtype is not None:
            return dtype
    raise ValueError(
        f"momentum_dtype {value!r} is not a known name: use one of {sorted(_MOMENTUM_DTYPE_NAMES)} "
        "(or a torch.dtype, torch.float32 or torch.bfloat16)"
    )
