"""Norm entry points: references against torch's modules, dispatch on CPU, checks."""

import pytest
import torch

import revnet_kernels
from revnet_kernels import registry
from revnet_kernels.norms import reference_layer_norm, reference_rms_norm


def test_references_match_torch_modules():
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    ln = torch.nn.LayerNorm(24, eps=1e-5, dtype=torch.float64)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    torch.testing.assert_close(reference_layer_norm(x, ln.weight, ln.bias, 1e-5), ln(x))
    rms = torch.nn.RMSNorm(24, eps=1e-5, dtype=torch.float64)
    torch.nn.init.normal_(rms.weight)
    torch.testing.assert_close(reference_rms_norm(x, rms.weight, 1e-5), rms(x))


@pytest.mark.parametrize("impl", [None, "torch", "reference", "triton"])
def test_entry_points(impl):
    x, w, b = torch.randn(4, 20), torch.randn(20), torch.randn(20)
    torch.testing.assert_close(revnet_kernels.layer_norm(x, w, b, impl=impl), reference_layer_norm(x, w, b),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(revnet_kernels.rms_norm(x, w, impl=impl), reference_rms_norm(x, w),
                               rtol=1e-5, atol=1e-5)


def test_torch_ranks_first_and_triton_takes_rows_up_to_max_hidden():
    """"torch" (F.layer_norm / F.rms_norm, what the blocks call) is chosen everywhere for now (the ranking
    awaits benchmarks/norm_act_bench.py on an H200); Triton serves GPU rows up to MAX_HIDDEN wide."""
    for op in ("layer_norm", "rms_norm"):
        assert [r.impl for r in registry.implementations(op)] == ["torch", "triton", "reference"]
        assert revnet_kernels.select(op, "cpu", torch.float32, {"hidden": 64}).impl == "torch"
        assert revnet_kernels.select(op, "cuda", torch.bfloat16, {"hidden": 64}).impl == "torch"
        triton = registry.implementations(op)[1]
        assert triton.accepts("cuda", "bfloat16", {"hidden": 64})
        assert not triton.accepts("cuda", "bfloat16", {"hidden": 1 << 20})
        assert not triton.accepts("cpu", "bfloat16", {"hidden": 64})


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 4), torch.ones(4), torch.ones(3)), r"bias must be \(4,\)"),
    ((torch.zeros(2, 4, dtype=torch.int64), torch.ones(4), None), "must be a float tensor"),
    ((torch.randn(2, 0), torch.ones(0), None), "N >= 1"),
])
def test_checks(args, match):
    with pytest.raises(ValueError, match=match):
        revnet_kernels.layer_norm(*args)
