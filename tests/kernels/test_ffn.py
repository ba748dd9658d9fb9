"""Chunked FFN: same values and gradients as the unchunked block, any chunk size, autocast dtypes."""

import pytest
import torch

from revnet_kernels.activations import reference_activation
from revnet_kernels.ffn import chunked_ffn

from .helpers import grads


def plain_ffn(x, w_up, w_down, kind):
    return reference_activation(x @ w_up.T, kind) @ w_down.T


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_matches_unchunked(kind, chunk, impl):
    width = 24 if kind == "gelu" else 48
    x, wu, wd = torch.randn(2, 9, 16), torch.randn(width, 16) * 0.3, torch.randn(10, 24) * 0.3
    y, g, dy = grads(lambda *t: chunked_ffn(*t, kind=kind, chunk_size=chunk, impl=impl), [x, wu, wd])
    ry, rg, _ = grads(lambda *t: plain_ffn(*t, kind), [t.double() for t in (x, wu, wd)], dy.double())
    assert y.shape == (2, 9, 10)
    for a, e in zip((y, *g), (ry, *rg)):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)


def test_autocast_runs_matmuls_in_bf16_and_returns_grads_in_param_dtypes():
    x = torch.randn(12, 16, requires_grad=True)
    wu, wd = torch.randn(32, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = chunked_ffn(x, wu, wd, "geglu", chunk_size=5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == wu.grad.dtype == wd.grad.dtype == torch.float32


def test_shape_checks():
    with pytest.raises(ValueError, match="must be \\(out, 12\\)"):
        chunked_ffn(torch.randn(3, 4), torch.randn(24, 4), torch.randn(5, 24), "swiglu")
