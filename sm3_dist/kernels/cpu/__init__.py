"""The fused SM3 step on CPU: a one-pass C++ kernel built with the system compiler at first use.

:mod:`.library` (the C++ source's generated interface, its build and load), ``sm3_native.cpp`` (the kernel),
:mod:`.native_step` (:class:`~sm3_dist.kernels.cpu.native_step.NativePlan`: blocks packed once, stepped many
times) and :mod:`.scan` (the parallel scan for inf and NaN).
"""
