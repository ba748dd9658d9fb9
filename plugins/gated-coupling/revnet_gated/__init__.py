"""A gated additive coupling for RevNet-Zero, as a plugin.

The block emits two halves (a, b); a gate in (0, 1) decides how much of b enters the stream::

    y = x + sigmoid(a + gate_bias) * b            x = y - sigmoid(a + gate_bias) * b

The update depends on fx only, never on x, so the coupling is volume-preserving like the additive one and
its inverse is as exact. Registered as ``gated``. It has no ``vjp`` rule on purpose: the backends then
differentiate ``forward`` with their own autodiff (torch autograd, ``jax.vjp``), the path a plugin author
takes who does not want to write one.
"""

from __future__ import annotations

import math

from array_api_compat import array_namespace
from revnet_core import BaseCoupling, hookimpl

__all__ = ["GatedAdditiveCoupling", "register_couplings"]
__version__ = "0.1.0"


class GatedAdditiveCoupling(BaseCoupling):
    """``y = x + sigmoid(a + gate_bias) * b``. x, y: (..., d); fx: (..., 2d) = (a, b), split on the last axis."""

    name = "gated"

    def __init__(self, gate_bias: float = 0.0):  # 0: the gate starts half open; negative biases start it closed
        if not math.isfinite(gate_bias):
            raise ValueError(f"{gate_bias=} must be finite")
        self.gate_bias = float(gate_bias)

    def fx_features(self, d: int) -> int:
        return 2 * d

    def update(self, fx):
        """sigmoid(a + gate_bias) * b: (..., 2d) -> (..., d)."""
        xp = array_namespace(fx)
        d = fx.shape[-1] // 2
        a, b = fx[..., :d], fx[..., d:]
        return (0.5 + 0.5 * xp.tanh(0.5 * (a + self.gate_bias))) * b  # sigmoid, with no overflow in exp

    def forward(self, x, fx):
        return x + self.update(fx)

    def inverse(self, y, fx):
        return y - self.update(fx)

    def __repr__(self) -> str:
        return f"GatedAdditiveCoupling(gate_bias={self.gate_bias})"


@hookimpl
def register_couplings(register):
    register("gated", GatedAdditiveCoupling)
