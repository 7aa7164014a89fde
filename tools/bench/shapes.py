"""The GPT-style parameter sets both benchmarks step: presets and ``VOCAB,WIDTH,BLOCKS``."""

from __future__ import annotations

import argparse

__all__ = ["PRESETS", "gpt_shapes", "parse_params", "parse_size"]

PRESETS = {"gpt": (16384, 512, 6), "small": (4096, 256, 4), "tiny": (256, 32, 1)}
"""Parameter sets as ``(vocab, width, blocks)``."""


def gpt_shapes(vocab: int, d: int, blocks: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-style model: embedding, blocks (qkv, proj, MLP, biases, layernorms), final norm."""
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]  # ln1, attention
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # ln2, MLP
    shapes += [(d,), (d,)]
    return shapes


def parse_size(spec: str, option: str = "--size") -> tuple[int, int, int]:
    """A preset of :data:`PRESETS` (``tiny``, ``small``, ``gpt``) or ``VOCAB,WIDTH,BLOCKS``, as
    ``(vocab, width, blocks)``; bad input raises :class:`argparse.ArgumentTypeError` naming ``option``."""
    if spec in PRESETS:
        return PRESETS[spec]
    try:
        vocab, width, blocks = (int(x) for x in spec.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{option} must be one of {sorted(PRESETS)} or VOCAB,WIDTH,BLOCKS, got {spec!r}"
        ) from None
    if min(vocab, width, blocks) < 1:
        raise argparse.ArgumentTypeError(f"{option} {spec!r}: VOCAB, WIDTH and BLOCKS must be >= 1")
    return vocab, width, blocks


def parse_params(spec: str) -> list[tuple[int, ...]]:
    """``--params`` of ``sm3-dist bench``: the shapes of :func:`parse_size`'s parameter set."""
    return gpt_shapes(*parse_size(spec, "--params"))
