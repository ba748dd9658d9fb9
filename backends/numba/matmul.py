"""The blocks' matmuls on numba's threads: each thread one single-threaded BLAS gemm on its share.

numpy's BLAS is held to one thread by default (``NumbaOptions.blas_threads``): its workers spin between
calls and took the cores from numba's prange threads (a 4096-token step 2x slower with two). So a big
product is split here instead, over numba's own threads, each calling the same single-threaded BLAS that the
attention tiles use (``np.dot`` in numba, SciPy's BLAS, see ``attention.single_threaded_kernel_blas``):

- ``a @ b`` with ``a`` C-contiguous: split over a's rows, written in place into the output (no copies);
- ``x.T @ b`` (a weight gradient, ``a`` a transposed C array): split over the summed dimension, each thread
  one partial product, the partials added after (one small (M, K) add per extra thread).

The split follows numba's thread count, so float32 results depend on it (each part is one gemm, always the
same for the same count: deterministic, as the reversible recompute needs). Small products go to numpy.
"""

from __future__ import annotations

import numpy as np

from .plugin import require_numba

numba = require_numba()
from numba import njit, prange  # noqa: E402

SPLIT_MIN_MACS = 1 << 22  # below this many multiply-adds one numpy call is cheaper than a parallel launch


@njit(parallel=True, cache=True, nogil=True)
def _split_rows(a, b, out, parts):
    M = a.shape[0]
    step = -(-M // parts)
    for p in prange(parts):
        r0 = p * step
        r1 = min(M, r0 + step)
        if r0 < r1:
            np.dot(a[r0:r1], b, out[r0:r1])


@njit(parallel=True, cache=True, nogil=True)
def _split_sum(x, b, partial):
    N = x.shape[0]
    parts = partial.shape[0]
    step = -(-N // parts)
    for p in prange(parts):
        r0 = p * step
        r1 = min(N, r0 + step)
        if r0 < r1:
            np.dot(x[r0:r1].T, b[r0:r1], partial[p])
        else:
            partial[p] = 0.0


def matmul(a: np.ndarray, b: np.ndarray, split: bool = True) -> np.ndarray:
    """a @ b for 2-D float32/float64 arrays of one dtype: (M, N) @ (N, K) -> (M, K), over numba's threads
    when ``split`` and the product is big enough, else numpy's ``@``."""
    parts = numba.get_num_threads()
    M, N = a.shape
    K = b.shape[1]
    if not split or parts < 2 or M * N * K < SPLIT_MIN_MACS or a.dtype != b.dtype or a.dtype.kind != "f":
        return a @ b
    if a.flags.c_contiguous:
        out = np.empty((M, K), a.dtype)
        _split_rows(a, b, out, min(parts, M))
        return out
    if a.T.flags.c_contiguous:  # a = x.T: split the summed dimension, x's rows
        bc = np.ascontiguousarray(b)
        partial = np.empty((min(parts, N), M, K), a.dtype)
        _split_sum(a.T, bc, partial)
        out = partial[0].copy()  # not a view: the partials' buffer is freed
        for p in range(1, partial.shape[0]):
            out += partial[p]
        return out
    return a @ b
