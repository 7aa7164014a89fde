"""The models, batches, configs and state readers the DeepSpeed tests share (see ``test_deepspeed.py``)."""

from __future__ import annotations

import os

import torch

ENV = {"DS_ACCELERATOR": "cpu"}
os.environ.update(ENV)

HYPER = {"lr": 0.05, "momentum": 0.9}
STEPS = 10
BATCH = 4


class Net(torch.nn.Module):
    """Shapes chosen so that ZeRO partition boundaries cut weights mid-row at world sizes 2 and 3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 7)
        self.mix = torch.nn.Parameter(torch.randn(2, 3, 7) * 0.3)
        self.fc2 = torch.nn.Linear(7, 3)
        self.scale = torch.nn.Parameter(torch.tensor([1.5]))  # 0-dim: DeepSpeed's broadcast rejects it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        h = h + torch.einsum("bk,ijk->bk", h, self.mix) * 0.1
        return self.fc2(h) * self.scale


class ExactNet(Net):
    """:class:`Net`'s parameters under a loss linear in each: gradients ``3 m``, ``m`` a small multiple of 1/8."""

    def forward(self, x1, d1, x2, d2, c_mix, c_scale):  # type: ignore[override]
        return (
            (self.fc1(x1) * d1).sum()
            + (self.fc2(x2) * d2).sum()
            + (self.mix * c_mix).sum()
            + (self.scale * c_scale).sum()
        )


MODELS = {"net": Net, "exact": ExactNet}


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 5, generator=gen), torch.randn(BATCH, 3, generator=gen)


def _exact_batch(step: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(200 + step)

    def ints(*shape):
        return torch.randint(-2, 3, shape, generator=gen).float()

    return (
        ints(BATCH, 5),
        ints(BATCH, 7) * 3 / 8,
        ints(BATCH, 7),
        ints(BATCH, 3) * 3 / 8,
        ints(2, 3, 7) * 3 / 8,
        ints(1) * 3 / 8,
    )


def loss_of(model, kind: str, step: int, poison: bool = False, dtype=torch.float32, scale: float = 1.0):
    """The loss of batch ``step`` (inputs in ``dtype``); ``poison`` puts a NaN into the input (every gradient of
    the rank turns NaN); ``scale`` multiplies :class:`Net`'s loss."""
    if kind == "net":
        x, y = _batch(step)
        if poison:
            x[0, 0] = float("nan")
        return ((model(x.to(dtype)) - y.to(dtype)) ** 2).mean() * scale
    inputs = list(_exact_batch(step))
    if poison:
        inputs[0][0, 0] = float("nan")
    return model(*(t.to(dtype) for t in inputs))


def reference(kind: str = "net", steps: int = STEPS, skip=(), poison=(), device="cpu", **options):
    """Single-process SM3 trained on the batches every rank of an engine sees (``skip``: steps left out;
    ``poison``: steps whose input holds a NaN). Returns the model and the optimizer."""
    from sm3_dist import SM3

    torch.manual_seed(0)
    model = MODELS[kind]().to(device)
    opt = SM3(model.parameters(), **{**HYPER, **options})
    for step in range(steps):
        if step in skip:
            continue
        opt.zero_grad()
        loss_of(model, kind, step, poison=step in poison).backward()
        opt.step()
    opt.state_dict()
    return model, opt


def _config(stage: int, params: dict | None = None, **extra) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "SM3", "params": {**HYPER, **(params or {})}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips to norm 1.0 unless told otherwise
    }
    if stage == 3:
        cfg["zero_optimization"]["sub_group_size"] = 40  # several sub-groups: one optimizer step each
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def _full_params(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    if engine.zero_optimization_stage() == 3:
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _describe_state(opt) -> list[dict]:
    """Per optimizer tensor: its pieces (tensor_id, shape, ranges, straddle) and its state tensors."""
    out = []
    for p, spec in opt._specs.items():  # ZeRO-3 empties param_groups between steps: walk the resolved tensors
        if p in opt.state:
            pieces = []
            for piece in spec.layout.pieces:
                mid_row = piece.ndim >= 2 and any(
                    b.starts[-1] != 0 or b.lengths[-1] != piece.shape[-1] for b in piece.blocks
                )
                pieces.append(
                    dict(
                        tensor_id=piece.tensor_id,
                        shape=piece.shape,
                        ranges=piece.ranges,
                        numel=piece.numel,
                        mid_row=mid_row,
                        partial=not piece.is_full,
                    )
                )
            out.append(
                dict(
                    numel=p.numel(),
                    pieces=pieces,
                    reduced=spec.group is not None,
                    state={k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)},
                )
            )
    return out
