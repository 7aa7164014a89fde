"""Steps with non-finite gradients: how :class:`sm3_dist.SM3` decides, alike on every rank, to skip, raise or go on.

``nonfinite="skip"`` (the default) skips a step in which any rank's gradient holds an inf or NaN and counts it
in ``skipped_steps``; ``"raise"`` raises ``FloatingPointError`` naming the parameter; ``"ignore"`` does not look.
A ``GradScaler``'s ``found_inf`` replaces the check. On CPU the decision is read on the host (free there); on
an accelerator it stays a device flag the kernels read, with no host synchronization inside ``step``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sm3_dist.comm import all_reduce_flag_, rank_suffix
from sm3_dist.kernels import dispatch, registry
from sm3_dist.kernels.dispatch import first_nonfinite, nonfinite_
from sm3_dist.kernels.registry import SCAN_DTYPES
from sm3_dist.placement import first_device, group_key, to_local
from sm3_dist.state import SKIPPED_KEY

__all__ = ["NonfiniteSteps"]


class NonfiniteSteps:
    """The non-finite part of :class:`sm3_dist.SM3`'s step, as a base class of it.

    It reads the optimizer's ``param_groups``, ``nonfinite`` policy, shard specs (``_specs``, for the process
    groups all ranks decide over), ``_name`` (how errors name a parameter) and plan cache (``_dense``, where the
    device's prepared check is kept), and keeps the device-side count of skipped steps in ``_skipped_device``.
    """

    param_groups: list[dict[str, Any]]
    nonfinite: str
    _specs: dict[Tensor, Any]
    _dense: dict[int | str, Any]

    def _nonfinite_flag(self, given: Tensor | None) -> tuple[bool, Tensor | None]:
        """Decide on this step's non-finite gradients: ``(skip it now, device flag the kernels read)``.

        ``given`` is a ``GradScaler``'s ``found_inf``: it replaces the check (its inf/NaN are the scaler's
        business, never an error). Where the flag can be read without a host synchronization (CPU) or must
        be (``"raise"``), :meth:`_found_nonfinite` decides here; otherwise the flag is set on the device,
        MAX-reduced over every process group the state is reduced over (so all ranks decide alike) without
        the host waiting, and the kernels read it; ``skipped_steps`` counts it there.
        """
        device = first_device(self.param_groups)
        host = device.type in dispatch.HOST_READ_DEVICES
        if given is None:
            if self.nonfinite == "ignore":
                return False, None
            if host or self.nonfinite == "raise":
                return self._found_nonfinite(), None
            flag = torch.zeros((), dtype=torch.float32, device=device)
            self._check_nonfinite_on_device([g for _, g in self._local_grads()], flag)
        else:
            flag = (given.reshape(()).to(device, non_blocking=True) != 0).to(torch.float32)
        all_reduce_flag_(flag, self._reduction_groups())
        if host:
            if not bool(flag):
                return False, None
            self._count_skipped(1)
            return True, None
        skipped = self.__dict__.get("_skipped_device")
        self._skipped_device = flag.clone() if skipped is None else skipped.add_(flag)
        return False, flag

    def _found_nonfinite(self) -> bool:
        """Whether any rank's gradient holds an inf/NaN, read on the host (every rank decides alike); raises
        ``FloatingPointError`` naming the parameter under ``nonfinite="raise"``, else counts a skipped step."""
        named = self._local_grads()
        bad = first_nonfinite([g for _, g in named])
        local_bad = None if bad is None else self._name(*named[bad][0])
        device = first_device(self.param_groups)
        flag = torch.full((), 0.0 if bad is None else 1.0, dtype=torch.float32, device=device)
        if not bool(all_reduce_flag_(flag, self._reduction_groups())):
            return False
        if self.nonfinite == "raise":
            where = f"in {local_bad}" if local_bad is not None else "on another rank"
            raise FloatingPointError(f"SM3: non-finite gradient {where}{rank_suffix()}; no state was changed")
        self._count_skipped(1)
        return True

    def _local_grads(self) -> list[tuple[tuple[int, int, Tensor], Tensor]]:
        """``((group index, parameter index, parameter), local gradient values)`` of every non-empty gradient."""
        named = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    g = to_local(p.grad)
                    g = g.coalesce().values() if g.is_sparse else g
                    if g.numel():
                        named.append(((gi, pi, p), g))
        return named

    def _reduction_groups(self) -> list[Any]:
        return list({group_key(s.group): s.group for s in self._specs.values() if s.group is not None}.values())

    def _count_skipped(self, n: int) -> None:
        for group in self.param_groups:
            group[SKIPPED_KEY] = group.get(SKIPPED_KEY, 0) + n

    def _check_nonfinite_on_device(self, grads: list[Tensor], flag: Tensor) -> None:
        """``nonfinite_``, through the device kernel's prepared check, kept (in the plan cache) while
        the gradients keep their sizes and dtypes."""
        kernel = registry.fused_kernel(flag.device.type)
        make = None if kernel is None else kernel.nonfinite_plan
        if make is None or any(g.dtype not in SCAN_DTYPES or not g.is_contiguous() for g in grads):
            nonfinite_(grads, flag)
            return
        plan = self._dense.get("nonfinite")
        if plan is not None:
            try:
                plan.run(flag, grads)
                return
            except ValueError:  # other sizes or dtypes than the plan's
                pass
        plan = self._dense["nonfinite"] = make(grads)
        plan.run(flag)

    def _fold_skipped(self) -> None:
        """Add the steps skipped on the device to the groups' counts (reads the device counter)."""
        skipped = self.__dict__.get("_skipped_device")
        if skipped is not None:
            self._skipped_device = None
            n = int(skipped.item())
            if n:
                self._count_skipped(n)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (kept in ``param_groups``, so checkpoints carry it).

        On an accelerator the count is kept on the device while training and read only here (or by
        ``state_dict``)."""
        self._fold_skipped()
        return max((group.get(SKIPPED_KEY, 0) for group in self.param_groups), default=0)
