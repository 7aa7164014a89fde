"""The training job's text: byte-level tokens (vocab 256) with a deterministic held-out split.

The default corpus needs no download: every CPython ships ``pydoc_data.topics``,
the text of ``help()``'s topics (about 465 KB, 65k words of English prose with
code). Its topics are taken in sorted order; every ``HOLDOUT_EVERY``-th topic is
held out for evaluation, so no held-out paragraph also appears in training.
``--data PATH`` reads another UTF-8 (or any binary) file instead; its last
``held_out_fraction`` of bytes is held out.

Batches are a pure function of ``(seed, step)``: the global batch of a step is
the same at any world size and after a resume, and rank ``r`` of ``w`` takes
rows ``[r * B / w, (r + 1) * B / w)`` of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["HOLDOUT_EVERY", "VOCAB_SIZE", "Corpus", "eval_windows", "load_corpus", "train_batch"]

VOCAB_SIZE = 256
HOLDOUT_EVERY = 10
"""With the default corpus, topics 0, 10, 20, ... (sorted by name) are held out."""


@dataclass(frozen=True, slots=True)
class Corpus:
    """Byte tokens of a text, split into training and held-out parts."""

    name: str
    """Where the text came from."""
    train: Tensor
    """Training tokens, a 1-D ``torch.uint8`` tensor."""
    held_out: Tensor
    """Held-out tokens for evaluation, a 1-D ``torch.uint8`` tensor."""


def _tokens(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def load_corpus(path: str | Path | None = None, *, held_out_fraction: float = 0.1) -> Corpus:
    """The pydoc topics corpus, or the file at ``path`` split at ``1 - held_out_fraction`` of its bytes."""
    if path is None:
        from pydoc_data.topics import topics

        names = sorted(topics)
        train = "".join(topics[n] for i, n in enumerate(names) if i % HOLDOUT_EVERY)
        held_out = "".join(topics[n] for i, n in enumerate(names) if i % HOLDOUT_EVERY == 0)
        return Corpus("pydoc_data.topics", _tokens(train.encode()), _tokens(held_out.encode()))
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    data = Path(path).read_bytes()
    cut = int(len(data) * (1.0 - held_out_fraction))
    return Corpus(str(path), _tokens(data[:cut]), _tokens(data[cut:]))


def train_batch(
    tokens: Tensor, *, step: int, global_batch: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
) -> Tensor:
    """This rank's ``(global_batch / world_size, seq_len + 1)`` int64 windows of step ``step``.

    Inputs are ``[:, :-1]`` and next-token targets ``[:, 1:]`` (or pass the whole
    window as ``labels``: the model shifts them).
    """
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
    span = seq_len + 1
    if tokens.numel() < span + 1:
        raise ValueError(f"the corpus has {tokens.numel()} training tokens, fewer than one window of {span}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - span + 1, (global_batch,), generator=gen)
    local = global_batch // world_size
    mine = starts[rank * local : (rank + 1) * local]
    index = mine[:, None] + torch.arange(span)[None, :]
    return tokens[index].long()


def eval_windows(tokens: Tensor, *, seq_len: int, max_windows: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """Non-overlapping held-out windows ``(n, seq_len + 1)``, the same count ``n`` on every rank.

    Every rank gets the same number (sharded models run collectives in forward),
    ``n * world_size <= max_windows``.
    """
    span = seq_len + 1
    total = min(tokens.numel() // span, max_windows)
    per_rank = total // world_size
    if per_rank == 0:
        raise ValueError(
            f"the held-out text ({tokens.numel()} tokens) has fewer than {world_size} windows of {span} tokens"
        )
    windows = tokens[: total * span].view(total, span)
    return windows[rank * per_rank : (rank + 1) * per_rank].long()
