"""Framework integrations for sm3-dist, one small adapter per framework (installed as ``sm3_dist.integrations``).

* :mod:`sm3_dist.integrations.deepspeed`: DeepSpeed ZeRO 0-3 (registration,
  ZeRO layout recovery, :class:`~sm3_dist.integrations.deepspeed.DeepSpeedSM3`,
  universal checkpoints).
* :mod:`sm3_dist.integrations.fsdp1`: FSDP1 (``FullyShardedDataParallel``)
  shard resolver and resharding checkpoints. (FSDP2 needs no adapter: SM3
  reads DTensor placements itself, :mod:`sm3_dist.placement`.)
* :mod:`sm3_dist.integrations.transformers`: a ``TrainerCallback`` that makes
  sure HF Trainer steps the SM3 it was given.
* :mod:`sm3_dist.integrations.shm`: removal of the ``/dev/shm`` buffers
  DeepSpeed's CPU backend leaves behind.

accelerate needs no adapter of its own (its DDP, DeepSpeed and FSDP2 paths go
through the above; README, "Your own scripts").

The core imports none of these. The one exception is :func:`register_on_import`,
which ``import sm3_dist`` calls: once DeepSpeed is imported (before or after
sm3_dist), ``sm3_dist.integrations.deepspeed`` registers SM3 with it, so a
script that forgets that import still gets ``"type": "SM3"`` and a ZeRO-aware
plain ``SM3``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

__all__ = ["register_on_import"]

_ON_IMPORT = {"deepspeed": "sm3_dist.integrations.deepspeed"}
"""Framework module -> the integration module that registers with it when imported."""


def register_on_import() -> None:
    """Import each integration of :data:`_ON_IMPORT` once its framework is imported (now, if it already is)."""
    for framework, integration in _ON_IMPORT.items():
        if framework in sys.modules:
            _load(integration)
        elif not any(isinstance(f, _AfterImport) and f.name == framework for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport(framework, integration))


def _load(integration: str) -> None:
    try:
        importlib.import_module(integration)
    except Exception as err:  # an unsupported version must not break the user's import of the framework
        warnings.warn(f"sm3_dist: {integration} was not registered: {err}", RuntimeWarning, stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of one top-level module so that ``then`` is imported after it."""

    def __init__(self, name: str, then: str) -> None:
        self.name, self.then, self._busy = name, then, False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ThenLoader(spec.loader, self)
        return spec


class _ThenLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, finder: _AfterImport) -> None:
        self._loader, self._finder = loader, finder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader  # the wrapper's work is done
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        _load(self._finder.then)
