"""Memory flat in depth under ``reverse``, measured without a device: saved-tensor bytes and live bytes."""

import pytest
import torch

import revnet_core
from revnet_torch.memory import live_tensor_bytes, saved_tensor_bytes


def build(num_layers, policy):
    torch.manual_seed(0)
    model = revnet_core.build("torch", num_layers=num_layers, d_model=32, num_heads=2, vocab_size=64,
                              policy=policy, loss_chunk_size=16)
    return model, torch.randint(0, 64, (1, 48))


def saved_bytes(num_layers, policy):
    model, ids = build(num_layers, policy)
    params = list(model.parameters())
    with saved_tensor_bytes(exclude=params) as saved:
        loss = model(ids).loss
    loss.backward()  # the graph must still be usable
    return saved["bytes"]


def test_saved_bytes_flat_in_depth_under_reverse():
    assert saved_bytes(2, "reverse") == saved_bytes(16, "reverse") > 0


def test_saved_bytes_grow_linearly_under_store():
    b2, b4, b8 = (saved_bytes(n, "store") for n in (2, 4, 8))
    assert b4 > b2
    assert b8 - b4 == pytest.approx(2 * (b4 - b2), rel=1e-6)


def live_after_forward(num_layers, policy):
    model, ids = build(num_layers, policy)
    params = [p for p in model.parameters()]
    base = live_tensor_bytes(exclude=params)
    loss = model(ids).loss
    grown = live_tensor_bytes(exclude=params) - base
    del loss
    return grown


def test_live_bytes_after_forward_flat_in_depth_under_reverse():
    """Counts tensors stashed on ctx or in Python objects too, not only what autograd saves."""
    assert live_after_forward(2, "reverse") == live_after_forward(16, "reverse")
    assert live_after_forward(16, "store") > live_after_forward(2, "store")


def test_live_bytes_ignores_fake_tensors_left_by_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    base = live_tensor_bytes()
    with FakeTensorMode():
        fake = torch.empty(1000, requires_grad=True)  # alive in gc while we count, owns no memory
    assert live_tensor_bytes() == base
    real = torch.empty(1000)
    assert live_tensor_bytes() - base == real.untyped_storage().nbytes()
    del fake
