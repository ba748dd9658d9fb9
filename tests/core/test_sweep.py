"""The sweep over plain numpy: a layer's backward rebuilds its inputs, and the additive fast path is taken
for exactly the couplings that declare the capability, with the same result as the general path."""

import array_api_compat.numpy as xp
import numpy as np
import pytest

from revnet_core import AdditiveCoupling, AffineCoupling
from revnet_core.sweep import half_backward


def rand(*shape, seed=0):
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape))


class Block:
    """A tiny nonlinear block (..., 4) -> (..., width) whose vjp is written by hand."""

    def __init__(self, width=4):
        self.w = rand(4, width, seed=9)

    def __call__(self, u):
        return np.tanh(u @ self.w)


block = Block()


def vjp(fn, u):
    out = fn(u)

    def pull(ct):
        g = ct * (1 - out**2)
        return g @ fn.w.T, [u.T @ g]

    return out, pull


def additive_vjp(calls):
    def run(fn, u, dy, settle):
        calls.append(fn)
        _, pull = vjp(fn, u)
        settle(fn(u))
        return pull(dy)
    return run


@pytest.mark.parametrize("coupling", [AdditiveCoupling(), AffineCoupling(scale_init=0.3)])
def test_additive_vjp_is_taken_for_additive_couplings_only_and_agrees(coupling):
    block = Block(coupling.fx_features(4))
    x, u, dy = rand(3, 4), rand(3, 4, seed=1), rand(3, 4, seed=2)
    y = coupling.forward(x, block(u))
    calls = []
    fast = half_backward(block, coupling, u, y.copy(), dy.copy(), vjp, additive_vjp=additive_vjp(calls))
    plain = half_backward(block, coupling, u, y.copy(), dy.copy(), vjp)
    assert len(calls) == (1 if isinstance(coupling, AdditiveCoupling) else 0)
    np.testing.assert_allclose(fast[0], x, atol=1e-12)
    for a, b in zip(fast[:3], plain[:3]):
        np.testing.assert_allclose(a, b, atol=1e-12)
    np.testing.assert_allclose(fast[3][0], plain[3][0], atol=1e-12)


def test_additive_vjp_not_taken_without_the_capability():
    class Additive(AdditiveCoupling):  # rewrites the math: the parent's capability no longer holds
        def forward(self, x, fx):
            return x + fx

        def inverse(self, y, fx):
            return y - fx

    x, u, dy = rand(3, 4), rand(3, 4, seed=1), rand(3, 4, seed=2)
    calls = []
    out = half_backward(block, Additive(), u, x + block(u), dy, vjp, additive_vjp=additive_vjp(calls))
    assert calls == []
    np.testing.assert_allclose(out[0], x, atol=1e-12)


def test_not_implemented_falls_back_and_settle_twice_is_an_error():
    x, u, dy = rand(3, 4), rand(3, 4, seed=1), rand(3, 4, seed=2)
    y = x + block(u)
    out = half_backward(block, AdditiveCoupling(), u, y, dy, vjp, additive_vjp=lambda *a: NotImplemented)
    np.testing.assert_allclose(out[0], x, atol=1e-12)

    def twice(fn, u, dy, settle):
        settle(fn(u))
        settle(fn(u))
        return vjp(fn, u)[1](dy)

    with pytest.raises(RuntimeError, match="exactly once"):
        half_backward(block, AdditiveCoupling(), u, y, dy, vjp, additive_vjp=twice)
