"""DeepSpeed integration: SM3 under ZeRO stages 0-3, from the config or built by the user.

Two ways in, with the same per-dimension state:

* the config entry ``"optimizer": {"type": "SM3", "params": {...}}``: DeepSpeed
  builds :class:`DeepSpeedSM3` (:func:`register` makes the name known);
* ``deepspeed.initialize(model, optimizer=SM3(model.parameters(), ...))``, and
  accelerate's DeepSpeed plugin, which calls it: a plain :class:`sm3_dist.SM3`
  or a :class:`DeepSpeedSM3` built by the user.

ZeRO replaces the optimizer's parameters with flat fp32 partitions after
construction; :mod:`.layouts` (the only reader of DeepSpeed's private
attributes) maps them back to parameter shapes, or SM3 refuses to step: never
per-element accumulators.

The package: :mod:`.registration` (``torch.optim.SM3``, ZeRO's supported list,
the scheduler entry, :func:`check_engine`), :mod:`.layouts` (layout recovery),
:mod:`.optimizer` (:class:`DeepSpeedSM3`), :mod:`.universal` (universal
checkpoints). Importing it registers (:func:`register`, idempotent); so does
``import sm3_dist`` once DeepSpeed is imported.

Config values: ``"params"`` are :class:`sm3_dist.SM3`'s keyword arguments;
``"momentum_dtype": "bfloat16"`` (or ``"bf16"``, ``"float32"``) is turned into
the ``torch.dtype`` (:func:`momentum_dtype_from_config`; an unknown name raises
``ValueError``), and ``"nonfinite": "skip" | "raise" | "ignore"`` passes through.

Non-finite gradients. DeepSpeed 0.19 catches most of them itself, before the
base optimizer is called, and SM3 never sees them: under fp16 the loss scaler's
overflow check (every rank, all partitions) skips the step and lowers the
scale; under bf16 (``check_grad_overflow``, default true) and under fp32
ZeRO-1/2/3 (an inf/NaN global gradient norm counts as an overflow) the ZeRO
optimizer does the same. Those steps count in ``engine.skipped_steps``, not in
SM3's ``skipped_steps``: there is no double handling, because on such a step
``DeepSpeedSM3.step`` is not called at all. What reaches SM3 (stage 0 in fp32,
``zero_optimization.compute_grad_norm: false``, bf16 with
``check_grad_overflow: false``, or anything that writes the flat gradient after
DeepSpeed's check) is handled by SM3's ``nonfinite`` policy: with ``"skip"``
every rank skips together (one one-element all-reduce over the data-parallel
group), ``"raise"`` names the model parameter and the element index on the
rank whose partition holds it. (fp16 cannot run on a CPU without fp16 support
in oneDNN, so that path is exercised only on GPUs; the fp32 ZeRO-2 skip is
tested on CPU.)

Checkpoints: ``engine.save_checkpoint`` stores the base optimizer's
``state_dict`` (per rank under ZeRO), which holds SM3's state keyed as in
:func:`sm3_dist.accumulator_key` plus (:class:`DeepSpeedSM3`) the piece record
:data:`LAYOUT_KEY`; ``load_checkpoint`` at the same world size restores it,
checking every tensor against the layout first. :func:`to_universal` converts
a :class:`DeepSpeedSM3` checkpoint for ``"checkpoint": {"load_universal":
true}`` at another data-parallel size (:mod:`.universal`).

Offload: ``offload_optimizer: {"device": "cpu"}`` runs SM3 on the CPU copy of
the partition. accelerate's DeepSpeed plugin replaces an optimizer it does not
recognise with ``DeepSpeedCPUAdam`` under offload unless the config says
``"zero_force_ds_cpu_optimizer": false``; the configs in ``launch/deepspeed``
say so, and :func:`check_engine` raises if the engine's optimizer is not SM3.
"""

from sm3_dist.integrations.deepspeed.layouts import SUPPORTED_DEEPSPEED, explain_swapped
from sm3_dist.integrations.deepspeed.optimizer import DeepSpeedSM3
from sm3_dist.integrations.deepspeed.registration import (
    check_deepspeed_version,
    check_engine,
    momentum_dtype_from_config,
    register,
    warmup_cooldown_scheduler,
)
from sm3_dist.integrations.deepspeed.universal import LAYOUT_KEY, UNIVERSAL_KEY, to_universal

__all__ = [
    "LAYOUT_KEY",
    "SUPPORTED_DEEPSPEED",
    "UNIVERSAL_KEY",
    "DeepSpeedSM3",
    "check_deepspeed_version",
    "check_engine",
    "explain_swapped",
    "momentum_dtype_from_config",
    "register",
    "to_universal",
    "warmup_cooldown_scheduler",
]

register()
