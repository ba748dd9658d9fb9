"""The Pallas flash attention (kernels/attn_pallas.py) against its reference under ``interpret=True`` on CPU:
outputs and all three gradients, odd lengths (T not a multiple of any block), windows, head dims 16 and 32;
and its place in the registry (framework jax, below XLA's attention until measured)."""

import jax
import jax.numpy as jnp
import pytest

from revnet_kernels import registry
from revnet_kernels.attn_pallas import BlockSizes, flash_attention, reference_attention

TOL = 2e-6  # fp32: online softmax and blocked sums reorder the reference's additions, nothing else
# Gradients: ds = p (do.v - rowsum(do * o)) cancels terms of size |do||v| ~ 4 here (exactly, at window 1,
# where the true dq is 0), so their rounding is a few fp32 ulps of that size.
GRAD_TOL = 5e-6


def inputs(T, D, H=3, B=2, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(T * 131 + D), 4)
    return tuple(jax.random.normal(k, (B, T, H, D), jnp.float32).astype(dtype) for k in ks)  # q, k, v, do


def value_and_grads(fn, q, k, v, do):
    out, pull = jax.vjp(fn, q, k, v)
    return out, pull(do)


@pytest.mark.parametrize("T,D,window,blocks", [
    (77, 16, None, BlockSizes(32, 16)),  # 3 query blocks of 32 over 5 key blocks of 16, tail padded
    (77, 32, 20, BlockSizes(32, 32)),    # a window shorter than a block: first blocks skipped
    (45, 16, 1, None),                   # window 1: each token sees itself alone; default blocks, one tile
])
def test_forward_and_gradients_equal_the_reference(T, D, window, blocks):
    q, k, v, do = inputs(T, D)
    fa = jax.jit(lambda q, k, v: flash_attention(q, k, v, window=window, block_sizes=blocks, interpret=True))
    out, grads = value_and_grads(fa, q, k, v, do)
    ref_out, ref_grads = value_and_grads(lambda q, k, v: reference_attention(q, k, v, window=window), q, k, v, do)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert float(jnp.abs(out - ref_out).max()) < TOL
    for name, g, r in zip("qkv", grads, ref_grads):
        assert float(jnp.abs(g - r).max()) < GRAD_TOL * max(1.0, float(jnp.abs(r).max())), f"d{name}"


def test_the_reference_is_xlas_attention():
    """The reference the kernel is held to is jax.nn.dot_product_attention's function (causal and banded)."""
    q, k, v, _ = inputs(19, 16)
    for window in (None, 5):
        local = None if window is None else (window - 1, 0)
        with jax.default_matmul_precision("highest"):
            xla = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                               implementation="xla")
        assert float(jnp.abs(reference_attention(q, k, v, window=window) - xla).max()) < 1e-6


def test_bad_inputs_are_named():
    q, k, v, _ = inputs(8, 16)
    with pytest.raises(ValueError, match="one .B, T, H, D. shape"):
        flash_attention(q, k[:, :4], v, interpret=True)
    with pytest.raises(ValueError, match="share a dtype"):
        flash_attention(q, k.astype(jnp.bfloat16), v, interpret=True)
    with pytest.raises(ValueError, match="window=0"):
        flash_attention(q, k, v, window=0, interpret=True)
    with pytest.raises(ValueError, match="block_q=16 must be a multiple of block_k=32"):
        flash_attention(*inputs(64, 16)[:3], block_sizes=BlockSizes(16, 32), interpret=True)


SEED_META = {"head_dim": 64, "num_heads": 16, "num_kv_heads": 16, "causal": True, "window": None,
             "return_lse": False}


def test_registered_for_jax_on_gpu_below_xla():
    """Until a measurement ranks it higher, XLA's attention (cuDNN) is what JAX selects on a GPU, windowed or
    not; the Pallas record serves framework jax alone and is forced by name."""
    recs = {r.impl: r for r in registry.implementations("attention", framework="jax")}
    assert set(recs) == {"xla", "pallas", "reference"}
    assert recs["pallas"].devices == frozenset({"cuda", "rocm"}) and not recs["pallas"].serves("torch")
    for meta in (SEED_META, {**SEED_META, "window": 4096}):
        assert registry.select("attention", "cuda", "bfloat16", meta, framework="jax").impl == "xla"
    assert registry.select("attention", "cuda", "bfloat16", SEED_META, impl="pallas", framework="jax").impl == "pallas"
    assert "pallas" not in {r.impl for r in registry.implementations("attention")}  # torch's records
    assert registry.device_kind(jax.devices("cpu")[0]) == "cpu"
