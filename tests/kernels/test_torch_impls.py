"""The "torch" implementations of the norms and activations are the torch blocks' own calls: the same output
and gradient bits, and the same saved tensors, so routing the blocks through the registry changes nothing."""

import pytest
import torch

import revnet_kernels
from revnet_core.config import ACTIVATIONS
from revnet_torch.blocks import activate, make_norm
from revnet_torch.memory import saved_tensor_bytes

DTYPES = [torch.float32, torch.float64]


def run(fn, inputs, dy):
    """(output, input gradients, saved bytes) of fn(*inputs) for the output gradient dy."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    with saved_tensor_bytes() as saved:
        out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, dy), saved["bytes"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ACTIVATIONS)
@pytest.mark.parametrize("impl", ["torch", None])  # None: what the registry picks on CPU
def test_activation_is_the_blocks_activate(kind, dtype, impl):
    u = torch.randn(3, 7, 16, dtype=dtype) * 3
    dy = torch.randn(activate(kind, u).shape, dtype=dtype)
    want = run(lambda t: activate(kind, t), [u], dy)
    got = run(lambda t: revnet_kernels.activation(t, kind, impl=impl), [u], dy)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1][0], want[1][0])
    assert got[2] == want[2] > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("impl", ["torch", None])
def test_norms_are_the_blocks_modules(norm, dtype, impl):
    torch.manual_seed(0)
    module = make_norm(norm, 24, 1e-5).to(dtype)
    for p in module.parameters():
        torch.nn.init.normal_(p)
    params = list(module.parameters())  # weight, and bias for LayerNorm
    x = torch.randn(2, 5, 24, dtype=dtype)
    dy = torch.randn(2, 5, 24, dtype=dtype)

    def blocks(x_, w, *b):  # the module's forward with these tensors as its parameters
        return torch.func.functional_call(module, dict(zip([n for n, _ in module.named_parameters()], (w, *b))), x_)

    def ours(x_, w, *b):
        if norm == "rmsnorm":
            return revnet_kernels.rms_norm(x_, w, module.eps, impl=impl)
        return revnet_kernels.layer_norm(x_, w, *b, module.eps, impl=impl)

    want, got = run(blocks, [x, *params], dy), run(ours, [x, *params], dy)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    assert got[2] == want[2] > 0


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "activation"])
def test_cpu_selects_torch(op):
    assert revnet_kernels.select(op, "cpu", torch.float32, {"hidden": 24, "kind": "gelu"}).impl == "torch"
