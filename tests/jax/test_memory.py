"""Memory from XLA's own buffer plan (``compiled().memory_analysis()``): flat in depth under reverse, growing
under store; the memory scheduler's variants compute the same gradients."""

import warnings

import jax
import jax.numpy as jnp
import pytest

from revnet_jax import JAXMemoryScheduler, ReversibleTransformerJAX, compiled_memory

from .conftest import max_rel_diff, plain_loss

B, T, D = 1, 128, 32
STREAMS = 2 * B * T * D * 4  # bytes of one layer's two fp32 input streams


def step_temp_bytes(num_layers: int, policy: str) -> int:
    """Temp bytes XLA plans for one jitted value_and_grad step; nothing is allocated or run."""
    model = ReversibleTransformerJAX(num_layers=num_layers, d_model=D, num_heads=2, vocab_size=64, max_seq_len=T,
                                     policy=policy, loss_chunk_size=32)
    params = jax.eval_shape(model.init, jax.random.key(0))
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    return compiled_memory(jax.value_and_grad(model.loss), params, ids)["temp"]


def test_temp_memory_flat_in_depth_under_reverse_and_growing_under_store():
    rev = {n: step_temp_bytes(n, "reverse") for n in (2, 8)}
    store = {n: step_temp_bytes(n, "store") for n in (2, 8)}
    ckpt = {n: step_temp_bytes(n, "checkpoint") for n in (2, 8)}
    # reverse: six more layers add less than one layer's input streams
    assert abs(rev[8] - rev[2]) < STREAMS, rev
    # store keeps every layer's activations: far more than the inputs per extra layer
    assert store[8] - store[2] > 6 * 4 * STREAMS, store
    # checkpoint keeps each layer's two input streams, about one STREAMS per extra layer
    assert 6 * STREAMS <= ckpt[8] - ckpt[2] < 6 * 2 * STREAMS, ckpt
    assert rev[8] < ckpt[8] < store[8]


def test_scheduler_variants_equal_plain_autodiff(tiny_model):
    model, ids = tiny_model(coupling="affine", dropout=0.1)
    key = jax.random.key(2)
    variants = [("reverse", False), ("selective", True), ("full", True), ("full", False), ("none", False)]
    scheduled = [JAXMemoryScheduler(rematerialization_policy=r, offload_to_cpu=o).schedule(model) for r, o in variants]

    @jax.jit
    def all_grads(params):
        plain = jax.grad(lambda p: plain_loss(model, p, ids, key=key))(params)
        return plain, [jax.grad(s.loss)(params, ids, key=key) for s in scheduled]

    plain, grads = all_grads(model.params)
    for (remat, offload), g in zip(variants, grads):
        assert max_rel_diff(g, plain) < 1e-10, (remat, offload)
    logits = jax.jit(scheduled[1])(model.params, ids)  # the README's scheduled(params, inputs)
    assert logits.shape == (*ids.shape, model.config.vocab_size)


def test_offload_moves_layer_inputs_to_host_memory(tiny_model):
    """CPU has a pinned-host memory space too, so the program structure is checked here; the GPU benchmark
    measures what it saves."""
    model, ids = tiny_model(num_layers=3)
    full = JAXMemoryScheduler(rematerialization_policy="full", offload_to_cpu=True).schedule(model)
    jaxpr = str(jax.make_jaxpr(jax.grad(full.loss))(model.params, ids))
    assert "f64<host>[3,2,12,16]" in jaxpr  # three layers' inputs (B, T, d) stacked in host memory
    kept = JAXMemoryScheduler(rematerialization_policy="full").schedule(model)
    assert "<host>" not in str(jax.make_jaxpr(jax.grad(kept.loss))(model.params, ids))


def test_scheduler_warns_and_rejects(tiny_model):
    model, _ = tiny_model()
    with pytest.warns(UserWarning, match="no effect"):
        JAXMemoryScheduler(rematerialization_policy="reverse", offload_to_cpu=True).schedule(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        JAXMemoryScheduler(scan_layers=False, rematerialization_policy="selective").schedule(model)
    with pytest.raises(ValueError, match="rematerialization_policy"):
        JAXMemoryScheduler(rematerialization_policy="sometimes")


def test_readme_scheduler_call(tiny_model):
    model, ids = tiny_model()
    scheduler = JAXMemoryScheduler(scan_layers=True, rematerialization_policy="selective", offload_to_cpu=True)
    scheduled_model = scheduler.schedule(model)
    assert scheduled_model.model.policies == ("checkpoint",) * 3 and model.policies == ("reverse",) * 3
    assert "selective" in repr(scheduled_model)
