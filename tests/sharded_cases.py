"""ShardedSM3's test models and the single-process runs it is held to (``test_sharded.py``, ``test_sharded_single.py``).

:class:`TinyTransformer` has an embedding, a rank-3 attention weight, rank-2 weights, biases and a scalar,
sized so that at world sizes 2, 3 and 4 a slice boundary cuts a weight mid-row; :class:`Wide` has one
weight larger than a 4-rank slice and a bf16 parameter. Two param groups (the second with its own lr and
weight decay), the same seeded global gradients on every rank, and a StepLR scheduler.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sm3_dist import SM3
from sm3_dist.sharded import FlatPartition
from tests.common import seeded_grads

LR = 0.05
STEPS = 10
HYPER = [(m, b) for m in (0.0, 0.9) for b in (0.0, 0.9)]
WORLD_SIZES = [2, 3, 4]
VOCAB = 11


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Parameter(torch.randn(3, dim, dim) / math.sqrt(dim))
        self.qkv_b = nn.Parameter(torch.zeros(3, dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (torch.einsum("btd,sed->sbte", x, self.qkv) + self.qkv_b[:, None, None, :]).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class TinyTransformer(nn.Module):
    """Embedding, a rank-3 attention weight, rank-2 weights, biases, a scalar."""

    def __init__(self, vocab: int = VOCAB, context: int = 6, dim: int = 6, hidden: int = 10) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.1)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.emb = nn.Embedding(vocab, dim)
        self.attn = Attention(dim)
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens[:, :-1]) + self.pos[: tokens.shape[1] - 1]
        x = x + self.attn(x)
        x = x + self.out(F.gelu(self.fc(self.ln(x))))
        logits = self.head(x) * self.scale
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


class Wide(nn.Module):
    """One weight larger than a 4-rank slice (ranks own only part of it), a bf16 parameter; bf16 momentum."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(9, 13))
        self.mix = nn.Parameter(torch.randn(2, 3, 5))
        self.low = nn.Parameter(torch.randn(4, 7).to(torch.bfloat16))
        self.b = nn.Parameter(torch.randn(3))


MODELS = {"transformer": TinyTransformer, "wide": Wide, "clipped": TinyTransformer}
EXTRA = {"wide": dict(momentum_dtype=torch.bfloat16), "clipped": dict(bias_correction=True, update_clip=0.5)}
"""Each kind's further SM3 keywords: ``clipped`` is the transformer with the update clipped (per element, so the
sharded steps clip exactly the coordinates the single-process step clips)."""


def make_sharded_model(kind: str = "transformer", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind]()


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: the second with its own lr and weight decay (a scheduler scales both)."""
    params = list(model.parameters())
    return [{"params": params[:-3]}, {"params": params[-3:], "lr": 2 * LR, "weight_decay": 0.01}]


def sharded_grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor | None]:
    """:func:`tests.common.seeded_grads` in the parameters' dtypes (step 0 zeroes a slice of every matrix:
    accumulator entries that stay 0); at step 3 the second parameter has none on every rank (left alone)."""
    grads: list[torch.Tensor | None] = [
        g.to(p.dtype) for p, g in zip(params, seeded_grads([p.shape for p in params], step, zero_slice=True))
    ]
    if step == 3:
        grads[1] = None
    return grads


def train(opt, params, steps, start=0, scheduler=None) -> None:
    for step in range(start, start + steps):
        for p, g in zip(params, sharded_grads(params, step)):
            p.grad = None if g is None else g.clone()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def reference_run(
    kind: str, momentum: float, beta: float, steps: int = STEPS, **overrides
) -> tuple[list[torch.Tensor], dict]:
    """Single-process SM3 on the kind's model (its :data:`EXTRA` keywords, ``overrides`` over them)."""
    model = make_sharded_model(kind)
    opt = SM3(param_groups(model), lr=LR, momentum=momentum, beta=beta, **{**EXTRA.get(kind, {}), **overrides})
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    params = list(model.parameters())
    train(opt, params, steps, scheduler=scheduler)
    return [p.detach().clone() for p in params], opt.state_dict()


def cut_mid_row(numels_shapes: list[tuple[int, ...]], world_size: int) -> list[int]:
    """Indices of rank>=2 parameters that a slice boundary cuts inside a row."""
    partition = FlatPartition(numels=tuple(math.prod(s) for s in numels_shapes), world_size=world_size)
    cut = []
    offset = 0
    for k, shape in enumerate(numels_shapes):
        n = math.prod(shape)
        for b in partition.bounds()[1:-1]:
            if len(shape) >= 2 and offset < b < offset + n and (b - offset) % shape[-1]:
                cut.append(k)
        offset += n
    return cut


def expected_local_bytes(shapes: list[tuple[int, ...]], owned, momentum: bool) -> int:
    """Momentum for the owned elements plus the hull of touched indices per accumulator, computed per element."""
    total = 0
    for shape, (a, b) in zip(shapes, owned):
        if b == a:
            continue
        if momentum:
            total += 4 * (b - a)
        if len(shape) <= 1:
            total += 4 * (b - a)
            continue
        idx = torch.unravel_index(torch.arange(a, b), shape)
        total += 4 * sum(int(i.max() - i.min() + 1) for i in idx)
    return total


def assert_state_equal(ours: dict, ref: dict) -> None:
    assert ours["param_groups"] == ref["param_groups"]
    assert sorted(ours["state"]) == sorted(ref["state"])
    for k, entry in ref["state"].items():
        assert sorted(ours["state"][k]) == sorted(entry), k
        for key, value in entry.items():
            assert ours["state"][k][key].dtype == value.dtype, (k, key)
            assert torch.equal(ours["state"][k][key], value), (k, key)
