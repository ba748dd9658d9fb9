"""Each kernel against a float64 numpy reference, and each hand-written VJP against central finite
differences, on odd sizes (T not a multiple of the attention tile, rows not a multiple of a norm's partial)."""

import math

import numpy as np
import pytest

from revnet_numba import kernels as K
from revnet_numba.attention import causal_attention, causal_attention_backward, reference_attention
from revnet_numba.blocks import AttentionBlock, BlockConfig, FeedForwardBlock, RopeCache, norm_vjp
from revnet_numba.loss import IGNORE_INDEX, chunked_lm_loss

RNG = np.random.default_rng(7)


def fd_check(f, pullback, x: np.ndarray, out_ct: np.ndarray, eps: float = 1e-6) -> float:
    """Relative error of <pullback(out_ct), dir> against (f(x + eps dir) - f(x - eps dir)) . out_ct / (2 eps)."""
    direction = RNG.standard_normal(x.shape)
    numeric = np.sum((f(x + eps * direction) - f(x - eps * direction)) * out_ct) / (2 * eps)
    analytic = np.sum(pullback(out_ct) * direction)
    return abs(numeric - analytic) / max(abs(numeric), 1e-12)


# --- norms ------------------------------------------------------------------------------------------------
def ref_norm(x, w, b, kind, eps):
    if kind == "rmsnorm":
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_forward_and_vjp(kind):
    N, d = 301, 13  # 301 rows: two partial sums of the weight gradient, the second one short
    x = RNG.standard_normal((N, d))
    p = {"norm.weight": RNG.standard_normal(d), "norm.bias": RNG.standard_normal(d)}
    y, pull = norm_vjp(p, x, kind, 1e-5)
    assert np.abs(y - ref_norm(x, p["norm.weight"], p["norm.bias"], kind, 1e-5)).max() < 1e-12
    ct = RNG.standard_normal((N, d))
    assert fd_check(lambda a: norm_vjp(p, a, kind, 1e-5)[0], lambda c: pull(c)[0], x, ct) < 1e-7
    for name in p if kind == "layernorm" else ["norm.weight"]:
        def f(v, name=name):
            return norm_vjp({**p, name: v}, x, kind, 1e-5)[0]
        assert fd_check(f, lambda c, name=name: pull(c)[1][name], p[name], ct) < 1e-7


# --- activations ------------------------------------------------------------------------------------------
def ref_act(kind, u):
    from math import erf

    if kind in ("gelu", "geglu"):
        return 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    if kind == "gelu_exact":
        return 0.5 * u * (1 + np.vectorize(erf)(u / math.sqrt(2)))
    if kind == "relu":
        return np.maximum(u, 0)
    return u / (1 + np.exp(-u))


@pytest.mark.parametrize("kind", ["gelu", "gelu_exact", "relu", "silu", "geglu", "swiglu"])
def test_activation_forward_and_vjp(kind):
    N, f = 17, 11
    gated = kind in ("geglu", "swiglu")
    u = RNG.standard_normal((N, 2 * f if gated else f)) * 2
    u[np.abs(u) < 1e-3] = 0.5  # relu's kink: a finite difference across 0 is not its derivative

    def fwd(v):
        a = np.empty((N, f))
        K.activation_forward(v, K.ACTIVATION_CODES[kind], gated, a)
        return a

    ref = ref_act(kind, u[:, :f]) * u[:, f:] if gated else ref_act(kind, u)
    assert np.abs(fwd(u) - ref).max() < 1e-14

    def pull(da):
        du = np.empty_like(u)
        K.activation_backward(u, da, K.ACTIVATION_CODES[kind], gated, du)
        return du

    assert fd_check(fwd, pull, u, RNG.standard_normal((N, f))) < 1e-7


# --- rotary positions -------------------------------------------------------------------------------------
def test_rope_tables_are_the_canonical_angles():
    cos, sin = K.rope_tables(19, 6, 10000.0, np.float64)
    inv = (10000.0 ** -(np.arange(0, 6, 2) / 6)).astype(np.float32)  # float64, rounded once
    ang = (np.arange(19, dtype=np.float32)[:, None] * inv).astype(np.float64)  # float32 products
    assert np.array_equal(cos, np.cos(ang)) and np.array_equal(sin, np.sin(ang))
    assert cos.dtype == np.float64 and K.rope_tables(3, 6, 1e4, np.float32)[0].dtype == np.float32


def test_split_heads_rope_and_its_vjp():
    B, T, H, hd = 2, 9, 3, 6
    qkv = RNG.standard_normal((B, T, 3, H, hd))
    cos, sin = K.rope_tables(T, hd, 10000.0, np.float64)

    def split(a):
        q, k, v = (np.empty((B, H, T, hd)) for _ in range(3))
        K.split_heads_rope(a, cos, sin, q, k, v)
        return np.stack([q, k, v])

    # reference: complex multiplication of each pair by e^{i angle}
    z = (qkv[..., 0::2] + 1j * qkv[..., 1::2]) * np.exp(1j * np.arctan2(sin, cos))[None, :, None, None, :]
    rotated = np.stack([z.real, z.imag], -1).reshape(qkv.shape)
    got = split(qkv)
    for i in range(2):
        assert np.abs(got[i] - rotated[:, :, i].transpose(0, 2, 1, 3)).max() < 1e-14
    assert np.array_equal(got[2], qkv[:, :, 2].transpose(0, 2, 1, 3))

    def pull(ct):
        d = np.empty_like(qkv)
        K.merge_heads_rope_backward(*ct, cos, sin, d)
        return d

    assert fd_check(split, pull, qkv, RNG.standard_normal((3, B, H, T, hd))) < 1e-8


# --- attention --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,tile", [(37, 8), (5, 64), (64, 16)])
def test_attention_equals_plain_numpy(T, tile):
    q, k, v = (RNG.standard_normal((2, 3, T, 6)) for _ in range(3))
    o, lse = causal_attention(q, k, v, tile)
    assert np.abs(o - reference_attention(q, k, v)).max() < 1e-13
    s = np.einsum("bhtc,bhsc->bhts", q, k) / math.sqrt(6)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    assert np.abs(lse - np.log(np.exp(s).sum(-1))).max() < 1e-12


def test_attention_float32_close_to_float64():
    q, k, v = (RNG.standard_normal((1, 2, 53, 8)) for _ in range(3))
    o32, _ = causal_attention(*(a.astype(np.float32) for a in (q, k, v)), 16)
    assert o32.dtype == np.float32
    assert np.abs(o32 - reference_attention(q, k, v)).max() < 1e-5


def reference_attention_vjp(q, k, v, do):
    """(dq, dk, dv) of ``reference_attention`` by the textbook formulas on full (T, T) matrices."""
    T, hd = q.shape[2], q.shape[3]
    s = np.einsum("bhtc,bhsc->bhts", q, k) / math.sqrt(hd)
    p = np.exp(np.where(np.tril(np.ones((T, T), bool)), s, -np.inf) - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dob = do.transpose(0, 2, 1, 3)
    dp = np.einsum("bhtc,bhsc->bhts", dob, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / math.sqrt(hd)
    return (np.einsum("bhts,bhsc->bhtc", ds, k), np.einsum("bhts,bhtc->bhsc", ds, q),
            np.einsum("bhts,bhtc->bhsc", p, dob))


@pytest.mark.parametrize("T,tile", [(37, 8), (29, 64), (50, 16)])
def test_attention_vjp(T, tile):
    qkv = RNG.standard_normal((3, 2, 2, T, 6))
    o, lse = causal_attention(*qkv, tile)
    do = RNG.standard_normal(o.shape)
    grads = causal_attention_backward(*qkv, o, lse, do, tile)
    ref = reference_attention_vjp(*qkv, do)
    for got, want in zip(grads, ref):
        assert np.abs(got - want).max() < 1e-12 * max(1.0, np.abs(want).max())
    # and the reference itself against central finite differences (truncation error ~1e-9 at eps 1e-6)
    assert fd_check(lambda a: reference_attention(*a), lambda c: np.stack(ref), qkv, do) < 1e-6


# --- whole blocks -----------------------------------------------------------------------------------------
CFG = BlockConfig(d_model=12, num_heads=2, d_ff=10, out_features=24, activation="swiglu", norm="layernorm",
                  attn_block=8, ffn_chunk_size=5)


def _params(shapes):
    return {k: RNG.standard_normal(s) * (0.3 if len(s) == 2 else 1.0) for k, s in shapes.items()}


@pytest.mark.parametrize("which", ["attention", "ffn"])
def test_block_vjp_against_finite_differences(which):
    if which == "attention":
        p = _params({"norm.weight": (12,), "norm.bias": (12,), "qkv.weight": (36, 12), "proj.weight": (24, 12)})

        def block(q):
            return AttentionBlock(q, CFG, RopeCache(6, 10000.0))
    else:
        p = _params({"norm.weight": (12,), "norm.bias": (12,), "up.weight": (20, 12), "down.weight": (24, 10)})

        def block(q):
            return FeedForwardBlock(q, CFG)
    x = RNG.standard_normal((2, 13, 12))
    out, pull = block(p).vjp(x)
    assert np.array_equal(out, block(p)(x))  # the recompute gives the forward's bits
    ct = RNG.standard_normal(out.shape)
    dx, dp = pull(ct)
    assert fd_check(lambda a: block(p)(a), lambda c: dx, x, ct) < 1e-7
    for name in p:
        assert fd_check(lambda v, name=name: block({**p, name: v})(x), lambda c, name=name: dp[name], p[name], ct) < 1e-7


# --- loss head --------------------------------------------------------------------------------------------
def test_chunked_loss_equals_full_logits_and_its_gradients():
    N, d, V = 23, 5, 11
    h = RNG.standard_normal((1, N, d))
    w = RNG.standard_normal((V, d))
    t = RNG.integers(0, V, (1, N))
    t[0, ::4] = IGNORE_INDEX

    def full(hh, ww):
        z = hh[0] @ ww.T
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        valid = t[0] != IGNORE_INDEX
        return np.sum((lse - z[np.arange(N), np.where(valid, t[0], 0)])[valid]) / valid.sum()

    loss, dh, dw = chunked_lm_loss(h, w, t, chunk_size=4)
    assert abs(loss - full(h, w)) < 1e-13
    assert chunked_lm_loss(h, w, t, chunk_size=4, need_grad=False)[1:] == (None, None)
    assert fd_check(lambda a: np.array(full(a, w)), lambda c: dh, h, np.array(1.0)) < 1e-7
    assert fd_check(lambda a: np.array(full(h, a)), lambda c: dw, w, np.array(1.0)) < 1e-7
