"""Windowed Rational-Fourier attention (revnet_torch.rf_hybrid) and RF models from a config: the estimator
against its definition and against softmax, decoding, the reversible layer, generation, set_attention_kind,
the bench's reversible_rf model and the cost model's refusal."""

import math

import pytest
import torch

import revnet_core
from revnet_core.config import ModelConfig
from revnet_core.errors import BackendFeatureError, ConfigError, InputError
from revnet_torch.generate import Decoder
from revnet_torch.layers import ReversibleAttention, ReversibleFFN, ReversibleLayer, ReversibleSequence
from revnet_torch.model import ReversibleTransformer
from revnet_torch.rf_attention import RationalFourierAttention, RFAttentionBlock, exact_causal_attention
from revnet_torch.rf_hybrid import WindowState, naive_windowed_rf, windowed_rf_heads

from .conftest import stack_grads

pytestmark = pytest.mark.usefixtures("one_thread")


def heads(seed, B=2, H=2, T=23, hd=8, scale=0.7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(B, H, T, hd, generator=g, dtype=dtype) for _ in range(3)]


def trained_like(module):
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return module


def rf(m=16, chunk=4, window=None, seed=0):
    torch.manual_seed(seed)
    return RationalFourierAttention(16, 2, m, use_rope=False, chunk_size=chunk, window=window).double()


# --- the estimator ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 4, 7, 40])
@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunked_windowed_attention_equals_its_quadratic_definition(window, chunk):
    """exp(q.k/sqrt(hd)) inside the window, the unshifted features' product beyond, one normalisation."""
    q, k, v = heads(0)
    att = rf(chunk=chunk)
    out, state = windowed_rf_heads(att, q, k, v, window)
    torch.testing.assert_close(out, naive_windowed_rf(att, q, k, v, window), rtol=1e-10, atol=1e-12)
    assert state is None


def test_a_window_covering_the_sequence_is_exact_softmax_attention():
    q, k, v = heads(1)
    for window in (23, 100):
        out, _ = windowed_rf_heads(rf(), q, k, v, window)
        torch.testing.assert_close(out, exact_causal_attention("gaussian", q, k, v), rtol=1e-12, atol=1e-12)


def test_far_part_is_a_consistent_estimate_of_softmax_better_than_rf_alone():
    """Error against exact causal softmax, averaged over 4 draws: falls with the features, and the exact window
    makes it smaller than pure RF attention's at the same feature count."""
    q, k, v = heads(2, T=48, hd=8, scale=0.8)
    exact = exact_causal_attention("gaussian", q, k, v)
    hybrid, pure = [], []
    for m in (16, 128, 1024):
        att = rf(m=m, chunk=8)
        h, p = [], []
        for s in range(4):
            att.redraw_features(torch.Generator().manual_seed(50 + s))
            h.append((windowed_rf_heads(att, q, k, v, 8)[0] - exact).norm() / exact.norm())
            fq, fk = att.feature_map(q, True), att.feature_map(k, False)
            o = (fq @ fk.transpose(-1, -2)).tril()
            p.append(((o @ v) / o.sum(-1, keepdim=True) - exact).norm() / exact.norm())
        hybrid.append(float(sum(h) / 4))
        pure.append(float(sum(p) / 4))
    assert hybrid[0] > hybrid[1] > hybrid[2] and hybrid[2] < 0.6 * hybrid[0], hybrid
    assert all(a < b for a, b in zip(hybrid, pure)), (hybrid, pure)


def test_large_logits_stay_finite_in_float32():
    """Logits past exp's float32 range (q.k / sqrt(hd) up to ~130): the merge by log normalisers keeps every
    term bounded; the result matches the float64 definition."""
    q, k, v = heads(3, T=30, scale=6.0)
    att = rf(m=32, chunk=8)
    want = naive_windowed_rf(att, q, k, v, 6)
    assert torch.exp((q @ k.transpose(-1, -2)).float() / math.sqrt(8)).isinf().any()  # a naive fp32 pass overflows
    got, _ = windowed_rf_heads(att.float(), q.float(), k.float(), v.float(), 6)
    assert got.isfinite().all()
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("window", [1, 5, 30])
def test_decoding_with_the_window_state_equals_the_whole_forward(window):
    torch.manual_seed(3)
    att = trained_like(RationalFourierAttention(16, 2, 12, chunk_size=4, window=window).double())
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    whole = att(x)
    state = att.init_state(2, dtype=torch.float64)
    pieces = []
    for a, b in [(0, 7), *[(t, t + 1) for t in range(7, 13)], (13, 19)]:  # a prompt, tokens, then a block
        out, state = att(x[:, a:b], use_cache=True, past_state=state)
        pieces.append(out)
        assert isinstance(state, WindowState) and state.k.shape[2] == min(b, window - 1)  # bounded buffer
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-10, atol=1e-12)
    assert state.position == 19


def test_windowed_attention_refuses_what_it_lacks():
    att = RationalFourierAttention(16, 2, 8, window=4)
    with pytest.raises(InputError, match="attention_mask with a window"):
        att(torch.randn(1, 5, 16), attention_mask=torch.ones(1, 5))
    with pytest.raises(InputError, match="past_state is a RFState"):
        att(torch.randn(1, 5, 16), past_state=RationalFourierAttention(16, 2, 8).init_state(1))
    with pytest.raises(ConfigError, match="window=4 with kernel='cauchy'"):
        RationalFourierAttention(16, 2, 8, "cauchy", window=4)
    with pytest.raises(ConfigError, match="window=0 must be a positive integer"):
        att.window = 0


# --- the reversible layer --------------------------------------------------------------------------------
def stack(coupling, window, dropout=0.0, layers=3):
    torch.manual_seed(7)
    blocks = [ReversibleLayer(
        ReversibleAttention(16, 2, coupling, use_rational_attention=True, num_fourier_features=12, rf_chunk_size=3,
                            window=window, dropout=dropout),
        ReversibleFFN(16, 24, coupling, dropout=dropout)) for _ in range(layers)]
    return trained_like(ReversibleSequence(blocks).double())


@pytest.mark.parametrize("coupling, window, dropout", [("additive", 4, 0.0), ("affine", 1, 0.0),
                                                       ("additive", 6, 0.1)])
def test_reversible_gradients_equal_plain_autograd_fp64(coupling, window, dropout):
    seq = stack(coupling, window, dropout).train()
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    store, rev = stack_grads(seq, x, "store"), stack_grads(seq, x, "reverse")
    assert store.keys() == rev.keys()
    for name in store:
        err = (store[name] - rev[name]).abs().max().item()
        assert err <= 1e-10 * max(1.0, store[name].abs().max().item()), f"{name}: {err:.3e}"


def test_reversible_recompute_is_bit_identical_in_fp32():
    from revnet_torch.engine import run_layers

    seq = stack("additive", 4, layers=2).float()
    seen = {0: [], 1: []}
    for i, layer in enumerate(seq.layers):
        layer.attn.block.register_forward_hook(lambda m, a, out, i=i: seen[i].append((a[0].detach().clone(),
                                                                                      out.detach().clone())))
    x = torch.randn(2, 15, 16, requires_grad=True)
    y1, y2 = run_layers(seq.layers, ["reverse", "reverse"], x, x, exact_streams=True)
    (y1.sum() + 2 * y2.sum()).backward()
    for i in (0, 1):
        (x_fwd, f_fwd), (x_bwd, f_bwd) = seen[i]
        assert x_bwd.equal(x_fwd) and f_bwd.equal(f_fwd)


# --- models from a config ------------------------------------------------------------------------------------
def rf_model(dtype=torch.float32, **fields):
    torch.manual_seed(0)
    cfg = dict(num_layers=2, d_model=16, num_heads=2, d_ff=24, vocab_size=29, max_seq_len=32, attention_kind="rf",
               attention_options={"num_fourier_features": 8, "chunk_size": 4}, attention_window=4)
    return trained_like(revnet_core.build("torch", **{**cfg, **fields}).to(dtype))


def test_a_config_builds_rf_attention_layers():
    model = rf_model(attention_options={"kernel": "cauchy", "num_fourier_features": 5, "learnable_features": True},
                     attention_window=None)
    att = model.layers[0].attn.block.attn
    assert isinstance(model.layers[1].attn.block, RFAttentionBlock)
    assert (att.kernel, att.num_fourier_features, att.chunk_size, att.window) == ("cauchy", 5, 64, None)
    assert isinstance(att.features, torch.nn.Parameter)
    assert model.layers[0].attn.block.attn.rotary[0] is model.rotary  # the model's shared RoPE
    windowed = rf_model()
    assert all(layer.attn.block.window == 4 for layer in windowed.layers)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_generation_with_windowed_rf_layers_equals_the_full_forward(dtype, tol):
    """Cached decoding (the window's keys plus the RF sums of older ones) gives the full forward's last-token
    logits, past the window so that the far part is used."""
    model = rf_model(dtype).eval()
    ids = torch.randint(0, 29, (2, 20), generator=torch.Generator().manual_seed(1))
    dec = Decoder(model, 2, 20)
    got = dec.feed(ids[:, :6])
    for t in range(6, 21):
        with torch.no_grad():
            want = model(ids[:, :t], return_logits=True, compute_loss=False).logits[:, -1]
        torch.testing.assert_close(got, want, rtol=0, atol=tol)
        if t < 20:
            got = dec.feed(ids[:, t:t + 1])
    assert dec.caches[0].k.shape[2] == 3 and dec.caches[0].kv.shape == (2, 2, 8, 8)
    out = model.generate(ids[:, :5], max_new_tokens=4, temperature=0)
    assert out.shape == (2, 9) and out[:, :5].equal(ids[:, :5])


def test_set_attention_kind_keeps_the_weights_and_is_saved_in_the_config(tmp_path):
    """A softmax model made RF with a window covering the sequence computes the very same function (exact
    softmax in the window, its weights kept); its config rebuilds the RF model from a checkpoint's dict."""
    torch.manual_seed(0)
    model = trained_like(revnet_core.build("torch", num_layers=2, d_model=16, num_heads=2, d_ff=24, vocab_size=29,
                                           max_seq_len=32).double())
    ids = torch.randint(0, 29, (2, 18), generator=torch.Generator().manual_seed(2))
    before = model(ids, return_logits=True).logits
    model.set_attention_kind("rf", num_fourier_features=8)
    model.set_attention_window(32)
    assert model.config.attention_kind == "rf" and model.config.rf_options["num_fourier_features"] == 8
    after = model(ids, return_logits=True).logits
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
    model.set_attention_window(4)  # now the far part counts: a different (approximate) function
    approx = model(ids, return_logits=True).logits
    assert (approx - before).abs().max() > 1e-6
    again = ReversibleTransformer(ModelConfig.from_saved(model.config.to_dict())).double()
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again(ids, return_logits=True).logits, approx, rtol=1e-12, atol=1e-12)
    model.set_attention_kind("softmax")
    model.set_attention_window(None)
    torch.testing.assert_close(model(ids, return_logits=True).logits, before, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match="attention_kind='linear' is not one of"):
        model.set_attention_kind("linear")


# --- the bench and the cost model ------------------------------------------------------------------------
def test_bench_measures_the_reversible_rf_model():
    from revnet_torch.bench import BenchmarkSuite, ModelSpec, build_model

    rev = build_model(ModelSpec("reversible", {"attention_window": 8}), 64)
    rfm = build_model(ModelSpec("reversible_rf", {"attention_window": 8}), 64)
    assert rfm.config.attention_kind == "rf" and rfm.layers[0].attn.block.window == 8
    # the same reference weights where both have them
    assert rfm.layers[0].attn.block.attn.qkv.weight.equal(rev.layers[0].attn.block.qkv.weight)
    assert rfm.head.weight.equal(rev.head.weight)
    results = BenchmarkSuite().run(models={"reversible_rf": "reversible_rf", "mine": rf_model()},
                                   sequence_lengths=[16, 32], batch_sizes=[1], steps=1, warmup=0,
                                   metrics=["memory", "throughput"])
    assert [(r["model"], r["seq"]) for r in results] == [("reversible_rf", 16), ("mine", 16), ("reversible_rf", 32),
                                                         ("mine", 32)]
    assert all(r["tokens_per_s"] > 0 and r["live_bytes"] > 0 for r in results)
    with pytest.raises(ConfigError, match="the PyTorch baselines run softmax attention"):
        build_model(ModelSpec("plain", {"attention_kind": "rf"}), 64)


def test_the_cost_model_refuses_rf_attention_by_name():
    from revnet_torch.cost import CostModel

    with pytest.raises(BackendFeatureError, match="Rational-Fourier attention's memory is not priced"):
        CostModel(ModelConfig(attention_kind="rf"))
    CostModel(ModelConfig())  # softmax is priced as before


def test_rf_configs_the_torch_layers_refuse():
    from revnet_torch.bert import ReversibleBERT

    with pytest.raises(ConfigError, match="attention_dropout=0.1 with use_rational_attention=True"):
        revnet_core.build("torch", num_layers=1, d_model=16, num_heads=2, attention_kind="rf", attention_dropout=0.1)
    with pytest.raises(ConfigError, match="causal=False with use_rational_attention=True"):
        ReversibleBERT(num_layers=1, d_model=16, num_heads=2, attention_kind="rf")
