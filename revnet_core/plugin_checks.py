"""Load-time checks of couplings: one that does not invert is refused before any model is built with it.

The registry builds every registered coupling with its default options and probes it on random float64
numpy arrays (through ``array_api_compat``, the namespace couplings are written against):

- ``fx_features(d)`` is a positive int;
- ``forward(x, fx)`` keeps the shape and dtype of ``x``, stays finite and leaves its inputs untouched (the
  engine reuses them in the backward);
- ``inverse(forward(x, fx), fx)`` gives back ``x`` to ``INVERSE_TOL`` relative to ``max|x|``;
- a ``vjp`` rule, where the coupling has one, agrees with central finite differences of ``forward``;
- in float32 too, on several shapes: ``forward`` and ``inverse`` keep float32 and the inverse gives ``x``
  back to ``FP32_INVERSE_TOL`` (a coupling exact in float64 but wrong in float32, e.g. one that rounds
  through float16, would otherwise pass and give silently wrong gradients in training). Not bfloat16: numpy
  has no such dtype (it comes from ml_dtypes, which the core does not depend on).

numpy only, so discovering plugins imports no framework; a probe takes about a millisecond. Plugin
authors can call ``check_coupling`` in their own tests, at a tighter tolerance if they like.
"""

from __future__ import annotations

from typing import Any, Callable

import array_api_compat.numpy as xp
import numpy as np

from .couplings import BaseCoupling
from .errors import RevNetError

INVERSE_TOL = 1e-10  # fp64 leaves ~1e-16 per op; 1e-10 refuses any real inverse bug with room for rounding
VJP_TOL = 1e-6  # central differences at eps=1e-6 carry ~1e-9 of rounding; a wrong rule is off by O(1)
PROBE_SHAPE = (2, 3)  # leading (batch, seq) axes of the probe: rank 3 like the engine's (B, T, d) streams
PROBE_WIDTH = 6  # d of the probe; even, and not a power of two
FP32_INVERSE_TOL = 1e-5  # about 80 float32 ulps of max|x|; a float16 rounding anywhere is ~5e-4
FP32_SHAPES = ((2, 3, 6), (1, 7, 8), (3, 1, 2))  # (batch, seq, d): d even (affine-like couplings split 2d)


class PluginCheckError(RevNetError, ValueError):
    """A coupling broke its contract on the load-time probe; the message says which part and by how much."""


def check_factory(factory: Callable[..., Any], *, seed: int = 0) -> BaseCoupling:
    """Build ``factory()`` (default options) and probe it; returns the instance or raises PluginCheckError."""
    coupling = _step("instantiating it with default options", factory)
    if not isinstance(coupling, BaseCoupling):
        raise PluginCheckError(f"the factory returned {type(coupling).__name__}, not a revnet_core.BaseCoupling")
    check_coupling(coupling, seed=seed)
    return coupling


def check_coupling(coupling: BaseCoupling, *, d: int = PROBE_WIDTH, seed: int = 0,
                   inverse_tol: float = INVERSE_TOL, vjp_tol: float = VJP_TOL) -> None:
    """Probe one coupling instance on float64 arrays x: (2, 3, d), fx: (2, 3, fx_features(d)).

    Raises PluginCheckError naming the first broken part of the contract; returns None if all hold.
    """
    n_fx = _step("fx_features", coupling.fx_features, d)
    # bool is an int subclass; True would pass `> 0` and build one-wide projections.
    if isinstance(n_fx, bool) or not isinstance(n_fx, (int, np.integer)) or n_fx <= 0:
        raise PluginCheckError(f"fx_features({d}) returned {n_fx!r}; it must be a positive int")
    rng = np.random.default_rng(seed)
    x = xp.asarray(rng.standard_normal((*PROBE_SHAPE, d)))
    fx = xp.asarray(rng.standard_normal((*PROBE_SHAPE, int(n_fx))))
    x0, fx0 = x.copy(), fx.copy()

    y = _array_result("forward", _step("forward", coupling.forward, x, fx), x.shape)
    _untouched("forward", (x, x0), (fx, fx0))
    y0 = y.copy()
    x_back = _array_result("inverse", _step("inverse", coupling.inverse, y, fx), x.shape)
    _untouched("inverse", (y, y0), (fx, fx0))
    err = float(np.max(np.abs(x_back - x)))
    if not err <= inverse_tol * max(1.0, float(np.max(np.abs(x)))):
        raise PluginCheckError(f"inverse(forward(x, fx), fx) differs from x by {err:.3e} (max abs) in float64; "
                               f"the probe allows {inverse_tol:.0e} times max(1, max|x|)")

    for shape in FP32_SHAPES:
        _check_fp32_inverse(coupling, shape, rng)

    dy = xp.asarray(rng.standard_normal(x.shape))
    dy0 = dy.copy()
    grads = _step("vjp", coupling.vjp, x, fx, dy)
    if grads is NotImplemented:
        return  # the backends differentiate forward themselves
    if not isinstance(grads, (tuple, list)) or len(grads) != 2:
        raise PluginCheckError(f"vjp returned {type(grads).__name__}; it must return (dx, dfx) or NotImplemented")
    _untouched("vjp", (x, x0), (fx, fx0), (dy, dy0))
    dx = _array_result("vjp's dx", grads[0], x.shape)
    dfx = _array_result("vjp's dfx", grads[1], fx.shape)
    for label, grad, along_x in (("dx", dx, True), ("dfx", dfx, False)):
        for _ in range(3):
            u = rng.standard_normal(grad.shape)
            exact = float(np.sum(grad * u))
            numeric = _directional(coupling, x, fx, dy, u, along_x)
            if not abs(exact - numeric) <= vjp_tol * max(1.0, abs(exact)):
                raise PluginCheckError(f"vjp's {label} disagrees with finite differences of forward: "
                                       f"<{label}, u> = {exact:.6e}, numeric {numeric:.6e}")


def _check_fp32_inverse(coupling: BaseCoupling, shape: tuple, rng) -> None:
    """inverse(forward(x, fx), fx) == x to FP32_INVERSE_TOL on float32 x: ``shape``, fx: its fx_features."""
    n_fx = int(coupling.fx_features(shape[-1]))
    x = xp.asarray(rng.standard_normal(shape).astype(np.float32))
    fx = xp.asarray(rng.standard_normal((*shape[:-1], n_fx)).astype(np.float32))
    y = _array_result("forward in float32", _step("forward", coupling.forward, x, fx), shape, np.float32)
    back = _array_result("inverse in float32", _step("inverse", coupling.inverse, y, fx), shape, np.float32)
    err = float(np.max(np.abs(back.astype(np.float64) - x)))
    if not err <= FP32_INVERSE_TOL * max(1.0, float(np.max(np.abs(x)))):
        raise PluginCheckError(f"inverse(forward(x, fx), fx) differs from x by {err:.3e} (max abs) in float32 on "
                               f"shape {shape}; the probe allows {FP32_INVERSE_TOL:.0e} times max(1, max|x|)")


def _directional(coupling, x, fx, dy, u, along_x: bool, eps: float = 1e-6) -> float:
    """<dy, d forward / d(x or fx) . u> by central differences."""
    def f(t):
        return np.asarray(coupling.forward(x + t * u, fx) if along_x else coupling.forward(x, fx + t * u))
    return float(np.sum((f(eps) - f(-eps)) * dy)) / (2 * eps)


def _step(what: str, fn: Callable, *args):
    try:
        return fn(*args)
    except PluginCheckError:
        raise
    except Exception as exc:  # any failure of plugin code is the plugin's, reported with its cause
        raise PluginCheckError(f"{what} raised {type(exc).__name__}: {exc}") from exc


def _array_result(what: str, value, shape, dtype=np.float64) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != tuple(shape):
        raise PluginCheckError(f"{what} returned shape {arr.shape}, expected {tuple(shape)}")
    if arr.dtype != dtype:
        raise PluginCheckError(f"{what} returned dtype {arr.dtype} for {np.dtype(dtype)} inputs; keep the input dtype")
    if not np.all(np.isfinite(arr)):
        raise PluginCheckError(f"{what} returned non-finite values on a standard-normal probe")
    return arr


def _untouched(what: str, *pairs) -> None:
    for now, before in pairs:
        if not np.array_equal(now, before):
            raise PluginCheckError(f"{what} modified its inputs in place; the engine reuses them, so return new arrays")
