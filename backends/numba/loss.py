"""The LM head and next-token loss over chunks of rows, never holding full-length logits.

Each chunk's loss and its gradients with respect to the hidden states and the head weight are computed
together, so no (N, V) array outlives a chunk; only dh (N, d) and dW (V, d) are kept. Everything is in the
hidden states' dtype (float32 or float64: float64 stays float64, like the torch and JAX heads).
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def shift_targets(labels: np.ndarray) -> np.ndarray:
    """Targets for position t are labels[t + 1]; the last position has none. (B, T) -> (B, T) int64."""
    out = np.full(labels.shape, IGNORE_INDEX, np.int64)
    out[:, :-1] = labels[:, 1:]
    return out


def _chunk(hc, w, tc, inv_count, need_grad: bool):
    """One chunk: hc (n, d), tc (n,). Returns (summed loss, g) with g = dL/dlogits (n, V) or None."""
    z = hc @ w.T  # (n, V)
    valid = tc != IGNORE_INDEX
    safe = np.where(valid, tc, 0)
    mx = z.max(axis=1, keepdims=True)
    e = np.exp(z - mx)
    s = e.sum(axis=1, keepdims=True)
    lse = (mx + np.log(s))[:, 0]
    rows = np.arange(z.shape[0])
    loss = float(np.sum(np.where(valid, lse - z[rows, safe], 0.0)))
    if not need_grad:
        return loss, None
    g = e
    g /= s  # softmax, in the exponentials' memory
    g[rows, safe] -= 1.0
    g *= (valid * inv_count).astype(g.dtype)[:, None]
    return loss, g


def chunked_lm_loss(hidden, weight, targets, chunk_size: int = 1024, need_grad: bool = True):
    """Mean cross-entropy of hidden (B, T, d) @ weight (V, d).T against targets (B, T) int (IGNORE_INDEX: no
    target) over chunks of ``chunk_size`` rows.

    Returns (loss, dh, dW): the loss a Python float, dh (B, T, d) and dW (V, d) in hidden's dtype, or None
    without ``need_grad``. Targets must lie in [0, V) or be IGNORE_INDEX (the model checks them).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    count = max(int(np.sum(t != IGNORE_INDEX)), 1)
    inv = 1.0 / count
    w = weight.astype(h.dtype, copy=False)
    dh = np.empty_like(h) if need_grad else None
    dw = np.zeros(w.shape, h.dtype) if need_grad else None
    total = 0.0
    for s in range(0, h.shape[0], chunk_size):
        rows = slice(s, s + chunk_size)
        loss, g = _chunk(h[rows], w, t[rows], inv, need_grad)
        total += loss
        if g is not None:
            dh[rows] = g @ w
            dw += g.T @ h[rows]
    return total * inv, (dh.reshape(hidden.shape) if need_grad else None), dw
