"""GPT-2 models for the training job: transformers' ``GPT2LMHeadModel`` from a config, random weights.

The sizes follow GPT-2's family (``gpt2``/``124M`` is 12 layers x 768, ``xl`` 48 x
1600) with two small ones for CPU runs. The vocabulary is 256 byte tokens, not
GPT-2's 50257 BPE tokens, so the parameter counts are smaller than the names
say (``124M`` has about 86M parameters here). Dropout is 0, so a resumed run
repeats the uninterrupted one exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SIZES", "ModelSize", "build_model"]


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


def build_model(size: str, *, n_positions: int, vocab_size: int = 256, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` of the named size (the same weights for the same seed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}: choose one of {', '.join(SIZES)}")
    shape = SIZES[size]
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_layer=shape.n_layer,
        n_embd=shape.n_embd,
        n_head=shape.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model
