"""The model object: pure functions under jit/grad, inputs as ids or embeddings, errors like torch's."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from revnet_core import ConfigError, InputError
from revnet_jax import ModelOutput, ReversibleTransformerJAX


def test_call_returns_loss_and_logits(tiny_model):
    model, ids = tiny_model()
    out = model(ids, return_logits=True)
    assert isinstance(out, ModelOutput)
    assert out.loss.shape == () and jnp.isfinite(out.loss)
    assert out.logits.shape == (2, 12, 37) and out.last_hidden_state.shape == (2, 12, 16)
    # the chunked head's loss is the full logits' cross-entropy
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    ref = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()
    assert abs(float(out.loss - ref)) < 1e-12
    assert model(ids, compute_loss=False).loss is None


def test_labels_are_shifted_inside_and_ignore_index_is_skipped(tiny_model):
    model, ids = tiny_model()
    labels = ids.at[:, 5:].set(-100)
    out = model(ids, labels, return_logits=True)
    logp = jax.nn.log_softmax(out.logits[:, :4], axis=-1)  # positions 0..3 predict labels 1..4
    ref = -jnp.take_along_axis(logp, ids[:, 1:5, None], axis=-1).mean()
    assert abs(float(out.loss - ref)) < 1e-12


def test_embeddings_as_inputs(tiny_model):
    """Float inputs (batch, seq, d_model) replace the token embedding (issue 10 builds on this)."""
    model, ids = tiny_model()
    emb = model.params["embed"]["weight"][ids]  # (B, T, d) float64
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply(model.params, emb), apply(model.params, ids), rtol=0, atol=1e-13)
    loss = jax.jit(model.loss)(model.params, emb, ids)
    assert abs(float(loss - model(ids).loss)) < 1e-13
    with pytest.raises(InputError, match="labels are required"):
        model.loss(model.params, emb)

    @jax.jit
    def input_grads(emb):
        rev = jax.grad(lambda e: model.loss(model.params, e, ids))(emb)
        plain = jax.grad(lambda e: model.replace(policies="store").loss(model.params, e, ids))(emb)
        return rev, plain

    rev, plain = input_grads(emb)  # the reversible backward hands the streams' cotangents to the inputs
    assert float(jnp.abs(rev - plain).max()) < 1e-12 and float(jnp.abs(plain).max()) > 1e-6


def test_readme_jax_example():
    """The README's JAX example: init from a float sample, jit apply, jit grad of the mean."""
    model = ReversibleTransformerJAX(num_layers=2, d_model=32, num_heads=4, use_scan=True, vocab_size=50)
    params = model.init(jax.random.key(0), jnp.ones((1, 16, 32)))

    @jax.jit
    def forward(params, inputs):
        return model.apply(params, inputs)

    grad_fn = jax.jit(jax.grad(lambda p, x: forward(p, x).mean()))
    grads = grad_fn(params, jnp.ones((1, 16, 32)))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_out_of_range_ids_under_jit_give_nan_not_a_silent_clamp(tiny_model):
    model, ids = tiny_model()
    bad = ids.at[0, 3].set(37)
    assert jnp.isnan(jax.jit(model.loss)(model.params, bad))
    with pytest.raises(InputError, match="out of range"):
        model(bad)


@pytest.mark.parametrize("inputs,match", [
    ([[1, 2, 3]], "must be a jax or numpy array"),
    (np.ones((2, 4), bool), "integer token ids or float embeddings"),
    (np.ones((2, 4), np.complex64), "integer token ids or float embeddings"),
    (np.ones((2, 3, 4), np.int32), r"shape \(batch, seq\)"),
    (np.ones((2, 3, 8), np.float32), "float embeddings must have shape"),
    (np.ones((1, 0), np.int32), "empty"),
    (np.ones((1, 65), np.int32), "exceeds max_seq_len=64"),
    (np.array([[0, 5, -1]]), r"out of range: ids must lie in \[0, 37\)"),
    (np.array([[0, 5, 37]]), r"out of range"),
    (np.array([[3]]), "at least 2 tokens"),
])
def test_bad_inputs_raise_like_torch(tiny_model, inputs, match):
    model, _ = tiny_model()
    with pytest.raises(InputError, match=match):
        model(inputs)
    if not isinstance(inputs, list) and inputs.dtype != bool and inputs.shape != (1, 1):
        with pytest.raises(InputError, match=match):
            model.loss(model.params, inputs)


@pytest.mark.parametrize("labels,match", [
    (np.zeros((2, 11), np.int32), "must match"),
    (np.zeros((2, 12), np.float32), "integer"),
    (np.full((2, 12), 40), "labels out of range"),
])
def test_bad_labels_raise(tiny_model, labels, match):
    model, ids = tiny_model()
    with pytest.raises(InputError, match=match):
        model(ids, labels)


def test_one_dimensional_ids_are_a_batch_of_one(tiny_model):
    model, ids = tiny_model()
    assert abs(float(model(ids[0]).loss - model(ids[:1]).loss)) < 1e-14


def test_policy_and_option_errors(tiny_model):
    model, _ = tiny_model()
    with pytest.raises(ConfigError, match="policies for 3 layers"):
        model.set_policy(["reverse"])
    with pytest.raises(ConfigError, match="not one of"):
        model.set_policy("sometimes")
    with pytest.raises(ConfigError, match="cannot change"):
        model.replace(num_layers=2)
    with pytest.raises(ConfigError, match="compute_dtype"):
        ReversibleTransformerJAX(compute_dtype="int8")
    with pytest.raises(ConfigError, match="unknown config field"):
        ReversibleTransformerJAX(num_layer=3)
    with pytest.raises(ConfigError, match="attention_window"):
        ReversibleTransformerJAX(attention_window=0)
    with pytest.raises(ConfigError, match="loss_kernel is an option of the torch backend"):
        ReversibleTransformerJAX(loss_kernel="fused")  # JAX has one loss head, its chunked one
    with pytest.raises(ConfigError, match=r"attention='flash' is not one of \['sdpa', 'reference'\]"):
        ReversibleTransformerJAX(attention="flash")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_discovery_does_not_import_jax_and_float64_needs_x64():
    """A fresh process: finding the backend imports no jax; float64 without jax_enable_x64 is a clear error."""
    r = _run("import sys, revnet_jax, revnet_jax.plugin\n"
             "from revnet_core.registry import get_backend\n"
             "get_backend('jax')\n"
             "assert 'jax' not in sys.modules, 'discovery imported jax'\n"
             "from revnet_jax import ReversibleTransformerJAX\n"
             "from revnet_core import ConfigError\n"
             "try:\n"
             "    ReversibleTransformerJAX(stream_dtype='float64')\n"
             "except ConfigError as e:\n"
             "    assert 'jax_enable_x64' in str(e)\n"
             "else:\n"
             "    raise SystemExit('no error')\n",
             JAX_ENABLE_X64="0")
    assert r.returncode == 0, r.stderr[-2000:]


def test_policies_come_from_the_one_table_and_unbuilt_ones_are_named():
    model = ReversibleTransformerJAX(num_layers=2, d_model=32, num_heads=4, vocab_size=50)
    model.set_policy(["checkpoint", "store"])
    assert model.policies == ("checkpoint", "store")
    with pytest.raises(ConfigError, match="policy='revers' is not one of"):
        model.set_policy("revers")
    with pytest.raises(ConfigError, match="'recompute_ffn' is not built in the JAX backend yet"):
        model.set_policy(["reverse", "recompute_ffn"])
    assert model.policies == ("checkpoint", "store")  # a refused call changes nothing
