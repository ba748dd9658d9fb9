"""The reversible backward (custom_vjp around the layer scan) equals plain autodiff of the same function."""

import os

import jax
import jax.numpy as jnp
import pytest

import revnet_core
from revnet_core import AdditiveCoupling
from revnet_core.registry import registry
from revnet_jax import ReversibleTransformerJAX, layer_forward, layer_inverse, run_layers

from .conftest import max_rel_diff, plain_loss

TOL = 1e-10


def grads(model, params, ids, policy, **kw):
    return jax.jit(jax.value_and_grad(model.replace(policies=policy).loss))(params, ids, **kw)


def reverse_and_plain(model, ids, key=None, policies="reverse"):
    """((loss, grads) under ``policies`` (None: the model's own), (loss, grads) of the plain reference),
    compiled as one program."""
    candidate = model if policies is None else model.replace(policies=policies)

    @jax.jit
    def both(params):
        rev = jax.value_and_grad(candidate.loss)(params, ids, key=key)
        plain = jax.value_and_grad(lambda p: plain_loss(model, p, ids, key=key))(params)
        return rev, plain

    return both(model.params)


@pytest.mark.parametrize("coupling,num_layers", [("additive", 1), ("affine", 3), ("additive", 6)])
def test_reverse_gradients_equal_plain_autodiff(tiny_model, num_layers, coupling):
    model, ids = tiny_model(num_layers=num_layers, coupling=coupling)
    (loss_rev, g_rev), (loss_plain, g_plain) = reverse_and_plain(model, ids)
    assert jnp.isfinite(loss_rev)
    assert abs(float(loss_rev - loss_plain)) < TOL
    assert max_rel_diff(g_rev, g_plain) < TOL


# Couplings from installed plugins (plugins/, pip-installed by the nox "plugins" session): written over the
# Array API for torch, they must run unchanged here.
PLUGIN_COUPLINGS = sorted(set(registry().couplings) - {"additive", "affine"})


def test_the_example_plugins_are_installed_when_required():
    """Under nox (REVNET_REQUIRE_PLUGINS) the plugin tests below must run, not collect an empty set."""
    if not os.environ.get("REVNET_REQUIRE_PLUGINS"):
        pytest.skip("outside nox the example plugins may be absent")
    assert PLUGIN_COUPLINGS, "no plugin coupling is registered"


@pytest.mark.parametrize("coupling", PLUGIN_COUPLINGS)
def test_plugin_couplings_run_reversibly_in_jax(tiny_model, coupling):
    model, ids = tiny_model(num_layers=2, coupling=coupling)
    (loss_rev, g_rev), (loss_plain, g_plain) = reverse_and_plain(model, ids)
    assert abs(float(loss_rev - loss_plain)) < TOL
    assert max_rel_diff(g_rev, g_plain) < TOL


def test_dropout_is_replayed_in_the_recompute(tiny_model):
    """Explicit keys per layer and per FFN chunk (12 tokens in chunks of 5): the reversible backward draws the
    forward's masks."""
    model, ids = tiny_model(coupling="affine", dropout=0.1, attention_dropout=0.1, ffn_chunk_size=5)
    key = jax.random.key(7)
    (loss_rev, g_rev), (loss_plain, g_plain) = reverse_and_plain(model, ids, key)
    assert abs(float(loss_rev - loss_plain)) < TOL
    assert max_rel_diff(g_rev, g_plain) < TOL
    assert abs(float(model(ids).loss - loss_rev)) > 1e-6  # no key: no dropout


def test_chunked_ffn_walks_the_same_chunks(tiny_model):
    """The FFN over sequence chunks (12 tokens: 4+4+4): reverse equals plain, and chunks leave the function
    unchanged."""
    model, ids = tiny_model(ffn_chunk_size=4)
    whole, _ = tiny_model(ffn_chunk_size=0)
    (loss_rev, g_rev), (_, g_plain) = reverse_and_plain(model, ids)
    assert max_rel_diff(g_rev, g_plain) < TOL
    assert abs(float(loss_rev - whole(ids, params=model.params).loss)) < 1e-12


@pytest.mark.parametrize("policies,use_scan", [(["checkpoint"] * 4, True),
                                               (["reverse", "store", "reverse", "reverse"], False),
                                               (["store", "reverse", "checkpoint", "reverse"], True)])
def test_mixed_policies_and_python_loop_equal_plain_autodiff(tiny_model, policies, use_scan):
    model, ids = tiny_model(num_layers=4, coupling="affine", dropout=0.1)
    key = jax.random.key(3)
    mixed = model.replace(policies=policies, use_scan=use_scan)
    (_, g), (_, g_plain) = reverse_and_plain(mixed, ids, key, policies=None)
    assert max_rel_diff(g, g_plain) < TOL


def test_stream_input_gradients_equal_plain_autodiff(tiny_model):
    model, _ = tiny_model(coupling="affine")
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x1, x2, w = (jax.random.normal(k, (2, 9, 16), jnp.float64) for k in (k1, k2, k3))

    def f(policy, layers, x1, x2):
        y1, y2 = run_layers(model.static, [policy] * 3, layers, None, x1, x2)
        return jnp.sum(y1 * w) + jnp.sum(y2 * y2)

    args = (model.params["layers"], x1, x2)
    g_rev = jax.grad(lambda *a: f("reverse", *a), argnums=(0, 1, 2))(*args)
    g_store = jax.grad(lambda *a: f("store", *a), argnums=(0, 1, 2))(*args)
    assert max_rel_diff(g_rev, g_store) < TOL


def test_compile_structure_one_scan_per_segment(tiny_model):
    """The reversible segment is one custom_vjp around one scan; its residuals are the params and the top
    outputs, not one entry per layer."""
    model, ids = tiny_model(num_layers=6)
    forward = str(jax.make_jaxpr(model.loss)(model.params, ids))
    assert forward.count("custom_vjp_call") == 2  # the layer stack and the loss head, each one call
    backward = str(jax.make_jaxpr(jax.grad(model.loss))(model.params, ids))
    assert backward.count("length=6") == 2  # one forward scan and one backward scan over all six layers


class SkewedAdditive(AdditiveCoupling):
    """An inverse off by a small, non-uniform epsilon: an engine that really inverts must notice."""

    def inverse(self, y, fx):
        return y - fx + 1e-3 * jnp.tanh(y)


def test_engine_really_uses_the_inverse(tiny_model):
    model, ids = tiny_model()
    skewed = model.replace(coupling=SkewedAdditive())
    _, g_store = grads(skewed, model.params, ids, "store")
    _, g_rev = grads(skewed, model.params, ids, "reverse")
    assert max_rel_diff(g_rev, g_store) > 1e-6, "gradients ignored the inverse: activations must have been stored"


def test_layer_inverse_rebuilds_inputs(tiny_model):
    model, _ = tiny_model(num_layers=6, coupling="affine")
    x1, x2 = (jax.random.normal(k, (2, 11, 16), jnp.float64) for k in jax.random.split(jax.random.key(1)))
    layers = [jax.tree.map(lambda a, i=i: a[i], model.params["layers"]) for i in range(6)]

    @jax.jit
    def there_and_back(x1, x2):
        y1, y2 = x1, x2
        for p in layers:
            y1, y2 = layer_forward(model.static, p, None, y1, y2)
        for p in reversed(layers):
            y1, y2 = layer_inverse(model.static, p, None, y1, y2)
        return y1, y2

    y1, y2 = there_and_back(x1, x2)
    assert float(jnp.abs(y1 - x1).max()) < 1e-12 and float(jnp.abs(y2 - x2).max()) < 1e-12


def test_bf16_compute_recompute_and_gradients():
    """bfloat16 matmuls with float32 streams (the benchmark's setting). The recompute runs the forward's dtypes
    and kernels, so the streams rebuilt through every layer are off by float32 rounding only; gradients then
    differ from plain autodiff only where that rounding flips a bf16 rounding of a matmul operand."""
    model = ReversibleTransformerJAX(num_layers=4, d_model=64, num_heads=4, vocab_size=64, compute_dtype="bfloat16")
    ids = jax.random.randint(jax.random.key(0), (1, 32), 0, 64)
    x = jax.random.normal(jax.random.key(1), (1, 32, 64), jnp.float32)
    layers = [jax.tree.map(lambda a, i=i: a[i], model.params["layers"]) for i in range(4)]

    @jax.jit
    def rebuilt_error(x):
        y = (x, x)
        for p in layers:
            y = layer_forward(model.static, p, None, *y)
        for p in reversed(layers):
            y = layer_inverse(model.static, p, None, *y)
        return jnp.maximum(jnp.abs(y[0] - x).max(), jnp.abs(y[1] - x).max()) / jnp.abs(x).max()

    assert float(rebuilt_error(x)) < 1e-6
    g_store = jax.jit(jax.grad(model.replace(policies="store").loss))(model.params, ids)
    g_rev = jax.jit(jax.grad(model.loss))(model.params, ids)
    rel = jax.tree.map(lambda a, b: float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel())),
                       g_rev, g_store)
    assert max(jax.tree.leaves(rel)) < 2e-2
    assert model.params["layers"]["attn"]["qkv"]["weight"].dtype == jnp.float32


def test_jit_of_the_stack_traces_once_per_depth_not_per_layer(tiny_model, monkeypatch):
    """lax.scan: the layer body is traced a fixed number of times however deep the stack."""
    import revnet_jax.layers as layers_mod

    counts = {}
    for depth in (2, 8):
        model, ids = tiny_model(num_layers=depth)
        calls = []
        original = layers_mod.attention_block
        monkeypatch.setattr(layers_mod, "attention_block", lambda *a, **k: calls.append(1) or original(*a, **k))
        jax.jit(jax.grad(model.loss)).lower(model.params, ids)
        monkeypatch.setattr(layers_mod, "attention_block", original)
        counts[depth] = len(calls)
    assert counts[2] == counts[8] > 0


def test_build_through_the_registry():
    model = revnet_core.build("jax", num_layers=2, d_model=16, num_heads=2, vocab_size=32)
    assert isinstance(model, ReversibleTransformerJAX)
    assert model.params["layers"]["attn"]["qkv"]["weight"].shape == (2, 48, 16)
