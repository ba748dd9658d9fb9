"""The JAX blocks ask the kernel registry for attention: XLA's path by default, the Pallas kernel when forced
(``REVNET_KERNELS=attention=pallas``; on CPU through its interpreter), the same function either way."""

import jax
import pytest

import revnet_core
from revnet_jax.blocks import attention_implementation

from .conftest import TINY, max_rel_diff


@pytest.mark.parametrize("window", [None, 5])
def test_forced_pallas_attention_equals_xla_in_the_reversible_model(monkeypatch, window):
    # float32, head dim 16 (the kernel's smallest)
    model = revnet_core.build("jax", **{**TINY, "num_layers": 2, "d_model": 32, "attention_window": window})
    ids = jax.random.randint(jax.random.key(0), (1, 13), 0, TINY["vocab_size"])
    assert attention_implementation(model.static.block, "float32", False) == "xla"
    loss, grads = jax.jit(jax.value_and_grad(model.loss))(model.params, ids)
    monkeypatch.setenv("REVNET_KERNELS", "attention=pallas")
    assert attention_implementation(model.static.block, "float32", False) == "pallas"
    forced = model.replace(use_scan=True)  # a fresh trace under the forced kernel
    loss_p, grads_p = jax.jit(jax.value_and_grad(forced.loss))(model.params, ids)
    assert abs(float(loss_p - loss)) < 1e-6
    assert max_rel_diff(grads_p, grads) < 1e-5
