"""A slow, independent SM3-II reference: one Python loop over every element, in float64.

Written from the paper's update rule (Anil, Gupta, Koren, Singer, "Memory-Efficient
Adaptive Optimization", NeurIPS 2019, arXiv:1901.11150: Algorithm SM3-II with the
cover of codimension-1 slices) and README.md's "The update" (the ``beta``, ``eps``,
``momentum`` and ``weight_decay`` variants), sharing no code with ``sm3_dist``.
Rank-0 and rank-1 tensors get one accumulator per element.

Variants: ``bias_correction`` (with ``beta > 0``) divides ``nu`` by
``1 - beta ** t`` for the update only, ``t`` being the number of steps the
parameter has taken (this one included), as Adam corrects its second moment;
the accumulators keep the plain moving average. ``ema_keeps_max`` (with
``beta > 0``) stores the larger of an accumulator's old value and its new
maximum, so accumulators never decrease (the rule of the PyTorch SM3 ports);
the update reads the new average either way. ``update_clip`` (``c > 0``) bounds
each coordinate of the preconditioned update ``g / sqrt(nu + eps)`` to ``[-c, c]``
before momentum (a NaN stays NaN).
"""

from __future__ import annotations

import itertools
import math

import torch


class ReferenceSM3:
    def __init__(
        self,
        params,
        *,
        lr=0.1,
        momentum=0.0,
        beta=0.0,
        eps=1e-30,
        weight_decay=0.0,
        maximize=False,
        bias_correction=False,
        ema_keeps_max=False,
        update_clip=0.0,
    ):
        self.params = [p.detach().double().clone() for p in params]
        self.lr, self.momentum, self.beta, self.eps = lr, momentum, beta, eps
        self.weight_decay, self.maximize = weight_decay, maximize
        self.bias_correction = bias_correction
        self.update_clip = update_clip
        self.keep_max = ema_keeps_max and beta > 0
        self.steps = [0] * len(self.params)
        self.mu = []
        for p in self.params:
            shape = tuple(p.shape) or (1,)
            if len(shape) <= 1:
                self.mu.append([[0.0] * math.prod(shape)])
            else:
                self.mu.append([[0.0] * n for n in shape])
        self.m = [torch.zeros_like(p) for p in self.params]

    def step(self, grads, touched_rows=None):
        """One step. ``touched_rows[k]``: for a sparse gradient, the rows it touches (others unchanged)."""
        for k, (w, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            rows = None if touched_rows is None else touched_rows[k]
            self.steps[k] += 1
            self._step_one(k, w, g.detach().double(), rows)

    def _step_one(self, k, w, g, rows):
        shape = tuple(w.shape) or (1,)
        wf, gf, mf = w.view(-1), g.reshape(-1), self.m[k].view(-1)
        mu = self.mu[k]
        diagonal = len(shape) <= 1
        nu = {}
        for idx in itertools.product(*(range(n) for n in shape)):
            if rows is not None and idx[0] not in rows:
                continue
            flat = 0
            for i, n in zip(idx, shape):
                flat = flat * n + i
            gi = float(gf[flat])
            if self.maximize:
                gi = -gi
            gi += self.weight_decay * float(wf[flat])
            least = mu[0][flat] if diagonal else min(mu[d][idx[d]] for d in range(len(shape)))
            if self.beta > 0:
                nu[idx] = (self.beta * least + (1 - self.beta) * gi * gi, gi, flat)
            else:
                nu[idx] = (least + gi * gi, gi, flat)
        if diagonal:
            for v, _, flat in nu.values():
                mu[0][flat] = max(mu[0][flat], v) if self.keep_max else v
        else:
            for d, n in enumerate(shape):
                new = {}
                for idx, (v, _, _) in nu.items():
                    new[idx[d]] = max(new.get(idx[d], 0.0), v)
                for i in range(n):
                    if (rows is not None and d > 0) or (self.keep_max and i in new):
                        mu[d][i] = max(mu[d][i], new.get(i, 0.0))
                    elif i in new:
                        mu[d][i] = new[i]
        correction = 1.0
        if self.bias_correction and self.beta > 0:
            correction = 1.0 - self.beta ** self.steps[k]
        for v, gi, flat in nu.values():
            v = v / correction  # the update sees the corrected average; mu keeps the plain one
            if self.eps > 0:
                u = gi / math.sqrt(v + self.eps)
            else:
                u = 0.0 if v == 0 else gi / math.sqrt(v)
            if self.update_clip > 0:
                c = self.update_clip
                if u > c:
                    u = c
                elif u < -c:
                    u = -c
            if self.momentum > 0:
                mf[flat] = self.momentum * float(mf[flat]) + (1 - self.momentum) * u
                u = float(mf[flat])
            wf[flat] = float(wf[flat]) - self.lr * u

    def accumulators(self, k):
        return [torch.tensor(v, dtype=torch.float64) for v in self.mu[k]]
