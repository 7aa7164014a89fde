"""The ``/dev/shm`` buffers DeepSpeed's CPU communication backend leaves behind, and their removal.

DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``) creates shared-memory
files ``/dev/shm/deepspeed_allreduce_buffer_<n>_<address>_<port>_<k>`` (tens of
MB each, per rank) and never unlinks them, so every run of a user script leaves
them behind until the machine reboots. :func:`remove_deepspeed_shm` removes
those of one master port; :func:`remove_deepspeed_shm_at_exit` registers that
for the current job's ``MASTER_PORT`` when the process exits (a file still
mapped by another rank stays valid for it: only its name goes)::

    from sm3_dist.integrations.shm import remove_deepspeed_shm_at_exit

    remove_deepspeed_shm_at_exit()
    engine, *_ = deepspeed.initialize(...)
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os

__all__ = ["remove_deepspeed_shm", "remove_deepspeed_shm_at_exit"]

SHM_DIR = "/dev/shm"


def remove_deepspeed_shm(port: int | str | None = None, directory: str = SHM_DIR) -> list[str]:
    """Remove DeepSpeed's all-reduce buffers of master ``port`` (default: ``$MASTER_PORT``); returns the paths."""
    port = port if port is not None else os.environ.get("MASTER_PORT")
    if port is None:
        raise ValueError("no port given and MASTER_PORT is not set: which job's buffers should go?")
    removed = []
    for path in glob.glob(os.path.join(directory, f"deepspeed_allreduce_buffer_*_{int(port)}_*")):
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    return removed


def remove_deepspeed_shm_at_exit() -> None:
    """At interpreter exit, :func:`remove_deepspeed_shm` for this job's ``MASTER_PORT`` (nothing if unset)."""
    port = os.environ.get("MASTER_PORT")
    if port is not None:
        atexit.register(remove_deepspeed_shm, port)
