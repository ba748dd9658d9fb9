"""Profilers: per-layer measurements agree with the cost model; the detailed report's timeline, plot and trace;
and the cost model's predicted step peak against the allocator records of a real CPU step."""

import json

import pytest
import torch

import revnet_core
from revnet_core.memory import Workload
from revnet_torch.cost import CostModel
from revnet_torch.profiler import DetailedMemoryProfiler, MemoryProfiler
from revnet_torch.scheduler import AdaptiveScheduler

from .conftest import step_peak


pytestmark = pytest.mark.usefixtures("one_thread")


def small(**fields):
    torch.manual_seed(0)
    cfg = dict(num_layers=3, d_model=64, num_heads=4, d_ff=96, vocab_size=128, max_seq_len=1024, loss_chunk_size=64)
    cfg.update(fields)
    return revnet_core.build("torch", **cfg)


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_memory_profiler_layers_match_the_cost_model(coupling):
    model = small(coupling=coupling)
    ids = torch.randint(0, 128, (2, 64))
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    rng = torch.get_rng_state()
    profile = MemoryProfiler(model).profile({"input_ids": ids})
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.all(p.grad == 3.0) for p in model.parameters())  # the user's gradients untouched
    cm = CostModel(model.config, Workload(batch=2, seq_len=64, autocast_dtype=None, device="cpu"))
    for lp in profile.layers:
        for policy in ("store", "reverse", "checkpoint"):
            assert lp.saved_bytes[policy] == cm.layer_saved_bytes(policy), (lp.index, policy)
            assert lp.forward_s[policy] > 0 and lp.backward_s[policy] > 0
            assert lp.peak_bytes[policy] is None  # CPU: no allocator statistics
    assert profile.activation_scale() == 1.0
    assert profile.model_saved_bytes == profile.model_predicted_saved_bytes
    assert set(profile.layer_seconds()) == {"store", "reverse", "checkpoint"}
    text = profile.summary()
    assert "store saved" in text and "predicted per layer" in text


def test_memory_profiler_runs_block_recomputes_as_the_engine_does():
    """Block recomputes are the engine's own: a profile can measure them per layer, and the whole-model
    prediction prices the model's policies as they are (no block policy read as ``store``)."""
    model = small()
    model.set_policy(["recompute_ffn", "recompute_attention", "store"])
    ids = torch.randint(0, 128, (2, 64))
    cm = CostModel(model.config, Workload(batch=2, seq_len=64, autocast_dtype=None, device="cpu"))
    profile = MemoryProfiler(model, policies=("store", "recompute_ffn", "recompute_attention")).profile(ids)
    for lp in profile.layers:
        for policy in profile.policies:
            assert lp.saved_bytes[policy] == cm.layer_saved_bytes(policy), (lp.index, policy)
        assert lp.saved_bytes["recompute_ffn"] < lp.saved_bytes["store"]
    assert profile.model_predicted_saved_bytes == cm.saved_bytes(model.policies)
    assert profile.model_saved_bytes == profile.model_predicted_saved_bytes


def test_profile_feeds_the_adaptive_scheduler():
    model = small()
    ids = torch.randint(0, 128, (1, 128))
    profile = MemoryProfiler(model).profile(ids)
    cm = CostModel(model.config, Workload(seq_len=128, autocast_dtype=None, device="cpu"))
    budget = (cm.peak_bytes("reverse") + cm.peak_bytes("store")) // 2
    with AdaptiveScheduler(model=model, memory_budget=budget, profile=profile, recompute_strategy="selective") as s:
        out = model(ids)
    out.loss.backward()
    assert s.activation_scale == 1.0 and s.plan.fits
    # Step times come from the profile's measured seconds, not FLOPs.
    priced = s.cost_model(1, 128)
    assert priced.layer_seconds == profile.layer_seconds()


def readme_region(model, ids, opt):
    """The README's DetailedMemoryProfiler region, plus the optimizer step of a training step."""
    profiler = DetailedMemoryProfiler()
    with profiler:
        outputs = model(ids)
        loss = outputs.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return profiler.generate_report()


def test_report_summary_plot_and_trace(tmp_path):
    model = small()
    ids = torch.randint(0, 128, (2, 64))
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    report = readme_region(model, ids, opt)
    text = report.summary()
    assert "cpu: peak" in text and "ops allocating the most" in text
    png = report.plot_memory_timeline(str(tmp_path / "memory_timeline.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    trace = report.export_chrome_trace(str(tmp_path / "trace.json"))
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    phases = {e["ph"] for e in events}
    assert {"X", "C", "M"} <= phases
    ops = [e for e in events if e["ph"] == "X"]
    assert any("mm" in e["name"] for e in ops) and all(e["dur"] >= 0 and "ts" in e for e in ops)
    counters = [e for e in events if e["ph"] == "C"]
    assert max(e["args"]["MiB"] for e in counters) == pytest.approx(report.peak("cpu")[1] / 2**20, abs=1e-3)
    with pytest.raises(RuntimeError, match="profiled region"):
        DetailedMemoryProfiler().generate_report()


@pytest.mark.parametrize("policies, fields", [
    (["reverse"] * 3, dict(attention="reference")),
    (["store"] * 3, dict(attention="reference", activation="geglu")),
    (["checkpoint", "store", "reverse"], dict(attention="reference", coupling="affine")),
    (["reverse", "reverse", "store"], dict(d_model=128, num_heads=2, d_ff=256)),
    (["store", "checkpoint", "reverse"], dict(d_model=128, num_heads=2, d_ff=256, ffn_chunk_size=128)),
])
@pytest.mark.parametrize("autocast", [False, True])
def test_predicted_step_peak_matches_the_allocator(policies, fields, autocast):
    """Step 2 (AdamW state exists) on CPU: every allocation is recorded, so the measured peak above the start
    is exact; the cost model must land within 5% (typically to the byte)."""
    model = small(**fields)
    model.set_policy(policies)
    predicted, measured, _ = step_peak(model, torch.randint(0, 128, (1, 512)), autocast)
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)
