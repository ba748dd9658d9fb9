"""The repository's kernels/ folder must not hide PyPI's ``kernels`` package from a process started at the root."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OURS = os.path.join(ROOT, "kernels")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def _pypi_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_revnet_kernels_imports_from_the_root():
    out = _run("import revnet_kernels, sys; print(revnet_kernels.__name__); print('torch' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["revnet_kernels", "False"]


@pytest.mark.skipif(not _pypi_kernels_installed(), reason="PyPI's kernels is not installed (the hf extra)")
def test_kernels_by_folder_name_is_pypis_package():
    out = _run("import kernels; print(kernels.__file__)")
    assert out.returncode == 0, out.stderr
    assert not out.stdout.strip().startswith(OURS), out.stdout


def test_kernels_by_folder_name_without_pypis_package_says_what_to_import():
    # -S: no site-packages, so no other 'kernels' to hand the name to.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-S", "-c", "import kernels"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1
    assert "ImportError: No module named 'kernels'" in out.stderr and "revnet_kernels" in out.stderr, out.stderr
