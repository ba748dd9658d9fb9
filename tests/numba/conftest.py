"""Fixtures of the numba backend's tests: tiny float64 models, and torch models on the same weights."""

import numpy as np
import pytest
import torch

import revnet_core

TINY = dict(num_layers=3, d_model=32, num_heads=2, d_ff=40, vocab_size=37, max_seq_len=128)


def worst_relative(a: dict, b: dict) -> float:
    """max over names of max|a - b| / max|b| (the same names in both)."""
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[n] - b[n]).max() / max(np.abs(b[n]).max(), 1e-30)) for n in b)


@pytest.fixture
def pair(tmp_path):
    """pair(**config) -> (torch model, numba model on the torch model's weight file, ids (2, 45) int64)."""

    def make(seed=0, dtype="float64", **fields):
        cfg = dict(TINY, **fields)
        torch.manual_seed(seed)
        tm = revnet_core.build("torch", **cfg)
        path = tmp_path / "w.safetensors"
        tm.save_weights(path)
        nm = revnet_core.build("numba", weights=str(path), **cfg)
        if dtype == "float64":
            tm, nm = tm.double(), nm.astype("float64")
        ids = np.random.default_rng(seed).integers(0, cfg["vocab_size"], (2, 45))
        return tm, nm, ids

    return make


def torch_loss_and_grads(tm, ids: np.ndarray):
    tm.zero_grad(set_to_none=True)
    loss = tm(torch.from_numpy(ids)).loss
    loss.backward()
    return loss.item(), {n: p.grad.double().numpy() for n, p in tm.named_parameters()}
