"""Fused gated activations (interpreted) against the reference: output and input gradient."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from revnet_kernels.activations import reference_activation
from revnet_kernels.activations_triton import ActivationBlocks, activation_backward, activation_forward, \
    triton_activation

from .helpers import grads, rel_err

KINDS = ["gelu", "silu", "geglu", "swiglu"]


def compare(kind, shape, dtype=torch.float32, tol=None, scale=3.0):
    u = (torch.randn(shape) * scale).to(dtype)
    y, (du,), dy = grads(lambda t: triton_activation(t, kind), [u])
    ry, (rdu,), _ = grads(lambda t: reference_activation(t, kind), [u.double()], dy.double())
    assert y.dtype == du.dtype == dtype
    for a, e in ((y, ry), (du, rdu)):
        if tol is None:
            # values reach ~30 (inputs of scale 3, products of two): 5e-5 is a few fp32 ulps there
            torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=5e-5)
        else:
            assert rel_err(a, e) < tol


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 2), (3, 34), (2, 5, 258)])
def test_fp32_matches_reference(kind, shape):
    compare(kind, shape)


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_inputs_stay_finite(kind):
    compare(kind, (2, 64), scale=60.0)  # tanh and sigmoid saturate without NaN


@pytest.mark.parametrize("kind", ["geglu", "swiglu"])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision(kind, dtype, tol):
    compare(kind, (4, 200), dtype=dtype, tol=tol)


def test_small_blocks_cover_the_row():
    u = torch.randn(3, 2 * 70)
    blocks = ActivationBlocks(block=16, num_warps=1)
    torch.testing.assert_close(activation_forward(u, "swiglu", blocks), reference_activation(u, "swiglu"))
    dy = torch.randn(3, 70)
    uu = u.clone().requires_grad_()
    (want,) = torch.autograd.grad(reference_activation(uu, "swiglu"), uu, dy)
    torch.testing.assert_close(activation_backward(dy, u, "swiglu", blocks), want)


def test_odd_gated_width_raises():
    with pytest.raises(ValueError, match="width=5 must be even"):
        triton_activation(torch.randn(2, 5), "geglu")


@given(rows=st.integers(1, 6), half=st.integers(1, 300), kind=st.sampled_from(KINDS))
def test_property_any_width(rows, half, kind):
    compare(kind, (rows, 2 * half))
