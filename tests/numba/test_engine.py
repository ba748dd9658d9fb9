"""The reversible loop: reverse equals store, mixed policies, the policies it refuses, one backward per forward,
and proof that the backward really rebuilds the inputs (a wrong inverse changes the gradients)."""

import numpy as np
import pytest

import revnet_core
from revnet_core.couplings import AdditiveCoupling
from revnet_core.errors import ConfigError, ReversibilityError
from revnet_core.sweep import inverse_step

from .conftest import TINY, worst_relative


def model(**fields):
    return revnet_core.build("numba", **dict(TINY, **fields)).astype("float64")


def ids_of(seed=0, T=45):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (2, T))


@pytest.mark.parametrize("fields", [dict(), dict(coupling="affine", norm="rmsnorm", activation="geglu"),
                                    dict(ffn_chunk_size=8, activation="swiglu")])
def test_reverse_equals_store(fields):
    m, ids = model(**fields), ids_of()
    m.set_policy("reverse")
    loss_r, g_r = m.value_and_grad(ids)
    m.set_policy("store")
    loss_s, g_s = m.value_and_grad(ids)
    assert abs(loss_r - loss_s) < 1e-13
    assert worst_relative(g_r, g_s) < 1e-10


def test_mixed_policies_equal_store():
    m, ids = model(num_layers=4), ids_of()
    m.set_policy("store")
    _, g_s = m.value_and_grad(ids)
    for plan in (["reverse", "store", "store", "reverse"], ["store", "reverse", "reverse", "store"]):
        m.set_policy(plan)
        assert worst_relative(m.value_and_grad(ids)[1], g_s) < 1e-10


@pytest.mark.parametrize("policy", ["checkpoint", "recompute_ffn", "recompute_attention"])
def test_other_policies_of_the_table_raise_naming_the_supported_ones(policy):
    m = model()
    with pytest.raises(ConfigError, match=r"not built in the numba backend; it supports \['store', 'reverse'\]"):
        m.set_policy(policy)
    with pytest.raises(ConfigError, match="numba backend"):
        revnet_core.build("numba", policy=policy, **TINY)


def test_unknown_policy_lists_the_table():
    with pytest.raises(ConfigError, match="is not one of"):
        model().set_policy("keep_everything")


def test_second_backward_of_one_forward_raises():
    pending = model().forward_backward(ids_of())
    pending.backward()
    with pytest.raises(ReversibilityError, match="already ran"):
        pending.backward()


class SkewedInverse(AdditiveCoupling):
    """Forward is additive; the inverse is off by 1e-3 tanh(y), so only a reconstructing backward notices."""

    capabilities = frozenset()

    def inverse(self, y, fx):
        return y - fx + 1e-3 * np.tanh(y)

    def inverse_(self, y, fx):
        return self.inverse(y, fx)


def test_reverse_really_rebuilds_inputs_from_outputs():
    m, ids = model(), ids_of()
    m.set_policy("store")
    _, g_store = m.value_and_grad(ids)
    m.layers.cf = m.layers.cg = SkewedInverse()
    m.set_policy("reverse")
    _, g_skewed = m.value_and_grad(ids)
    assert worst_relative(g_skewed, g_store) > 1e-6  # the wrong inverse reaches the gradients


def test_six_layers_invert_to_their_inputs():
    m = model(num_layers=6)
    x = m.params["embed.weight"][ids_of()]
    x1, x2 = x.copy(), x * 0.5
    from revnet_numba.engine import run_layers

    y1, y2 = run_layers(m.layers, m.policies, x1, x2)
    for i in reversed(range(6)):
        y1, y2 = inverse_step(y1, y2, m.layers.spec(i))
    assert max(np.abs(y1 - x1).max(), np.abs(y2 - x2).max()) < 1e-12
