"""The load-time probe: good couplings pass, each way of breaking the contract is named in the error."""

import array_api_compat.numpy as xp
import numpy as np
import pytest

from revnet_core import AdditiveCoupling, AffineCoupling, BaseCoupling
from revnet_core.plugin_checks import PluginCheckError, check_coupling, check_factory


class Scaled(BaseCoupling):
    """y = x + 2 f, with a correct vjp; subclasses break one part at a time."""

    def forward(self, x, fx):
        return x + 2.0 * fx

    def inverse(self, y, fx):
        return y - 2.0 * fx

    def vjp(self, x, fx, dy):
        return dy, 2.0 * dy


class NoVjp(Scaled):
    def vjp(self, x, fx, dy):
        return NotImplemented


class SkewedInverse(Scaled):
    def inverse(self, y, fx):
        return y - 2.0 * fx + 1e-6 * xp.tanh(y)


class WrongSign(Scaled):
    def inverse(self, y, fx):
        return y + 2.0 * fx


class InheritedVjp(AdditiveCoupling):
    """The classic slip: forward changed, the parent's vjp (dy, dy) kept."""

    def forward(self, x, fx):
        return x + 2.0 * fx

    def inverse(self, y, fx):
        return y - 2.0 * fx


class VjpOneArray(Scaled):
    def vjp(self, x, fx, dy):
        return dy


class VjpWrongShape(Scaled):
    def vjp(self, x, fx, dy):
        return dy, dy[..., :1]


class InPlace(Scaled):
    def forward(self, x, fx):
        x += 2.0 * fx
        return x


class InverseInPlace(Scaled):
    def inverse(self, y, fx):
        y -= 2.0 * fx
        return y


class VjpInPlace(Scaled):
    def vjp(self, x, fx, dy):
        dy *= 1.0
        dfx = 2.0 * dy
        dy[...] = 0.0
        return dfx / 2.0, dfx


class Downcast(Scaled):
    def forward(self, x, fx):
        return xp.astype(x + 2.0 * fx, xp.float32)


class WrongShape(Scaled):
    def inverse(self, y, fx):
        return xp.concat([y, y], axis=-1)


class Raises(Scaled):
    def forward(self, x, fx):
        raise TypeError("unsupported operand")


class Explodes(Scaled):
    def forward(self, x, fx):
        return x + xp.exp(1e3 * fx)

    def inverse(self, y, fx):
        return y - xp.exp(1e3 * fx)


def features(value):
    return type("Features", (Scaled,), {"fx_features": lambda self, d: value})


@pytest.mark.parametrize("coupling", [Scaled(), NoVjp(), AdditiveCoupling(), AffineCoupling(),
                                      AffineCoupling(scale_init=0.9, split_dim=-1)])
def test_correct_couplings_pass(coupling):
    check_coupling(coupling, inverse_tol=1e-12)


@pytest.mark.parametrize("coupling,message", [
    (SkewedInverse(), r"inverse\(forward\(x, fx\), fx\) differs from x by [0-9.]+e-0[67]"),
    (WrongSign(), r"inverse\(forward\(x, fx\), fx\) differs from x"),
    (InheritedVjp(), r"vjp's dfx disagrees with finite differences"),
    (VjpOneArray(), r"vjp returned ndarray; it must return \(dx, dfx\) or NotImplemented"),
    (VjpWrongShape(), r"vjp's dfx returned shape \(2, 3, 1\), expected \(2, 3, 6\)"),
    (InPlace(), r"forward modified its inputs in place"),
    (InverseInPlace(), r"inverse modified its inputs in place"),
    (VjpInPlace(), r"vjp modified its inputs in place"),
    (Downcast(), r"forward returned dtype float32 for float64 inputs"),
    (WrongShape(), r"inverse returned shape \(2, 3, 12\), expected \(2, 3, 6\)"),
    (Raises(), r"forward raised TypeError: unsupported operand"),
    (Explodes(), r"forward returned non-finite values"),
    (features(0)(), r"fx_features\(6\) returned 0; it must be a positive int"),
    (features(-3)(), r"returned -3"),
    (features(6.0)(), r"returned 6.0"),
    (features(True)(), r"returned True"),
    (features("6")(), r"returned '6'"),
])
def test_each_broken_part_is_named(coupling, message):
    with np.errstate(over="ignore"), pytest.raises(PluginCheckError, match=message):
        check_coupling(coupling)


def test_default_tolerance_lets_rounding_through_but_not_a_1e_8_error():
    class Tiny(Scaled):
        def __init__(self, eps):
            self.eps = eps

        def inverse(self, y, fx):
            return y - 2.0 * fx + self.eps * xp.tanh(y)

    check_coupling(Tiny(1e-13))
    with pytest.raises(PluginCheckError, match="differs from x"):
        check_coupling(Tiny(1e-8))


def test_factory_is_built_with_default_options():
    assert isinstance(check_factory(AffineCoupling), AffineCoupling)

    def needs_option(width):
        return Scaled()

    with pytest.raises(PluginCheckError, match="instantiating it with default options raised TypeError"):
        check_factory(needs_option)
    with pytest.raises(PluginCheckError, match="returned dict, not a revnet_core.BaseCoupling"):
        check_factory(dict)


def test_probe_does_not_touch_global_numpy_random_state():
    before = np.random.get_state()[1].copy()
    check_coupling(AffineCoupling())
    assert np.array_equal(before, np.random.get_state()[1])
