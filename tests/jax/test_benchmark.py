"""benchmarks/jax_vs_torch.py --smoke runs end to end at toy sizes on CPU (the GPU run is the lead's): the
training-step cells of both frameworks and the attention cells (Pallas in its interpreter beside XLA's)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_benchmark_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}  # as a user runs it
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "jax_vs_torch.py"), "--smoke", "--seq", "32",
                           "--attn-seq", "64", "--steps", "1", "--methods", "jax-reverse,jax-plain,torch-reverse",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"device", "jax", "jaxlib", "torch", "python", "command"} <= set(result["environment"])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"jax-reverse", "jax-plain", "torch-reverse", "attn-pallas", "attn-cudnn"}
    attn = {name: rows.pop(name) for name in ("attn-pallas", "attn-cudnn")}
    for r in attn.values():
        assert r["oom"] is False and r["fwd_bwd_tflops"] > 0 and r["seq"] == 64, r
    # the Pallas cell's own check against the reference (fp32, odd T, two windows)
    assert set(attn["attn-pallas"]["check_fp32"]) == {"window=None", "window=25"}
    for errs in attn["attn-pallas"]["check_fp32"].values():
        assert max(errs.values()) < 1e-5, errs
    ratio = {r["seq"]: r for r in result["ratios"]}
    assert ratio[32]["jax_over_torch_step"] > 0 and ratio[64]["pallas_over_cudnn_fwd_bwd"] > 0
    for r in rows.values():
        assert r["oom"] is False and r["step_s_median"] > 0 and len(r["losses"]) == 2, r
    # same model, same data, two memory policies: the same losses
    assert rows["jax-reverse"]["losses"] == rows["jax-plain"]["losses"]
    assert rows["jax-reverse"]["attention"] == "xla"  # bf16 on CPU: XLA's kernel (cuDNN on GPU)
    assert rows["jax-reverse"]["compiled_gib"]["temp"] < rows["jax-plain"]["compiled_gib"]["temp"]
