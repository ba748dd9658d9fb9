"""The test matrix: one session per backend, plus the framework-free core.

Sessions run in the interpreter that ran the README's install command (``venv_backend="none"``): a fresh
virtualenv per session would reinstall torch each time, and torch must come from the pinned CPU wheel
(``pip install torch==2.13.0``) before anything asks for a looser version. pytest's exit code 5 (no tests
collected) fails a session like any other non-zero code.
"""

import contextlib
import os
import tempfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["core", "torch", "plugins", "jax", "kernels", "numba", "hf"]


@nox.session
def core(session):
    """revnet_core alone: couplings, config, registry; proves the core imports no framework."""
    session.run("python", "-m", "pytest", "tests/core", *session.posargs)


@nox.session
def torch(session):
    """The PyTorch backend: engine gradients, memory accounting, model, errors; the user's namespace
    (revnet_zero) and its README examples; the README's own examples."""
    session.run("python", "-m", "pytest", "tests/torch", "tests/revnet_zero", "tests/test_docs.py",
                "--ignore=tests/revnet_zero/test_readme_jax.py", "--ignore=tests/torch/hf", *session.posargs)


@contextlib.contextmanager
def plugins_on_path(session, folders):
    """The plugin folders pip-installed into a temporary folder, yielded as a PYTHONPATH value for this
    session only (entry points are found there like anywhere on sys.path); deleted afterwards, pass or fail,
    so the user's own environment never gains the example plugins."""
    with tempfile.TemporaryDirectory(prefix="revnet-nox-plugins-") as target:
        for folder in folders:
            session.run("python", "-m", "pip", "install", "--quiet", "--no-deps", "--target", target, folder)
        yield os.pathsep.join(filter(None, [target, os.environ.get("PYTHONPATH")]))


def example_plugins() -> list[str]:
    return sorted(str(p) for p in Path("plugins").iterdir() if (p / "pyproject.toml").is_file())


@nox.session
def plugins(session):
    """Coupling plugins: each folder of plugins/ pip-installed as a user would (``plugins_on_path``), then the
    plugin system's tests (broken plugins reported and skipped, the template of docs/plugins.md) and every
    plugin's own tests."""
    folders = example_plugins()
    with plugins_on_path(session, folders) as path:
        # REVNET_REQUIRE_PLUGINS: an example plugin that did not install fails the tests instead of skipping them.
        session.run("python", "-m", "pytest", "tests/plugins", *(f"{f}/tests" for f in folders), *session.posargs,
                    env={"REVNET_REQUIRE_PLUGINS": "1", "PYTHONPATH": path})


@nox.session
def jax(session):
    """The JAX backend in its own process (jax_enable_x64 is process-wide): reversible gradients against
    plain autodiff in float64, compiled memory flat in depth, weights and losses shared with torch; the
    example plugins' couplings (on the path for this session) run unchanged in JAX."""
    with plugins_on_path(session, example_plugins()) as path:
        session.run("python", "-m", "pytest", "tests/jax", "tests/revnet_zero/test_readme_jax.py", *session.posargs,
                    env={"JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu", "PYTHONPATH": path,
                         "REVNET_REQUIRE_PLUGINS": "1"})


@nox.session
def kernels(session):
    """revnet_kernels: every Triton kernel through Triton's CPU interpreter against its PyTorch reference
    (forward and gradients), registry selection, forcing and the one-warning fallback."""
    session.run("python", "-m", "pytest", "tests/kernels", *session.posargs, env={"TRITON_INTERPRET": "1"})


@nox.session
def numba(session):
    """The numba-CPU backend: fp64 gradients equal torch's on one weight file, reverse equal to store, each
    kernel's VJP against a float64 reference, live bytes flat in depth, torch's input errors. The momentum
    plugin (whose couplings bring a vjp rule) is installed into a temporary folder for the session, as the
    plugins session does, so its gradient test runs rather than skips."""
    with plugins_on_path(session, ["plugins/momentum-coupling"]) as path:
        session.run("python", "-m", "pytest", "tests/numba", *session.posargs,
                    env={"REVNET_REQUIRE_PLUGINS": "1", "PYTHONPATH": path})


@nox.session
def hf(session):
    """The Hugging Face converter (revnet_torch.hf) against the transformers version ``.[dev]`` pins."""
    session.run("python", "-m", "pytest", "tests/torch/hf", *session.posargs)
