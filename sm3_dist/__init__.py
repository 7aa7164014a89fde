"""sm3-dist: the SM3 optimizer with state sharded across data-parallel ranks."""

import os as _os

from sm3_dist.optimizer import SM3
from sm3_dist.placement import ShardSpec, UnsupportedLayoutError
from sm3_dist.sharded import ShardedSM3
from sm3_dist.state import MOMENTUM_KEY, STEP_KEY, accumulator_key, local_state_bytes

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

# Installed, sm3_dist.launch and sm3_dist.integrations are subpackages; in the source tree they are the folders
# launch/ and integrations/ beside this one (pyproject.toml's package-dir). When this package is imported from the
# source tree (e.g. `python -m sm3_dist.cli` run in the repository root, which puts the root first on sys.path,
# ahead of any installed copy) its subpackages are found there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if all(_os.path.isfile(_os.path.join(_root, *f)) for f in (("pyproject.toml",), ("launch", "__init__.py"))):
    __path__.append(_root)

# DeepSpeed learns "SM3" (and a plain SM3 under ZeRO gets its layouts mapped) once it is imported, in either order
from sm3_dist.integrations import register_on_import as _register_on_import  # noqa: E402

_register_on_import()
