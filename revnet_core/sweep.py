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


def _defining_class(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in c.__dict__), None)


def has_capability(coupling: BaseCoupling, name: str) -> bool:
    """Whether ``coupling`` declares capability ``name`` (``couplings.CAPABILITIES``), declared by the very
    class that defines its ``forward`` and ``inverse``: a subclass that rewrites either loses what its parent
    declared unless it declares it again."""
    cls = type(coupling)
    declarer = _defining_class(cls, "capabilities")
    return (name in getattr(coupling, "capabilities", ())
            and declarer is _defining_class(cls, "forward") and declarer is _defining_class(cls, "inverse"))


def invert(coupling: BaseCoupling, y, fx, overwrite: bool):
    """``coupling.inverse``, or its in-place twin when allowed and written by the same class: a subclass
    that overrides only ``inverse`` must not silently get its parent's ``inverse_``."""
    cls = type(coupling)
    if overwrite and _defining_class(cls, "inverse_") is _defining_class(cls, "inverse"):
        return coupling.inverse_(y, fx)
    return coupling.inverse(y, fx)


def half_backward(block, coupling: BaseCoupling, u, y, dy, vjp: Vjp, coupling_autodiff=None, overwrite=False,
                  additive_vjp=None):
    """Undo ``y = coupling(x, block(u))`` given the block input u, the output y and its cotangent dy.

    Returns (x, dx, du, dparams): the rebuilt stream, its cotangent, the cotangent reaching u through the
    block, and the block's parameter cotangents. With ``overwrite`` the caller owns y and dy and lets them
    be reused for x and dx (in place where the array type allows it).

    ``additive_vjp(block, u, dy, settle) -> (du, dparams) | NotImplemented``: a backend's way to run the
    block and its pullback in one pass, taken for couplings with the "additive" capability. There the
    block's output cotangent is dy whatever block(u) is, so the backend may differentiate piece by piece
    (attention over head chunks) while it computes block(u); it calls ``settle(block(u))`` once the output
    is complete, which rebuilds x, so the output need not outlive it. NotImplemented: the general path.
    """
    if additive_vjp is not None and has_capability(coupling, "additive"):
        rebuilt = []
        out = additive_vjp(block, u, dy, lambda bu: rebuilt.append(invert(coupling, y, bu, overwrite)))
        if out is not NotImplemented:
            if len(rebuilt) != 1:
                raise RuntimeError("additive_vjp must call settle exactly once")
            return rebuilt[0], dy, *out
    bu, pull = vjp(block, u)
    x = invert(coupling, y, bu, overwrite)
    dx, dbu = coupling_vjp(coupling, x, bu, dy, coupling_autodiff)
    du, dparams = pull(dbu)
    return x, dx, du, dparams


def _accumulate(a, b, overwrite: bool):
    if overwrite:
        a += b  # in place for mutable arrays (torch, numpy); a plain rebinding for immutable ones (jax)
        return a
    return a + b


def backward_step(y1, y2, dy1, dy2, layer: LayerSpec, vjp: Vjp, coupling_autodiff=None, *, overwrite=False,
                  g_half=half_backward, f_half=half_backward):
    """One layer of the reversible backward.

    Args: the layer's outputs (y1, y2) and their cotangents (dy1, dy2), all (..., d). ``overwrite``: the
    caller owns all four and lets the step reuse their memory. ``g_half``: how to run the G half (a backend
    may run it over sequence chunks, since G and the couplings act token by token); ``f_half`` likewise for
    F (a backend may run attention over chunks of heads). Both take ``half_backward``'s arguments.
    Returns: (x1, x2, dx1, dx2, dparams_f, dparams_g): the rebuilt inputs, their cotangents, and the
    blocks' parameter cotangents in whatever structure the backend's pullback returns.
    """
    # Undo G first: y2 = cg(x2, G(y1)) and y1 is known.
    x2, dx2, dy1_from_g, dparams_g = g_half(layer.g, layer.cg, y1, y2, dy2, vjp, coupling_autodiff, overwrite)
    dz1 = _accumulate(dy1, dy1_from_g, overwrite)
    del dy1_from_g
    # Then F: y1 = cf(x1, F(x2)) and x2 is now known.
    x1, dx1, dx2_from_f, dparams_f = f_half(layer.f, layer.cf, x2, y1, dz1, vjp, coupling_autodiff, overwrite)
    return x1, x2, dx1, _accumulate(dx2, dx2_from_f, overwrite), dparams_f, dparams_g


def pair_backward_step(y1, y2, dy1, dy2, pair, inverse, vjp2):
    """Backward of a whole-pair coupling (one that owns its functions): ``(y1, y2) = pair(x1, x2)``.

    ``inverse(pair, y1, y2) -> (x1, x2)`` rebuilds the inputs (no derivatives needed); ``vjp2(pair, x1, x2)
    -> ((y1, y2), pullback)`` re-runs the forward for the vector-Jacobian product, with pullback((dy1, dy2))
    -> (dx1, dx2, dparams). One inverse and one forward: the price of a coupling the engine cannot see into.
    """
    x1, x2 = inverse(pair, y1, y2)
    _, pull = vjp2(pair, x1, x2)
    dx1, dx2, dparams = pull((dy1, dy2))
    return x1, x2, dx1, dx2, dparams
