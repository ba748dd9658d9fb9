"""The example plugins as a fixture: installed by ``nox -s plugins``, a visible skip under a bare pytest."""

import os

import pytest

from revnet_core.registry import registry

from .helpers import EXAMPLE_PLUGINS


@pytest.fixture
def example_plugins():
    """The example plugins' registry entries; they must be pip-installed (``nox -s plugins`` does it)."""
    missing = [name for name in EXAMPLE_PLUGINS if not any(e.plugin == name for e in registry().couplings.values())]
    if missing:
        failed = {m: registry().failures[m] for m in missing if m in registry().failures}
        if failed:
            pytest.fail(f"example plugins installed but refused at load time: {failed}")
        how = "pip install --no-deps " + " ".join(f"./{EXAMPLE_PLUGINS[m]}" for m in missing)
        # Under the nox session a missing plugin is a failure; under a bare `pytest` it is a visible skip.
        if os.environ.get("REVNET_REQUIRE_PLUGINS"):
            pytest.fail(f"example plugins not installed: {missing}; {how}")
        pytest.skip(f"example plugins not installed: {missing}; {how} (or run nox -s plugins)")
    return {name: e for name, e in registry().couplings.items() if e.plugin in EXAMPLE_PLUGINS}
