"""The registry: built-ins through the same hooks as plugins, clear errors, framework-free import."""

import subprocess
import sys
import warnings

import pytest

import revnet_core
from revnet_core import AdditiveCoupling, AffineCoupling, ConfigError, UnknownNameError, hookimpl
from revnet_core.registry import (BackendRecord, allowed_overrides, describe, get_coupling, register_plugin, registry,
                                  unregister_plugin)


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


class Hijacker:
    """Registers a backend and a coupling under names the built-ins already hold."""

    @hookimpl
    def register_backends(self, register):
        register(BackendRecord("torch", build=lambda config, *, weights=None: "hijacked"))

    @hookimpl
    def register_couplings(self, register):
        register("additive", AffineCoupling)


def test_second_registration_of_a_name_is_refused_and_listed():
    name = register_plugin(Hijacker(), name="test-hijack")
    try:
        with pytest.warns(UserWarning, match="test-hijack.*backend 'torch' refused"):
            reg = registry()
        assert reg.backends["torch"].plugin == "torch"  # the built-in wins
        assert reg.couplings["additive"].obj is AdditiveCoupling
        why = reg.failures["test-hijack"]
        assert "backend 'torch' refused" in why and "coupling 'additive' refused" in why
        assert "REVNET_ALLOW_OVERRIDE=torch" in why
        row = next(r for r in describe() if r["kind"] == "failed" and r["name"] == "test-hijack")
        assert row["distribution"] == "in-process" and "refused" in row["reason"]
        torch_row = next(r for r in describe() if r["kind"] == "backend" and r["name"] == "torch")
        assert torch_row["distribution"].startswith("revnet-zero ")  # distribution and version
    finally:
        unregister_plugin(name)


@pytest.mark.parametrize("how", ["env", "argument"])
def test_override_is_allowed_by_name(how, monkeypatch):
    if how == "env":
        monkeypatch.setenv("REVNET_ALLOW_OVERRIDE", "torch, additive")
    name = register_plugin(Hijacker(), name="test-hijack", override=["torch", "additive"] if how == "argument" else ())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reg = registry()
        assert sorted(str(w.message).split(" of ")[0].split(" replaces ")[1] for w in caught) == [
            "backend 'torch'", "coupling 'additive'"]
        assert "test-hijack" not in reg.failures
        assert reg.backends["torch"].plugin == "test-hijack" and reg.couplings["additive"].obj is AffineCoupling
        row = next(r for r in describe() if r["kind"] == "backend" and r["name"] == "torch")
        assert row["reason"] == "replaces 'torch' (REVNET_ALLOW_OVERRIDE)"
    finally:
        unregister_plugin(name)
    monkeypatch.delenv("REVNET_ALLOW_OVERRIDE", raising=False)
    assert registry().backends["torch"].plugin == "torch" and not allowed_overrides()


@pytest.mark.parametrize("options,match", [({"scale": 2}, "does not take options.*'scale'"),
                                           ({"scale_init": "x"}, "scale_init='x' must be a number"),
                                           ({"scale_init": 1.5}, r"scale_init=1.5 must be a number in \(0, 1\)"),
                                           ({"split_dim": 1.0}, "split_dim=1.0 must be an integer")])
def test_bad_affine_option_is_a_config_error(options, match):
    with pytest.raises(ConfigError, match=match):
        get_coupling("affine", **options)
