"""Momentum ResNet couplings (Sander et al., 2021) for RevNet-Zero, as a plugin.

A momentum step keeps a fraction ``g`` of the stream and mixes in ``1 - g`` of the block's output::

    y = g * x + (1 - g) * f            x = (y - (1 - g) * f) / g

Registered names: ``momentum`` (g fixed, option ``gamma``) and ``momentum_learned`` (g computed per token
from one extra output channel of the block). Written over the Array API, so they run on numpy, torch and
jax arrays alike.

Unlike the additive coupling this is not volume-preserving: inverting divides by g, so rounding error in the
rebuilt streams grows by up to 1/g per coupling (two per layer). Keep g near 1 for deep stacks.
"""

from __future__ import annotations

import math

from array_api_compat import array_namespace
from revnet_core import BaseCoupling, hookimpl

__all__ = ["LearnedMomentumCoupling", "MomentumCoupling", "register_couplings"]
__version__ = "0.1.0"


class MomentumCoupling(BaseCoupling):
    """``y = gamma * x + (1 - gamma) * f`` with gamma fixed. x, fx, y: (..., d), any float dtype."""

    name = "momentum"

    def __init__(self, gamma: float = 0.9):  # 0.9: the paper's default
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"{gamma=} must lie in (0, 1): the inverse divides by gamma")
        self.gamma = float(gamma)

    def forward(self, x, fx):
        return self.gamma * x + (1.0 - self.gamma) * fx

    def inverse(self, y, fx):
        return (y - (1.0 - self.gamma) * fx) / self.gamma

    def vjp(self, x, fx, dy):
        return self.gamma * dy, (1.0 - self.gamma) * dy

    def __repr__(self) -> str:
        return f"MomentumCoupling(gamma={self.gamma})"


class LearnedMomentumCoupling(BaseCoupling):
    """Momentum with g learned per token from a gate channel the block emits besides f.

    fx: (..., d + 1) = (f, r), f: (..., d), r: (..., 1). ``g = gamma_min + (1 - gamma_min) * sigmoid(r + b)``
    with b chosen so that g = gamma_init where r = 0 (a freshly initialised block emits r near 0). g stays in
    (gamma_min, 1], so the inverse never divides by less than gamma_min.
    """

    name = "momentum_learned"

    def __init__(self, gamma_init: float = 0.9, gamma_min: float = 0.5):
        if not 0.0 < gamma_min < gamma_init < 1.0:
            raise ValueError(f"need 0 < {gamma_min=} < {gamma_init=} < 1: g starts at gamma_init and stays above "
                             "gamma_min, which bounds the inverse's division")
        self.gamma_init = float(gamma_init)
        self.gamma_min = float(gamma_min)
        p = (gamma_init - gamma_min) / (1.0 - gamma_min)
        self.bias = math.log(p / (1.0 - p))

    def fx_features(self, d: int) -> int:
        return d + 1

    def _split(self, fx):
        """(f, s, g): f (..., d); s = sigmoid(r + b) and g, both (..., 1) to broadcast over d."""
        xp = array_namespace(fx)
        f, r = fx[..., :-1], fx[..., -1:]
        s = 0.5 + 0.5 * xp.tanh(0.5 * (r + self.bias))  # sigmoid without exp's overflow for very negative r
        return f, s, self.gamma_min + (1.0 - self.gamma_min) * s

    def forward(self, x, fx):
        f, _, g = self._split(fx)
        return g * x + (1.0 - g) * f

    def inverse(self, y, fx):
        f, _, g = self._split(fx)
        return (y - (1.0 - g) * f) / g

    def vjp(self, x, fx, dy):
        xp = array_namespace(fx)
        f, s, g = self._split(fx)
        dg = xp.sum(dy * (x - f), axis=-1, keepdims=True)  # g is shared by the d features of a token
        dr = dg * ((1.0 - self.gamma_min) * s * (1.0 - s))
        return g * dy, xp.concat([(1.0 - g) * dy, dr], axis=-1)

    def __repr__(self) -> str:
        return f"LearnedMomentumCoupling(gamma_init={self.gamma_init}, gamma_min={self.gamma_min})"


@hookimpl
def register_couplings(register):
    register("momentum", MomentumCoupling)
    register("momentum_learned", LearnedMomentumCoupling)
