"""Bounded waits for the training job: a watchdog thread, and failed collectives named with their step and rank.

Process-group collectives fail on their own after ``--pg-timeout``;
:func:`collectives` re-raises such a failure naming the rank, the step and the
timeout. :class:`Watchdog` covers the waits no process-group timeout covers
(DeepSpeed's CPU shared-memory all-reduce spins without one).
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Iterator

import torch.distributed as dist

__all__ = ["Watchdog", "collectives", "comm_failure"]


class Watchdog:
    """Ends this process when the job makes no progress for ``timeout`` seconds after a :meth:`beat`.

    A daemon thread waits for the deadline; when it passes, it prints which phase
    stalled and the stack of every thread, then exits the process (code 3), so the
    launcher stops the other ranks. If native code holds the GIL, ``faulthandler``'s
    C-level timer ends the process 10 s later.
    """

    def __init__(self, timeout: float, rank: int) -> None:
        self.timeout = timeout
        self.rank = rank
        self._label = ""
        self._allowed = timeout
        self._deadline: float | None = None
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._watch, name="sm3-dist-watchdog", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def beat(self, label: str, timeout: float | None = None) -> None:
        """Progress: ``label`` (what runs now) has ``timeout`` seconds (default: the watchdog's) to the next beat."""
        timeout = self.timeout if timeout is None else timeout
        with self._cond:
            self._label = label
            self._allowed = timeout
            self._deadline = time.monotonic() + timeout
            self._cond.notify()
        faulthandler.dump_traceback_later(timeout + 10.0, exit=True)

    def stop(self) -> None:
        """End the watch and its thread (a daemon thread still waiting at interpreter exit can abort it)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()
        faulthandler.cancel_dump_traceback_later()

    def _watch(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                print(
                    f"sm3-dist train: rank {self.rank}: {self._label} made no progress for {self._allowed:g} s "
                    f"(--step-timeout {self.timeout:g} s): another rank died or hung, or a collective waits "
                    "without a timeout. Stacks of this rank follow; it exits with code 3.",
                    file=sys.stderr,
                    flush=True,
                )
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                os._exit(3)


_TIMEOUT_MARKS = ("timed out", "timeout", "deadline exceeded")
_CONNECTION_MARKS = ("connection reset", "connection closed", "connection refused", "broken pipe", "read error",
                     "nccl error", "remote worker", "peer")  # fmt: skip


def comm_failure(e: BaseException) -> str | None:
    """``"timeout"`` or ``"connection"`` when ``e`` is a failed collective (gloo/NCCL), else ``None``."""
    text = str(e).lower()
    if any(mark in text for mark in _TIMEOUT_MARKS):
        return "timeout"
    if isinstance(e, dist.DistError) or any(mark in text for mark in _CONNECTION_MARKS):
        return "connection"
    return None


@contextlib.contextmanager
def collectives(rank: int, step: int, what: str, pg_timeout: float) -> Iterator[None]:
    """Re-raise a failed or timed-out collective with the step, the rank and ``--pg-timeout``."""
    try:
        yield
    except RuntimeError as e:
        kind = comm_failure(e)
        if kind is None:
            raise
        timeout = f"--pg-timeout {pg_timeout:g} s"
        if kind == "timeout":
            why = f"a collective did not complete within the process-group timeout ({timeout})"
            why += ": another rank hung or died"
        else:
            why = f"a collective lost its connection to another rank, which died or was killed ({timeout})"
        raise RuntimeError(f"rank {rank}, step {step} ({what}): {why}. Cause: {e}") from e
