"""Couplings: how a stream absorbs a block's output, invertibly.

A coupling combines a stream ``x`` with a function output ``fx`` into ``y`` and can undo it given the same
``fx``. Written once over the Array API, so one coupling serves every backend (torch, jax, numpy).

Contract (``BaseCoupling``)::

    fx_features(d)          -> int     # width of fx a block must produce for a stream of width d
    forward(x, fx)          -> y       # x: (..., d) stream, fx: (..., fx_features(d))
    inverse(y, fx)          -> x       # exact up to floating-point rounding
    vjp(x, fx, dy)          -> (dx, dfx) or NotImplemented (the backend then differentiates ``forward``)
    capabilities            -> frozenset of names the sweep may exploit (see ``CAPABILITIES``)
"""

from __future__ import annotations

from enum import Enum

from array_api_compat import array_namespace

from .errors import ConfigError


# What a coupling may declare, and what the sweep then does for it.
CAPABILITIES = {
    # y = x + fx: dx = dfx = dy, and the inverse needs fx alone; a block may then differentiate itself in
    # pieces (the torch engine's head-chunked attention backward) without waiting for the whole of fx.
    "additive": "y = x + fx exactly (cotangents pass through unchanged)",
}


class BaseCoupling:
    """Subclass this to write a coupling; see the module docstring for the contract."""

    name: str = ""
    capabilities: frozenset = frozenset()

    def fx_features(self, d: int) -> int:
        return d

    def forward(self, x, fx):
        raise NotImplementedError

    def inverse(self, y, fx):
        raise NotImplementedError

    def inverse_(self, y, fx):
        """``inverse`` allowed to reuse y's memory (the engine calls it only on arrays it owns)."""
        return self.inverse(y, fx)

    def vjp(self, x, fx, dy):
        """Cotangents ``(dx, dfx)`` of ``forward`` at ``(x, fx)``; NotImplemented asks the backend's autodiff."""
        return NotImplemented

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AdditiveCoupling(BaseCoupling):
    """``y = x + f``: volume preserving, the cheapest inverse (``x = y - f``)."""

    name = "additive"
    capabilities = frozenset({"additive"})

    def forward(self, x, fx):
        return x + fx

    def inverse(self, y, fx):
        return y - fx

    def inverse_(self, y, fx):
        y -= fx  # same rounding as y - fx, without a new stream-sized array where arrays are mutable
        return y

    def vjp(self, x, fx, dy):
        return dy, dy


class AffineCoupling(BaseCoupling):
    """``y = x * s + t`` with ``(r, t) = split(fx)`` and ``s = 1 + scale_init * tanh(r)``.

    The scale stays in ``[1 - scale_init, 1 + scale_init]``, bounded away from 0, so the inverse
    ``x = (y - t) / s`` is always finite; at initialisation (r near 0) the coupling is close to additive.
    ``split_dim`` is the axis of ``fx`` split into its scale half and shift half.
    """

    name = "affine"

    def __init__(self, split_dim: int = -1, scale_init: float = 0.1):
        # ConfigError (a ValueError): users pass these as coupling_options, so the message names the option.
        if isinstance(split_dim, bool) or not isinstance(split_dim, int):
            raise ConfigError(f"affine coupling option {split_dim=} must be an integer axis")
        if isinstance(scale_init, bool) or not isinstance(scale_init, (int, float)) or not 0.0 < scale_init < 1.0:
            raise ConfigError(f"affine coupling option {scale_init=} must be a number in (0, 1) so the scale stays "
                              "bounded away from 0")
        self.split_dim = split_dim
        self.scale_init = float(scale_init)

    def fx_features(self, d: int) -> int:
        return 2 * d

    def _halves(self, fx):
        axis = self.split_dim % fx.ndim
        n = fx.shape[axis] // 2
        lo = [slice(None)] * fx.ndim
        hi = [slice(None)] * fx.ndim
        lo[axis], hi[axis] = slice(0, n), slice(n, 2 * n)
        return fx[tuple(lo)], fx[tuple(hi)]

    def _scale_shift(self, fx):
        xp = array_namespace(fx)
        r, t = self._halves(fx)
        return 1.0 + self.scale_init * xp.tanh(r), t

    def forward(self, x, fx):
        s, t = self._scale_shift(fx)
        return x * s + t

    def inverse(self, y, fx):
        s, t = self._scale_shift(fx)
        return (y - t) / s

    def inverse_(self, y, fx):
        s, t = self._scale_shift(fx)
        y -= t
        y /= s
        return y

    def vjp(self, x, fx, dy):
        xp = array_namespace(fx)
        r, _ = self._halves(fx)
        th = xp.tanh(r)
        s = 1.0 + self.scale_init * th
        dr = dy * x * (self.scale_init * (1.0 - th * th))
        dfx = xp.concat([dr, dy], axis=self.split_dim % fx.ndim)
        return dy * s, dfx

    def __repr__(self) -> str:
        return f"AffineCoupling(split_dim={self.split_dim}, scale_init={self.scale_init})"


class CouplingType(str, Enum):
    """The built-in couplings by registered name; a ``str`` so it goes wherever a coupling name does
    (``ModelConfig(coupling=CouplingType.AFFINE)``, ``ReversibleAttention(..., coupling=CouplingType.ADDITIVE)``)."""

    ADDITIVE = "additive"
    AFFINE = "affine"

    def __str__(self) -> str:  # f-strings and file names show the registered name, as a user types it
        return self.value
