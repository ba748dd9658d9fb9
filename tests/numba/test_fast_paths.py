"""The float32 fast paths against float64 ground truth: the vectorizable exp/tanh/sigmoid, the activations on
them, attention with key tiles of another size than its query tiles, and the matmuls split over threads."""

import numpy as np
import pytest
from numba import njit

from revnet_numba import kernels as K
from revnet_numba import matmul as M
from revnet_numba.attention import causal_attention, causal_attention_backward, reference_attention
from revnet_numba.vmath import vexp, vsigmoid, vtanh

from .test_kernels import ref_act, reference_attention_vjp

RNG = np.random.default_rng(11)


@njit
def _apply(x, which, out):
    for i in range(x.size):
        if which == 0:
            out[i] = vexp(x[i])
        elif which == 1:
            out[i] = vtanh(x[i])
        else:
            out[i] = vsigmoid(x[i])


@pytest.mark.parametrize("which,ref", [(0, np.exp), (1, np.tanh), (2, lambda v: 1 / (1 + np.exp(-v)))])
def test_vmath_float32_accuracy_and_float64_full_precision(which, ref):
    x = np.concatenate([np.linspace(-87, 88, 100_001), RNG.standard_normal(10_000) * 3]).astype(np.float32)
    got = np.empty_like(x)
    _apply(x, which, got)
    want = ref(x.astype(np.float64))
    # exp: relative (a few ulp); tanh and the sigmoid: absolute, their values lie in [-1, 1]
    err = np.abs(got - want) / (np.abs(want) if which == 0 else 1.0)
    assert got.dtype == np.float32 and err.max() < 2.5e-7
    if which == 0:
        out = np.empty(3, np.float32)
        _apply(np.array([-100.0, -np.inf, 0.0], np.float32), 0, out)
        assert list(out) == [0.0, 0.0, 1.0]
    x64 = x.astype(np.float64)
    got64 = np.empty_like(x64)
    _apply(x64, which, got64)
    want64 = ref(x64)  # float64 is libm's: equal to numpy's to an ulp or so
    assert (np.abs(got64 - want64) / np.maximum(np.abs(want64), 1e-300)).max() < 5e-16


@pytest.mark.parametrize("kind", ["gelu", "gelu_exact", "relu", "silu", "geglu", "swiglu"])
def test_float32_activations_stay_float32_and_close_to_float64(kind):
    N, f = 33, 70
    gated = kind in ("geglu", "swiglu")
    u = RNG.standard_normal((N, 2 * f if gated else f)) * 3
    u32 = u.astype(np.float32)
    a = np.empty((N, f), np.float32)
    K.activation_forward(u32, K.ACTIVATION_CODES[kind], gated, a)
    u64 = u32.astype(np.float64)
    ref = ref_act(kind, u64[:, :f]) * u64[:, f:] if gated else ref_act(kind, u64)
    assert np.abs(a - ref).max() < 2e-6 * np.abs(ref).max()
    da = RNG.standard_normal((N, f)).astype(np.float32)
    du32, du64 = np.empty_like(u32), np.empty_like(u64)
    K.activation_backward(u32, da, K.ACTIVATION_CODES[kind], gated, du32)
    K.activation_backward(u64, da.astype(np.float64), K.ACTIVATION_CODES[kind], gated, du64)
    assert du32.dtype == np.float32 and np.abs(du32 - du64).max() < 2e-6 * np.abs(du64).max()


@pytest.mark.parametrize("T,tile,key_tile", [(37, 8, 16), (37, 16, 8), (45, 8, 24)])
def test_attention_with_key_tiles_of_another_size(T, tile, key_tile):
    qkv = RNG.standard_normal((3, 1, 2, T, 6))
    o, lse = causal_attention(*qkv, tile, key_tile)
    assert np.abs(o - reference_attention(*qkv)).max() < 1e-13
    do = RNG.standard_normal(o.shape)
    grads = causal_attention_backward(*qkv, o, lse, do, tile, key_tile)
    for got, want in zip(grads, reference_attention_vjp(*qkv, do)):
        assert np.abs(got - want).max() < 1e-12 * max(1.0, np.abs(want).max())


def test_attention_float32_gradients_close_to_float64():
    qkv = RNG.standard_normal((3, 1, 2, 70, 8))
    do = RNG.standard_normal((1, 70, 2, 8))
    o, lse = causal_attention(*qkv.astype(np.float32), 16)
    grads = causal_attention_backward(*qkv.astype(np.float32), o, lse, do.astype(np.float32), 16)
    for got, want in zip(grads, reference_attention_vjp(*qkv, do)):
        assert got.dtype == np.float32 and np.abs(got - want).max() < 1e-5 * np.abs(want).max()


def test_split_matmuls_equal_numpy(monkeypatch):
    monkeypatch.setattr(M, "SPLIT_MIN_MACS", 0)
    monkeypatch.setattr(M.numba, "get_num_threads", lambda: 3)  # three parts, whatever this machine has
    a, w, x = RNG.standard_normal((10, 7)), RNG.standard_normal((5, 7)), RNG.standard_normal((10, 5))
    cases = [(a, w.T), (x.T, a), (a[:2], w.T)]  # rows split; the summed dimension split; fewer rows than parts
    for lhs, rhs in cases:
        got = M.matmul(lhs, rhs)
        assert got.shape == (lhs.shape[0], rhs.shape[1]) and np.abs(got - lhs @ rhs).max() < 1e-13
    assert M.matmul(a.astype(np.float32), w.T.astype(np.float32)).dtype == np.float32
    assert np.array_equal(M.matmul(a, w.T, split=False), a @ w.T)
