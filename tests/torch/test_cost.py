"""The torch cost model's arithmetic (no tensor is allocated): the seed model's fixed costs, the per-layer formulas, how bytes
scale with depth and length, and relative compute. (That the predictions match what torch actually saves
and allocates is tested in tests/torch/test_scheduler.py, test_profiler.py and, for head chunks,
test_cost_measured.py.)"""

import pytest

from revnet_core import ModelConfig
from revnet_core.policies import summary as plan_summary
from revnet_core.memory import GiB, Workload, format_bytes
from revnet_torch.cost import CostModel

SEED = ModelConfig(num_layers=24, d_model=1024, num_heads=16, d_ff=4096, vocab_size=50257, max_seq_len=262144)


def test_seed_fixed_costs_match_the_floor_arithmetic():
    """MEASURING.md: at 256k tokens, parameters + gradients + AdamW = 6.0 GiB; two fp32 streams and their
    gradients = 4.0 GiB."""
    cm = CostModel(SEED, Workload(seq_len=262144))
    d, V, f, L = 1024, 50257, 4096, 24
    per_layer = 3 * d * d + d * d + d * f + f * d + 4 * d  # qkv, proj, up, down, two LayerNorms
    assert cm.parameter_count() == L * per_layer + 2 * V * d + 2 * d
    assert cm.static_bytes() / GiB == pytest.approx(6.04, abs=0.01)
    assert 4 * cm.stream_bytes() == 4 * GiB
    assert cm.autocast_cache_bytes() / GiB == pytest.approx(0.5625, abs=1e-3)  # bf16 copies of layer weights


def store_layer_formula(cfg: ModelConfig, w: Workload) -> int:
    """What autograd saves for one stored middle layer (additive coupling, GELU, fused attention), written
    out by hand from blocks.py; the rotary tables are shared and counted once elsewhere."""
    N, d, H, f = w.batch * w.seq_len, cfg.d_model, cfg.num_heads, cfg.ffn_dim
    s = 4
    c = 2 if w.autocast_dtype else 4
    weights = (3 * d * d + d * d + d * f + f * d) * c if w.autocast_dtype else 0
    attention = (N * d * s + 2 * N * 4 + N * d * c  # input x2, LN mean/rstd, qkv's (cast) input
                 + 3 * N * d * c + N * d * c + N * H * 4)  # rope(q), rope(k), v; output (= proj input); lse
    ffn = N * d * s + 2 * N * 4 + N * d * c + 2 * N * f * c  # y1, LN stats, up's input, GELU in and out
    return attention + ffn + weights


@pytest.mark.parametrize("autocast", [None, "bfloat16"])
@pytest.mark.parametrize("T", [64, 1000])
def test_store_layer_bytes_follow_the_formula(autocast, T):
    cfg = ModelConfig(num_layers=4, d_model=64, num_heads=4, d_ff=96, vocab_size=100, max_seq_len=4096)
    w = Workload(batch=2, seq_len=T, autocast_dtype=autocast, device="cpu")
    cm = CostModel(cfg, w)
    rope = cm.rope_table_bytes()  # counted once, with the first stored layer
    assert cm.layer_saved_bytes("store") == store_layer_formula(cfg, w) + rope
    assert cm.layer_saved_bytes("reverse") == 0
    assert cm.layer_saved_bytes("checkpoint") == 2 * cm.stream_bytes()  # its two inputs


def test_head_chunks_follow_the_attention_block():
    """AttentionBlock.head_chunks: ``attn_head_chunk`` heads each (the last chunk may be short), or when 0
    about 2^20 // (B*T) of them, at most H: one chunk up to 64k tokens at batch 1."""
    def counts(H, chunk, T, batch=1, d=None):
        cfg = ModelConfig(num_layers=2, d_model=d or 16 * H, num_heads=H, attn_head_chunk=chunk)
        return CostModel(cfg, Workload(batch=batch, seq_len=T)).sizes.head_counts()

    assert counts(3, 1, 64) == [1, 1, 1]
    assert counts(4, 2, 64) == [2, 2]
    assert counts(4, 3, 64) == [3, 1]
    assert counts(4, 4, 64) == counts(4, 9, 64) == counts(4, 0, 64) == [4]
    assert counts(16, 0, 65536, d=1024) == [16]
    assert counts(16, 0, 262144, d=1024) == counts(16, 0, 65536, batch=4, d=1024) == [4] * 4
    assert counts(16, 0, 1048576, d=1024) == [1] * 16


@pytest.mark.parametrize("autocast", [None, "bfloat16"])
@pytest.mark.parametrize("heads, chunk", [(3, 1), (4, 2), (4, 3)])
@pytest.mark.parametrize("T", [64, 1000])
def test_head_chunked_store_layer_bytes(autocast, heads, chunk, T):
    """A stored layer with head chunks saves the unchunked layer's bytes (split by chunk), plus the (B, T, H,
    hd) buffer proj reads and, without autocast, the copies of the qkv weight's rows each chunk's matmul
    saves (under autocast it saves their casts: as many bytes as autocast's cached copy of the weight)."""
    cfg = ModelConfig(num_layers=4, d_model=16 * heads, num_heads=heads, d_ff=96, vocab_size=100,
                      max_seq_len=4096, attn_head_chunk=chunk)
    w = Workload(batch=2, seq_len=T, autocast_dtype=autocast, device="cpu")
    cm = CostModel(cfg, w)
    assert len(cm.sizes.head_counts()) > 1
    N, d = 2 * T, cfg.d_model
    c = 2 if autocast else 4
    extra = N * d * c + (0 if autocast else 3 * d * d * 4)
    assert cm.layer_saved_bytes("store") == store_layer_formula(cfg, w) + cm.rope_table_bytes() + extra
    assert cm.layer_saved_bytes("reverse") == 0
    assert cm.layer_saved_bytes("checkpoint") == 2 * cm.stream_bytes()


def test_seed_automatic_head_chunks_lower_the_reverse_peak():
    """At 256k tokens the automatic chunks (four of four heads) hold one chunk's q, k, v and kernel buffers
    at a time in the reversible backward, where one chunk of all 16 heads holds them all at once."""
    w = Workload(seq_len=262144)  # batch 1, bf16 autocast on cuda, AdamW
    auto = CostModel(SEED, w)
    whole = CostModel(SEED.replace(attn_head_chunk=16), w)
    assert auto.sizes.head_counts() == [4] * 4 and whole.sizes.head_counts() == [16]
    assert auto.peak_bytes("reverse") < whole.peak_bytes("reverse")
    assert auto.simulate("reverse").phase.startswith("backward layer")
    # Below 64k tokens the automatic choice is one chunk: the same step as attn_head_chunk=16, to the byte.
    short = Workload(seq_len=65536)
    assert CostModel(SEED, short).simulate("reverse") == CostModel(SEED.replace(attn_head_chunk=16),
                                                                   short).simulate("reverse")


def test_attention_window_counts_as_a_fused_kernel():
    """A sliding window changes only the kernel: counted as SDPA's fused one (output and LSE saved)."""
    cfg = ModelConfig(num_layers=2, d_model=32, num_heads=2, attention_window=16,
                      backend_options={"torch": {"attention": "reference"}})
    w = Workload(seq_len=256, device="cpu")
    cm = CostModel(cfg, w)
    assert cm.sizes.attention == "sdpa"
    fused = CostModel(cfg.replace(backend_options={}, attention_window=None), w)
    assert cm.saved_bytes("store") == fused.saved_bytes("store")
    assert cm.peak_bytes("reverse") == fused.peak_bytes("reverse")
    assert CostModel(cfg, w, attention="math").sizes.attention == "math"  # a workload's choice still wins


def test_saved_bytes_flat_in_depth_under_reverse_and_linear_under_store():
    w = Workload(batch=1, seq_len=256, device="cpu", autocast_dtype=None)
    saved = {L: {p: CostModel(ModelConfig(num_layers=L, d_model=32, num_heads=2), w).saved_bytes(p)
                 for p in ("reverse", "store", "checkpoint")} for L in (2, 4, 8)}
    assert saved[2]["reverse"] == saved[8]["reverse"]
    for p in ("store", "checkpoint"):
        assert saved[8][p] - saved[4][p] == 2 * (saved[4][p] - saved[2][p]) > 0


def test_peaks_order_and_grow_with_length():
    peaks = {}
    for T in (8192, 65536):
        cm = CostModel(SEED, Workload(seq_len=T))
        peaks[T] = {p: cm.peak_bytes(p) for p in ("reverse", "checkpoint", "store")}
        assert peaks[T]["reverse"] < peaks[T]["checkpoint"] < peaks[T]["store"]
    assert peaks[65536]["store"] > 4 * peaks[8192]["store"] - 4 * CostModel(SEED, Workload()).static_bytes()
    assert peaks[65536]["reverse"] - peaks[8192]["reverse"] < (peaks[65536]["store"] - peaks[8192]["store"]) / 10


def test_components_name_every_piece():
    cm = CostModel(SEED, Workload(seq_len=262144))
    c = cm.components("reverse")
    assert c["streams_and_grads"] == 4 * GiB and c["peak"] == cm.peak_bytes("reverse")
    assert c["layer_saved_reverse"] == 0 < c["layer_saved_checkpoint"] < c["layer_saved_store"]
    assert c["layer_transient_store"] < c["layer_transient_reverse"] < c["layer_transient_checkpoint"]
    dh, dw = cm.stream_bytes(), 50257 * 1024 * 4
    assert dh + dw < c["loss_head"] < dh + dw + GiB and c["embedding"] > 0  # plus a chunk or two of logits
    assert c["parameters"] + c["gradients"] + c["optimizer_state"] == cm.static_bytes()


def test_breakdown_sums_to_the_peak_and_names_the_phase():
    sm = CostModel(SEED, Workload(seq_len=65536)).simulate("reverse")
    assert sum(sm.breakdown.values()) == sm.peak
    assert sm.phase.startswith("backward layer")
    assert sm.breakdown["parameters"] > 0 and sm.breakdown["optimizer_state"] > 0
    assert "peak" in sm.summary() and "GiB" in sm.summary()


def test_relative_compute_one_extra_forward():
    cm = CostModel(SEED, Workload(seq_len=32768))
    f = cm.block_flops()
    fwd = sum(f.values())
    assert cm.layer_time("reverse") - cm.layer_time("store") == pytest.approx(fwd)
    assert cm.layer_time("checkpoint") == cm.layer_time("reverse")
    assert cm.layer_time("recompute_ffn") - cm.layer_time("store") == pytest.approx(f["ffn"])
    assert cm.relative_step_time("store") == 1.0
    assert 1.2 < cm.relative_step_time("reverse") < 1.34  # one more forward: ~25-33% of a step


def test_optimizer_and_dtype_change_the_static_bytes():
    cfg = ModelConfig(num_layers=2, d_model=32, num_heads=2)
    adam = CostModel(cfg, Workload(optimizer="adamw"))
    sgd = CostModel(cfg, Workload(optimizer="sgd"))
    fp64 = CostModel(cfg, Workload(optimizer="sgd", param_dtype="float64", autocast_dtype=None))
    assert adam.static_bytes() - sgd.static_bytes() == 2 * adam.parameter_bytes()
    assert fp64.static_bytes() == 2 * sgd.static_bytes()
    assert fp64.stream_bytes() == 2 * sgd.stream_bytes()  # streams are never below the parameters' dtype


@pytest.mark.parametrize("bad, match", [
    (dict(batch=0), "batch=0"), (dict(seq_len=-1), "seq_len"), (dict(param_dtype="int8"), "param_dtype"),
    (dict(autocast_dtype="float32"), "autocast_dtype"), (dict(device="tpu"), "device"),
    (dict(optimizer="lion"), "optimizer"),
])
def test_workload_errors_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        Workload(**bad)


def test_the_attention_kernel_name_is_checked_by_the_backends_cost_model():
    with pytest.raises(ValueError, match="attention='flash3' is not one of"):
        CostModel(ModelConfig(num_layers=2, d_model=32, num_heads=2), Workload(attention="flash3"))


def test_plan_errors_and_helpers():
    cm = CostModel(ModelConfig(num_layers=3, d_model=32, num_heads=2), Workload(seq_len=64))
    with pytest.raises(ValueError, match="got 2 policies for 3 layers"):
        cm.peak_bytes(["store", "store"])
    with pytest.raises(ValueError, match="policy='fast'"):
        cm.peak_bytes(["store", "fast", "reverse"])
    assert plan_summary(["store", "store", "reverse"]) == "store x2, reverse x1"
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(3 * GiB) == "3.00 GiB"


# --- optimizer options (revnet_torch.optim_cost, issue #21) -----------------------------------------------
import json
from pathlib import Path

from revnet_core import ConfigError
from revnet_torch.optim_cost import OPTIMIZER_OPTIONS, optimizer_option, state_bytes

LARGE = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "large_models"
MEASURED_OPTION = {"reversible": "adamw", "inbackward": "adamw_in_backward", "inbackward-bf16": "adamw_in_backward_bf16"}


def test_plain_adamw_option_is_the_cost_models_own_peak():
    cfg = ModelConfig(num_layers=4, d_model=64, num_heads=4, d_ff=256, vocab_size=300, max_seq_len=2048)
    for policy in ("reverse", "store", "checkpoint"):
        cm = CostModel(cfg, Workload(seq_len=2048))
        assert cm.optimizer_peak_bytes(policy, "adamw") == cm.peak_bytes(policy)


def test_each_option_prices_its_state_and_gradients():
    # Parameters dominate at 64 tokens: the peak is at the end of the backward, where the options differ.
    cfg = ModelConfig(num_layers=4, d_model=256, num_heads=4, vocab_size=8192, max_seq_len=64)
    cm = CostModel(cfg, Workload(seq_len=64))
    peak = {o: cm.optimizer_peak_bytes("reverse", o) for o in OPTIMIZER_OPTIONS}
    # Inside the backward the gradients never all exist: all but the two largest tensors' (embedding, head).
    largest = cfg.vocab_size * cfg.d_model * 4
    assert cm.gradient_bytes() - 2 * largest <= peak["adamw"] - peak["adamw_in_backward"] <= cm.gradient_bytes()
    # 8-bit moments: 6 bytes a parameter less, less the chunked update's temporaries.
    assert peak["adamw8bit"] < peak["adamw"] and peak["adamw8bit_in_backward"] < peak["adamw_in_backward"]
    assert peak["adamw8bit_in_backward"] == min(peak.values())


def test_state_bytes_per_parameter():
    assert state_bytes(10**6, 10, "adamw") == 8 * 10**6
    assert state_bytes(10**6, 10, "adamw8bit_in_backward") / 10**6 == pytest.approx(2 + 8 / 256, rel=1e-3)
    assert state_bytes(10**6, 10, "adamw8bit", block_size=2048) / 10**6 == pytest.approx(2 + 8 / 2048, rel=1e-3)
    with pytest.raises(ConfigError, match="block_size"):
        state_bytes(10, 1, "adamw8bit", block_size=100)
    with pytest.raises(ConfigError, match="not one of"):
        optimizer_option("adam8")
    assert optimizer_option("adamw8bit_in_backward").trainer_kwargs() == {"optimizer": "adamw8bit",
                                                                         "optimizer_in_backward": True}


@pytest.mark.parametrize("name", ["large_7b_h200.json", "large_7b_256k_h200.json", "large_1b3_h200.json"])
def test_option_peaks_are_within_3_percent_of_the_h200_measurements(name):
    """docs/benchmarks/large_models: full-depth 1.3B and 7B steps on one H200, measured."""
    from revnet_core.presets import preset_config

    rows = [r for r in json.loads((LARGE / name).read_text())["rows"] if r["method"] in MEASURED_OPTION
            and not r["oom"]]
    assert rows
    for row in rows:
        cfg = preset_config(row["size"], vocab_size=50257, max_seq_len=row["seq"])
        cm = CostModel(cfg, Workload(seq_len=row["seq"]))
        predicted = cm.optimizer_peak_bytes(cfg.policy, MEASURED_OPTION[row["method"]]) / GiB
        assert predicted == pytest.approx(row["peak_allocated_gib"], rel=0.03), (row["size"], row["method"])
