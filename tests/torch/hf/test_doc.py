"""docs/hf_conversion.md's example runs as written."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[3] / "docs" / "hf_conversion.md"


def test_doc_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    exec(compile(code, str(DOC), "exec"), {"__name__": "__doc_example__"})
