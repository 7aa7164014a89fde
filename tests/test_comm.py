"""sm3_dist.comm returns from a collective on CPU tensors only once gloo's worker threads hold no reference to them.

A worker that drops such a reference needs the GIL; one still holding it when the interpreter finalizes aborts the
process at exit (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#190489).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from sm3_dist import comm
from tests.common import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROUNDS = 20


def _gather(world: int) -> tuple[torch.Tensor, ...]:
    local, output = torch.ones(5), torch.empty(5 * world)
    comm.all_gather_flat(local, output, None)
    return local, output


def _max_reduce(world: int) -> tuple[torch.Tensor, ...]:
    reducer = comm.MaxReducer(None, [(3, 2)], torch.device("cpu"))
    reducer.zero_()
    reducer.launch()
    reducer.wait()
    return (reducer.buffer,)


COLLECTIVES = {
    # name: one collective through comm on fresh tensors; returns the tensors handed to torch.distributed
    "all_gather_flat": _gather,
    "all_reduce_": lambda world: (comm.all_reduce_(torch.ones(3), "sum", None),),
    "all_reduce_flag_": lambda world: (comm.all_reduce_flag_(torch.zeros(1), [None]),),
    "max_reducer": _max_reduce,
}


def _still_referenced(rank: int, world: int) -> dict[str, int]:
    """For each collective, in how many of ROUNDS calls a tensor was still referenced elsewhere when it returned."""
    return {
        name: sum(any(t._use_count() > 1 for t in collective(world)) for _ in range(ROUNDS))
        for name, collective in COLLECTIVES.items()
    }


def test_cpu_collectives_return_after_gloo_released_their_tensors():
    for rank, result in enumerate(run_distributed(_still_referenced, 2)):
        assert result == dict.fromkeys(COLLECTIVES, 0), f"rank {rank}: calls that returned with gloo holding a tensor"


# A framework's last collective on temporaries, its work handle dropped, then Python code until the script ends with
# the GIL never offered (switch interval 1000 s): gloo's worker is still waiting for the GIL to free the tensors when
# the interpreter finalizes. Without comm's exit drain every rank aborts ("terminate called without an active
# exception"); with it the workers finish while the atexit callback sleeps.
EXIT_SCRIPT = textwrap.dedent(
    """
    import sys
    import time

    import torch
    import torch.distributed as dist

    from sm3_dist import comm

    sys.setswitchinterval(1000.0)
    dist.init_process_group("gloo")
    comm.all_reduce_(torch.zeros(1), "max", None)
    dist.all_gather([torch.empty(4) for _ in range(2)], torch.ones(4), async_op=True)
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        pass
    """
)


def test_a_script_ending_while_a_gloo_worker_waits_for_the_gil_exits_cleanly(tmp_path):
    script = tmp_path / "ends_after_a_collective.py"
    script.write_text(EXIT_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    for _ in range(2):
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "terminate called" not in done.stderr, done.stderr[-3000:]
