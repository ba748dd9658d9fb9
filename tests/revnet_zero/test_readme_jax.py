"""The README's JAX examples, as typed, at small sizes.

Meant for the nox ``jax`` session (its own process, JAX_ENABLE_X64=1, JAX_PLATFORMS=cpu): there the gradient
comparisons run in float64 to 1e-10. Run elsewhere they still hold, in float32 with float32 tolerances.
"""

import os
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile time dominates these tests; LLVM's optimisation level changes no IEEE result (as in tests/jax).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import revnet_core  # noqa: E402

LAYERS, D, HEADS, SEQ = 2, 16, 2, 16
X64 = jax.config.read("jax_enable_x64")
ATOL = 1e-10 if X64 else 1e-5


def max_diff(a, b):
    return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def make():
    from revnet_zero.jax import ReversibleTransformerJAX

    model = ReversibleTransformerJAX(
        num_layers=LAYERS,
        d_model=D,
        num_heads=HEADS,
        use_scan=True,  # Efficient scanning for layers
        param_dtype="float64" if X64 else "float32",
    )
    key = jax.random.PRNGKey(0)
    params = model.init(key, jnp.ones((1, SEQ, D)))
    return model, params


def test_jax_reversible_transformer():
    model, params = make()

    @jax.jit
    def forward(params, inputs):
        return model.apply(params, inputs)

    grad_fn = jax.jit(jax.grad(lambda p, x: forward(p, x).mean()))

    inputs = jax.random.normal(jax.random.PRNGKey(1), (2, SEQ, D))  # float inputs: embeddings
    logits = forward(params, inputs)
    assert logits.shape == (2, SEQ, model.config.vocab_size) and bool(jnp.isfinite(logits).all())
    grads = grad_fn(params, inputs)

    plain = model.replace(policies="store")  # plain autodiff, every activation stored
    want = jax.jit(jax.grad(lambda p, x: plain.apply(p, x).mean()))(params, inputs)
    assert max_diff(grads, want) < ATOL
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["layers"]))

    ids = jax.random.randint(jax.random.PRNGKey(2), (2, SEQ), 0, model.config.vocab_size)  # integers: token ids
    assert forward(params, ids).shape == (2, SEQ, model.config.vocab_size)


def test_jax_memory_scheduling():
    from revnet_jax.memory import host_memory_available
    from revnet_zero.jax import JAXMemoryScheduler

    model, params = make()
    inputs = jax.random.normal(jax.random.PRNGKey(1), (2, SEQ, D))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scheduler = JAXMemoryScheduler(
            scan_layers=True,
            rematerialization_policy='selective',
            offload_to_cpu=True
        )
        scheduled_model = scheduler.schedule(model)
        outputs = scheduled_model(params, inputs)

    offload_warned = any("offload" in str(w.message) for w in caught)
    assert offload_warned != host_memory_available()  # a warning exactly where there is no host memory
    assert max_diff(outputs, jax.jit(model.apply)(params, inputs)) < ATOL
    g = jax.jit(jax.grad(lambda p, x: scheduled_model(p, x).mean()))(params, inputs)
    want = jax.jit(jax.grad(lambda p, x: model.replace(policies="store").apply(p, x).mean()))(params, inputs)
    assert max_diff(g, want) < ATOL


def test_build_jax_makes_the_class_revnet_zero_exports():
    from revnet_zero.jax import ReversibleTransformerJAX

    model = revnet_core.build("jax", num_layers=1, d_model=D, num_heads=HEADS)
    assert type(model) is ReversibleTransformerJAX
