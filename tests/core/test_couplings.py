"""Couplings over the Array API: inverse undoes forward, the vjp rule matches finite differences."""

import array_api_compat.numpy as xp
import numpy as np
import pytest

from revnet_core import AdditiveCoupling, AffineCoupling
from revnet_core.registry import get_coupling


def rand(*shape, seed=0):
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape))


@pytest.mark.parametrize("coupling", [AdditiveCoupling(), AffineCoupling(scale_init=0.3), AffineCoupling(split_dim=0)])
def test_inverse_undoes_forward_fp64(coupling):
    x = rand(6, 5)
    fx = rand(6 * (2 if coupling.split_dim == 0 else 1), 5 * (2 if coupling.split_dim == -1 else 1), seed=1) \
        if isinstance(coupling, AffineCoupling) else rand(6, 5, seed=1)
    y = coupling.forward(x, fx)
    assert np.max(np.abs(coupling.inverse(y, fx) - x)) < 1e-12


@pytest.mark.parametrize("coupling", [AdditiveCoupling(), AffineCoupling(scale_init=0.5)])
def test_vjp_matches_finite_differences(coupling):
    d = 4
    x, fx, dy = rand(3, d), rand(3, coupling.fx_features(d), seed=1), rand(3, d, seed=2)
    dx, dfx = coupling.vjp(x, fx, dy)
    eps = 1e-6
    for arr, grad in ((x, dx), (fx, dfx)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += eps
            minus[idx] -= eps
            args_p = (plus, fx) if arr is x else (x, plus)
            args_m = (minus, fx) if arr is x else (x, minus)
            num[idx] = np.sum((coupling.forward(*args_p) - coupling.forward(*args_m)) * dy) / (2 * eps)
        np.testing.assert_allclose(grad, num, atol=1e-8)


def test_affine_scale_bounded_away_from_zero():
    c = AffineCoupling(scale_init=0.9)
    fx = xp.concat([xp.full((1, 3), -1e6), xp.zeros((1, 3))], axis=-1)
    s, _ = c._scale_shift(fx)
    assert np.all(s >= 0.1 - 1e-12)
    with pytest.raises(ValueError, match="scale_init"):
        AffineCoupling(scale_init=1.0)


def test_couplings_registered_by_name():
    assert isinstance(get_coupling("additive"), AdditiveCoupling)
    assert get_coupling("affine", scale_init=0.2).scale_init == 0.2


def test_capabilities_are_declared_by_the_class_that_defines_the_math():
    from revnet_core.couplings import CAPABILITIES, AdditiveCoupling, AffineCoupling
    from revnet_core.sweep import has_capability

    class Scaled(AdditiveCoupling):  # rewrites forward and inverse: the parent's promise no longer holds
        def forward(self, x, fx):
            return x + 2 * fx

        def inverse(self, y, fx):
            return y - 2 * fx

    class Renamed(AdditiveCoupling):  # changes nothing of the math
        name = "renamed"

    class Redeclared(Scaled):
        capabilities = frozenset()

    assert set(AdditiveCoupling.capabilities) <= set(CAPABILITIES)
    assert has_capability(AdditiveCoupling(), "additive")
    assert not has_capability(AffineCoupling(), "additive")
    assert not has_capability(Scaled(), "additive")
    assert not has_capability(Redeclared(), "additive")
    assert has_capability(Renamed(), "additive")  # same math, same class behind it: the promise holds
