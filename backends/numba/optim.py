"""AdamW in numpy, torch.optim.AdamW's update step for step (decoupled weight decay, bias corrections)."""

from __future__ import annotations

import math

import numpy as np


class AdamW:
    """AdamW over a dict of arrays updated in place: ``step(grads)`` with grads keyed like ``params``.

    The moments are float32 or wider (the parameters' dtype if wider), like torch's for float32 parameters.
    ``decay``: the names weight decay applies to (default: every parameter).
    """

    def __init__(self, params: dict[str, np.ndarray], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, decay=None):
        self.params, self.lr, self.betas, self.eps, self.weight_decay = params, lr, betas, eps, weight_decay
        self.decay = set(params) if decay is None else set(decay)
        self.t = 0
        self.m = {k: np.zeros(v.shape, np.promote_types(v.dtype, np.float32)) for k, v in params.items()}
        self.v = {k: np.zeros_like(m) for k, m in self.m.items()}

    def step(self, grads: dict[str, np.ndarray]) -> None:
        """One update of every parameter from its gradient (same shapes)."""
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        for k, p in self.params.items():
            g, m, v = grads[k], self.m[k], self.v[k]
            if k in self.decay and self.weight_decay:
                p *= 1.0 - self.lr * self.weight_decay
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            denom = np.sqrt(v) / math.sqrt(c2) + self.eps
            p -= ((self.lr / c1) * m / denom).astype(p.dtype, copy=False)

    def state_dict(self) -> dict:
        return {"t": self.t, "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        for k in self.params:
            self.m[k][...] = state["m"][k]
            self.v[k][...] = state["v"][k]
