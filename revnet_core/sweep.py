"""The reversible sweep, one layer at a time; backends drive the loop over layers.

A layer holds two blocks F (attention) and G (FFN) and a coupling for each::

    y1 = cf.forward(x1, F(x2))
    y2 = cg.forward(x2, G(y1))

Backward never needs the layer's inputs: it rebuilds them from the outputs, and the same evaluations of
G(y1) and F(x2) that rebuild them also give the vector-Jacobian products, so a layer's backward costs one
forward of each block plus its backward, exactly what checkpointing pays.

Backends supply ``vjp(block, x) -> (block(x), pullback)`` with ``pullback(ct) -> (dx, dparams)``; ``block``
is whatever the backend calls (an ``nn.Module``, a params-carrying JAX closure). Arrays are any Array API
arrays. Nothing here allocates more than one block's residuals at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .couplings import BaseCoupling

Vjp = Callable[[Any, Any], tuple[Any, Callable[[Any], tuple[Any, Any]]]]


@dataclass(frozen=True)
class LayerSpec:
    """A reversible layer as the sweep sees it: two blocks and their couplings."""

    f: Any
    g: Any
    cf: BaseCoupling
    cg: BaseCoupling


def forward_step(x1, x2, layer: LayerSpec):
    """(x1, x2) -> (y1, y2), each (..., d)."""
    y1 = layer.cf.forward(x1, layer.f(x2))
    y2 = layer.cg.forward(x2, layer.g(y1))
    return y1, y2


def inverse_step(y1, y2, layer: LayerSpec):
    """(y1, y2) -> (x1, x2): the layer's inputs rebuilt from its outputs."""
    x2 = layer.cg.inverse(y2, layer.g(y1))
    x1 = layer.cf.inverse(y1, layer.f(x2))
    return x1, x2


def coupling_vjp(coupling: BaseCoupling, x, fx, dy, vjp_fn):
    """(dx, dfx) of ``coupling.forward`` at (x, fx): the coupling's own rule, else the backend's autodiff."""
    out = coupling.vjp(x, fx, dy)
    if out is not NotImplemented:
        return out
    return vjp_fn(coupling, x, fx, dy)


def backward_step(y1, y2, dy1, dy2, layer: LayerSpec, vjp: Vjp, coupling_autodiff=None):
    """One layer of the reversible backward.

    Args: the layer's outputs (y1, y2) and their cotangents (dy1, dy2), all (..., d).
    Returns: (x1, x2, dx1, dx2, dparams_f, dparams_g): the rebuilt inputs, their cotangents, and the
    blocks' parameter cotangents in whatever structure the backend's pullback returns.
    """
    # Undo G first: y2 = cg(x2, G(y1)) and y1 is known.
    gy, g_pull = vjp(layer.g, y1)
    x2 = layer.cg.inverse(y2, gy)
    dx2, dgy = coupling_vjp(layer.cg, x2, gy, dy2, coupling_autodiff)
    dy1_from_g, dparams_g = g_pull(dgy)
    dz1 = dy1 + dy1_from_g
    del gy, g_pull, dgy, dy1_from_g
    # Then F: y1 = cf(x1, F(x2)) and x2 is now known.
    fx, f_pull = vjp(layer.f, x2)
    x1 = layer.cf.inverse(y1, fx)
    dx1, dfx = coupling_vjp(layer.cf, x1, fx, dz1, coupling_autodiff)
    dx2_from_f, dparams_f = f_pull(dfx)
    return x1, x2, dx1, dx2 + dx2_from_f, dparams_f, dparams_g
