"""``sm3-dist memory``: a per-rank memory model of data-parallel training, checked by measurement.

* :mod:`~sm3_dist.tools.memory.model`: model states per rank (parameters, gradients, master weights,
  optimizer state, working set) by setup and optimizer; pure arithmetic.
* :mod:`~sm3_dist.tools.memory.activations`: activation bytes, the largest micro-batch and model a budget
  allows; pure arithmetic.
* :mod:`~sm3_dist.tools.memory.measure`: optimizer state of real optimizer instances.
* :mod:`~sm3_dist.tools.memory.saved`: activation bytes autograd really keeps, on CPU.
* :mod:`~sm3_dist.tools.memory.step`: whole training steps measured (CPU allocator events, CUDA peaks) and
  the largest micro-batch and depth that train under a budget.
* :mod:`~sm3_dist.tools.memory.report` and :mod:`~sm3_dist.tools.memory.cli`: tables, plots, the command.
"""

from sm3_dist.tools.memory.activations import (
    ACTIVATION_PRECISIONS,
    ActivationBytes,
    ActivationModel,
    activation_bytes,
    activation_bytes_per_token,
    activation_terms,
    largest_model,
    max_micro_batch,
)
from sm3_dist.tools.memory.model import (
    BUDGETS_GIB,
    GIB,
    OPTIMIZERS,
    PRECISIONS,
    SETUPS,
    SIZES,
    WORLD_SIZES,
    GPT2Config,
    RankCounts,
    RankMemory,
    family_config,
    flat_bounds,
    rank_counts,
    rank_memory,
    resolve_size,
    state_bytes,
)


def main(argv=None) -> int:
    """``sm3-dist memory`` (see :mod:`sm3_dist.tools.memory.cli`)."""
    from sm3_dist.tools.memory.cli import main as run

    return run(argv)


__all__ = [
    "ACTIVATION_PRECISIONS",
    "BUDGETS_GIB",
    "GIB",
    "OPTIMIZERS",
    "PRECISIONS",
    "SETUPS",
    "SIZES",
    "WORLD_SIZES",
    "ActivationBytes",
    "ActivationModel",
    "GPT2Config",
    "RankCounts",
    "RankMemory",
    "activation_bytes",
    "activation_bytes_per_token",
    "activation_terms",
    "family_config",
    "flat_bounds",
    "largest_model",
    "main",
    "max_micro_batch",
    "rank_counts",
    "rank_memory",
    "resolve_size",
    "state_bytes",
]
