"""Kept for imports written before :mod:`tests.common`, the shared harness, held these helpers."""

from tests.common import free_port, remove_shared_memory, run_distributed

__all__ = ["free_port", "remove_shared_memory", "run_distributed"]
