"""The numba blocks take their norms and activations from the kernel registry (framework "numba", cpu)."""

import numpy as np
import pytest

import revnet_core
from revnet_core import hookimpl
from revnet_core.registry import register_plugin, unregister_plugin
from revnet_kernels import registry
from revnet_kernels.registry import KernelImpl, select
from revnet_numba import kernel_impls as KI

from .conftest import TINY, worst_relative

CALLS: list[str] = []


def counting_layer_norm(x, w, b, eps):
    """A plugin's layer norm: the numba one, counting its calls."""
    CALLS.append("layer_norm")
    return KI.numba_layer_norm(x, w, b, eps)


def counting_activation(u, kind):
    CALLS.append("activation")
    return KI.numba_activation(u, kind)


class Plugin:
    def __init__(self, *records):
        self.records = records

    @hookimpl
    def register_kernels(self, register):
        for rec in self.records:
            register(rec)


@pytest.fixture
def plugin():
    names = []
    yield lambda *recs: names.append(register_plugin(Plugin(*recs), name="test-numba-kernels"))
    for name in names:
        unregister_plugin(name)


def test_numba_blocks_select_numba_records_and_torch_keeps_its_own():
    for op in ("layer_norm", "rms_norm", "activation"):
        assert select(op, "cpu", "float32", {"hidden": 8, "kind": "gelu"}, framework="numba").impl == "numba"
    assert select("layer_norm", "cpu", "float32", {"hidden": 8}).impl == "torch"  # torch's default framework
    rows = {r["op"]: r for r in registry.describe("cpu", "float32", framework="numba")}
    assert rows["layer_norm"]["candidates"] == "numba, reference" and "attention" not in rows


def test_a_higher_priority_plugin_kernel_is_used_by_the_model(plugin):
    m = revnet_core.build("numba", **TINY).astype("float64")
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 19))
    want = m.grads(ids)
    numba_only = frozenset({"numba"})
    plugin(KernelImpl("layer_norm", "counting", "tests.numba.test_registry:counting_layer_norm",
                      frozenset({"cpu"}), priority=100, frameworks=numba_only),
           KernelImpl("activation", "counting", "tests.numba.test_registry:counting_activation",
                      frozenset({"cpu"}), priority=100, frameworks=numba_only))
    assert select("layer_norm", "cpu", "float64", {"hidden": 32}, framework="numba").impl == "counting"
    assert select("layer_norm", "cpu", "float64", {"hidden": 32}).impl == "torch"  # not torch's
    CALLS.clear()
    got = m.grads(ids)
    # per reverse layer: 2 norms and 1 activation forward, the same again in the backward's recompute,
    # plus the final norm once
    L = TINY["num_layers"]
    assert CALLS.count("layer_norm") == 4 * L + 1 and CALLS.count("activation") == 2 * L
    assert worst_relative(got, want) == 0.0


@pytest.mark.parametrize("fields", [dict(norm="layernorm", activation="gelu"),
                                    dict(norm="rmsnorm", activation="swiglu"),
                                    dict(norm="layernorm", activation="gelu_exact"),
                                    dict(norm="rmsnorm", activation="relu"),
                                    dict(norm="layernorm", activation="geglu")])
def test_forced_numpy_references_give_the_numba_kernels_gradients(monkeypatch, fields):
    """REVNET_KERNELS=reference: the plain numpy implementations, float64, equal to the numba kernels'."""
    m = revnet_core.build("numba", **dict(TINY, **fields)).astype("float64")
    ids = np.random.default_rng(1).integers(0, TINY["vocab_size"], (2, 19))
    want = m.grads(ids)
    monkeypatch.setenv("REVNET_KERNELS", "reference")
    assert select("activation", "cpu", "float64", {"kind": "gelu"}, framework="numba").impl == "reference"
    assert worst_relative(m.grads(ids), want) < 1e-12
