"""The attention entry point: the reference's math, input checks, and what the registry runs on CPU."""

import math

import pytest
import torch
import torch.nn.functional as F

import revnet_kernels
from revnet_kernels.attn import reference_attention, visible_mask


def test_reference_matches_sdpa_with_grouped_heads():
    q = torch.randn(2, 6, 23, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 23, 16, dtype=torch.float64), torch.randn(2, 2, 23, 16, dtype=torch.float64)
    o, _ = reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def test_reference_window_and_lse_by_hand():
    """Row by row with Python loops: query i attends keys i - window < j <= i."""
    T, window, scale = 9, 3, 0.7
    q, k, v = (torch.randn(1, 1, T, 16, dtype=torch.float64) for _ in range(3))
    o, lse = reference_attention(q, k, v, causal=True, window=window, scale=scale)
    for i in range(T):
        keys = [j for j in range(T) if i - window < j <= i]
        s = torch.stack([scale * q[0, 0, i] @ k[0, 0, j] for j in keys])
        p = torch.softmax(s, 0)
        torch.testing.assert_close(o[0, 0, i], sum(pj * v[0, 0, j] for pj, j in zip(p, keys)))
        torch.testing.assert_close(lse[0, 0, i], torch.logsumexp(s, 0))


def test_visible_mask():
    assert visible_mask(4, True, 2, None).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert visible_mask(3, False, None, None).all()


def test_cpu_runs_sdpa_without_window_and_reference_with_one():
    q, k, v = (torch.randn(1, 2, 11, 16) for _ in range(3))
    assert revnet_kernels.select("attention", q.device, q.dtype, {"head_dim": 16, "window": None}).impl == "sdpa"
    assert revnet_kernels.select("attention", q.device, q.dtype, {"head_dim": 16, "window": 4}).impl == "reference"
    torch.testing.assert_close(revnet_kernels.attention(q, k, v), reference_attention(q, k, v)[0])
    torch.testing.assert_close(revnet_kernels.attention(q, k, v, window=4), reference_attention(q, k, v, window=4)[0])


def test_return_lse_and_scale():
    q, k, v = (torch.randn(1, 2, 7, 16) for _ in range(3))
    o, lse = revnet_kernels.attention(q, k, v, return_lse=True, scale=0.5)
    ro, rlse = reference_attention(q, k, v, scale=0.5)
    torch.testing.assert_close(o, ro)
    torch.testing.assert_close(lse, rlse)


def test_forced_triton_runs_the_interpreted_kernel_on_cpu():
    q, k, v = (torch.randn(1, 3, 19, 16) for _ in range(3))
    o = revnet_kernels.attention(q, k, v, impl="triton")
    torch.testing.assert_close(o, reference_attention(q, k, v)[0], rtol=2e-5, atol=2e-5)


def test_all_implementations_agree_on_gradients():
    q = torch.randn(1, 4, 13, 16)
    k, v = torch.randn(1, 2, 13, 16), torch.randn(1, 2, 13, 16)
    out = {}
    for impl in ("reference", "sdpa", "triton"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = revnet_kernels.attention(*leaves, impl=impl)
        out[impl] = (o, *torch.autograd.grad(o.square().sum(), leaves))
    for impl in ("sdpa", "triton"):
        for a, b in zip(out[impl], out["reference"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shapes,kwargs,match", [
    (((1, 2, 5, 16), (1, 2, 6, 16)), {}, r"k must be \(B, Hkv, T, D\)"),
    (((2, 5, 16), (2, 5, 16)), {}, r"must be \(B, H, T, D\)"),
    (((1, 2, 0, 16), (1, 2, 0, 16)), {}, "seq_len=0 must be >= 1"),
    (((1, 2, 5, 16), (1, 2, 5, 16)), {"causal": False, "window": 3}, "needs causal=True"),
])
def test_entry_point_checks_inputs(shapes, kwargs, match):
    q, k = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    with pytest.raises(ValueError, match=match):
        revnet_kernels.attention(q, k, k, **kwargs)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = (torch.randn(1, 1, 6, 32) for _ in range(3))
    torch.testing.assert_close(reference_attention(q, k, v)[0],
                               reference_attention(q, k, v, scale=1 / math.sqrt(32))[0])


def manual_attention(q, k, v, dropout_p):
    """Causal softmax attention with F.dropout on the probabilities, written out."""
    T = q.shape[2]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return F.dropout(s.softmax(-1), dropout_p) @ v


def test_reference_dropout_matches_manual_dropout_under_the_same_seed():
    q, k, v = (torch.randn(2, 3, 13, 8, dtype=torch.float64) for _ in range(3))
    torch.manual_seed(7)
    o, lse = reference_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(7)
    want = manual_attention(q, k, v, 0.3)
    torch.testing.assert_close(o, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, reference_attention(q, k, v)[1])  # the scores' lse, before dropout
    assert not torch.equal(o, reference_attention(q, k, v)[0])
    torch.manual_seed(7)
    assert torch.equal(reference_attention(q, k, v, dropout_p=0.3, return_lse=False), o)


def test_reference_without_lse_returns_the_same_output_and_gradients():
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    o, _ = reference_attention(q, k, v, window=4)
    o2 = reference_attention(q, k, v, window=4, return_lse=False)
    assert torch.equal(o, o2)
    for x in (q, k, v):
        x.requires_grad_()
    g = torch.autograd.grad(reference_attention(q, k, v, return_lse=False).sum(), (q, k, v))
    g2 = torch.autograd.grad(manual_attention(q, k, v, 0.0).sum(), (q, k, v))
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_reference_math_is_fp32_under_autocast():
    """bf16 inputs: the same fp32 math with autocast on as off (autocast would run the matmuls in bf16)."""
    q, k, v = (torch.randn(1, 2, 11, 16).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, lse = reference_attention(q, k, v)
    ro, rlse = reference_attention(q, k, v)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.equal(o, ro) and torch.equal(lse, rlse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [False, True])
def test_blocks_reference_path_is_this_reference(dtype, training):
    """AttentionBlock(attention="reference") runs this function (dropout only in training), bit for bit."""
    from revnet_torch.blocks import AttentionBlock, Rotary

    block = AttentionBlock(32, 4, 32, Rotary(8, 10000.0), attention="reference", attention_dropout=0.25)
    block.train(training)
    q, k, v = (torch.randn(2, 4, 10, 8, dtype=dtype) for _ in range(3))
    torch.manual_seed(3)
    got = block._core(q, k, v)
    torch.manual_seed(3)
    want = reference_attention(q, k, v, dropout_p=0.25 if training else 0.0, return_lse=False)
    assert torch.equal(got, want)
