"""Sliding-window attention in JAX: torch's semantics (query i sees keys i - window < j <= i), the fused
kernel against the reference, torch's model on shared weights, and reversible gradients under a window.

On a GPU (``JAX_PLATFORMS=cuda pytest tests/jax/test_window.py``) the kernel test also covers cuDNN's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import revnet_core
from revnet_jax.blocks import band_mask, fused_attention, reference_attention
from revnet_jax.trainer import JAXTrainer
from revnet_jax.weights import to_canonical

from .conftest import max_rel_diff
from .test_engine import TOL, reverse_and_plain

IMPLEMENTATIONS = ["xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])


def test_band_mask_sees_itself_and_the_window_before():
    m = np.asarray(band_mask(6, 3))
    assert m[5].tolist() == [False, False, False, True, True, True]
    assert m[0].tolist() == [True] + [False] * 5
    assert np.array_equal(np.asarray(band_mask(6, 1)), np.eye(6, dtype=bool))
    assert np.array_equal(np.asarray(band_mask(6, 6)), np.tril(np.ones((6, 6), bool)))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("T,window", [(1, 4), (17, 5), (33, 40)])
def test_fused_windowed_attention_equals_the_reference(implementation, T, window):
    dtype = jnp.float32 if implementation == "xla" else jnp.bfloat16
    q, k, v = (jax.random.normal(jax.random.key(i), (2, T, 2, 8), dtype) for i in range(3))
    g = jax.random.normal(jax.random.key(3), (2, T, 2, 8), dtype)

    def out_and_grads(fn):
        out, pull = jax.vjp(fn, q, k, v)
        return out, pull(g)

    ours = jax.jit(lambda: out_and_grads(lambda *a: fused_attention(*a, implementation, window)))()
    ref = jax.jit(lambda: out_and_grads(lambda *a: reference_attention(*a, window=window)))()
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert max_rel_diff(ours, ref) < tol


def test_reference_equals_torchs_windowed_attention_in_fp64():
    from revnet_torch.window import windowed_attention

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 19, 3, 8), jnp.float64) for i in range(3))
    ours = reference_attention(q, k, v, window=5)
    theirs = windowed_attention(*(torch.from_numpy(np.array(a)).transpose(1, 2) for a in (q, k, v)), 5)
    assert np.abs(np.asarray(ours) - theirs.transpose(1, 2).numpy()).max() < 1e-12


CFG = dict(num_layers=2, d_model=24, num_heads=3, d_ff=32, vocab_size=37, max_seq_len=64, attention_window=4)


@pytest.mark.parametrize("dtype,attention", [("float64", "reference"), ("float32", "sdpa")])
def test_windowed_model_equals_torchs_on_shared_weights(tmp_path, dtype, attention):
    torch.manual_seed(0)
    tm = revnet_core.build("torch", **CFG)
    tm.save_weights(tmp_path / "w.safetensors")
    jm = revnet_core.build("jax", weights=str(tmp_path / "w.safetensors"), attention=attention, **CFG)
    if dtype == "float64":
        tm, jm = tm.double(), jm.astype("float64")
    ids = torch.randint(0, CFG["vocab_size"], (2, 20))
    loss = tm(ids).loss
    loss.backward()
    t_grads = {n: p.grad.double().numpy() for n, p in tm.named_parameters()}
    j_loss, j_grads = jax.jit(jax.value_and_grad(jm.loss))(jm.params, jnp.asarray(ids.numpy(), jnp.int32))
    j_grads = to_canonical(j_grads, dtype=np.float64)
    tol = 1e-10 if dtype == "float64" else 1e-5
    assert abs(float(j_loss) - loss.item()) / loss.item() < tol
    assert max(np.abs(j_grads[n] - t_grads[n]).max() / np.abs(t_grads[n]).max() for n in t_grads) < tol


def test_windowed_reverse_gradients_equal_plain_autodiff(tiny_model):
    """Affine coupling, dropout in attention and on the outputs (the recompute replays the masks), and
    trained-like weights: N(0, 1/fan_in) for every layer matrix, not only the init's small scale."""
    model, ids = tiny_model(num_layers=2, attention_window=4, coupling="affine", dropout=0.1, attention_dropout=0.1)
    p = model.params
    model.params = jax.tree.map(lambda a, k: a if a.ndim < 3 else jax.random.normal(k, a.shape, a.dtype)
                                / np.sqrt(a.shape[-1]), p, _keys_like(p))
    (loss_rev, g_rev), (loss_plain, g_plain) = reverse_and_plain(model, ids, jax.random.key(5))
    assert abs(float(loss_rev - loss_plain)) < TOL
    assert max_rel_diff(g_rev, g_plain) < TOL


def _keys_like(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(jax.random.split(jax.random.key(11), len(leaves))))


def test_window_wider_than_the_sequence_is_full_attention_and_the_trainer_sets_it(tiny_model):
    model, ids = tiny_model(num_layers=2)
    full = float(model(ids).loss)
    model.set_attention_window(ids.shape[1])
    assert model.config.attention_window == ids.shape[1]
    assert abs(float(model(ids).loss) - full) < 1e-12
    model.set_attention_window(2)
    assert abs(float(model(ids).loss) - full) > 1e-6  # the window changes the function (traced again)
    trainer = JAXTrainer(model, attention_window_size=3, progress=False)
    assert trainer.config.attention_window == 3 and trainer.model.static.block.window == 3
