"""The LM head and next-token loss over sequence chunks, never holding full-length logits.

Chunking under ordinary autodiff would still keep every chunk's logits for the backward. The ``custom_vjp``
below computes, in its forward rule, each chunk's loss *and* its gradients with respect to the hidden states
and the head weight inside one ``lax.scan``, keeping only those: (N, d) and (V, d); no (N, V) array outlives
a chunk. The backward only scales them by the incoming cotangent. Without differentiation only the loss is
computed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def _chunks(h, targets, chunk_size: int):
    """(N, d), (N,) -> (n_chunks, c, d), (n_chunks, c) padded with ignored rows."""
    N = h.shape[0]
    c = min(chunk_size, N)
    pad = -N % c
    h = jnp.pad(h, ((0, pad), (0, 0)))
    targets = jnp.pad(targets, (0, pad), constant_values=IGNORE_INDEX)
    return h.reshape(-1, c, h.shape[-1]), targets.reshape(-1, c)


def _chunk_logits(hc, w, cdtype):
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(cdtype).itemsize >= 4 else None
    acc = jnp.promote_types(cdtype, jnp.float32)  # softmax in >= float32
    return jnp.einsum("nd,vd->nv", hc.astype(cdtype), w, precision=precision, preferred_element_type=acc)


def _chunk_loss(logits, tc, vocab: int):
    """Summed cross-entropy of one chunk and the pieces its gradient needs. Targets outside [0, vocab) that
    are not IGNORE_INDEX give NaN (ids cannot be range-checked under jit; a silent clamp would be worse)."""
    valid = tc != IGNORE_INDEX
    bad = valid & ((tc < 0) | (tc >= vocab))
    safe = jnp.where(valid & ~bad, tc, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[:, None], axis=1)[:, 0]
    per_row = jnp.where(valid, lse - picked, 0.0) + jnp.where(bad, jnp.asarray(jnp.nan, lse.dtype), 0.0)
    return per_row.sum(), lse, safe, valid


def _loss_only(h, w, targets, chunk_size: int, cdtype):
    hs, ts = _chunks(h, targets, chunk_size)
    wc = w.astype(cdtype)

    def step(total, xs):
        hc, tc = xs
        s, _, _, _ = _chunk_loss(_chunk_logits(hc, wc, cdtype), tc, w.shape[0])
        return total + s, None

    acc = jnp.promote_types(cdtype, jnp.float32)
    total, _ = jax.lax.scan(step, jnp.zeros((), acc), (hs, ts))
    count = jnp.maximum(jnp.sum(targets != IGNORE_INDEX), 1).astype(acc)
    return total / count, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_ce(h, w, targets, chunk_size: int, cdtype):
    return _loss_only(h, w, targets, chunk_size, cdtype)[0]


def _chunked_ce_fwd(h, w, targets, chunk_size: int, cdtype):
    N, d = h.shape
    hs, ts = _chunks(h, targets, chunk_size)
    wc = w.astype(cdtype)
    acc = jnp.promote_types(cdtype, jnp.float32)
    count = jnp.maximum(jnp.sum(targets != IGNORE_INDEX), 1).astype(acc)

    def step(carry, xs):
        total, dw = carry
        hc, tc = xs
        logits = _chunk_logits(hc, wc, cdtype)  # (c, V)
        s, lse, safe, valid = _chunk_loss(logits, tc, w.shape[0])
        # d loss / d logits = (softmax - onehot) / count on rows with a target, 0 elsewhere.
        g = jnp.exp(logits - lse[:, None])
        g = g - jax.nn.one_hot(safe, logits.shape[-1], dtype=g.dtype)
        g = (g * (valid.astype(g.dtype) / count)[:, None]).astype(cdtype)
        dh = jnp.einsum("nv,vd->nd", g, wc, preferred_element_type=acc).astype(h.dtype)
        dw = dw + jnp.einsum("nv,nd->vd", g, hc.astype(cdtype), preferred_element_type=acc).astype(dw.dtype)
        return (total + s, dw), dh

    init = (jnp.zeros((), acc), jnp.zeros(w.shape, jnp.promote_types(w.dtype, jnp.float32)))
    (total, dw), dh = jax.lax.scan(step, init, (hs, ts))
    dh = dh.reshape(-1, d)[:N]
    return total / count, (dh, dw.astype(w.dtype))


def _chunked_ce_bwd(chunk_size, cdtype, res, g):
    dh, dw = res
    return dh * g.astype(dh.dtype), dw * g.astype(dw.dtype), None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def chunked_lm_loss(hidden, weight, targets, chunk_size: int = 1024, compute_dtype=None):
    """Mean next-token cross-entropy over rows with a target.

    hidden (B, T, d) float, weight (V, d), targets (B, T) int with IGNORE_INDEX for no target -> scalar in
    promote(compute dtype, float32). ``compute_dtype`` is the matmul dtype (default: the weight's).
    """
    cdtype = jnp.dtype(compute_dtype) if compute_dtype is not None else jnp.dtype(weight.dtype)
    h = hidden.reshape(-1, hidden.shape[-1])
    return _chunked_ce(h, weight, targets.reshape(-1).astype(jnp.int32), int(chunk_size), cdtype)


def shift_targets(labels):
    """Targets for position t are labels[t + 1]; the last position has none. (B, T) -> (B, T) int32."""
    labels = labels.astype(jnp.int32)
    return jnp.concatenate([labels[:, 1:], jnp.full((labels.shape[0], 1), IGNORE_INDEX, jnp.int32)], axis=1)


def logits(hidden, weight, compute_dtype=None):
    """Full logits (B, T, V) in promote(compute dtype, float32): only when asked for (``return_logits``)."""
    cdtype = jnp.dtype(compute_dtype) if compute_dtype is not None else jnp.dtype(weight.dtype)
    return _chunk_logits(hidden.reshape(-1, hidden.shape[-1]), weight.astype(cdtype), cdtype).reshape(
        *hidden.shape[:-1], weight.shape[0])
