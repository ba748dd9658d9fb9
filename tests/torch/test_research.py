"""revnet_zero.research: scaling-law cells from the cost model, short real runs with a power-law fit, and
attention-distance statistics checked against the full (T, T) matrix."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from revnet_core.advisor import usable_bytes
from revnet_core.config import ModelConfig
from revnet_core.errors import ConfigError, InputError
from revnet_core.memory import Workload
from revnet_core.presets import preset_config
from revnet_torch.cost import CostModel
from revnet_torch.layers import ReversibleAttention
from revnet_torch.model import ReversibleTransformer
from revnet_torch.research import (H200, attention_statistics, capture_qkv, distance_bin_edges, fit_device_rates,
                                   step_flops)
from revnet_zero.research import MemoryEfficientResearch, fit_power_law

ROOT = Path(__file__).resolve().parents[2]
README_SIZES = ["125M", "350M", "1.3B", "2.7B"]
PNG = b"\x89PNG\r\n\x1a\n"


# --- the reference: statistics of an explicit (T, T) matrix ---------------------------------------------------
def full_statistics(q, k, distances, causal=True, window=None):
    """The same statistics from the whole softmax matrix, written directly (float64)."""
    B, H, T, hd = q.shape
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    visible = (j <= i) if causal else torch.ones(T, T, dtype=torch.bool)
    if window is not None:
        visible &= j > i - window
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(hd)
    p = scores.masked_fill(~visible, float("-inf")).softmax(-1)  # (B, H, T, T)
    dist = (i - j).abs().double()
    edges = distance_bin_edges(T)
    hist = torch.stack([(p * ((dist >= lo) & (dist < hi))).sum(-1).mean((0, 2))
                        for lo, hi in zip(edges[:-1], edges[1:])], dim=-1)
    logp = torch.where(p > 0, p.log(), torch.zeros_like(p))
    return {"mean_distance": (p * dist).sum(-1).mean((0, 2)), "entropy": -(p * logp).sum(-1).mean((0, 2)),
            "fraction_beyond": torch.stack([(p * (dist >= D)).sum(-1).mean((0, 2)) for D in distances]),
            "histogram": hist, "probs": p}


@pytest.fixture(scope="module")
def research():
    return MemoryEfficientResearch()  # one object: its priced cells are reused across memory limits


@pytest.fixture(scope="module")
def readme_40(research):
    return research.test_scaling_laws(model_sizes=README_SIZES, context_lengths=[8192, 32768], gpu_memory_limit=40)


# --- scaling laws (predicted) ---------------------------------------------------------------------------------
def test_readme_example_table_is_sane(research, readme_40):
    rows = readme_40.table
    assert [(r["size"], r["context"]) for r in rows] == [(s, T) for s in README_SIZES for T in (8192, 32768)]
    assert readme_40.budget_bytes == usable_bytes(40 * 2**30)
    for r in rows:
        cm = CostModel(preset_config(r["size"], vocab_size=50257, max_seq_len=r["context"]),
                       Workload(seq_len=r["context"]))
        assert r["baseline_peak_bytes"] == cm.peak_bytes("store")
        assert r["peak_bytes"] == cm.peak_bytes(r["policy_per_layer"])
        assert r["baseline_fits"] == (r["baseline_peak_bytes"] <= readme_40.budget_bytes)
        assert r["step_flops"] == pytest.approx(cm.step_time(r["policy_per_layer"]), rel=1e-12)
        if r["fits"]:
            assert r["peak_bytes"] <= readme_40.budget_bytes
            assert r["tokens_per_s"] == pytest.approx(r["context"] / r["predicted_step_s"])
        else:
            assert r["peak_bytes"] > readme_40.budget_bytes and r["predicted_step_s"] is None
            assert r["policies"] == f"reverse x{r['layers']}"  # the least-memory plan, and still too big
    for s in README_SIZES:
        short, long = readme_40.cell(s, 8192), readme_40.cell(s, 32768)
        assert long["baseline_peak_bytes"] > short["baseline_peak_bytes"]
        assert short["fits"] or not long["fits"]  # a longer context never fits where a shorter one does not
        if long["fits"]:
            assert long["predicted_step_s"] > short["predicted_step_s"]
    params = [readme_40.cell(s, 8192)["params"] for s in README_SIZES]
    assert params == sorted(params)
    assert readme_40.cell("125M", 8192)["fits"]
    # 2.7B's weights, gradients and AdamW state alone are 16 bytes a parameter: 44 GB, past 40 GiB.
    assert not readme_40.cell("2.7B", 8192)["fits"]
    assert readme_40.cell(125e6, 8192) is readme_40.cell("125M", 8192)
    counts = research.test_scaling_laws(model_sizes=[125e6, 1.3e9], context_lengths=[8192], gpu_memory_limit=40)
    assert [r["size"] for r in counts.table] == ["125M", "1.3B"]
    assert counts.table[1] == readme_40.cell("1.3B", 8192)
    # At 1.3B x 32k storing everything does not fit but a reversible plan does.
    cell = readme_40.cell("1.3B", 32768)
    assert cell["fits"] and not cell["baseline_fits"] and "reverse" in cell["policies"]


def test_more_memory_fits_more_cells(research, readme_40):
    big = research.test_scaling_laws(model_sizes=README_SIZES, context_lengths=[8192, 32768], gpu_memory_limit=80)
    small = research.test_scaling_laws(model_sizes=README_SIZES, context_lengths=[8192, 32768], gpu_memory_limit=16)
    fits = [{(r["size"], r["context"]) for r in res.table if r["fits"]} for res in (small, readme_40, big)]
    assert fits[0] < fits[1] < fits[2]
    for lo, hi in zip(readme_40.table, big.table):  # a larger budget never makes a fitting step slower
        if lo["fits"]:
            assert hi["predicted_step_s"] <= lo["predicted_step_s"] * (1 + 1e-12)


def test_result_files(readme_40, tmp_path):
    png = readme_40.plot(tmp_path / "scaling.png")
    assert png.read_bytes()[:8] == PNG
    data = json.loads(readme_40.to_json(tmp_path / "scaling.json", command="python x.py").read_text())
    assert data["command"] == "python x.py" and "predicted" in data and "peak_bytes" in data["predicted_fields"]
    assert data["table"][0]["size"] == "125M" and data["runs"] == []


def test_step_flops_split_scales_as_matmuls_and_attention():
    cfg = preset_config("small", max_seq_len=4096)
    (m1, a1), (m2, a2) = (step_flops(CostModel(cfg, Workload(seq_len=T)), "reverse") for T in (2048, 4096))
    assert m2 == pytest.approx(2 * m1, rel=1e-12) and a2 == pytest.approx(4 * a1, rel=1e-12)
    cm = CostModel(cfg, Workload(seq_len=2048))
    assert m1 + a1 == pytest.approx(cm.step_time("reverse"), rel=1e-12) and a1 > 0


def test_h200_rates_are_the_fit_to_the_measured_steps():
    data = json.loads((ROOT / "docs" / "benchmarks" / "cost_check_h200.json").read_text())
    cfg = ModelConfig(**data["config"], max_seq_len=max(r["seq"] for r in data["lengths"]))
    cells = [(CostModel(cfg, Workload(seq_len=r["seq"])), [r["policy_name"]] * cfg.num_layers, r["step_s_median"])
             for r in data["lengths"]]
    rates = fit_device_rates(cells, "H200", "test")
    assert rates.matmul_flops_per_s == pytest.approx(H200.matmul_flops_per_s, rel=1e-6)
    assert rates.attention_flops_per_s == pytest.approx(H200.attention_flops_per_s, rel=1e-6)
    for cm, plan, seconds in cells:
        assert H200.seconds(*step_flops(cm, plan)) == pytest.approx(seconds, rel=0.03)


# --- power law ------------------------------------------------------------------------------------------------
def test_power_law_recovers_synthetic_data():
    C = np.geomspace(1e9, 1e13, 7)
    fit = fit_power_law(C, 40.0 * C ** -0.12)
    assert (fit.a, fit.b, fit.c) == (pytest.approx(40.0, rel=1e-10), pytest.approx(0.12, rel=1e-10), 0.0)
    assert fit.rmse_log < 1e-12
    fit = fit_power_law(C, 300.0 * C ** -0.25 + 1.3, irreducible=True)
    assert fit.a == pytest.approx(300.0, rel=1e-5) and fit.b == pytest.approx(0.25, rel=1e-5)
    assert fit.c == pytest.approx(1.3, rel=1e-6)
    np.testing.assert_allclose(fit.predict(C), 300.0 * C ** -0.25 + 1.3, rtol=1e-7)


def test_power_law_bad_input():
    with pytest.raises(InputError, match="at least 2"):
        fit_power_law([1e9], [3.0])
    with pytest.raises(InputError, match="at least 3"):
        fit_power_law([1e9, 1e10], [3.0, 2.0], irreducible=True)
    with pytest.raises(InputError, match="> 0"):
        fit_power_law([1e9, -1.0], [3.0, 2.0])


# --- short real runs (measured) -------------------------------------------------------------------------------
def test_run_true_trains_and_fits(tmp_path):
    research = MemoryEfficientResearch()
    res = research.test_scaling_laws(model_sizes=["tiny"], context_lengths=[32, 64], gpu_memory_limit=40, run=True,
                                     steps=12, run_batch_size=4, eval_windows=4, device="cpu")
    assert [(r["size"], r["context"]) for r in res.runs] == [("tiny", 32), ("tiny", 64)]
    for run in res.runs:
        cm = CostModel(preset_config("tiny", max_seq_len=run["context"]),
                       Workload(batch=4, seq_len=run["context"], autocast_dtype=None, device="cpu"))
        assert run["train_flops"] == pytest.approx(12 * cm.step_time("store"))
        assert abs(run["bpb_init"] - 8.0) < 0.3  # a fresh model is near uniform over 256 bytes
        assert run["bpb_final"] < run["bpb_init"] - 0.5
        assert run["curve"][-1][0] == pytest.approx(run["train_flops"])
    assert res.fit is not None and res.fit.points == 2
    assert res.plot(tmp_path / "run.png").read_bytes()[:8] == PNG
    data = json.loads(res.to_json(tmp_path / "run.json").read_text())
    assert data["fit"]["formula"].startswith("L = ") and "bpb_final" in data["measured_fields"]


# --- attention statistics (measured) --------------------------------------------------------------------------
def _model(seed=0, **fields):
    torch.manual_seed(seed)
    cfg = dict(num_layers=3, d_model=16, num_heads=2, d_ff=32, vocab_size=256, max_seq_len=64, **fields)
    model = ReversibleTransformer(**cfg).double()
    with torch.no_grad():  # trained-like weights: attention far from uniform
        for layer in model.layers:
            layer.attn.block.qkv.weight.mul_(25.0)
    return model


def test_captured_qkv_reproduce_the_blocks_attention_output():
    model = _model()
    ids = torch.randint(0, 256, (2, 40))
    got = {}
    block = model.layers[1].attn.block
    handle = block.proj.register_forward_pre_hook(lambda m, args: got.setdefault("o", args[0].detach()))
    try:
        q, k, v = capture_qkv(model, ids, [1])[1]
    finally:
        handle.remove()
    p = full_statistics(q, k, [1])["probs"]
    o = (p @ v.double()).transpose(1, 2).reshape(2, 40, 16)
    torch.testing.assert_close(o, got["o"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", [None, 8])
def test_chunked_statistics_equal_the_full_matrix(window):
    model = _model(1 if window else 0, attention_window=window)
    ids = torch.randint(0, 256, (2, 40))
    distances = (1, 4, 16)
    research = MemoryEfficientResearch()
    # 50 scores at a time: one query per chunk, every chunk boundary exercised
    res = research.analyze_attention_patterns(model, 40, range(0, 3, 2), input_ids=ids, distances=distances,
                                              max_elements=50)
    qkv = capture_qkv(model, ids, [0, 2])
    assert res.layers == [0, 2] and res.heads == 2 and res.batch == 2
    for n, layer in enumerate(res.layers):
        ref = full_statistics(qkv[layer][0], qkv[layer][1], distances, window=window)
        np.testing.assert_allclose(res.mean_distance[n], ref["mean_distance"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(res.entropy[n], ref["entropy"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(res.histogram[n], ref["histogram"], rtol=1e-12, atol=1e-12)
        for m, D in enumerate(distances):
            np.testing.assert_allclose(res.fraction_beyond[D][n], ref["fraction_beyond"][m], rtol=1e-12, atol=1e-12)
    assert max(res.mean_distance[0]) < (window or 40)
    # the same numbers from one chunk of all queries
    whole = attention_statistics(qkv[2][0], qkv[2][1], distances=distances, window=window)
    np.testing.assert_allclose(res.mean_distance[1], whole["mean_distance"], rtol=1e-12)


def test_uniform_attention_has_the_known_statistics(tmp_path):
    """q = 0 makes every score 0: query i attends uniformly to keys 0..i, so its mean distance is i / 2."""
    model = _model()
    T, H = 48, 2
    with torch.no_grad():
        model.layers[1].attn.block.qkv.weight.view(3, H, -1, 16)[0].zero_()
    distances = (1, 10, 30)
    res = MemoryEfficientResearch().analyze_attention_patterns(model, T, [1], distances=distances,
                                                               max_elements=7 * T)
    i = np.arange(T, dtype=float)
    np.testing.assert_allclose(res.mean_distance[0], [(T - 1) / 4] * H, rtol=1e-12)
    assert res.uniform_mean_distance == (T - 1) / 4
    np.testing.assert_allclose(res.entropy[0], [np.log(i + 1).mean()] * H, rtol=1e-12)
    for D in distances:
        np.testing.assert_allclose(res.fraction_beyond[D][0], [(np.maximum(0, i - D + 1) / (i + 1)).mean()] * H,
                                   rtol=1e-12)
    edges = res.bin_edges
    expect = [np.mean([max(0, min(hi, t + 1) - lo) / (t + 1) for t in range(T)]) for lo, hi in zip(edges, edges[1:])]
    np.testing.assert_allclose(res.histogram[0][0], expect, rtol=1e-12, atol=1e-15)
    assert "embedded corpus" in res.input
    assert res.plot(tmp_path / "attn.png").read_bytes()[:8] == PNG
    data = json.loads(res.to_json(tmp_path / "attn.json", command="c").read_text())
    assert data["command"] == "c" and data["fraction_beyond"]["10"] == res.fraction_beyond[10]


# --- named errors ---------------------------------------------------------------------------------------------
def test_named_errors():
    research = MemoryEfficientResearch()
    ok = dict(model_sizes=["tiny"], context_lengths=[32], gpu_memory_limit=40)
    for bad, match in ((dict(model_sizes=["huge"]), "not one of"), (dict(model_sizes=[]), "non-empty"),
                       (dict(model_sizes="125M"), "list"), (dict(context_lengths=[0]), ">= 2"),
                       (dict(context_lengths=[-8]), ">= 2"), (dict(context_lengths=[64.5]), "integer"),
                       (dict(gpu_memory_limit=0), "positive"), (dict(gpu_memory_limit=-40), "positive"),
                       (dict(gpu_memory_limit=0.1), "nothing"), (dict(run=True, steps=0), "steps")):
        with pytest.raises(ConfigError, match=match):
            research.test_scaling_laws(**{**ok, **bad})
    with pytest.raises(ConfigError, match="granularity"):
        MemoryEfficientResearch(granularity="tokens")
    model = _model()
    for layers, match in ((range(2, 5), r"\[3, 4\].*3 layers"), ([], "empty"), (5, "iterable")):
        with pytest.raises(ConfigError, match=match):
            research.analyze_attention_patterns(model, 16, layers)
    for T in (65, 1, 16.0):
        with pytest.raises(InputError, match=re.escape("max_seq_len=64")):
            research.analyze_attention_patterns(model, T, [0])
    with pytest.raises(InputError, match=r"\(batch, 16\)"):
        research.analyze_attention_patterns(model, 16, [0], input_ids=torch.zeros(1, 12, dtype=torch.long))
    small_vocab = ReversibleTransformer(num_layers=1, d_model=16, num_heads=2, vocab_size=64, max_seq_len=32)
    with pytest.raises(InputError, match="input_ids="):
        research.analyze_attention_patterns(small_vocab, 16, [0])
    model.layers[0].attn.block = ReversibleAttention(16, 2, use_rational_attention=True).block
    with pytest.raises(ConfigError, match="Rational-Fourier"):
        research.analyze_attention_patterns(model, 16, [1])


# --- docs -----------------------------------------------------------------------------------------------------
def test_docs_research_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "docs" / "research.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "docs/research.md", "exec"), {"__name__": "__doc_example__"})
    assert (tmp_path / "scaling.png").read_bytes()[:8] == PNG


def test_bidirectional_statistics_equal_the_full_matrix():
    torch.manual_seed(3)
    q, k = torch.randn(2, 3, 37, 8, dtype=torch.float64) * 2, torch.randn(2, 3, 37, 8, dtype=torch.float64) * 2
    got = attention_statistics(q, k, causal=False, distances=(1, 5, 20), max_elements=200)
    ref = full_statistics(q, k, (1, 5, 20), causal=False)
    for name in ("mean_distance", "entropy", "fraction_beyond", "histogram"):
        torch.testing.assert_close(got[name], ref[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["histogram"].sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_committed_readme_is_rendered_from_the_committed_json():
    import importlib.util

    spec = importlib.util.spec_from_file_location("research_scaling", ROOT / "benchmarks" / "research_scaling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = ROOT / "docs" / "benchmarks" / "research"
    steps = json.loads((out / "scaling_run.json").read_text())["runs"][0]["steps"]
    assert (out / "README.md").read_text() == bench.render_readme(out, steps)
