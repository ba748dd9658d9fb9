"""One weight file, the same loss and gradients in torch and numba (torch as shipped, reversible in both)."""

import os

import numpy as np
import pytest
import torch

import revnet_core

from .conftest import torch_loss_and_grads, worst_relative

CONFIGS = {
    "additive-layernorm-gelu": dict(),
    "affine-rmsnorm-swiglu": dict(coupling="affine", norm="rmsnorm", activation="swiglu"),
    "additive-rmsnorm-gelu_exact-ffn_chunks": dict(norm="rmsnorm", activation="gelu_exact", ffn_chunk_size=7),
    "affine-layernorm-geglu-ffn_chunks": dict(coupling="affine", activation="geglu", ffn_chunk_size=16),
    "additive-relu": dict(activation="relu", num_layers=2),
    "affine-silu": dict(coupling="affine", activation="silu", num_layers=2),
    "additive-mean-merge": dict(stream_merge="mean"),  # the merge of models saved before stream_merge
    "affine-rmsnorm-mean-merge": dict(coupling="affine", norm="rmsnorm", stream_merge="mean"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp64_reverse_gradients_equal_torch(pair, name):
    tm, nm, ids = pair(**CONFIGS[name])
    t_loss, t_grads = torch_loss_and_grads(tm, ids)
    n_loss, n_grads = nm.value_and_grad(ids)
    assert abs(n_loss - t_loss) / abs(t_loss) < 1e-10
    assert worst_relative(n_grads, t_grads) < 1e-10


@pytest.mark.parametrize("policy", ["store", ["reverse", "store", "reverse"]])
def test_fp64_other_policies_equal_torch(pair, policy):
    tm, nm, ids = pair(coupling="affine")
    nm.set_policy(policy)
    t_loss, t_grads = torch_loss_and_grads(tm, ids)
    n_loss, n_grads = nm.value_and_grad(ids)
    assert abs(n_loss - t_loss) / abs(t_loss) < 1e-10
    assert worst_relative(n_grads, t_grads) < 1e-10


def test_fp64_labels_with_ignored_positions_equal_torch(pair):
    tm, nm, ids = pair()
    labels = ids.copy()
    labels[:, ::3] = -100
    tm.zero_grad(set_to_none=True)
    t_loss = tm(torch.from_numpy(ids), torch.from_numpy(labels)).loss
    t_loss.backward()
    n_loss, n_grads = nm.value_and_grad(ids, labels)
    assert abs(n_loss - t_loss.item()) / t_loss.item() < 1e-10
    assert worst_relative(n_grads, {n: p.grad.numpy() for n, p in tm.named_parameters()}) < 1e-10


@pytest.mark.parametrize("name", ["additive-layernorm-gelu", "affine-rmsnorm-swiglu"])
def test_fp32_loss_and_gradients_close_to_torch(pair, name):
    tm, nm, ids = pair(dtype="float32", **CONFIGS[name])
    t_loss, t_grads = torch_loss_and_grads(tm, ids)
    n_loss, n_grads = nm.value_and_grad(ids)
    assert all(g.dtype == np.float32 for g in n_grads.values())
    assert abs(n_loss - t_loss) / abs(t_loss) < 1e-5
    worst = max(np.abs(n_grads[n] - t_grads[n]).max() for n in t_grads) / max(np.abs(g).max() for g in t_grads.values())
    assert worst < 1e-5


@pytest.mark.parametrize("coupling", ["momentum", "momentum_learned"])
def test_momentum_plugin_couplings_equal_torch(pair, coupling):
    """The example plugin's couplings (pip-installed by the plugins session, which runs before this one)."""
    if coupling not in revnet_core.registry.registry().couplings:
        if os.environ.get("REVNET_REQUIRE_PLUGINS"):  # the nox session installs it: missing is a failure there
            pytest.fail(f"coupling {coupling!r} is not registered though REVNET_REQUIRE_PLUGINS is set")
        pytest.skip("revnet-momentum is not installed (pip install plugins/momentum-coupling)")
    tm, nm, ids = pair(coupling=coupling)
    t_loss, t_grads = torch_loss_and_grads(tm, ids)
    n_loss, n_grads = nm.value_and_grad(ids)
    assert abs(n_loss - t_loss) / abs(t_loss) < 1e-10
    assert worst_relative(n_grads, t_grads) < 1e-10
