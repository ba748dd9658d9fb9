"""Whole-pair couplings in JAX: rebuilt by their own inverse, differentiated by re-running their forward, mixed
with ordinary layers under every policy; fp64 gradients equal plain autodiff of the same stack."""

import jax
import jax.numpy as jnp
import pytest

from revnet_core.errors import ConfigError
from revnet_jax import PairCoupling, run_sequence
from revnet_jax.engine import layer_step

from .conftest import max_rel_diff

TOL = 1e-10


class GatedPair(PairCoupling):
    """The README's example: y1 = x1, y2 = x2 + t(x1), t a gated linear map with dropout; ``swap``
    changes the other stream."""

    def __init__(self, swap=False, dropout=0.0):
        self.swap = swap
        self.dropout = dropout

    def init(self, key, d_model, dtype=jnp.float64):
        k1, k2 = jax.random.split(key)
        w = lambda k: (jax.random.normal(k, (d_model, d_model)) / d_model ** 0.5).astype(dtype)  # noqa: E731
        return {"mlp": w(k1), "gate": w(k2), "bias": jnp.full((d_model,), 0.1, dtype)}

    def transform(self, p, x, key):
        t = (x @ p["mlp"] + p["bias"]) * jax.nn.sigmoid(x @ p["gate"])
        if key is not None and self.dropout:
            keep = jax.random.bernoulli(key, 1 - self.dropout, t.shape)
            t = jnp.where(keep, t / (1 - self.dropout), 0)
        return t

    def forward(self, p, x1, x2, key=None):
        if self.swap:
            return x1 + self.transform(p, x2, key), x2
        return x1, x2 + self.transform(p, x1, key)

    def inverse(self, p, y1, y2, key=None):
        if self.swap:
            return y1 - self.transform(p, y2, key), y2
        return y1, y2 - self.transform(p, y1, key)


class Swap(PairCoupling):
    """No parameters at all: the scan must still know its length."""

    def forward(self, p, x1, x2, key=None):
        return x2, x1 * 2.0

    def inverse(self, p, y1, y2, key=None):
        return y2 / 2.0, y1


def plain(layers, params, x1, x2, keys):
    """The reference: plain autodiff through a Python loop, no custom_vjp, no scan."""
    for i, (layer, p) in enumerate(zip(layers, params)):
        x1, x2 = layer_step(layer, p, None if keys is None else keys[i], x1, x2)
    return x1, x2


def objective(run):
    w = jax.random.normal(jax.random.key(9), (2, 7, 16), jnp.float64)

    def f(params, x1, x2):
        y1, y2 = run(params, x1, x2)
        return jnp.sum(y1 * w) + jnp.sum(y2 * y2)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))


@pytest.fixture
def mixed_stack(tiny_model):
    """[layer, pair, layer, pair (swap), pair (swap)]: two ordinary layers of a float64 model (affine coupling,
    dropout), a pair coupling, and one pair object used twice in a row (a run of one object: one scan)."""
    model, _ = tiny_model(num_layers=2, coupling="affine", dropout=0.1)
    unstack = [jax.tree.map(lambda a, i=i: a[i], model.params["layers"]) for i in range(2)]
    a, b = GatedPair(dropout=0.2), GatedPair(swap=True, dropout=0.2)
    kp = jax.random.split(jax.random.key(4), 3)
    layers = [model.static, a, model.static, b, b]
    params = [unstack[0], a.init(kp[0], 16), unstack[1], b.init(kp[1], 16), b.init(kp[2], 16)]
    x1, x2 = (jax.random.normal(k, (2, 7, 16), jnp.float64) for k in jax.random.split(jax.random.key(2)))
    keys = list(jax.random.split(jax.random.key(5), 5))
    return layers, params, x1, x2, keys


POLICIES = [  # every policy appears; reverse segments span both kinds of layer
    "reverse",
    ["reverse", "reverse", "store", "reverse", "reverse"],
    ["checkpoint", "reverse", "reverse", "store", "reverse"],
]


@pytest.mark.parametrize("policies", POLICIES)
def test_mixed_pair_stack_gradients_equal_plain_autodiff(mixed_stack, policies):
    layers, params, x1, x2, keys = mixed_stack
    ref = objective(lambda p, a, b: plain(layers, p, a, b, keys))(params, x1, x2)
    got = objective(lambda p, a, b: run_sequence(layers, policies, p, a, b, keys=keys))(params, x1, x2)
    assert abs(float(got[0] - ref[0])) < TOL
    assert max_rel_diff(got[1], ref[1]) < TOL


def test_python_loop_and_parameterless_pair(mixed_stack):
    layers, params, x1, x2, keys = mixed_stack
    layers, params = [*layers, Swap(), Swap()], [*params, {}, {}]
    keys = None  # no dropout: the Swap run has no leaves to scan over at all
    ref = objective(lambda p, a, b: plain(layers, p, a, b, keys))(params, x1, x2)
    for use_scan in (True, False):
        got = objective(lambda p, a, b: run_sequence(layers, "reverse", p, a, b, use_scan=use_scan))(
            params, x1, x2)
        assert max_rel_diff(got[1], ref[1]) < TOL


def test_engine_uses_the_pair_inverse(mixed_stack):
    class Skewed(GatedPair):
        def inverse(self, p, y1, y2, key=None):
            x1, x2 = super().inverse(p, y1, y2, key)
            return x1, x2 + 1e-3 * jnp.tanh(y1)

    layers, params, x1, x2, _ = mixed_stack
    skewed = Skewed()
    layers = [layers[0], skewed, skewed]
    params = [params[0], params[1], params[3]]
    rev = objective(lambda p, a, b: run_sequence(layers, "reverse", p, a, b))(params, x1, x2)
    store = objective(lambda p, a, b: run_sequence(layers, "store", p, a, b))(params, x1, x2)
    assert max_rel_diff(rev[1], store[1]) > 1e-6, "gradients ignored the inverse: activations were stored"


def test_a_reverse_pair_stack_keeps_nothing_per_layer():
    """XLA's plan of the gradient: six more pair layers add less than one stream (1, 512, 16) of temporaries
    under reverse (what they add is their stacked parameters and gradients, 6 x 8 KiB, whatever T), where
    plain autodiff keeps at least a stream per layer."""
    pair = GatedPair()
    x = jnp.ones((1, 512, 16), jnp.float64)

    def temp_bytes(depth, policy):
        params = [pair.init(jax.random.key(i), 16) for i in range(depth)]
        f = lambda p, a: jnp.sum(run_sequence([pair] * depth, policy, p, a, a)[1])  # noqa: E731
        return jax.jit(jax.grad(f)).lower(params, x).compile().memory_analysis().temp_size_in_bytes

    stream = x.size * x.dtype.itemsize
    assert temp_bytes(8, "reverse") - temp_bytes(2, "reverse") < stream
    assert temp_bytes(8, "store") - temp_bytes(2, "store") >= 6 * stream


def test_refusals_name_the_problem(tiny_model, mixed_stack):
    model, _ = tiny_model(num_layers=1)
    with pytest.raises(ConfigError, match="whole-pair coupling.*run_sequence"):
        model.replace(coupling=GatedPair())
    layers, params, x1, x2, _ = mixed_stack
    with pytest.raises(ConfigError, match="one parameter pytree per layer"):
        run_sequence(layers, "reverse", params[:-1], x1, x2)
    with pytest.raises(ConfigError, match="'recompute_ffn' is not built in the JAX backend"):
        run_sequence(layers, "recompute_ffn", params, x1, x2)
    with pytest.raises(ConfigError, match="policy='bogus'"):
        run_sequence(layers, "bogus", params, x1, x2)
