"""Blocks against their references: the fused attention path, RoPE's pair convention, the activations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from revnet_jax.blocks import BlockConfig, activate, apply_rope, attention_block, reference_attention, rope_angles
from revnet_torch.blocks import Rotary


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_dot_product_attention_matches_reference(dtype, tol):
    q, k, v = (jax.random.normal(key, (2, 33, 3, 8), jnp.float32).astype(dtype)
               for key in jax.random.split(jax.random.key(0), 3))
    fused = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    ref = reference_attention(q, k, v)
    assert float(jnp.abs(fused.astype(jnp.float32) - ref.astype(jnp.float32)).max()) < tol


def test_sdpa_and_reference_blocks_agree_in_float32():
    cfg = BlockConfig(d_model=16, num_heads=2, d_ff=32, out_features=16)
    p = {"norm": {"weight": jnp.ones(16), "bias": jnp.zeros(16)},
         "qkv": {"weight": 0.3 * jax.random.normal(jax.random.key(1), (48, 16), jnp.float32)},
         "proj": {"weight": 0.3 * jax.random.normal(jax.random.key(2), (16, 16), jnp.float32)}}
    x = jax.random.normal(jax.random.key(3), (2, 10, 16), jnp.float32)
    sdpa = attention_block(p, x, None, cfg)
    ref = attention_block(p, x, None, BlockConfig(d_model=16, num_heads=2, d_ff=32, out_features=16,
                                                  attention="reference"))
    assert float(jnp.abs(sdpa - ref).max()) < 1e-6


def test_rope_pairs_match_torch():
    """Pairs (x[2i], x[2i+1]) rotated by position, as backends/torch/blocks.py's Rotary does (float32 tables
    of the two frameworks differ in the last bit, hence the tolerance)."""
    x = np.random.default_rng(0).standard_normal((2, 3, 17, 8)).astype(np.float32)  # (B, H, T, hd)
    theirs = Rotary(8, 10000.0)(torch.from_numpy(x)).numpy()
    ours = apply_rope(jnp.asarray(x).transpose(0, 2, 1, 3), rope_angles(17, 8, 10000.0))  # (B, T, H, hd)
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 2, 1, 3), theirs, rtol=0, atol=2e-6)


@pytest.mark.parametrize("kind", ["gelu", "gelu_exact", "relu", "silu", "geglu", "swiglu"])
def test_activations_match_torch(kind):
    from revnet_torch.blocks import activate as torch_activate

    u = np.random.default_rng(1).standard_normal((5, 12)) * 3
    ours = np.asarray(activate(kind, jnp.asarray(u)))
    theirs = torch_activate(kind, torch.from_numpy(u)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-14)
    if kind == "gelu":  # the tanh approximation, not erf: they differ visibly
        assert np.abs(ours - F.gelu(torch.from_numpy(u)).numpy()).max() > 1e-5
