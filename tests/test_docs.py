"""Every python code block of the README, docs/architecture.md and docs/memory.md runs; the quick start's
commands exist.

(docs/training.md, plugins.md, api.md and benchmarks.md are executed by their own tests, docs/jax.md by the
jax session's.) The quick start's ``nox`` is not run
from here: the test suite is what it runs.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "architecture.md", ROOT / "docs" / "memory.md"]


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here, not into the checkout
    for code in blocks(path, "python"):
        exec(compile(code, str(path), "exec"), {"__name__": "__doc_example__"})


def test_quick_start_is_three_commands_that_exist():
    (quick,) = blocks(ROOT / "README.md", "bash")[:1]
    commands = [line for line in quick.splitlines() if line.strip()]
    assert len(commands) == 3
    install, train, tests = commands
    assert install.startswith("pip install") and "-e" in shlex.split(install)
    assert train == "revnet train"
    assert tests == "nox"
    help_text = subprocess.run([sys.executable, "-m", "revnet_zero", "train", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--steps" in help_text
    sessions = subprocess.run([sys.executable, "-m", "nox", "--list"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
    assert "torch" in sessions and "core" in sessions


def test_readme_headline_table_is_rendered_from_the_result_files():
    """The README's numbers are the committed JSON's: benchmarks/headline.py --check renders and compares."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("headline", ROOT / "benchmarks" / "headline.py")
    headline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headline)
    table = headline.render()
    readme = (ROOT / "README.md").read_text()
    assert headline.replace_in(readme, table) == readme, "run python benchmarks/headline.py --write"
    assert "13.23 GiB" in table and "out of memory" in table  # read from the files, not typed in
    tampered = readme.replace(table.splitlines()[2], "| 16k | 1 GiB |")
    assert headline.replace_in(tampered, table) != tampered
