"""The training job's text: byte-level tokens (vocab 256) with a deterministic held-out split.

The default corpus needs no download: every CPython ships ``pydoc_data.topics``,
the text of ``help()``'s topics (about 465 KB, 65k words of English prose with
code). Its topics are taken in sorted order; every ``HOLDOUT_EVERY``-th topic is
held out for evaluation, so no held-out paragraph also appears in training.
``--data PATH`` reads another UTF-8 (or any binary) file instead; its last
``held_out_fraction`` of bytes is held out.

``--data stdlib`` (:data:`STDLIB`) is a larger corpus that needs no download
either: the ``.py`` files of the running CPython's standard library (the
directory ``sysconfig.get_paths()["stdlib"]``), about 10 MB on CPython 3.11.
Left out: test suites (any directory named ``test``, ``tests`` or
``idle_test``), ``site-packages``/``dist-packages``, ``encodings`` (mostly
generated codec tables) and ``pydoc_data`` (the default corpus). The files are
taken in sorted order of their relative POSIX paths, each followed by one
``\\n``; every ``HOLDOUT_EVERY``-th file (0, 10, 20, ...) is held out, so no
held-out file is seen in training. The text differs between Python versions:
results name the version (:attr:`Corpus.name`).

Batches are a pure function of ``(seed, step)``: the global batch of a step is
the same at any world size and after a resume, and rank ``r`` of ``w`` takes
rows ``[r * B / w, (r + 1) * B / w)`` of it.
"""

from __future__ import annotations

import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "HOLDOUT_EVERY",
    "STDLIB",
    "VOCAB_SIZE",
    "Corpus",
    "eval_windows",
    "load_corpus",
    "spread_windows",
    "stdlib_corpus",
    "stdlib_files",
    "train_batch",
]

VOCAB_SIZE = 256
HOLDOUT_EVERY = 10
"""With the default corpus, topics 0, 10, 20, ... (sorted by name) are held out; with ``stdlib``, files."""
STDLIB = "stdlib"
"""The name ``load_corpus`` (and ``--data``) takes for the standard-library source corpus."""
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
"""Directories (at any depth) whose files the stdlib corpus leaves out."""
STDLIB_SKIP_TOP = frozenset({"encodings", "pydoc_data"})
"""Top-level packages the stdlib corpus leaves out."""


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


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The stdlib corpus's files under ``root`` (default: this CPython's stdlib), sorted by relative POSIX path."""
    base = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not base.is_dir():
        raise FileNotFoundError(f"the standard-library directory {str(base)!r} does not exist")
    found = []
    for f in base.rglob("*.py"):
        rel = f.relative_to(base)
        if STDLIB_SKIP_DIRS.intersection(rel.parts[:-1]) or (len(rel.parts) > 1 and rel.parts[0] in STDLIB_SKIP_TOP):
            continue
        if f.is_file():
            found.append((rel.as_posix(), f))
    found.sort()
    return [f for _, f in found]


def stdlib_corpus(root: str | Path | None = None) -> Corpus:
    """The stdlib corpus of the CPython at ``root`` (default this one): see the module docstring."""
    files = stdlib_files(root)
    if len(files) < HOLDOUT_EVERY:
        raise ValueError(f"the standard library at {root!r} has {len(files)} .py files, fewer than {HOLDOUT_EVERY}")
    train, held_out = bytearray(), bytearray()
    for i, f in enumerate(files):
        part = held_out if i % HOLDOUT_EVERY == 0 else train
        part += f.read_bytes()
        part += b"\n"
    version = f"{sys.implementation.name}{sys.version_info.major}.{sys.version_info.minor}"
    return Corpus(f"stdlib ({version}, {len(files)} files)", _tokens(bytes(train)), _tokens(bytes(held_out)))


def load_corpus(path: str | Path | None = None, *, held_out_fraction: float = 0.1) -> Corpus:
    """The pydoc topics corpus (``None``), the stdlib source (``"stdlib"``), or the file at ``path``.

    A file is split at ``1 - held_out_fraction`` of its bytes (a file that happens to be named
    ``stdlib`` is read as ``./stdlib``).
    """
    if path == STDLIB:
        return stdlib_corpus()
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


def spread_windows(tokens: Tensor, *, seq_len: int, count: int) -> Tensor:
    """``(count, seq_len + 1)`` held-out windows at evenly spaced starts over the whole text (int64).

    Unlike :func:`eval_windows` (contiguous windows from the start), these sample
    every part of the held-out text, so a few windows stand for all of it.
    """
    span = seq_len + 1
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    if tokens.numel() < span:
        raise ValueError(f"the held-out text ({tokens.numel()} tokens) is shorter than one window of {span} tokens")
    starts = torch.linspace(0, tokens.numel() - span, count).round().long()
    return tokens[starts[:, None] + torch.arange(span)[None, :]].long()
