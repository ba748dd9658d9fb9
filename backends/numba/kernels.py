"""The numba kernels of the blocks besides attention: norms, activations, RoPE, each with its backward.

Rows (tokens) are spread over threads with ``prange``; a row is always computed by one thread in one order,
so every call is deterministic (the reversible backward's recompute must give the forward's bits). No
``fastmath``: IEEE results, the same as a float64 numpy reference to rounding. Arrays are 2-D (N, d) rows
unless said otherwise; outputs are written into arrays the caller allocates, in the inputs' dtype.
"""

from __future__ import annotations

import math

import numpy as np

from .plugin import require_numba

numba = require_numba()
from numba import njit, prange  # noqa: E402

ACTIVATION_CODES = {"gelu": 0, "gelu_exact": 1, "relu": 2, "silu": 3, "geglu": 0, "swiglu": 3}
ROWS_PER_PARTIAL = 256  # rows per partial sum of a norm's weight gradient (the partials are summed after)

_K_TANH = math.sqrt(2.0 / math.pi)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


# --- norms ----------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, nogil=True)
def layernorm_forward(x, w, b, eps, y, mean, rstd):
    """y = (x - mean) * rstd * w + b over each row of x (N, d); mean, rstd (N,) kept for the backward."""
    N, d = x.shape
    for i in prange(N):
        mu = 0.0
        for j in range(d):
            mu += x[i, j]
        mu /= d
        var = 0.0
        for j in range(d):
            c = x[i, j] - mu
            var += c * c
        r = 1.0 / math.sqrt(var / d + eps)
        mean[i] = mu
        rstd[i] = r
        for j in range(d):
            y[i, j] = (x[i, j] - mu) * r * w[j] + b[j]


@njit(parallel=True, cache=True, nogil=True)
def layernorm_backward(dy, x, mean, rstd, w, dx, dw_part, db_part):
    """dx (N, d) of layernorm; the weight and bias gradients as partial sums (N / ROWS_PER_PARTIAL, d)."""
    N, d = x.shape
    for p in prange(dw_part.shape[0]):
        for j in range(d):
            dw_part[p, j] = 0.0
            db_part[p, j] = 0.0
        for i in range(p * ROWS_PER_PARTIAL, min(N, (p + 1) * ROWS_PER_PARTIAL)):
            mu, r = mean[i], rstd[i]
            s1 = 0.0
            s2 = 0.0
            for j in range(d):
                xh = (x[i, j] - mu) * r
                g = dy[i, j] * w[j]
                s1 += g
                s2 += g * xh
                dw_part[p, j] += dy[i, j] * xh
                db_part[p, j] += dy[i, j]
            s1 /= d
            s2 /= d
            for j in range(d):
                xh = (x[i, j] - mu) * r
                dx[i, j] = r * (dy[i, j] * w[j] - s1 - xh * s2)


@njit(parallel=True, cache=True, nogil=True)
def rmsnorm_forward(x, w, eps, y, rstd):
    """y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) per row of x (N, d)."""
    N, d = x.shape
    for i in prange(N):
        ss = 0.0
        for j in range(d):
            ss += x[i, j] * x[i, j]
        r = 1.0 / math.sqrt(ss / d + eps)
        rstd[i] = r
        for j in range(d):
            y[i, j] = x[i, j] * r * w[j]


@njit(parallel=True, cache=True, nogil=True)
def rmsnorm_backward(dy, x, rstd, w, dx, dw_part):
    """dx (N, d) of rmsnorm; the weight gradient as partial sums (N / ROWS_PER_PARTIAL, d)."""
    N, d = x.shape
    for p in prange(dw_part.shape[0]):
        for j in range(d):
            dw_part[p, j] = 0.0
        for i in range(p * ROWS_PER_PARTIAL, min(N, (p + 1) * ROWS_PER_PARTIAL)):
            r = rstd[i]
            s2 = 0.0
            for j in range(d):
                xh = x[i, j] * r
                s2 += dy[i, j] * w[j] * xh
                dw_part[p, j] += dy[i, j] * xh
            s2 /= d
            for j in range(d):
                dx[i, j] = r * (dy[i, j] * w[j] - x[i, j] * r * s2)


# --- activations ----------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _act(x, code):
    """(act(x), act'(x)); code: 0 gelu (tanh), 1 exact gelu (erf), 2 relu, 3 silu."""
    if code == 0:
        inner = _K_TANH * (x + 0.044715 * x * x * x)
        t = math.tanh(inner)
        return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _K_TANH * (1.0 + 3 * 0.044715 * x * x)
    if code == 1:
        cdf = 0.5 * (1.0 + math.erf(x * _INV_SQRT2))
        return x * cdf, cdf + x * math.exp(-0.5 * x * x) * _INV_SQRT2PI
    if code == 2:
        return (x, 1.0) if x > 0 else (0.0 * x, 0.0)
    s = 1.0 / (1.0 + math.exp(-x))
    return x * s, s * (1.0 + x * (1.0 - s))


@njit(parallel=True, cache=True, nogil=True)
def activation_forward(u, code, gated, a):
    """a = act(u) (N, f), or with ``gated`` act(u[:, :f]) * u[:, f:] from u (N, 2f)."""
    N, f = a.shape
    for i in prange(N):
        for j in range(f):
            val, _ = _act(u[i, j], code)
            a[i, j] = val * u[i, f + j] if gated else val


@njit(parallel=True, cache=True, nogil=True)
def activation_backward(u, da, code, gated, du):
    """du (shaped like u) from da (N, f): the pullback of ``activation_forward`` at u."""
    N, f = da.shape
    for i in prange(N):
        for j in range(f):
            val, der = _act(u[i, j], code)
            if gated:
                du[i, j] = da[i, j] * u[i, f + j] * der
                du[i, f + j] = da[i, j] * val
            else:
                du[i, j] = da[i, j] * der


# --- rotary positions -----------------------------------------------------------------------------------
@njit(parallel=True, cache=True, nogil=True)
def split_heads_rope(qkv, cos, sin, q, k, v):
    """qkv (B, T, 3, H, hd) -> q, k, v (B, H, T, hd), q and k with pairs (x[2i], x[2i+1]) rotated by the
    position's angles: cos, sin (T, hd/2)."""
    B, T, _, H, hd = qkv.shape
    for bt in prange(B * T):
        b, t = bt // T, bt % T
        for h in range(H):
            for i in range(hd // 2):
                c, s = cos[t, i], sin[t, i]
                a, z = qkv[b, t, 0, h, 2 * i], qkv[b, t, 0, h, 2 * i + 1]
                q[b, h, t, 2 * i] = a * c - z * s
                q[b, h, t, 2 * i + 1] = a * s + z * c
                a, z = qkv[b, t, 1, h, 2 * i], qkv[b, t, 1, h, 2 * i + 1]
                k[b, h, t, 2 * i] = a * c - z * s
                k[b, h, t, 2 * i + 1] = a * s + z * c
            for c2 in range(hd):
                v[b, h, t, c2] = qkv[b, t, 2, h, c2]


@njit(parallel=True, cache=True, nogil=True)
def merge_heads_rope_backward(dq, dk, dv, cos, sin, dqkv):
    """The pullback of ``split_heads_rope``: dq, dk, dv (B, H, T, hd) -> dqkv (B, T, 3, H, hd); a rotation
    is orthogonal, so its backward rotates by the opposite angle."""
    B, T, _, H, hd = dqkv.shape
    for bt in prange(B * T):
        b, t = bt // T, bt % T
        for h in range(H):
            for i in range(hd // 2):
                c, s = cos[t, i], sin[t, i]
                a, z = dq[b, h, t, 2 * i], dq[b, h, t, 2 * i + 1]
                dqkv[b, t, 0, h, 2 * i] = a * c + z * s
                dqkv[b, t, 0, h, 2 * i + 1] = z * c - a * s
                a, z = dk[b, h, t, 2 * i], dk[b, h, t, 2 * i + 1]
                dqkv[b, t, 1, h, 2 * i] = a * c + z * s
                dqkv[b, t, 1, h, 2 * i + 1] = z * c - a * s
            for c2 in range(hd):
                dqkv[b, t, 2, h, c2] = dv[b, h, t, c2]


def partials(N: int) -> int:
    """How many partial sums a norm backward over N rows writes."""
    return max(1, -(-N // ROWS_PER_PARTIAL))


def rope_tables(T: int, head_dim: int, base: float, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (T, head_dim/2) in ``dtype``, from the canonical angles every backend computes:
    inv_freq in float64 rounded once to float32, angles = position * inv_freq in float32."""
    inv = (base ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)
    ang = (np.arange(T, dtype=np.float32)[:, None] * inv[None, :]).astype(dtype)
    return np.cos(ang), np.sin(ang)
