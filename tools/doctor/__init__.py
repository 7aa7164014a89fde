"""``sm3-dist doctor``: one command that says whether this machine, with these versions, runs SM3 correctly
and fast; ``--full`` is the GPU acceptance run.

* :mod:`~sm3_dist.tools.doctor.environment`: versions, CPU and ISA, the native kernel's build, GPU and Triton;
  every item ``ok`` or a named problem with its fix.
* :mod:`~sm3_dist.tools.doctor.correctness`: every kernel on the device bitwise against the eager per-tensor
  kernel and close to the doctor's own float64 reference (:mod:`~sm3_dist.tools.doctor.reference`).
* :mod:`~sm3_dist.tools.doctor.speed`: a short step-time table (``sm3-dist bench``'s measurement).
* :mod:`~sm3_dist.tools.doctor.full`: ``--full``, the stages of the acceptance run and their targets;
  :mod:`~sm3_dist.tools.doctor.graph`: its CUDA-graph capture; :mod:`~sm3_dist.tools.doctor.report`:
  ``report.md``/``report.json`` and ``docs/gpu-report.md``.

Exit status: 0 when every correctness check passed (and, with ``--full``, every stage finished and met its
targets), 1 otherwise, 2 for ``--device cuda`` without CUDA or bad arguments.
"""


def main(argv=None) -> int:
    """``sm3-dist doctor`` (see :mod:`sm3_dist.tools.doctor.cli`)."""
    from sm3_dist.tools.doctor.cli import main as run

    return run(argv)


__all__ = ["main"]
