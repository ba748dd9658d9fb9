"""docs/numba.md's python blocks run as written (the top-level tests/test_docs.py covers other pages)."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "numba.md"


def test_python_blocks_of_docs_numba_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), {"__name__": "__doc_example__"})
