"""Every python code block of docs/jax.md runs."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "jax.md"


def test_jax_doc_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write files (weights) where a user would: the current folder
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), {"__name__": "__doc_example__"})
