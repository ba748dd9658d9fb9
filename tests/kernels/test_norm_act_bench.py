"""benchmarks/norm_act_bench.py runs end to end in its CPU smoke mode (the GPU run is the H200's)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_mode_writes_the_table_and_json(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("norm_act_bench", ROOT / "benchmarks" / "norm_act_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("OUT", str(tmp_path))
    result = bench.main(["--smoke"])
    saved = json.loads((tmp_path / "norm_act.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["device"] == "cpu" and saved["impls"] == ["reference", "torch"] and "--smoke" in saved["command"]
    assert {"torch", "triton"} <= set(saved)
    rows = saved["results"]
    assert {(r["op"], r["kind"]) for r in rows} == {("layer_norm", None), ("rms_norm", None), ("activation", "gelu"),
                                                   ("activation", "geglu"), ("activation", "swiglu")}
    for r in rows:
        assert "error" not in r and r["ms"] > 0 and r["peak_mib"] is None
        assert max(r["rel_err"]) < 1e-2  # "torch" against the fp32-math reference, in bf16
    assert "layer_norm | 64 | 32" in capsys.readouterr().out
