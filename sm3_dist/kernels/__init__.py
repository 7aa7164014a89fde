"""The SM3 kernels: the math, the registry of fused kernels, and one kernel per device type.

- :mod:`.rule`: :class:`~sm3_dist.kernels.rule.UpdateRule`, a step's hyperparameters as a kernel reads them.
- :mod:`.math`: the reference math on local tensors (per-tensor, ``foreach``, sparse rows, the eager
  non-finite scan); every kernel may import it.
- :mod:`.cpu`: the one-pass C++ kernel (its source, build and load, block packing, scan).
- :mod:`.cuda`: the Triton kernels (block table, update, scan and finalize, their check and benchmark).
- :mod:`.registry`: one :class:`~sm3_dist.kernels.registry.FusedKernel` entry per device type, loaded lazily,
  and the one default-kernel choice.
- :mod:`.dispatch`: :func:`~sm3_dist.kernels.dispatch.sm3`, one step routed to the kernel chosen.

Imports point one way: ``dispatch -> registry -> (cpu | cuda, lazily) -> math -> rule``. No kernel imports the
registry, the dispatch or anything of the optimizer above them. This file imports nothing.
"""
