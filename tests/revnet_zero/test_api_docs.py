"""Every python code block of docs/api.md runs, in order, in a fresh interpreter (the first block is about
what ``import revnet_zero`` imports, so it needs a process that has imported nothing yet)."""

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_api_doc_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3
    script = "\n".join(f"exec(compile({b!r}, 'docs/api.md block {i}', 'exec'), {{'__name__': '__doc__'}})"
                       for i, b in enumerate(blocks))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_api_doc_names_every_public_name():
    """The table of docs/api.md mentions every name revnet_zero exports."""
    import importlib

    text = DOC.read_text()
    for module in ("revnet_zero", "revnet_zero.layers", "revnet_zero.models", "revnet_zero.memory",
                   "revnet_zero.training", "revnet_zero.utils", "revnet_zero.configs", "revnet_zero.benchmarks",
                   "revnet_zero.jax", "revnet_zero.examples", "revnet_zero.research", "revnet_zero.experimental"):
        for name in importlib.import_module(module).__all__:
            assert name in text, f"{module}.{name} is missing from docs/api.md"
