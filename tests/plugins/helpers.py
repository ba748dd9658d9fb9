"""Throwaway distributions for the plugin tests (a broken plugin, the docs' template).

They are pip-installed into a private ``--target`` folder, never into the running environment, and used
from a subprocess whose PYTHONPATH points there: entry points are read once per process, and a test must
not leave a plugin behind.
"""

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE_PLUGINS = {"revnet_momentum": "plugins/momentum-coupling", "revnet_gated": "plugins/gated-coupling"}


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """Write {relative path: text} under root; returns root."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def pip_install(src: Path, target: Path) -> None:
    """``pip install --no-deps --target target src``: the distribution's files and metadata, nothing else."""
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                          str(src)], capture_output=True, text=True)
    assert out.returncode == 0, f"pip install {src} failed:\n{out.stdout}\n{out.stderr}"


def run_python(args: list[str], *, site: Path, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """``python *args`` with ``site`` first on the import path (so its entry points are found)."""
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONPATH": path, **env})
