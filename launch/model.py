"""GPT-2 models for the training job: transformers' ``GPT2LMHeadModel`` from a config, random weights.

The sizes follow GPT-2's family (``gpt2``/``124M`` is 12 layers x 768, ``xl`` 48 x
1600) with two small ones for CPU runs. The vocabulary is 256 byte tokens, not
GPT-2's 50257 BPE tokens, so the parameter counts are smaller than the names
say (``124M`` has about 86M parameters here). Dropout is 0, so a resumed run
repeats the uninterrupted one exactly. The model keeps no key/value cache while
it trains (``use_cache=False``: the cache would copy every layer's keys and values).

:func:`checkpoint_blocks` turns on activation checkpointing: each block keeps
only its input and is recomputed in the backward pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["SIZES", "ModelSize", "build_model", "checkpoint_blocks"]


@dataclass(frozen=True, slots=True)
class ModelSize:
    """A GPT-2 shape."""

    n_layer: int
    """Transformer blocks."""
    n_embd: int
    """Hidden width."""
    n_head: int
    """Attention heads."""


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(n_layer=2, n_embd=128, n_head=4),
    "small": ModelSize(n_layer=6, n_embd=384, n_head=6),
    "gpt2": ModelSize(n_layer=12, n_embd=768, n_head=12),
    "124M": ModelSize(n_layer=12, n_embd=768, n_head=12),
    "medium": ModelSize(n_layer=24, n_embd=1024, n_head=16),
    "large": ModelSize(n_layer=36, n_embd=1280, n_head=20),
    "xl": ModelSize(n_layer=48, n_embd=1600, n_head=25),
}


def build_model(
    size: str | ModelSize,
    *,
    n_positions: int,
    vocab_size: int = 256,
    seed: int = 0,
    dropout: float = 0.0,
    attention: str = "sdpa",
) -> torch.nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` of the named size (the same weights for the same seed).

    ``size`` may also be a :class:`ModelSize`; ``dropout`` sets every dropout
    probability (embeddings, attention, residual); ``attention`` is transformers'
    ``attn_implementation`` (``sdpa`` or ``eager``).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if isinstance(size, ModelSize):
        shape = size
    elif size in SIZES:
        shape = SIZES[size]
    else:
        raise ValueError(f"unknown model size {size!r}: choose one of {', '.join(SIZES)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"unknown attention {attention!r}: choose sdpa or eager")
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_layer=shape.n_layer,
        n_embd=shape.n_embd,
        n_head=shape.n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
        attn_implementation=attention,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model


def checkpoint_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Activation checkpointing of every transformer block of a model from :func:`build_model`, in place.

    While it trains, each block keeps only its input (saved by
    ``torch.utils.checkpoint``'s reentrant function, so the bytes are visible to
    ``torch.autograd.graph.saved_tensors_hooks``) and runs again in the backward
    pass. Outside training or without gradients a block runs as before.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.transformer.h:
        if getattr(block, "_sm3_checkpointed", False):
            continue

        def forward(hidden_states, *args, _block=block, _forward=block.forward, **kwargs):
            if not (_block.training and torch.is_grad_enabled()):
                return _forward(hidden_states, *args, **kwargs)
            return checkpoint(functools.partial(_forward, **kwargs), hidden_states, *args, use_reentrant=True)

        block.forward = forward
        block._sm3_checkpointed = True
    return model
