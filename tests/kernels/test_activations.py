"""Activation entry point: the reference's definitions and the dispatch."""

import pytest
import torch
import torch.nn.functional as F

import revnet_kernels
from revnet_kernels.activations import reference_activation


def test_reference_definitions():
    u = torch.randn(3, 8, dtype=torch.float64)
    a, b = u.chunk(2, -1)
    torch.testing.assert_close(reference_activation(u, "gelu"), F.gelu(u, approximate="tanh"))
    torch.testing.assert_close(reference_activation(u, "silu"), F.silu(u))
    torch.testing.assert_close(reference_activation(u, "geglu"), F.gelu(a, approximate="tanh") * b)
    torch.testing.assert_close(reference_activation(u, "swiglu"), F.silu(a) * b)


@pytest.mark.parametrize("impl", [None, "triton"])
def test_entry_point(impl):
    u = torch.randn(5, 12)
    torch.testing.assert_close(revnet_kernels.activation(u, "geglu", impl=impl), reference_activation(u, "geglu"),
                               rtol=1e-5, atol=1e-5)


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="kind='relu2' must be one of"):
        revnet_kernels.activation(torch.randn(2, 4), "relu2")
