"""The registry: built-ins through the same hooks as plugins, clear errors, framework-free import."""

import subprocess
import sys

import pytest

import revnet_core
from revnet_core import AdditiveCoupling, UnknownNameError, hookimpl
from revnet_core.registry import get_coupling, register_plugin, registry, unregister_plugin


def test_importing_core_imports_no_framework():
    code = "import sys, revnet_core; revnet_core.registry.registry(); " \
           "print(sorted(m for m in ('torch', 'jax', 'numba', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_backend_lists_installed():
    with pytest.raises(UnknownNameError, match=r"unknown backend 'nope'; installed backends: .*torch"):
        revnet_core.build("nope")


def test_unknown_coupling_lists_installed():
    with pytest.raises(UnknownNameError, match=r"unknown coupling 'twist'.*additive, affine"):
        revnet_core.build("torch", coupling="twist")


def test_plugin_registered_in_process_is_used_then_removed():
    class Doubling(AdditiveCoupling):
        def forward(self, x, fx):
            return x + 2 * fx

        def inverse(self, y, fx):
            return y - 2 * fx

        def vjp(self, x, fx, dy):
            return dy, 2 * dy

    class Plugin:
        @hookimpl
        def register_couplings(self, register):
            register("doubling", Doubling)

    name = register_plugin(Plugin(), name="test-doubling")
    try:
        assert isinstance(get_coupling("doubling"), Doubling)
        assert registry().couplings["doubling"].plugin == "test-doubling"
    finally:
        unregister_plugin(name)
    with pytest.raises(UnknownNameError):
        get_coupling("doubling")


def test_plugin_failing_to_register_is_skipped_with_reason():
    class Broken:
        @hookimpl
        def register_couplings(self, register):
            raise RuntimeError("boom")

    name = register_plugin(Broken(), name="test-broken")
    try:
        with pytest.warns(UserWarning, match="test-broken.*boom"):
            reg = registry()
        assert "boom" in reg.failures["test-broken"]
        assert "additive" in reg.couplings
    finally:
        unregister_plugin(name)
