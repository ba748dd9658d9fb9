"""The canonical weight layout: torch's state_dict names and shapes, fp32 safetensors, atomic writes."""

import os

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import revnet_core
from revnet_core import ConfigError
from revnet_jax.weights import to_canonical

CONFIGS = [
    dict(num_layers=2, d_model=16, num_heads=2, vocab_size=37),
    dict(num_layers=3, d_model=16, num_heads=2, vocab_size=37, coupling="affine", norm="rmsnorm",
         activation="swiglu", d_ff=40),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_names_and_shapes_are_torch_state_dict(cfg):
    torch_sd = revnet_core.build("torch", **cfg).state_dict()
    ours = to_canonical(revnet_core.build("jax", **cfg).params)
    assert sorted(ours) == sorted(torch_sd)
    for name, t in torch_sd.items():
        assert ours[name].shape == tuple(t.shape), name
        assert ours[name].dtype == np.float32


def test_save_is_atomic_and_round_trips(tmp_path):
    cfg = CONFIGS[1]
    model = revnet_core.build("jax", **cfg)
    path = tmp_path / "w.safetensors"
    model.save_weights(path)
    assert os.listdir(tmp_path) == ["w.safetensors"]  # no temp file left behind
    loaded = revnet_core.build("jax", weights=str(path), **cfg)
    same = jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), loaded.params, model.params)
    assert all(jax.tree.leaves(same))
    assert load_file(str(path))["layers.2.ffn.block.up.weight"].shape == (80, 16)  # gated: 2 * d_ff rows


def test_loaded_weights_take_the_models_dtype(tmp_path):
    cfg = CONFIGS[0]
    path = tmp_path / "w.safetensors"
    revnet_core.build("torch", **cfg).save_weights(path)
    model = revnet_core.build("jax", **cfg).astype("float64").load_weights(path)
    assert {str(p.dtype) for p in jax.tree.leaves(model.params)} == {"float64"}


def test_a_file_that_does_not_fit_names_what_is_wrong(tmp_path):
    cfg = CONFIGS[0]
    path = tmp_path / "w.safetensors"
    tensors = to_canonical(revnet_core.build("jax", **cfg).params)
    tensors["head.weight"] = np.zeros((5, 16), np.float32)
    del tensors["norm.bias"]
    tensors["extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(path))
    with pytest.raises(ConfigError, match=r"missing \['norm.bias'\], unexpected \['extra.weight'\], wrong shape "
                                          r"\['head.weight'\]"):
        revnet_core.build("jax", weights=str(path), **cfg)
    with pytest.raises(ConfigError):  # a different depth does not fit either
        revnet_core.build("jax", weights=str(path), **dict(cfg, num_layers=3))


def test_jax_file_loads_into_torch(tmp_path):
    cfg = CONFIGS[1]
    path = tmp_path / "w.safetensors"
    model = revnet_core.build("jax", **cfg)
    model.save_weights(path)
    sd = revnet_core.build("torch", weights=str(path), **cfg).state_dict()
    ours = to_canonical(model.params)
    for name, t in sd.items():
        assert torch.equal(t, torch.from_numpy(np.array(ours[name]))), name
