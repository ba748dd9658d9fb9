"""Sliding-window attention: the band mask, the kernel's reference, and gradients under every policy."""

import pytest
import torch

from revnet_core.errors import ConfigError
from revnet_kernels.attn import reference_attention
from revnet_torch.window import band_mask, windowed_attention

from .conftest import grads_of
from .test_engine import assert_same_grads


def test_band_mask_sees_itself_and_the_window_before():
    m = band_mask(6, 3, "cpu")
    assert m[5].tolist() == [False, False, False, True, True, True]
    assert m[0].tolist() == [True] + [False] * 5
    assert band_mask(6, 1, "cpu").equal(torch.eye(6, dtype=torch.bool))


@pytest.mark.parametrize("T,window", [(1, 4), (17, 5), (33, 40)])
def test_windowed_attention_equals_the_kernels_reference(T, window):
    torch.manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = windowed_attention(q, k, v, window)
    ref, _ = reference_attention(q, k, v, causal=True, window=window)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g),
                               rtol=0, atol=1e-12)


def test_windowed_attention_refuses_dropout():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ConfigError, match="attention_dropout"):
        windowed_attention(q, q, q, 2, dropout_p=0.1)


@pytest.mark.parametrize("head_chunk", [0, 1])
def test_windowed_reverse_gradients_equal_plain_autograd(tiny_model, head_chunk):
    model, ids = tiny_model(num_layers=3, d_model=24, num_heads=3, attention_window=4, attn_head_chunk=head_chunk)
    loss_store, g_store = grads_of(model, ids, "store")
    loss_rev, g_rev = grads_of(model, ids, "reverse")
    assert abs(loss_rev.item() - loss_store.item()) < 1e-10
    assert_same_grads(g_rev, g_store)
    full, _ = tiny_model(num_layers=3, d_model=24, num_heads=3)
    assert abs(full(ids).loss.item() - loss_store.item()) > 1e-6  # the window changes the function


def test_window_wider_than_the_sequence_is_full_attention(tiny_model):
    model, ids = tiny_model(num_layers=2)
    full = model(ids).loss
    model.set_attention_window(ids.shape[1])
    torch.testing.assert_close(model(ids).loss, full, rtol=0, atol=1e-12)
