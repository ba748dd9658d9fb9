"""Causal attention tiled over query and key blocks with an online softmax, and its backward (numba).

One thread per (batch, head) (``prange``): heads never share a write, so there are no reductions across
threads and every call is deterministic, which the reversible backward's recompute relies on. Inside a head
the forward walks query tiles; for each it walks the key tiles up to the diagonal, keeping a running row max
and sum (flash attention), so no (T, T) array exists. The backward recomputes each tile's probabilities
from the saved log-sum-exp (flash attention 2's order: key tiles outside, query tiles inside).

A tile's products (scores, probabilities times values, and the backward's four) are ``np.dot`` calls, which
numba lowers to BLAS gemm (through SciPy's BLAS: numba needs SciPy for ``np.dot``); the softmax is loops.
SciPy's BLAS is held to one thread (``single_threaded_kernel_blas``): every prange thread calls it at once.
Layouts: q, k, v (B, H, T, hd); the output and its cotangent (B, T, H, hd), the layout the projection
reads, so no transpose copies are made.
"""

from __future__ import annotations

import math

import numpy as np

from .plugin import require_numba
from .vmath import vexp

numba = require_numba()
from numba import njit, prange  # noqa: E402


def single_threaded_kernel_blas() -> list[str]:
    """Hold the BLAS that numba's ``np.dot`` calls (SciPy's, when SciPy ships its own) to one thread; returns
    the libraries limited. Each prange thread calls it for its tiles; a multi-threaded OpenBLAS there puts
    4 threads on 2 cores and its spinning workers made a training step 10x slower (docs/numba.md). numpy's own
    BLAS, used for the blocks' big matmuls outside the kernels, keeps its threads."""
    import os

    import scipy
    import scipy.linalg.cython_blas  # noqa: F401  (loads the library)
    from threadpoolctl import ThreadpoolController

    root = os.path.dirname(scipy.__file__)  # wheels: scipy/ and scipy.libs/ beside it
    limited = []
    for lib in ThreadpoolController().select(user_api="blas").lib_controllers:
        if lib.filepath.startswith(root):
            lib.set_num_threads(1)
            limited.append(lib.filepath)
    return limited


single_threaded_kernel_blas()


@njit(cache=True, nogil=True, fastmath={"nnan", "ninf", "nsz", "reassoc"})
def _row_max(row, n):
    """max(row[:n]), vectorized (the flags let LLVM reorder a max, which is exact in any order)."""
    mx = row[0]
    for j in range(1, n):
        mx = row[j] if row[j] > mx else mx
    return mx


@njit(cache=True, nogil=True, fastmath={"reassoc", "nsz"})
def _row_sum(row, n):
    """sum(row[:n]), vectorized: reassociated, but always the same order for the same n (deterministic)."""
    total = row[0] * 0
    for j in range(n):
        total += row[j]
    return total


@njit(cache=True, nogil=True, inline="always")
def _softmax_tile(s, i0, j0, m, den, acc):
    """Online-softmax update of one (query tile, key tile) of scores s (nq, nk), in place: s becomes the
    tile's unnormalized probabilities (0 where masked), m and den (nq,) the running row max and sum, and
    acc (nq, hd) is rescaled to the new max (the caller then adds s @ v)."""
    nq, nk = s.shape
    for i in range(nq):
        last = min(nk, i0 + i - j0 + 1)  # keys j0 .. i0+i are visible to query i0+i
        if last <= 0:
            s[i, :] = 0.0
            continue
        mx = max(m[i], _row_max(s[i], last))
        alpha = vexp(m[i] - mx)  # rescales what earlier tiles summed (0 before the first: e^-inf)
        for j in range(last):
            s[i, j] = vexp(s[i, j] - mx)
        for j in range(last, nk):
            s[i, j] = 0.0
        m[i] = mx
        den[i] = den[i] * alpha + _row_sum(s[i], last)
        for c in range(acc.shape[1]):
            acc[i, c] *= alpha


@njit(parallel=True, cache=True, nogil=True)
def _forward(q, k, v, scale, tile, ktile, o, lse):
    B, H, T, hd = q.shape
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        qs = np.ascontiguousarray(q[b, h]) * scale  # scores are then one product per tile
        for i0 in range(0, T, tile):
            nq = min(tile, T - i0)
            qb = np.ascontiguousarray(qs[i0:i0 + nq])  # typed contiguous: np.dot then calls gemm
            acc = np.zeros((nq, hd), q.dtype)
            m = np.full(nq, -np.inf, q.dtype)
            den = np.zeros(nq, q.dtype)
            for j0 in range(0, i0 + nq, ktile):
                nk = min(ktile, T - j0)
                s = np.dot(qb, np.ascontiguousarray(k[b, h, j0:j0 + nk]).T)  # (nq, nk)
                _softmax_tile(s, i0, j0, m, den, acc)
                acc += np.dot(s, np.ascontiguousarray(v[b, h, j0:j0 + nk]))
            for i in range(nq):
                inv = 1.0 / den[i]
                for c in range(hd):
                    o[b, i0 + i, h, c] = acc[i, c] * inv
                lse[b, h, i0 + i] = m[i] + np.log(den[i])


@njit(parallel=True, cache=True, nogil=True)
def _backward(q, k, v, o, lse, do, scale, tile, ktile, dq, dk, dv):
    B, H, T, hd = q.shape
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        qs = np.ascontiguousarray(q[b, h]) * scale
        dob = np.ascontiguousarray(do[b, :, h, :])  # (T, hd)
        delta = np.empty(T, q.dtype)  # rowsum(dO * O): the softmax backward's correction
        for i in range(T):
            acc = 0.0
            for c in range(hd):
                acc += dob[i, c] * o[b, i, h, c]
            delta[i] = acc
        dqa = np.zeros((T, hd), q.dtype)
        for j0 in range(0, T, ktile):
            nk = min(ktile, T - j0)
            kb = np.ascontiguousarray(k[b, h, j0:j0 + nk])
            vb = np.ascontiguousarray(v[b, h, j0:j0 + nk])
            dka = np.zeros((nk, hd), q.dtype)
            dva = np.zeros((nk, hd), q.dtype)
            for i0 in range(j0 - j0 % tile, T, tile):  # earlier query tiles see none of these keys
                nq = min(tile, T - i0)
                qb, gb = np.ascontiguousarray(qs[i0:i0 + nq]), np.ascontiguousarray(dob[i0:i0 + nq])
                p = np.dot(qb, kb.T)  # the forward's scores, then its probabilities
                dp = np.dot(gb, vb.T)
                for i in range(nq):
                    last = max(0, min(nk, i0 + i - j0 + 1))
                    li, di = lse[b, h, i0 + i], delta[i0 + i]
                    for j in range(last):  # no branch inside: the loop vectorizes, vexp included
                        pij = vexp(p[i, j] - li)
                        p[i, j] = pij
                        dp[i, j] = pij * (dp[i, j] - di)  # d loss / d (scaled score)
                    for j in range(last, nk):
                        p[i, j] = 0.0
                        dp[i, j] = 0.0
                dva += np.dot(p.T, gb)
                dka += np.dot(dp.T, qb)
                dqa[i0:i0 + nq] += np.dot(dp, kb)
            dk[b, h, j0:j0 + nk] = dka
            dv[b, h, j0:j0 + nk] = dva
        dq[b, h] = dqa * scale


def causal_attention(q, k, v, tile: int = 256, key_tile: int | None = None):
    """Causal softmax(q k^T / sqrt(hd)) v: q, k, v (B, H, T, hd) C-contiguous, float32 or float64; ``tile``
    query rows and ``key_tile`` (default ``tile``) key rows per tile.

    Returns (o, lse): o (B, T, H, hd) in q's dtype and the rows' log-sum-exp (B, H, T), what the backward needs.
    """
    B, H, T, hd = q.shape
    o = np.empty((B, T, H, hd), q.dtype)
    lse = np.empty((B, H, T), q.dtype)
    _forward(q, k, v, q.dtype.type(1.0 / math.sqrt(hd)), tile, key_tile or tile, o, lse)
    return o, lse


def causal_attention_backward(q, k, v, o, lse, do, tile: int = 256, key_tile: int | None = None):
    """Cotangents (dq, dk, dv), each (B, H, T, hd), of ``causal_attention`` given do (B, T, H, hd)."""
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    _backward(q, k, v, o, lse, np.ascontiguousarray(do), q.dtype.type(1.0 / math.sqrt(q.shape[-1])), tile,
              key_tile or tile, dq, dk, dv)
    return dq, dk, dv


def reference_attention(q, k, v):
    """Plain numpy causal attention with the full (T, T) scores: the ground truth. (B, H, T, hd) -> (B, T, H, hd)."""
    T, hd = q.shape[2], q.shape[3]
    s = np.einsum("bhtc,bhsc->bhts", q, k) / math.sqrt(hd)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bhsc->bthc", p, v)
