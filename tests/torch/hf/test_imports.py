"""transformers is optional: importing the library never imports it, and its absence is one clear line."""

import subprocess
import sys

CHECK = """
import sys
import revnet_zero, revnet_torch, revnet_torch.hf
from revnet_torch.hf import convert_to_reversible, UnsupportedModelError
assert "transformers" not in sys.modules, "importing the library imported transformers"
"""

BLOCKED = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
sys.meta_path.insert(0, Block())
import torch
from revnet_torch.hf import convert_to_reversible, MissingExtraError
from revnet_core.errors import RevNetError
try:
    convert_to_reversible(torch.nn.Linear(2, 2))
except MissingExtraError as e:
    assert isinstance(e, (ImportError, RevNetError))
    print(e)
else:
    raise SystemExit("no error")
"""


def _run(code, tmp_path):
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_importing_the_library_does_not_import_transformers(tmp_path):
    out = _run(CHECK, tmp_path)
    assert out.returncode == 0, out.stderr


def test_missing_transformers_is_one_line_naming_the_extra(tmp_path):
    out = _run(BLOCKED, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("convert_to_reversible needs Hugging Face transformers: "
                                  "pip install 'revnet-zero[hf]'")
