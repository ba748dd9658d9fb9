"""One weight file, the same loss and gradients in torch and JAX (both backends exactly as shipped).

Float64 parity to 1e-10 holds because both compute RoPE's canonical angles the same way and keep the loss
head in float64 when given float64.
"""

import dataclasses

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
import revnet_core
from revnet_core.config import ModelConfig
from revnet_jax.weights import to_canonical

CONFIGS = {
    "additive-layernorm-gelu-sdpa": dict(),
    "affine-rmsnorm-swiglu-reference": dict(coupling="affine", norm="rmsnorm", activation="swiglu",
                                            attention="reference"),
    "additive-gelu_exact-ffn_chunks": dict(activation="gelu_exact", ffn_chunk_size=7, num_layers=2),
    "affine-geglu": dict(coupling="affine", activation="geglu"),
}
if "stream_merge" in {f.name for f in dataclasses.fields(ModelConfig)}:  # the merge torch builds: sum less e
    CONFIGS["additive-stream_merge_sum"] = dict(stream_merge="sum", num_layers=2)
BASE = dict(num_layers=3, d_model=32, num_heads=2, d_ff=40, vocab_size=37, max_seq_len=64)


def make_pair(tmp_path, name, seed=0):
    """A torch model, the weight file it wrote, and the JAX model built from that file; ids (2, 20)."""
    cfg = dict(BASE, **CONFIGS[name])
    torch.manual_seed(seed)
    tm = revnet_core.build("torch", **cfg)
    path = tmp_path / "w.safetensors"
    tm.save_weights(path)
    jm = revnet_core.build("jax", weights=str(path), **cfg)
    ids = torch.randint(0, cfg["vocab_size"], (2, 20))
    return tm, jm, ids


def torch_shipped_loss_and_grads(tm, ids):
    tm.zero_grad(set_to_none=True)
    loss = tm(ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.double().numpy() for n, p in tm.named_parameters()}


def jax_loss_and_grads(jm, ids):
    loss, grads = jax.jit(jax.value_and_grad(jm.loss))(jm.params, jnp.asarray(ids.numpy(), jnp.int32))
    return float(loss), to_canonical(grads, dtype=np.float64)


def worst_relative(a, b):
    assert sorted(a) == sorted(b)
    return max(np.abs(a[n] - b[n]).max() / max(np.abs(b[n]).max(), 1e-30) for n in b)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp64_same_loss_and_gradients(tmp_path, name):
    tm, jm, ids = make_pair(tmp_path, name)
    t_loss, t_grads = torch_shipped_loss_and_grads(tm.double(), ids)
    j_loss, j_grads = jax_loss_and_grads(jm.astype("float64"), ids)
    assert abs(t_loss - j_loss) < 1e-10
    assert worst_relative(j_grads, t_grads) < 1e-10


@pytest.mark.parametrize("name", ["additive-layernorm-gelu-sdpa", "affine-geglu"])
def test_fp32_same_loss_and_gradients_torch_as_shipped(tmp_path, name):
    tm, jm, ids = make_pair(tmp_path, name)
    t_loss, t_grads = torch_shipped_loss_and_grads(tm, ids)
    j_loss, j_grads = jax_loss_and_grads(jm, ids)
    assert abs(t_loss - j_loss) / abs(t_loss) < 1e-5
    assert worst_relative(j_grads, t_grads) < 1e-5
