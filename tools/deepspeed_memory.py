"""Per-rank optimizer-state memory under DeepSpeed ZeRO 0-3: SM3 vs DeepSpeed's Adam and Adagrad.

Run: ``python -m sm3_dist.tools.deepspeed_memory [--world 2]`` (DeepSpeed on CPU). Prints a
markdown table of the bytes of optimizer state tensors each rank holds after
one step (largest rank; ``step`` counters excluded), the same small model
(an embedding, two MLP blocks and a head; 1.18M parameters) for every row.
"""

from __future__ import annotations

import argparse
import os

import torch
from sm3_dist.tools.memory.measure import run_ranks

OPTIMIZERS = {
    "SM3 (momentum 0.9)": {"type": "SM3", "params": {"lr": 0.1, "momentum": 0.9}},
    "SM3 (momentum 0.9, bf16)": {"type": "SM3", "params": {"lr": 0.1, "momentum": 0.9, "momentum_dtype": "bfloat16"}},
    "SM3 (momentum 0)": {"type": "SM3", "params": {"lr": 0.1, "momentum": 0.0}},
    "Adam": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
    "Adagrad": {"type": "Adagrad", "params": {"lr": 1e-2}},
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    width, hidden = 256, 1024
    return torch.nn.Sequential(
        torch.nn.Embedding(256, width),
        torch.nn.Linear(width, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, width),
        torch.nn.Linear(width, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, width),
        torch.nn.Linear(width, 256),
    )


def _measure(rank: int, world: int, stage: int) -> dict[str, int]:
    import deepspeed
    import sm3_dist.integrations.deepspeed  # noqa: F401

    from sm3_dist import local_state_bytes

    out = {}
    for name, optimizer in OPTIMIZERS.items():
        model = _model()
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "optimizer": optimizer,
            "zero_optimization": {"stage": stage},
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
        }
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
        engine.backward(engine(tokens).logsumexp(-1).mean())
        engine.step()
        # The optimizer that steps: ZeRO rebuilds Adagrad on its partitions (the one it was given, with full-size
        # state, stays referenced as engine.basic_optimizer: not counted here).
        stepping = engine.optimizer.optimizer if stage > 0 else engine.basic_optimizer
        out[name] = local_state_bytes(stepping)
        out["params"] = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
        engine.destroy()
    return out


def table(world: int = 2, stages: tuple[int, ...] = (0, 1, 2, 3)) -> str:
    """The markdown table: one row per optimizer, one column per ZeRO stage (KiB of state on the largest rank)."""
    env = {"DS_ACCELERATOR": "cpu"}
    per_stage = {stage: run_ranks(_measure, world, stage, env=env) for stage in stages}
    numel = per_stage[stages[0]][0]["params"]
    lines = [
        f"Optimizer state per rank, KiB (largest rank; {numel / 1e6:.2f}M fp32 parameters = "
        f"{numel * 4 / 1024:.0f} KiB; world size {world}; DeepSpeed CPU)",
        "",
        "| optimizer | " + " | ".join(f"ZeRO-{s}" for s in stages) + " |",
        "|---|" + "---:|" * len(stages),
    ]
    for name in OPTIMIZERS:
        cells = [f"{max(r[name] for r in per_stage[s]) / 1024:,.0f}" for s in stages]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world", type=int, default=2, help="data-parallel ranks (CPU processes, default 2)")
    args = parser.parse_args()
    if args.world < 1:
        parser.error(f"--world must be >= 1, got {args.world}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(table(args.world))


if __name__ == "__main__":
    main()
