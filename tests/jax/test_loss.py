"""The chunked LM head: the full logits' cross-entropy and its gradients, without holding (N, V) logits."""

import jax
import jax.numpy as jnp
import pytest

from revnet_jax.loss import IGNORE_INDEX, chunked_lm_loss, shift_targets


def reference(h, w, targets):
    logits = h @ w.T
    valid = targets != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(valid.sum(), 1)


@pytest.mark.parametrize("chunk", [5, 64])  # 5 does not divide the 22 tokens; 64 is one chunk
def test_chunked_loss_and_gradients_equal_full_logits(chunk):
    kh, kw, kt = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(kh, (2, 11, 8), jnp.float64)
    w = jax.random.normal(kw, (13, 8), jnp.float64)
    targets = shift_targets(jax.random.randint(kt, (2, 11), 0, 13)).at[1, 2].set(IGNORE_INDEX)

    @jax.jit
    def both(h, w):
        ours = jax.value_and_grad(lambda h, w: chunked_lm_loss(h, w, targets, chunk) * 3.0, argnums=(0, 1))(h, w)
        ref = jax.value_and_grad(lambda h, w: reference(h, w, targets) * 3.0, argnums=(0, 1))(h, w)
        return ours, ref

    (loss, (dh, dw)), (ref_loss, (ref_dh, ref_dw)) = both(h, w)
    assert abs(float(loss - ref_loss)) < 1e-12
    assert float(jnp.abs(dh - ref_dh).max()) < 1e-12 and float(jnp.abs(dw - ref_dw).max()) < 1e-12


def test_the_differentiated_head_keeps_no_logits():
    """What the head keeps for the backward is dh (N, d) and dW (V, d): no (N, V) or chunk-of-logits array."""
    N, d, V = 64, 8, 1000
    targets = jnp.zeros((1, N), jnp.int32)

    def pullback(h, w):
        return jax.vjp(lambda h_, w_: chunked_lm_loss(h_, w_, targets, 16), h, w)[1]

    kept = jax.eval_shape(pullback, jax.ShapeDtypeStruct((1, N, d), jnp.float32),
                          jax.ShapeDtypeStruct((V, d), jnp.float32))
    shapes = {leaf.shape for leaf in jax.tree.leaves(kept)}
    assert (N, d) in shapes and (V, d) in shapes
    assert all(V not in s or s == (V, d) for s in shapes), shapes


@pytest.mark.parametrize("compute_dtype", ["bfloat16", None])
def test_peak_bytes_at_32k_tokens_and_a_gpt2_vocab_are_under_an_eighth_of_the_bf16_logits(compute_dtype):
    """XLA's buffer plan (``memory_analysis``, compiled only: nothing is allocated) of the head's loss and
    gradients at the issue's size: temp bytes <= 1/8 of the full (N, V) bf16 logits. The full-logits loss,
    planned the same way, needs more than the whole logits: the measure can fail."""
    from revnet_core.config import ModelConfig
    from revnet_jax.memory import compiled_memory

    N, V, d = 32768, 50257, 32  # small d: compiles in well under a second
    chunk = ModelConfig().loss_chunk_size
    shapes = (jax.ShapeDtypeStruct((1, N, d), jnp.float32), jax.ShapeDtypeStruct((V, d), jnp.float32),
              jax.ShapeDtypeStruct((1, N), jnp.int32))

    def ours(h, w, t):
        return jax.value_and_grad(lambda h_, w_: chunked_lm_loss(h_, w_, t, chunk, compute_dtype), (0, 1))(h, w)

    def full(h, w, t):
        def loss(h_, w_):
            cd = compute_dtype or jnp.float32
            return reference(h_.astype(cd).astype(jnp.float32)[0], w_.astype(cd).astype(jnp.float32), t[0])
        return jax.value_and_grad(loss, (0, 1))(h, w)

    logits_bf16 = N * V * 2
    assert compiled_memory(ours, *shapes)["temp"] <= logits_bf16 / 8
    assert compiled_memory(full, *shapes)["temp"] > logits_bf16
