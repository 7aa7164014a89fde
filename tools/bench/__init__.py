"""``sm3-dist bench``: time one optimizer step, side by side, against the memory-bandwidth bound.

All optimizers step the same parameters and gradients of a GPT-style parameter
set (by default: embedding 16384x512 and 6 blocks of width 512, ~27M
parameters), interleaved round by round so that they share the machine's noise.
For each: the median and interquartile range of the step time, the ratio to
``torch.optim.Adam(fused=True)``, the optimizer state, the bytes the step must
move at the least (its algorithm's reads and writes of per-parameter tensors),
and the time those bytes take at the bandwidth of a large tensor copy measured
in the same run. On CUDA also the kernel launches of one step (counted with
``torch.profiler``) and its host synchronizations (warnings of
``torch.cuda.set_sync_debug_mode("warn")``); ``--sync-error`` runs one more step
of every SM3 row under ``set_sync_debug_mode("error")``, ``--check`` first
compares the CUDA kernels with the eager CPU kernel on a few shapes, and
``--fsdp2`` adds the parameter set FSDP2-sharded on a one-rank mesh.

* :mod:`~sm3_dist.tools.bench.shapes`: the GPT-style parameter sets (presets, ``VOCAB,WIDTH,BLOCKS``).
* :mod:`~sm3_dist.tools.bench.step`: the rows and their measurement (one process).
* :mod:`~sm3_dist.tools.bench.report`: the table and the plot; :mod:`~sm3_dist.tools.bench.cli`: the command.
* :mod:`~sm3_dist.tools.bench.distributed`: ``sm3-dist bench --distributed``, ShardedSM3 at several world
  sizes on CPU (gloo).

The benchmarks are clients of the library: they use only ``sm3_dist``'s public names and
:mod:`sm3_dist.comm`.
"""


def main(argv=None) -> int:
    """``sm3-dist bench`` (see :mod:`sm3_dist.tools.bench.cli`)."""
    from sm3_dist.tools.bench.cli import main as run

    return run(argv)


__all__ = ["main"]
