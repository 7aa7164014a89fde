"""HF Trainer: make sure the optimizer it steps is SM3, or stop before the first step naming why.

What HF Trainer does with SM3 (transformers 4.45-5.x):

* no DeepSpeed: ``Trainer(optimizers=(SM3(model.parameters(), ...), None))`` and
  ``Trainer(optimizer_cls_and_kwargs=(SM3, {...}))`` step that SM3 (DDP, and
  FSDP2 through accelerate, which moves it onto the sharded parameters);
* DeepSpeed, config with ``"optimizer": {"type": "SM3", "params": {"lr":
  "auto", ...}}``: DeepSpeed builds ``DeepSpeedSM3`` (the "auto" values come
  from the training arguments);
* DeepSpeed, no optimizer section: ``optimizer_cls_and_kwargs=(SM3, {...})``
  builds SM3 on the model and hands it to DeepSpeed, whose ZeRO partitions it
  then maps; but ``optimizers=(SM3(...), None)`` is discarded:
  transformers' ``deepspeed_init`` sets ``trainer.optimizer = None`` and
  builds ``args.optim`` (AdamW) instead, silently.

:class:`RequireSM3` catches the last case (and any other way a different
optimizer ends up being stepped) at ``on_train_begin``, before the first step,
with a ``RuntimeError`` naming the cause and the fix::

    from sm3_dist.integrations.transformers import RequireSM3

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RequireSM3()],
                      optimizer_cls_and_kwargs=(SM3, {"lr": 0.1, "momentum": 0.9}))
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from sm3_dist.optimizer import SM3
from sm3_dist.sharded import ShardedSM3

__all__ = ["RequireSM3", "stepped_optimizer"]

_COMPARED = ("lr", "momentum", "beta", "eps", "weight_decay", "bias_correction", "update_clip")


def stepped_optimizer(optimizer: Any) -> Any:
    """The optimizer that actually steps inside accelerate's and DeepSpeed's wrappers."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, (SM3, ShardedSM3)) and seen < 8:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return optimizer


class RequireSM3(TrainerCallback):
    """Raise before the first training step unless HF Trainer steps an SM3 (see the module docstring).

    If an SM3 was passed as ``Trainer(optimizers=(SM3(...), ...))`` and a
    different SM3 steps (a DeepSpeed config's ``"optimizer"`` entry), their
    hyperparameters must agree, so that none of yours is silently replaced.
    """

    def __init__(self) -> None:
        self.given: Any = None

    def on_init_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self.given = optimizer  # what Trainer(optimizers=(...)) received, before any framework replaced it

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        stepped = stepped_optimizer(optimizer)
        config = _deepspeed_config(args)
        if isinstance(stepped, (SM3, ShardedSM3)):
            if isinstance(self.given, SM3) and stepped is not self.given:
                _check_same_hyperparameters(self.given, stepped)
            return
        raise RuntimeError(_cause(stepped, self.given, config, args))


def _deepspeed_config(args: Any) -> dict | None:
    hf = getattr(args, "hf_deepspeed_config", None)
    config = getattr(hf, "config", None)
    return config if isinstance(config, dict) else None


def _cause(stepped: Any, given: Any, config: dict | None, args: Any) -> str:
    found = type(stepped).__name__ if stepped is not None else "no optimizer"
    head = f"HF Trainer is about to step {found}, not SM3: "
    if config is not None:
        section = config.get("optimizer")
        if section is None and isinstance(given, SM3):
            return head + (
                'under DeepSpeed without an "optimizer" section in its config, transformers\' deepspeed_init '
                "discards the optimizer passed as Trainer(optimizers=(SM3(...), None)) (it sets "
                f"trainer.optimizer = None) and builds args.optim ({_optim_name(args)}) instead. Fix: "
                'Trainer(..., optimizer_cls_and_kwargs=(SM3, {"lr": ..., "momentum": ...})), or put '
                '"optimizer": {"type": "SM3", "params": {"lr": "auto", ...}} in the DeepSpeed config'
            )
        from sm3_dist.integrations.deepspeed.registration import _diagnose

        return head + _diagnose(stepped, config).split(": ", 1)[1]
    return head + (
        f"the Trainer built it from args.optim ({_optim_name(args)}). Fix: "
        "Trainer(..., optimizers=(SM3(model.parameters(), ...), None)) or optimizer_cls_and_kwargs=(SM3, {...})"
    )


def _optim_name(args: Any) -> str:
    optim = getattr(args, "optim", "?")
    return str(getattr(optim, "value", optim))


def _check_same_hyperparameters(given: SM3, stepped: Any) -> None:
    ours = given.param_groups[0]
    theirs = stepped.param_groups[0] if stepped.param_groups else {}
    differ = [
        f"{key}: {theirs.get(key)!r} instead of {ours.get(key)!r}"
        for key in _COMPARED
        if key in ours and key in theirs and float(theirs[key]) != float(ours[key])
    ]
    if differ:
        raise RuntimeError(
            'HF Trainer is about to step an SM3 that the DeepSpeed config\'s "optimizer" section built, not the '
            "one passed as Trainer(optimizers=(SM3(...), None)) (with an optimizer section, transformers hands "
            f"DeepSpeed a placeholder and drops yours), and its hyperparameters differ: {'; '.join(differ)}. Fix: "
            'set them in the config\'s "params" ("lr": "auto" takes --learning_rate), or remove the section '
            "and pass optimizer_cls_and_kwargs=(SM3, {...})"
        )
