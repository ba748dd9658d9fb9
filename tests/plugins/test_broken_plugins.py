"""A broken plugin is reported by name with its reason, and skipped; it never takes the others down."""

import json
import textwrap
import warnings

import pytest

import revnet_core
from revnet_core import AdditiveCoupling, BaseCoupling, UnknownNameError, hookimpl
from revnet_core.registry import describe, get_coupling, register_plugin, registry, unregister_plugin

from .helpers import pip_install, run_python, write_tree


class NotInvertible(BaseCoupling):
    """forward doubles f, inverse subtracts it once: off by f everywhere."""

    def forward(self, x, fx):
        return x + 2.0 * fx

    def inverse(self, y, fx):
        return y - fx


class Good(AdditiveCoupling):
    pass


def plugin(**couplings):
    """A plugin object registering each keyword as a coupling name -> factory."""
    class Plugin:
        @hookimpl
        def register_couplings(self, register):
            for name, factory in couplings.items():
                register(name, factory)
    return Plugin()


def load_registry():
    """registry() rebuilt, with the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = registry()
    return reg, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_coupling_failing_its_probe_is_reported_and_skipped():
    name = register_plugin(plugin(twisted=NotInvertible), name="test-twisted")
    try:
        reg, warned = load_registry()
        assert len(warned) == 1 and "test-twisted" in warned[0] and "'twisted'" in warned[0]
        assert "coupling 'twisted' skipped: it failed its load-time check: inverse(forward(x, fx), fx) differs from x" \
            in reg.failures["test-twisted"]
        assert "twisted" not in reg.couplings
        assert {"additive", "affine"} <= set(reg.couplings)
        with pytest.raises(UnknownNameError, match=r"unknown coupling 'twisted'; installed couplings: .*additive"):
            revnet_core.build("torch", coupling="twisted")
        assert {"kind": "failed", "name": "test-twisted", "plugin": "test-twisted", "distribution": "in-process",
                "reason": reg.failures["test-twisted"]} in describe()
    finally:
        unregister_plugin(name)
    assert "test-twisted" not in registry().failures


def test_good_couplings_of_a_plugin_survive_its_broken_one():
    name = register_plugin(plugin(fine=Good, twisted=NotInvertible), name="test-mixed")
    try:
        reg, warned = load_registry()
        assert len(warned) == 1
        assert isinstance(get_coupling("fine"), Good)
        assert reg.couplings["fine"].plugin == "test-mixed"
        assert "'twisted'" in reg.failures["test-mixed"]
    finally:
        unregister_plugin(name)


def test_hook_that_raises_registers_nothing():
    class HalfDone:
        @hookimpl
        def register_couplings(self, register):
            register("half", Good)
            raise RuntimeError("lost the rest")

    name = register_plugin(HalfDone(), name="test-half")
    try:
        reg, warned = load_registry()
        assert reg.failures["test-half"] == \
            "register_couplings raised RuntimeError: lost the rest; the plugin was skipped"
        assert len(warned) == 1 and "lost the rest" in warned[0]
        assert "half" not in reg.couplings
    finally:
        unregister_plugin(name)


def test_a_plugin_cannot_take_over_a_registered_name():
    name = register_plugin(plugin(additive=NotInvertible, affine=Good), name="test-squatter")
    try:
        reg, _ = load_registry()
        assert reg.couplings["additive"].plugin == "revnet_core.builtin_couplings"
        assert type(get_coupling("affine")) is revnet_core.AffineCoupling
        assert "coupling 'affine' refused: the name is already registered by 'revnet_core.builtin_couplings'" \
            in reg.failures["test-squatter"]
    finally:
        unregister_plugin(name)


def test_broken_plugins_do_not_affect_a_model_built_next_to_them():
    names = [register_plugin(plugin(twisted=NotInvertible), name="test-a"),
             register_plugin(plugin(fine=Good), name="test-b")]
    try:
        reg, warned = load_registry()
        assert len(warned) == 1 and set(reg.failures) >= {"test-a"} and "test-b" not in reg.failures
        model = revnet_core.build("torch", coupling="fine", num_layers=1, d_model=8, num_heads=2, vocab_size=11)
        assert isinstance(model.layers[0].attn.coupling, Good)
    finally:
        for n in names:
            unregister_plugin(n)


# A tiny distribution with three plugins: one whose import fails, one whose coupling does not invert, one fine.
BROKEN_DIST = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "revnet-broken-fixture"
        version = "0.3.1"

        [project.entry-points.revnet_zero]
        fixture_import_fails = "revnet_broken_fixture.import_fails"
        fixture_not_invertible = "revnet_broken_fixture.not_invertible"
        fixture_fine = "revnet_broken_fixture.fine"

        [tool.setuptools]
        packages = ["revnet_broken_fixture"]
        """,
    "revnet_broken_fixture/__init__.py": "",
    "revnet_broken_fixture/import_fails.py": """
        import revnet_no_such_module  # a missing dependency, as after a botched install
        """,
    "revnet_broken_fixture/not_invertible.py": """
        from revnet_core import BaseCoupling, hookimpl

        class Leaky(BaseCoupling):
            def forward(self, x, fx):
                return 0.5 * x + fx

            def inverse(self, y, fx):
                return y - fx

        @hookimpl
        def register_couplings(register):
            register("fixture_leaky", Leaky)
        """,
    "revnet_broken_fixture/fine.py": """
        from revnet_core import AdditiveCoupling, hookimpl

        @hookimpl
        def register_couplings(register):
            register("fixture_fine", AdditiveCoupling)
        """,
}

REPORT = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import revnet_core
    from revnet_core.registry import describe, registry
    reg = registry()
model = revnet_core.build("torch", coupling="fixture_fine", num_layers=1, d_model=8, num_heads=2, vocab_size=11)
print(json.dumps({"failures": reg.failures, "couplings": sorted(reg.couplings), "backends": sorted(reg.backends),
                  "rows": describe(), "warnings": [str(w.message) for w in caught],
                  "built": type(model.layers[0].attn.coupling).__name__}))
"""


def test_installed_broken_distribution_is_reported_and_skipped(tmp_path):
    src = write_tree(tmp_path / "broken", {k: textwrap.dedent(v) for k, v in BROKEN_DIST.items()})
    pip_install(src, tmp_path / "site")
    out = run_python(["-c", REPORT], site=tmp_path / "site")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["failures"]["fixture_import_fails"] == "ModuleNotFoundError: No module named 'revnet_no_such_module'"
    assert got["failures"]["fixture_not_invertible"].startswith(
        "coupling 'fixture_leaky' skipped: it failed its load-time check: inverse(forward(x, fx), fx) differs from x")
    assert len(got["warnings"]) == 2  # one per broken plugin
    assert "fixture_import_fails" in got["warnings"][0] and "fixture_not_invertible" in got["warnings"][1]
    assert "fixture_fine" in got["couplings"] and "fixture_leaky" not in got["couplings"]
    assert {"additive", "affine"} <= set(got["couplings"]) and "torch" in got["backends"]
    assert got["built"] == "AdditiveCoupling"
    rows = {(r["kind"], r["name"]): r for r in got["rows"]}
    assert rows["coupling", "fixture_fine"]["distribution"] == "revnet-broken-fixture 0.3.1"
    assert rows["coupling", "fixture_fine"]["plugin"] == "fixture_fine"
    assert rows["failed", "fixture_import_fails"]["distribution"] == "revnet-broken-fixture 0.3.1"
    assert rows["failed", "fixture_not_invertible"]["reason"] == got["failures"]["fixture_not_invertible"]
