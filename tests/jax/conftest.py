"""The JAX tests run in their own process (the nox ``jax`` session sets JAX_ENABLE_X64=1, JAX_PLATFORMS=cpu):
float64 is how a reversible backward is shown to equal plain autodiff to 1e-10. Run directly with
``pytest tests/jax`` the flag is set here, before any array exists; never run these beside other JAX tests."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile time dominates these tests; LLVM's optimisation level changes neither IEEE results nor XLA's buffer
# plan (memory_analysis), only how fast the tiny programs run.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import revnet_core  # noqa: E402

TINY = dict(num_layers=3, d_model=16, num_heads=2, d_ff=24, vocab_size=37, max_seq_len=64)


@pytest.fixture
def tiny_model():
    """A small float64 model factory: tiny_model(**config) -> (model, ids (batch, seq) int32)."""

    def make(seed=0, batch=2, seq=12, **fields):
        cfg = dict(TINY)
        cfg.update(fields)
        model = revnet_core.build("jax", **cfg)
        model.seed = seed
        model.astype("float64")
        ids = jax.random.randint(jax.random.key(seed + 1), (batch, seq), 0, cfg["vocab_size"], dtype=jnp.int32)
        return model, ids

    return make


def max_rel_diff(a, b) -> float:
    """max over leaves of max|a - b| / max(max|b|, 1)."""
    diffs = jax.tree.map(lambda x, y: float(jnp.abs(x - y).max() / max(float(jnp.abs(y).max()), 1.0)), a, b)
    return max(jax.tree.leaves(diffs))


def plain_loss(model, params, ids, labels=None, *, key=None):
    """The reference: plain autodiff through every layer (store) and full logits, no custom_vjp anywhere."""
    plain = model.replace(policies="store")
    logits = plain.apply(params, ids, key=key)  # (B, T, V)
    labels = ids if labels is None else labels
    targets = jnp.concatenate([labels[:, 1:], jnp.full((labels.shape[0], 1), -100, labels.dtype)], axis=1)
    valid = targets != -100
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(valid.sum(), 1)
