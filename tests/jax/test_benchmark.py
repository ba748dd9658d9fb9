"""benchmarks/jax_vs_torch.py runs end to end at toy sizes on CPU (the GPU run is the lead's)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_benchmark_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}  # as a user runs it
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "jax_vs_torch.py"), "--tiny", "--seq", "32",
                           "--steps", "1", "--methods", "jax-reverse,jax-plain,torch-reverse", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"device", "jax", "jaxlib", "torch", "python", "command"} <= set(result["environment"])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"jax-reverse", "jax-plain", "torch-reverse"}
    for r in rows.values():
        assert r["oom"] is False and r["step_s_median"] > 0 and len(r["losses"]) == 2, r
    # same model, same data, two memory policies: the same losses
    assert rows["jax-reverse"]["losses"] == rows["jax-plain"]["losses"]
    assert rows["jax-reverse"]["attention"] == "xla"  # bf16 on CPU: XLA's kernel (cuDNN on GPU)
    assert rows["jax-reverse"]["compiled_gib"]["temp"] < rows["jax-plain"]["compiled_gib"]["temp"]
