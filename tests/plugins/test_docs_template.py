"""A plugin written from docs/plugins.md alone works end to end.

The template's files are taken verbatim from the page's ``file=`` code blocks, installed with pip like a
user would (into a private folder), and its own tests run; then the page's Python examples run against it.
"""

import importlib.util
import json
import re
from pathlib import Path

from revnet_core.registry import registry

from .helpers import pip_install, run_python, write_tree

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.S | re.M)


def doc_blocks():
    """[(language, file path or None, text)] for every unindented fenced block of the page."""
    out = []
    for lang, info, text in FENCE.findall(DOC.read_text()):
        m = re.search(r"\bfile=(\S+)", info)
        out.append((lang, m.group(1) if m else None, text))
    return out


def test_template_written_from_the_docs_installs_passes_its_tests_and_runs_the_examples(tmp_path):
    files = {path: text for _, path, text in doc_blocks() if path}
    assert sorted(files) == ["README.md", "pyproject.toml", "revnet_bounded/__init__.py", "tests/test_bounded.py"]
    plugin = write_tree(tmp_path / "my-coupling", files)
    site = tmp_path / "site"
    pip_install(plugin, site)

    # As the page says: python -m pytest my-coupling/tests, from the folder holding my-coupling/.
    out = run_python(["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "my-coupling/tests"], site=site,
                     cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    jax = "jax" in registry().backends and importlib.util.find_spec("jax") is not None
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|skipped|failed|error)", summary))
    assert counts == ({"passed": 6} if jax else {"passed": 5, "skipped": 1}), summary
    if not jax:
        assert "no 'jax' backend installed" in out.stdout

    examples = [text for lang, path, text in doc_blocks() if lang == "python" and path is None]
    assert len(examples) == 3
    runner = ("import json, sys\nfor i, code in enumerate(json.loads(sys.argv[1])):\n"
              "    exec(compile(code, f'docs/plugins.md python block {i}', 'exec'), {})\nprint('ok')")
    out = run_python(["-c", runner, json.dumps(examples)], site=site, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.split()[-1] == "ok", out.stderr[-3000:]
    assert "loaded fine" in out.stdout  # the page's failures example: the template was not refused
