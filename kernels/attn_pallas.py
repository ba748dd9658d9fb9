"""Flash attention for JAX in Pallas: causal, optional sliding window, forward and backward, beside its reference.

Shapes follow ``jax.nn.dot_product_attention``: q, k, v (B, T, H, D), output (B, T, H, D) in q's dtype.
Query i sees keys j <= i, and with ``window`` w only i - w < j <= i (itself included), as ``kernels/attn.py``.

Forward, per (batch x head, block of queries), over the key blocks a query block can see (FlashAttention-2's
online softmax, all in fp32)::

    s = scale * q k^T (masked);  m' = max(m, rowmax s);  l' = l e^(m - m') + rowsum e^(s - m')
    acc' = acc e^(m - m') + e^(s - m') v;       o = acc / l,   lse = m + log l

Backward from the saved (o, lse), with delta = rowsum(do * o)::

    p = e^(s - lse);  dv = p^T do;  dp = do v^T;  ds = p (dp - delta);  dq = scale ds k;  dk = scale ds^T q

in two kernels that need no atomics: one per key block (dk, dv over the query blocks that see it), one per
query block (dq over its key blocks). T need not be a multiple of the blocks: the wrapper pads with zeros,
which the causal mask already hides from every real query (padded keys come after every real query), and
whose queries carry zero cotangents, so padding changes neither the output nor any gradient.

The same kernel source runs on GPU (Triton lowering) and under ``interpret=True`` anywhere (how CI tests it
on CPU). TPU (Mosaic) would lower the same source, but it was never run on a TPU: only the interpreter has
checked it. Which path the JAX blocks take is the kernel registry's choice (``kernels/plugin.py``): XLA's
``jax.nn.dot_product_attention`` (cuDNN on GPU) ranks above this kernel until a measurement says otherwise.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_NEG = -1e30  # running-max start: finite, so a row that sees nothing yet gives e^0 * 0, never inf - inf


@dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two, >= 16 for the GPU's tensor cores)."""

    block_q: int = 64
    block_k: int = 64

    @classmethod
    def get_default(cls, head_dim: int = 64) -> "BlockSizes":
        # 128-wide tiles keep an H100/H200 busy at head dim <= 64; wider heads need the registers back.
        return cls(128, 64) if head_dim <= 64 else cls(64, 64)


def check_inputs(q, k, v, window) -> None:
    """Raise ValueError naming the offending argument unless q, k, v are one (B, T, H, D) shape and dtype."""
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be one (B, T, H, D) shape; got {q.shape=}, {k.shape=}, {v.shape=}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] < 1:
        raise ValueError(f"seq_len={q.shape[1]} must be >= 1")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"{window=} must be a positive integer or None")


def reference_attention(q, k, v, *, window: int | None = None, scale: float | None = None):
    """The ground truth: causal softmax attention by plain matmuls in >= fp32, (B, T, H, D) -> (B, T, H, D)."""
    T, D = q.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = jnp.promote_types(q.dtype, jnp.float32)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(acc), k.astype(acc), precision="highest") * scale
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    visible = (j <= i) if window is None else (j <= i) & (j > i - window)
    p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)  # (B, H, T, T)
    return jnp.einsum("bhts,bshd->bthd", p, v.astype(acc), precision="highest").astype(q.dtype)


# --- the kernels -------------------------------------------------------------------------------------------
def _dot(a, b, trans_b: bool = False):
    """a (m, k) @ b (k, n) (or b (n, k) transposed) with fp32 accumulation; full precision for fp32 inputs."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _visible(rows, cols, window):
    """(bq, bk) bool from absolute query rows (bq, 1) and key columns (1, bk)."""
    mask = cols <= rows
    if window is not None:
        mask &= cols > rows - window
    return mask


def _key_range(qi, bq, bk, nk, window):
    """[lo, hi): the key blocks query block qi can see."""
    hi = jnp.minimum(nk, ((qi + 1) * bq + bk - 1) // bk)
    lo = 0 if window is None else jnp.maximum(0, (qi * bq - window + 1) // bk)
    return lo, hi


def _query_range(kj, bq, bk, nq, window):
    """[lo, hi): the query blocks that see key block kj."""
    lo = (kj * bk) // bq
    hi = nq if window is None else jnp.minimum(nq, ((kj + 1) * bk - 1 + window - 1) // bq + 1)
    return lo, hi


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, window, bq, bk, nk):
    qi = pl.program_id(1)
    q = q_ref[...]  # (bq, D)
    rows = qi * bq + jnp.arange(bq)[:, None]

    def body(j, carry):
        m, l, acc = carry
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s = _dot(q, k, trans_b=True) * scale  # (bq, bk)
        mask = _visible(rows, j * bk + jnp.arange(bk)[None, :], window)
        m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, _NEG), axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    lo, hi = _key_range(qi, bq, bk, nk, window)
    init = (jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros(o_ref.shape, jnp.float32))
    m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale, window, bq, bk, nq):
    kj = pl.program_id(1)
    k, v = k_ref[...], v_ref[...]  # (bk, D)
    cols = kj * bk + jnp.arange(bk)[None, :]

    def body(i, carry):
        dk, dv = carry
        q = q_ref[pl.ds(i * bq, bq), :]
        do = do_ref[pl.ds(i * bq, bq), :]
        lse = lse_ref[pl.ds(i * bq, bq)]
        delta = delta_ref[pl.ds(i * bq, bq)]
        s = _dot(q, k, trans_b=True) * scale  # (bq, bk)
        mask = _visible(i * bq + jnp.arange(bq)[:, None], cols, window)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dv = dv + _dot(p.T.astype(do.dtype), do)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        dk = dk + _dot(ds.T.astype(q.dtype), q)
        return dk, dv

    lo, hi = _query_range(kj, bq, bk, nq, window)
    zeros = jnp.zeros(dk_ref.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(lo, hi, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, window, bq, bk, nk):
    qi = pl.program_id(1)
    q, do = q_ref[...], do_ref[...]  # (bq, D)
    lse, delta = lse_ref[...], delta_ref[...]  # (bq,)
    rows = qi * bq + jnp.arange(bq)[:, None]

    def body(j, dq):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s = _dot(q, k, trans_b=True) * scale
        mask = _visible(rows, j * bk + jnp.arange(bk)[None, :], window)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    lo, hi = _key_range(qi, bq, bk, nk, window)
    dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# --- host side: layout, padding, the custom_vjp --------------------------------------------------------------
def _to_rows(x, Tp):
    """(B, T, H, D) -> (B*H, Tp, D), zero-padded along T."""
    B, T, H, D = x.shape
    x = jnp.transpose(x, (0, 2, 1, 3)).reshape(B * H, T, D)
    return jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0))) if Tp > T else x


def _from_rows(x, B, T, H):
    return jnp.transpose(x[:, :T].reshape(B, H, T, -1), (0, 2, 1, 3))


def _specs(bq, bk, Tp, D):
    tile_q = pl.BlockSpec((None, bq, D), lambda b, i: (b, i, 0))
    tile_k = pl.BlockSpec((None, bk, D), lambda b, i: (b, i, 0))
    whole = pl.BlockSpec((None, Tp, D), lambda b, i: (b, 0, 0))
    row_q = pl.BlockSpec((None, bq), lambda b, i: (b, i))
    whole_row = pl.BlockSpec((None, Tp), lambda b, i: (b, 0))
    return tile_q, tile_k, whole, row_q, whole_row


def _forward(q, k, v, scale, window, bq, bk, interpret):
    """Padded rows in, (o, lse) out: q, k, v (BH, Tp, D) -> o (BH, Tp, D), lse (BH, Tp) fp32."""
    BH, Tp, D = q.shape
    tile_q, _, whole, row_q, _ = _specs(bq, bk, Tp, D)
    kernel = functools.partial(_fwd_kernel, scale=scale, window=window, bq=bq, bk=bk, nk=Tp // bk)
    return pl.pallas_call(
        kernel, grid=(BH, Tp // bq), in_specs=[tile_q, whole, whole], out_specs=[tile_q, row_q],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((BH, Tp), jnp.float32)],
        interpret=interpret, name="revnet_flash_fwd",
    )(q, k, v)


def _backward(q, k, v, o, lse, do, scale, window, bq, bk, interpret):
    BH, Tp, D = q.shape
    tile_q, tile_k, whole, row_q, whole_row = _specs(bq, bk, Tp, D)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # (BH, Tp)
    dkdv = functools.partial(_dkdv_kernel, scale=scale, window=window, bq=bq, bk=bk, nq=Tp // bq)
    dk, dv = pl.pallas_call(
        dkdv, grid=(BH, Tp // bk), in_specs=[whole, tile_k, tile_k, whole, whole_row, whole_row],
        out_specs=[tile_k, tile_k], out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        interpret=interpret, name="revnet_flash_dkdv",
    )(q, k, v, do, lse, delta)
    dq_kernel = functools.partial(_dq_kernel, scale=scale, window=window, bq=bq, bk=bk, nk=Tp // bk)
    dq = pl.pallas_call(
        dq_kernel, grid=(BH, Tp // bq), in_specs=[tile_q, whole, whole, tile_q, row_q, row_q],
        out_specs=tile_q, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret, name="revnet_flash_dq",
    )(q, k, v, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _flash(q, k, v, scale, window, bq, bk, interpret):
    return _forward(q, k, v, scale, window, bq, bk, interpret)[0]


def _flash_fwd(q, k, v, scale, window, bq, bk, interpret):
    o, lse = _forward(q, k, v, scale, window, bq, bk, interpret)
    return o, (q, k, v, o, lse)


def _flash_bwd(scale, window, bq, bk, interpret, res, do):
    q, k, v, o, lse = res
    return _backward(q, k, v, o, lse, do, scale, window, bq, bk, interpret)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, window: int | None = None, scale: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret: bool = False):
    """Causal flash attention, (B, T, H, D) x3 -> (B, T, H, D) in q's dtype; differentiable (``custom_vjp``).

    ``window``: query i sees keys i - window < j <= i. ``scale`` defaults to 1/sqrt(D). ``interpret=True``
    runs the kernels in the Pallas interpreter (any device, slowly).
    """
    check_inputs(q, k, v, window)
    B, T, H, D = q.shape
    bs = block_sizes or BlockSizes.get_default(D)
    bq, bk = (min(b, pl.next_power_of_2(T)) for b in (bs.block_q, bs.block_k))  # no tile past a short T
    if bq % bk:
        raise ValueError(f"block_q={bq} must be a multiple of block_k={bk}")
    Tp = pl.cdiv(T, bq) * bq
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    window = None if window is None or window >= T else int(window)
    o = _flash(*(_to_rows(x, Tp) for x in (q, k, v)), scale, window, bq, bk, interpret)
    return _from_rows(o, B, T, H)


def pallas_impl(q, k, v, *, window=None, scale=None):
    """Registry entry (framework jax): the kernel compiled for the array's device."""
    return flash_attention(q, k, v, window=window, scale=scale)


def xla_impl(q, k, v, *, window=None, scale=None):
    """Registry entry (framework jax): ``jax.nn.dot_product_attention``, cuDNN where it applies, else XLA's."""
    local = None if window is None else (window - 1, 0)
    call = functools.partial(jax.nn.dot_product_attention, is_causal=True, local_window_size=local,
                   scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    return call(q, k, v)


def reference_impl(q, k, v, *, window=None, scale=None):
    """Registry entry (framework jax) for the reference."""
    return reference_attention(q, k, v, window=window, scale=scale)
