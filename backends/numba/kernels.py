"""The numba kernels of the blocks besides attention: norms, activations, RoPE, each with its backward.

Rows (tokens) are spread over threads with ``prange``; a row is always computed by one thread in one order,
so every call is deterministic (the reversible backward's recompute must give the forward's bits). The only
``fastmath`` liberty is reassociating the norms' row sums (``_SUMS``); the activations' float32 tanh and
sigmoid come from ``vmath``; results equal a float64 numpy reference to rounding. Arrays are 2-D (N, d) rows
unless said otherwise; outputs are written into arrays the caller allocates, in the inputs' dtype.
"""

from __future__ import annotations

import math

import numpy as np

from .plugin import require_numba

numba = require_numba()
from numba import njit, prange  # noqa: E402
from numba.core import types  # noqa: E402
from numba.extending import overload, register_jitable  # noqa: E402

from .vmath import vsigmoid, vtanh  # noqa: E402

ACTIVATION_CODES = {"gelu": 0, "gelu_exact": 1, "relu": 2, "silu": 3, "geglu": 0, "swiglu": 3}
# The norms' row sums may be reassociated (vectorized): the same order for the same row length every call,
# so still deterministic, and within rounding of the sequential sum (no other fastmath liberty).
_SUMS = {"reassoc", "nsz"}
ROWS_PER_PARTIAL = 256  # rows per partial sum of a norm's weight gradient (the partials are summed after)

_K_TANH = math.sqrt(2.0 / math.pi)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


# --- norms ----------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, nogil=True, fastmath=_SUMS)
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


@njit(parallel=True, cache=True, nogil=True, fastmath=_SUMS)
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


@njit(parallel=True, cache=True, nogil=True, fastmath=_SUMS)
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


@njit(parallel=True, cache=True, nogil=True, fastmath=_SUMS)
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
# One scalar (value, derivative) function per kind, chosen per float type when numba compiles: constants
# typed like x (float32 never widens to float64), tanh and the sigmoid from ``vmath`` (vectorizable in
# float32, libm's in float64). The kernels below branch on the kind once per row, never inside a row loop,
# so each loop is straight-line code that LLVM vectorizes.
def gelu_tanh_pair(x):
    """(gelu(x), gelu'(x)), the tanh approximation (numba only)."""
    raise NotImplementedError("runs inside numba kernels only")


def gelu_erf_pair(x):
    """(gelu(x), gelu'(x)), the exact (erf) form (numba only)."""
    raise NotImplementedError("runs inside numba kernels only")


def relu_pair(x):
    """(relu(x), relu'(x)) (numba only)."""
    raise NotImplementedError("runs inside numba kernels only")


def silu_pair(x):
    """(silu(x), silu'(x)) (numba only)."""
    raise NotImplementedError("runs inside numba kernels only")


def _float(x):
    return np.float32 if x == types.float32 else np.float64


@overload(gelu_tanh_pair, inline="always")
def _gelu_tanh_pair(x):
    F = _float(x)
    half, one, k, c, c3 = F(0.5), F(1.0), F(_K_TANH), F(0.044715), F(3 * 0.044715)

    def impl(x):
        t = vtanh(k * (x + c * x * x * x))
        return half * x * (one + t), half * (one + t) + half * x * (one - t * t) * k * (one + c3 * x * x)

    return impl


@overload(gelu_erf_pair, inline="always")
def _gelu_erf_pair(x):
    F = _float(x)
    half, one, isq2, isq2pi = F(0.5), F(1.0), F(_INV_SQRT2), F(_INV_SQRT2PI)

    def impl(x):
        cdf = F(half * (one + math.erf(x * isq2)))
        return x * cdf, cdf + x * F(np.exp(-half * x * x)) * isq2pi

    return impl


@overload(relu_pair, inline="always")
def _relu_pair(x):
    F = _float(x)
    zero = F(0.0)

    def impl(x):
        pos = F(x > zero)  # 1 or 0, no branch: the loop vectorizes (and x * 0 keeps 0 * x's sign and NaN)
        return x * pos, pos

    return impl


@overload(silu_pair, inline="always")
def _silu_pair(x):
    F = _float(x)
    one = F(1.0)

    def impl(x):
        s = vsigmoid(x)
        return x * s, s * (one + x * (one - s))

    return impl


@register_jitable
def _forward_row(pair, u, a, i, gated):
    f = a.shape[1]
    if gated:
        for j in range(f):
            a[i, j] = pair(u[i, j])[0] * u[i, f + j]
    else:
        for j in range(f):
            a[i, j] = pair(u[i, j])[0]


@register_jitable
def _backward_row(pair, u, da, du, i, gated):
    f = da.shape[1]
    if gated:  # two loops of one store each: one loop of two did not vectorize
        for j in range(f):
            du[i, j] = da[i, j] * u[i, f + j] * pair(u[i, j])[1]
        for j in range(f):
            du[i, f + j] = da[i, j] * pair(u[i, j])[0]
    else:
        for j in range(f):
            du[i, j] = da[i, j] * pair(u[i, j])[1]


@njit(parallel=True, cache=True, nogil=True)
def activation_forward(u, code, gated, a):
    """a = act(u) (N, f), or with ``gated`` act(u[:, :f]) * u[:, f:] from u (N, 2f); code: 0 gelu (tanh),
    1 exact gelu (erf), 2 relu, 3 silu."""
    for i in prange(a.shape[0]):
        if code == 0:
            _forward_row(gelu_tanh_pair, u, a, i, gated)
        elif code == 1:
            _forward_row(gelu_erf_pair, u, a, i, gated)
        elif code == 2:
            _forward_row(relu_pair, u, a, i, gated)
        else:
            _forward_row(silu_pair, u, a, i, gated)


@njit(parallel=True, cache=True, nogil=True)
def activation_backward(u, da, code, gated, du):
    """du (shaped like u) from da (N, f): the pullback of ``activation_forward`` at u."""
    for i in prange(da.shape[0]):
        if code == 0:
            _backward_row(gelu_tanh_pair, u, da, du, i, gated)
        elif code == 1:
            _backward_row(gelu_erf_pair, u, da, du, i, gated)
        elif code == 2:
            _backward_row(relu_pair, u, da, du, i, gated)
        else:
            _backward_row(silu_pair, u, da, du, i, gated)


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
