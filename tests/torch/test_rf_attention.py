"""Rational-Fourier attention: the chunked causal sums, the estimator, the recurrent decode, the reversible layer."""

import math

import pytest
import torch

import revnet_core
from revnet_core.errors import ConfigError, InputError
from revnet_torch.generate import Decoder
from revnet_torch.layers import ReversibleAttention, ReversibleFFN, ReversibleLayer, ReversibleSequence
from revnet_torch.rf_attention import (KERNELS, RationalFourierAttention, causal_linear_attention, draw_features,
                                       exact_causal_attention, exact_kernel, naive_causal_linear_attention)

from .conftest import stack_grads

pytestmark = pytest.mark.usefixtures("one_thread")


def heads(seed, B=2, H=2, T=37, hd=8, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(B, H, T, hd, generator=g, dtype=torch.float64) for _ in range(3)]


def trained_like(module):
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return module


# --- the causal sums -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_causal_sums_equal_the_quadratic_form_of_the_same_features(kernel, chunk):
    q, k, v = heads(0)
    att = RationalFourierAttention(16, 2, 24, kernel, use_rope=False).double()
    fq, fk = att.feature_map(q, True), att.feature_map(k, False)
    floor = None if kernel == "gaussian" else 0.01 * torch.arange(1, 38, dtype=torch.float64).expand(2, 37)
    out, kv, z = causal_linear_attention(fq, fk, v, chunk, floor=floor)
    ref = naive_causal_linear_attention(fq, fk, v, floor)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kv, fk.transpose(-1, -2) @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, fk.sum(-2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
def test_features_estimate_their_kernel_without_bias(kernel):
    """Averaged over 4000 independent draws, phi(x) . phi(y) is the exact kernel within 4 standard errors
    (gaussian: without the shifts, which cancel in attention, tested below)."""
    x, y = heads(1, B=1, H=1, T=3, hd=8, scale=0.6)[:2]
    att = RationalFourierAttention(8, 1, 16, kernel, use_rope=False).double()
    est = []
    for s in range(4000):
        att.redraw_features(torch.Generator().manual_seed(s))
        est.append(att.feature_map(x, True, stabilize=False)[0, 0] @ att.feature_map(y, False, stabilize=False)[0, 0].T)
    est = torch.stack(est)  # (draws, 3, 3)
    exact = exact_kernel(kernel, x, y)[0, 0]
    mean, sem = est.mean(0), est.std(0) / math.sqrt(len(est))
    assert ((mean - exact).abs() <= 4 * sem).all(), ((mean - exact) / sem)


def test_gaussian_shifts_cancel_in_the_attention():
    q, k, v = heads(8, T=20, hd=8)
    att = RationalFourierAttention(16, 2, 32, use_rope=False).double()
    shifted = naive_causal_linear_attention(att.feature_map(q, True), att.feature_map(k, False), v)
    raw = naive_causal_linear_attention(att.feature_map(q, True, False), att.feature_map(k, False, False), v)
    torch.testing.assert_close(shifted, raw, rtol=1e-10, atol=1e-12)
    assert att.feature_map(k * 10, False).max() <= 1.0  # no key feature can overflow a running sum


def test_orthogonal_gaussian_features_are_gaussian_rows():
    """Sign-fixed QR blocks: each row's direction uniform (mean ~0) and squared norm chi^2(hd) (mean hd)."""
    w = torch.cat([draw_features("gaussian", 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(500)])
    assert w.mean(0).abs().max() < 0.15
    assert abs((w * w).sum(-1).mean().item() - 8) < 0.3
    blk = draw_features("gaussian", 8, 8, generator=torch.Generator().manual_seed(0))
    gram = blk @ blk.T
    torch.testing.assert_close(gram - torch.diag(gram.diagonal()), torch.zeros(8, 8, dtype=torch.float64),
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_estimator_error_shrinks_with_the_number_of_features(kernel):
    """Relative error against exact attention with the same kernel (softmax for gaussian), averaged over 4
    draws: falls at every step 16 -> 64 -> 256 -> 1024 features."""
    q, k, v = heads(2, T=32, hd=16, scale=0.7)
    ref = exact_causal_attention(kernel, q, k, v)
    errors = []
    for m in (16, 64, 256, 1024):
        att = RationalFourierAttention(32, 2, m, kernel, use_rope=False).double()
        trials = []
        for s in range(4):
            att.redraw_features(torch.Generator().manual_seed(100 + s))
            fq, fk = att.feature_map(q, True), att.feature_map(k, False)
            floor = None if kernel == "gaussian" else att.eps * torch.arange(1, 33, dtype=torch.float64).expand(2, 32)
            out, _, _ = causal_linear_attention(fq, fk, v, 8, floor=floor)
            trials.append(((out - ref).norm() / ref.norm()).item())
        errors.append(sum(trials) / len(trials))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.6 * errors[0], errors


# --- the module: cache, mask, features ----------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
def test_recurrent_decode_equals_the_chunked_forward(kernel):
    torch.manual_seed(3)
    att = trained_like(RationalFourierAttention(16, 2, 12, kernel, chunk_size=4).double())
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    whole, state_end = att(x, use_cache=True)
    state = att.init_state(2, dtype=torch.float64)
    pieces = []
    for a, b in [(0, 7), *[(t, t + 1) for t in range(7, 19)]]:  # a prompt, then one token at a time
        out, state = att(x[:, a:b], use_cache=True, past_state=state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.kv, state_end.kv, rtol=1e-12, atol=1e-12)
    assert state.position == 19 and state.keys.tolist() == [19.0, 19.0]


def test_attention_mask_removes_keys_exactly():
    """A masked key changes nothing for later queries: the same as deleting it from the sequence (no RoPE,
    so positions do not shift)."""
    torch.manual_seed(4)
    att = trained_like(RationalFourierAttention(16, 2, 16, "gaussian", use_rope=False).double())
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 3] = False
    out = att(x, attention_mask=mask)
    kept = att(torch.cat([x[:, :3], x[:, 4:]], 1))
    torch.testing.assert_close(out[:, 4:], kept[:, 3:], rtol=1e-12, atol=1e-12)
    mask[0, 0] = False  # the first query sees no key at all: output 0, and no NaN anywhere (nor in grads)
    xg = x.clone().requires_grad_(True)
    out = att(xg, attention_mask=mask)
    out.sum().backward()
    assert out[0, 0].abs().max() == 0 and out.isfinite().all() and xg.grad.isfinite().all()
    with pytest.raises(InputError, match=r"attention_mask must have shape \(1, 10\)"):
        att(x, attention_mask=mask[:, :5])


def test_fourier_outputs_stay_bounded_with_few_features():
    """The denominator floor: |out| <= max|v| / eps even where 2 features estimate a near-zero kernel."""
    torch.manual_seed(5)
    for kernel in ("laplacian", "cauchy"):
        att = RationalFourierAttention(16, 2, 2, kernel, use_rope=False).double()
        q, k, v = heads(6, T=64, hd=8, scale=3.0)
        fq, fk = att.feature_map(q, True), att.feature_map(k, False)
        out, _, _ = causal_linear_attention(fq, fk, v, 16, floor=att.eps * torch.arange(1, 65.0).expand(2, 64))
        assert out.abs().max() <= v.abs().max() / att.eps + 1e-9


def test_redraw_changes_the_features_only_when_asked():
    torch.manual_seed(6)
    att = RationalFourierAttention(16, 2, 8)
    x = torch.randn(1, 5, 16)
    before = att.features.clone()
    att(x), att(x)
    assert att.features.equal(before)
    att.redraw_features(torch.Generator().manual_seed(1))
    assert not att.features.equal(before)
    assert "features" in att.state_dict()  # a checkpoint keeps the draw


def test_learnable_features_get_gradients_and_refuse_a_redraw():
    att = RationalFourierAttention(16, 2, 8, "cauchy", learnable_features=True).double()
    assert isinstance(att.features, torch.nn.Parameter)
    att(torch.randn(1, 6, 16, dtype=torch.float64)).sum().backward()
    assert att.features.grad is not None and att.features.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="trained, not redrawn"):
        att.redraw_features()


@pytest.mark.parametrize("kwargs, message", [
    ({"kernel": "rbf"}, "kernel='rbf' is not one of"),
    ({"num_fourier_features": 0}, "num_fourier_features=0 must be a positive integer"),
    ({"chunk_size": -1}, "chunk_size=-1 must be a positive integer"),
    ({"num_heads": 3}, "must be divisible by num_heads=3"),
])
def test_bad_settings_raise_named_errors(kwargs, message):
    args = {"d_model": 16, "num_heads": 2, **kwargs}
    with pytest.raises(ConfigError, match=message):
        RationalFourierAttention(**args)


def test_reversible_attention_refuses_what_rf_attention_lacks():
    with pytest.raises(ConfigError, match="attention_dropout=0.1 with use_rational_attention=True"):
        ReversibleAttention(16, 2, use_rational_attention=True, attention_dropout=0.1)
    with pytest.raises(ConfigError, match="window=4 with kernel='laplacian'"):  # windowed: gaussian only
        ReversibleAttention(16, 2, use_rational_attention=True, window=4, rf_kernel="laplacian")


# --- as the F half of a reversible layer ------------------------------------------------------------------
def rf_stack(kernel, coupling, layers=3, learnable=False, dropout=0.0):
    torch.manual_seed(7)
    blocks = [ReversibleLayer(
        ReversibleAttention(16, 2, coupling, use_rational_attention=True, num_fourier_features=12, rf_kernel=kernel,
                            learnable_features=learnable, rf_chunk_size=5, dropout=dropout),
        ReversibleFFN(16, 24, coupling, dropout=dropout)) for _ in range(layers)]
    return trained_like(ReversibleSequence(blocks).double())


@pytest.mark.parametrize("kernel, coupling, learnable, dropout", [
    ("gaussian", "additive", False, 0.0), ("laplacian", "affine", False, 0.0), ("cauchy", "additive", True, 0.0),
    ("gaussian", "affine", True, 0.1)])
def test_reversible_gradients_equal_plain_autograd_fp64(kernel, coupling, learnable, dropout):
    seq = rf_stack(kernel, coupling, learnable=learnable, dropout=dropout)
    seq.train()
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    store = stack_grads(seq, x, "store")
    rev = stack_grads(seq, x, "reverse")
    assert store.keys() == rev.keys() and any("features" in n for n in store) == learnable
    for name in store:
        err = (store[name] - rev[name]).abs().max().item()
        assert err <= 1e-10 * max(1.0, store[name].abs().max().item()), f"{name}: {err:.3e}"


def test_reversible_recompute_is_bit_identical_in_fp32():
    """With exact (fixed-point) streams the backward rebuilds each F input bit for bit; F run again on it
    must then give the forward's very bits: the features did not move between forward and backward."""
    from revnet_torch.engine import run_layers

    seq = rf_stack("gaussian", "additive", layers=2).float()
    seen = {0: [], 1: []}
    for i, layer in enumerate(seq.layers):
        layer.attn.block.register_forward_hook(lambda m, a, out, i=i: seen[i].append((a[0].detach().clone(),
                                                                                      out.detach().clone())))
    x = torch.randn(2, 11, 16, requires_grad=True)
    y1, y2 = run_layers(seq.layers, ["reverse", "reverse"], x, x, exact_streams=True)
    (y1.sum() + 2 * y2.sum()).backward()
    for i in (0, 1):
        (x_fwd, f_fwd), (x_bwd, f_bwd) = seen[i]  # one call in the forward, one in the backward
        assert x_bwd.equal(x_fwd) and f_bwd.equal(f_fwd)


def test_generation_with_rf_layers_uses_the_recurrent_state():
    """A model whose attention is RF: cached decoding equals the full forward (the state, not a KV cache)."""
    model = revnet_core.build("torch", num_layers=2, d_model=16, num_heads=2, d_ff=24, vocab_size=29,
                              max_seq_len=32).double()
    for layer in model.layers:
        layer.attn = ReversibleAttention(16, 2, use_rational_attention=True, num_fourier_features=8,
                                         rotary=model.rotary, rf_chunk_size=4).double()
    trained_like(model).eval()
    ids = torch.randint(0, 29, (2, 15))
    dec = Decoder(model, 2, 15)
    got = dec.feed(ids[:, :6])
    for t in range(6, 16):
        with torch.no_grad():
            want = model(ids[:, :t], return_logits=True, compute_loss=False).logits[:, -1]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        if t < 15:
            got = dec.feed(ids[:, t:t + 1])
    assert dec.caches[0].kv.shape == (2, 2, 8, 8)  # O(1) in the position


def test_the_docs_error_table_is_the_committed_curve():
    """docs/inference.md's rows render from docs/benchmarks/rf/error_curve.json (no typed-in numbers)."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    curve = json.loads((root / "docs/benchmarks/rf/error_curve.json").read_text())
    doc = (root / "docs/inference.md").read_text()
    rows = 0
    for kernel, by_scale in curve["curves"].items():
        for scale, points in by_scale.items():
            errors = {p["num_fourier_features"]: p["rel_error_mean"] for p in points}
            line = (f"| {kernel} | {scale} | " + " | ".join(f"{errors[m]:.3g}" for m in (16, 64, 256, 1024, 2048))
                    + f" | {curve['slopes'][kernel][scale]:+.2f} |")
            rows += line in doc
            if line not in doc:
                assert f"| {kernel} | {scale} |" not in doc, f"stale row in docs/inference.md; want {line}"
        assert errors[2048] < errors[16]  # the committed curve itself falls
    assert rows >= 7
