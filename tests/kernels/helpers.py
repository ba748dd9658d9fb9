"""Comparison helpers shared by the kernel tests."""

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in fp64 (0 for two zero tensors)."""
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), "non-finite values"
    denom = e.norm().item()
    return (a - e).norm().item() / denom if denom else (a - e).norm().item()


def grads(fn, inputs, grad_out=None, seed=1):
    """(output, gradients of every floating input) of fn(*inputs) for a random (or given) output gradient.

    Inputs are cloned as leaves, so the same list can feed the kernel and the reference.
    """
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*leaves)
    if grad_out is None:
        gen = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.dtype)
    diff = [x for x in leaves if x.requires_grad]
    return out, torch.autograd.grad(out, diff, grad_out), grad_out
