"""The doctor's own float64 reference of one SM3 step on a whole tensor, written from the update rule.

It shares no code with :mod:`sm3_dist` (the kernels are held to it, so it must not be built from them) and
none with the test suite's element-by-element reference (``tests/reference.py``, which the tests keep for
themselves): plain ``torch`` float64 operations on whole tensors.

    g <- g_raw / grad_scale;  g <- -g if maximize;  g <- g + weight_decay * w
    nu <- min_d mu_d[i_d] + g^2                        (beta = 0)
    nu <- beta * min_d mu_d[i_d] + (1 - beta) * g^2     (beta > 0)
    mu_d[k] <- max over i with i_d = k of nu[i]
    u <- g / sqrt(nu / nu_divisor + eps)                (0 where the denominator is 0)
    m <- momentum * m + (1 - momentum) * u;  u <- m     (momentum > 0)
    w <- w - lr * u

A rank-0 or rank-1 tensor has one accumulator per element. With ``found_inf`` nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Reference64"]


@dataclass
class Reference64:
    """Whole tensors in float64: ``params[k]``, ``momentum[k]`` (``None``: no momentum) and ``mu[k][d]``."""

    params: list[Tensor]
    momentum: list[Tensor | None]
    mu: list[list[Tensor]]

    @classmethod
    def of(cls, params, momentum, mu) -> Reference64:
        f64 = torch.float64
        return cls(
            [p.detach().cpu().to(f64).clone() for p in params],
            [None if m is None else m.detach().cpu().to(f64).clone() for m in momentum],
            [[a.detach().cpu().to(f64).clone() for a in accs] for accs in mu],
        )

    def step(
        self,
        grads: list[Tensor],
        *,
        lr: float,
        momentum: float = 0.0,
        beta: float = 0.0,
        eps: float = 1e-30,
        weight_decay: float = 0.0,
        maximize: bool = False,
        nu_divisor: float | None = None,
        update_clip: float = 0.0,
        grad_scale: float | None = None,
        found_inf: bool = False,
    ) -> None:
        if found_inf:
            return
        for k, g_raw in enumerate(grads):
            w = self.params[k]
            shape = w.shape
            vector = w.reshape(-1) if w.ndim <= 1 else w  # rank 0 and 1: one accumulator per element
            g = g_raw.detach().cpu().to(torch.float64).reshape(vector.shape)
            if grad_scale is not None:
                g = g / grad_scale
            if maximize:
                g = -g
            g = g + weight_decay * vector
            mu = self.mu[k]
            ndim = vector.ndim
            least = None
            for d, acc in enumerate(mu):
                view = acc.reshape([-1 if j == d else 1 for j in range(ndim)])
                least = view if least is None else torch.minimum(least, view)
            least = least.expand(vector.shape)
            nu = least + g * g if beta == 0.0 else beta * least + (1.0 - beta) * (g * g)
            self.mu[k] = [
                nu.amax(dim=tuple(j for j in range(ndim) if j != d)) if ndim > 1 else nu.clone() for d in range(ndim)
            ]
            nu_hat = nu if nu_divisor is None else nu / nu_divisor
            denominator = torch.sqrt(nu_hat + eps)
            u = torch.where(denominator > 0, g / torch.where(denominator > 0, denominator, 1.0), 0.0)
            if update_clip > 0.0:
                u = u.clamp(-update_clip, update_clip)
            if self.momentum[k] is not None:
                m = momentum * self.momentum[k].reshape(vector.shape) + (1.0 - momentum) * u
                self.momentum[k] = m.reshape(shape)
                u = m
            self.params[k] = (vector - lr * u).reshape(shape)
