"""Attention over chunks of heads: the same function, and the reversible backward walks the same chunks."""

import pytest
import torch

from revnet_torch.blocks import AttentionBlock, Rotary
from revnet_torch.memory import saved_tensor_bytes

from .conftest import grads_of
from .test_engine import assert_same_grads


@pytest.mark.parametrize("head_chunk", [1, 2])
def test_head_chunks_do_not_change_the_function(tiny_model, head_chunk):
    model, ids = tiny_model(num_layers=2, d_model=24, num_heads=3)
    whole = model(ids).loss
    for layer in model.layers:
        layer.attn.block.head_chunk = head_chunk
        assert len(layer.attn.block.head_chunks(*ids.shape)) > 1
    torch.testing.assert_close(model(ids).loss, whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("head_chunk", [1, 2])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_head_chunked_reverse_gradients_equal_plain_autograd(tiny_model, head_chunk, norm):
    model, ids = tiny_model(num_layers=3, d_model=24, num_heads=3, attn_head_chunk=head_chunk, norm=norm,
                            ffn_chunk_size=5)
    loss_store, g_store = grads_of(model, ids, "store")
    loss_rev, g_rev = grads_of(model, ids, "reverse")
    assert abs(loss_rev.item() - loss_store.item()) < 1e-10
    assert_same_grads(g_rev, g_store)


def test_head_chunked_fast_path_runs_and_rebuilds_inputs(tiny_model, monkeypatch):
    """The engine takes the block's own backward (called once per layer) and the streams come back exact."""
    model, ids = tiny_model(num_layers=3, d_model=24, num_heads=3, attn_head_chunk=1)
    calls = []
    original = AttentionBlock.additive_vjp

    def spy(self, *args):
        calls.append(self)
        return original(self, *args)

    monkeypatch.setattr(AttentionBlock, "additive_vjp", spy)
    grads_of(model, ids, "reverse")
    assert len(calls) == 3


@pytest.mark.parametrize("coupling,dropout", [("affine", 0.0), ("additive", 0.1)])
def test_head_chunks_fall_back_where_the_fast_path_does_not_apply(tiny_model, monkeypatch, coupling, dropout):
    """Affine couplings need F before the chunks' cotangents; dropout needs its draws replayed in order."""
    model, ids = tiny_model(num_layers=2, d_model=24, num_heads=3, attn_head_chunk=1, coupling=coupling,
                            dropout=dropout, attention_dropout=dropout)
    model.train()

    def refuse(*args):
        raise AssertionError("fast path taken")

    monkeypatch.setattr(AttentionBlock, "additive_vjp", refuse)
    _, g_store = grads_of(model, ids, "store")
    _, g_rev = grads_of(model, ids, "reverse")
    assert_same_grads(g_rev, g_store)


def test_head_chunks_bound_the_attention_graph(monkeypatch):
    """The head-chunked backward holds one chunk's graph at a time: with 8 chunks of one head, each chunk
    saves (q, k, v, output, its weight rows) under a quarter of what the whole block's graph saves."""
    torch.manual_seed(0)
    d, H, T = 64, 8, 512
    block = AttentionBlock(d, H, d, Rotary(d // H, 10000.0)).double()
    params = list(block.parameters())
    x = torch.randn(1, T, d, dtype=torch.float64)
    with saved_tensor_bytes(exclude=[x, *params]) as whole:
        block(x.detach().requires_grad_())
    block.head_chunk = 1
    chunks = []
    original = AttentionBlock.attend_heads

    def measured(self, h, heads, key_mask=None):
        with saved_tensor_bytes(exclude=[h, *params]) as saved:
            out = original(self, h, heads, key_mask)
        chunks.append(saved["bytes"])
        return out

    monkeypatch.setattr(AttentionBlock, "attend_heads", measured)
    y, dy = torch.randn(1, T, d, dtype=torch.float64), torch.randn(1, T, d, dtype=torch.float64)
    settled = []
    dx, dparams = block.additive_vjp(x, dy, params, settled.append)
    assert len(chunks) == H
    torch.testing.assert_close(settled[0], block(x), rtol=0, atol=1e-12)  # settle gets F(x) itself
    assert dx.shape == x.shape and len(dparams) == len(params)
    assert 0 < max(chunks) * 4 < whole["bytes"], (chunks, whole)
