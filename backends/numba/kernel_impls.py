"""The numba backend's norms and activations as kernel-registry records (framework "numba", device kind cpu).

The blocks never pick a kernel by hand: they call ``layer_norm``/``rms_norm``/``activation`` below, which
ask ``revnet_kernels.registry`` (``framework="numba"``) for the implementation of this dtype and shape, so
a plugin can register a faster one (a higher ``priority``) and ``REVNET_KERNELS=reference`` forces the
numpy references. Every implementation here is VJP-shaped, numpy arrays in and out:

    layer_norm(x (N, d), w (d,), b (d,), eps) -> (y (N, d), pullback(dy) -> (dx, dw, db))
    rms_norm(x (N, d), w (d,), eps)           -> (y, pullback(dy) -> (dx, dw))
    activation(u (N, W), kind)                -> (a (N, F), pullback(da) -> du (N, W)),
                                                 F = W/2 for the gated kinds, else W

Outputs in x's (u's) dtype. ``numba_*``: the numba kernels (``kernels.py``); ``reference_*``: plain numpy,
the ground truth (float64 math for float64 inputs). ``revnet_numba.plugin.KERNELS`` registers them.
"""

from __future__ import annotations

import math

import numpy as np

from revnet_core.config import GATED_ACTIVATIONS
from revnet_kernels.registry import dispatch

FRAMEWORK = "numba"


# --- entry points the blocks call -------------------------------------------------------------------------
def layer_norm(x, w, b, eps: float, *, impl: str | None = None):
    """LayerNorm over rows x (N, d) through the registry: (y, pullback) (see the module docstring)."""
    return dispatch("layer_norm", (x, w, b, eps), {}, device="cpu", dtype=x.dtype.name,
                    meta={"hidden": x.shape[-1]}, impl=impl, framework=FRAMEWORK)


def rms_norm(x, w, eps: float, *, impl: str | None = None):
    """RMSNorm over rows x (N, d) through the registry: (y, pullback)."""
    return dispatch("rms_norm", (x, w, eps), {}, device="cpu", dtype=x.dtype.name,
                    meta={"hidden": x.shape[-1]}, impl=impl, framework=FRAMEWORK)


def activation(u, kind: str, *, impl: str | None = None):
    """The FFN activation ``kind`` of rows u (N, W) through the registry: (a, pullback)."""
    return dispatch("activation", (u, kind), {}, device="cpu", dtype=u.dtype.name,
                    meta={"kind": kind, "width": u.shape[-1]}, impl=impl, framework=FRAMEWORK)


# --- numba implementations ------------------------------------------------------------------------------
def numba_layer_norm(x, w, b, eps):
    from . import kernels as K

    y = np.empty_like(x)
    mean, rstd = np.empty(x.shape[0], x.dtype), np.empty(x.shape[0], x.dtype)
    K.layernorm_forward(x, w, b, eps, y, mean, rstd)

    def pullback(dy):
        dy = np.ascontiguousarray(dy, x.dtype)
        dx = np.empty_like(x)
        dw = np.empty((K.partials(x.shape[0]), x.shape[1]), x.dtype)
        db = np.empty_like(dw)
        K.layernorm_backward(dy, x, mean, rstd, w, dx, dw, db)
        return dx, dw.sum(0), db.sum(0)

    return y, pullback


def numba_rms_norm(x, w, eps):
    from . import kernels as K

    y = np.empty_like(x)
    rstd = np.empty(x.shape[0], x.dtype)
    K.rmsnorm_forward(x, w, eps, y, rstd)

    def pullback(dy):
        dy = np.ascontiguousarray(dy, x.dtype)
        dx = np.empty_like(x)
        dw = np.empty((K.partials(x.shape[0]), x.shape[1]), x.dtype)
        K.rmsnorm_backward(dy, x, rstd, w, dx, dw)
        return dx, dw.sum(0)

    return y, pullback


def numba_activation(u, kind):
    from . import kernels as K

    gated = kind in GATED_ACTIVATIONS
    code = K.ACTIVATION_CODES[kind]
    a = np.empty((u.shape[0], u.shape[1] // 2 if gated else u.shape[1]), u.dtype)
    K.activation_forward(u, code, gated, a)

    def pullback(da):
        da = np.ascontiguousarray(da, u.dtype)
        du = np.empty_like(u)
        K.activation_backward(u, da, code, gated, du)
        return du

    return a, pullback


# --- numpy references -----------------------------------------------------------------------------------
def reference_layer_norm(x, w, b, eps):
    xc = x - x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
    xh = xc * rstd

    def pullback(dy):
        g = dy * w
        dx = rstd * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True))
        return dx.astype(x.dtype), (dy * xh).sum(0).astype(x.dtype), dy.sum(0).astype(x.dtype)

    return (xh * w + b).astype(x.dtype), pullback


def reference_rms_norm(x, w, eps):
    rstd = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    xh = x * rstd

    def pullback(dy):
        g = dy * w
        dx = rstd * (g - xh * (g * xh).mean(-1, keepdims=True))
        return dx.astype(x.dtype), (dy * xh).sum(0).astype(x.dtype)

    return (xh * w).astype(x.dtype), pullback


def _act_pair(kind: str, u):
    """(act(u), act'(u)) in numpy, u's dtype."""
    if kind in ("gelu", "geglu"):
        k = math.sqrt(2.0 / math.pi)
        t = np.tanh(k * (u + 0.044715 * u ** 3))
        return 0.5 * u * (1 + t), 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * k * (1 + 3 * 0.044715 * u * u)
    if kind == "gelu_exact":
        from scipy.special import erf  # numba's np.dot needs SciPy already

        cdf = 0.5 * (1 + erf(u / math.sqrt(2.0)))
        return u * cdf, cdf + u * np.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
    if kind == "relu":
        return np.maximum(u, 0), (u > 0).astype(u.dtype)
    s = 1.0 / (1.0 + np.exp(-u))
    return u * s, s * (1 + u * (1 - s))


def reference_activation(u, kind):
    gated = kind in GATED_ACTIVATIONS
    f = u.shape[-1] // 2 if gated else u.shape[-1]
    val, der = _act_pair(kind, u[:, :f])

    def pullback(da):
        if not gated:
            return (da * der).astype(u.dtype)
        return np.concatenate([da * u[:, f:] * der, da * val], axis=-1).astype(u.dtype)

    return (val * u[:, f:] if gated else val).astype(u.dtype), pullback
