"""Fused LayerNorm / RMSNorm (interpreted) against the references: output, input, weight and bias grads."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from revnet_kernels.norms import reference_layer_norm, reference_rms_norm
from revnet_kernels.norms_triton import norm_forward, triton_layer_norm, triton_rms_norm

from .helpers import grads, rel_err


def compare(kind, shape, dtype=torch.float32, bias=True, tol=None):
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    w = torch.randn(n, dtype=dtype)
    b = torch.randn(n, dtype=dtype)
    if kind == "layer":
        inputs = [x, w, b] if bias else [x, w]
        kernel = lambda *t: triton_layer_norm(*t, eps=1e-5)  # noqa: E731
        ref = lambda *t: reference_layer_norm(*t, eps=1e-5)  # noqa: E731
    else:
        inputs = [x, w]
        kernel = lambda *t: triton_rms_norm(*t, eps=1e-5)  # noqa: E731
        ref = lambda *t: reference_rms_norm(*t, eps=1e-5)  # noqa: E731
    y, g, dy = grads(kernel, inputs)
    ry, rg, _ = grads(ref, [t.double() for t in inputs], dy.double())
    assert y.dtype == dtype and all(a.dtype == dtype for a in g)
    for a, e in zip((y, *g), (ry, *rg)):
        if tol is None:
            torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)
        else:
            assert rel_err(a, e) < tol


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 5, 129), (7, 64)])
def test_fp32_matches_reference(kind, shape):
    compare(kind, shape)


def test_layer_norm_without_bias():
    compare("layer", (4, 33), bias=False)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision(kind, dtype, tol):
    compare(kind, (5, 96), dtype=dtype, tol=tol)


def test_mixed_dtypes_output_in_x_dtype_grads_in_their_own():
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    y = triton_rms_norm(x, w)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_statistics_are_saved_in_fp32():
    x = torch.randn(4, 10, dtype=torch.float16)
    _, mean, rstd = norm_forward(x, torch.ones(10, dtype=torch.float16), None, 1e-5, rms=False)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (4,)
    torch.testing.assert_close(mean, x.float().mean(-1))


def test_bad_weight_shape_raises():
    with pytest.raises(ValueError, match=r"weight must be \(8,\)"):
        triton_layer_norm(torch.randn(2, 8), torch.ones(7))


@given(rows=st.integers(1, 9), n=st.integers(1, 150), kind=st.sampled_from(["layer", "rms"]))
def test_property_any_shape(rows, n, kind):
    compare(kind, (rows, n))
