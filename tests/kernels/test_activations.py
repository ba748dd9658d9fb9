"""Activation entry point: the reference's definitions, every kind of the config, and the dispatch."""

import pytest
import torch
import torch.nn.functional as F

import revnet_kernels
from revnet_core.config import ACTIVATIONS
from revnet_kernels import registry
from revnet_kernels.activations import KINDS, TRITON_KINDS, reference_activation


def test_reference_definitions():
    u = torch.randn(3, 8, dtype=torch.float64)
    a, b = u.chunk(2, -1)
    torch.testing.assert_close(reference_activation(u, "gelu"), F.gelu(u, approximate="tanh"))
    torch.testing.assert_close(reference_activation(u, "gelu_exact"), F.gelu(u))
    torch.testing.assert_close(reference_activation(u, "relu"), F.relu(u))
    torch.testing.assert_close(reference_activation(u, "silu"), F.silu(u))
    torch.testing.assert_close(reference_activation(u, "geglu"), F.gelu(a, approximate="tanh") * b)
    torch.testing.assert_close(reference_activation(u, "swiglu"), F.silu(a) * b)


@pytest.mark.parametrize("impl,kind", [(impl, kind) for impl in (None, "torch", "reference", "triton")
                                       for kind in ACTIVATIONS if impl != "triton" or kind in TRITON_KINDS])
def test_entry_point(impl, kind):
    u = torch.randn(5, 12)
    torch.testing.assert_close(revnet_kernels.activation(u, kind, impl=impl), reference_activation(u, kind),
                               rtol=1e-5, atol=1e-5)


def test_every_config_activation_is_a_kind():
    assert KINDS == ACTIVATIONS and set(TRITON_KINDS) < set(KINDS)


@pytest.mark.parametrize("kind", sorted(set(ACTIVATIONS) - set(TRITON_KINDS)))
def test_triton_is_never_chosen_for_kinds_it_lacks(kind):
    assert registry.select("activation", "cpu", torch.float32, {"kind": kind}).impl == "torch"
    triton = [r for r in registry.implementations("activation") if r.impl == "triton"][0]
    assert not triton.accepts("cuda", "bfloat16", {"kind": kind})
    with pytest.raises(ValueError, match="'triton' does not support"):
        revnet_kernels.activation(torch.randn(2, 4), kind, impl="triton")


def test_triton_ranks_first_for_gated_kinds_on_gpus_only():
    """The H200 measurement (kernels/plugin.py): the fused gate 3.7-4.3x faster; GELU level with torch's."""
    assert [r.impl for r in registry.implementations("activation")] == ["torch", "triton", "reference"]
    for kind in ("swiglu", "geglu"):
        assert registry.select("activation", "cpu", torch.bfloat16, {"kind": kind}).impl == "torch"
        assert registry.select("activation", "cuda", torch.bfloat16, {"kind": kind}).impl == "triton"
    for kind in ("gelu", "silu"):
        assert registry.select("activation", "cuda", torch.bfloat16, {"kind": kind}).impl == "torch"


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="kind='relu2' must be one of"):
        revnet_kernels.activation(torch.randn(2, 4), "relu2")
