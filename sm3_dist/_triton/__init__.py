"""The former home of the Triton kernels, kept so that ``sm3_dist._triton`` and ``python -m sm3_dist._triton``
still work: everything is :mod:`sm3_dist.kernels.cuda`."""

from sm3_dist.kernels.cuda import *  # noqa: F403
from sm3_dist.kernels.cuda import __all__  # noqa: F401
