"""sm3-dist: the SM3 optimizer with state sharded across data-parallel ranks."""

from sm3_dist.optimizer import MOMENTUM_KEY, SM3, STEP_KEY, accumulator_key, local_state_bytes
from sm3_dist.placement import ShardSpec, UnsupportedLayoutError
from sm3_dist.sharded import ShardedSM3

__all__ = [
    "MOMENTUM_KEY",
    "SM3",
    "STEP_KEY",
    "ShardSpec",
    "ShardedSM3",
    "UnsupportedLayoutError",
    "accumulator_key",
    "local_state_bytes",
]
__version__ = "0.1.0"
