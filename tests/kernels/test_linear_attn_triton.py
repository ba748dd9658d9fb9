"""The Triton linear attention (interpreted on CPU) against the fp64 reference: output, returned state, and
gradients of the features, the values and the incoming state, on odd sizes (T not a multiple of the chunk,
M and hd not powers of two), the floor active, inactive and absent, several segments and column blocks,
fp32 and bf16; registry selection per device; the torch RF attention running the kernel when forced."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from revnet_kernels import registry
from revnet_kernels.linear_attn import TritonRFAttention, linear_attention, reference_linear_attention
from revnet_kernels.linear_attn_triton import LinearAttentionBlocks, triton_linear_attention

from .helpers import rel_err
from .test_linear_attn import features, mixed_floor

SIZES = dict(B=2, H=3, T=37, M=12, D=10)


def run_both(dtype=torch.float32, floor="mixed", state=False, blocks=None, chunk=16, sizes=SIZES, kernel=True):
    """(kernel's (out, kv, z, grads...) in ``dtype``, fp64 reference's), the loss touching the output and the
    state. ``kernel=False``: the reference in ``dtype`` instead of the kernel."""
    fq, fk, v = features(**sizes, dtype=torch.float64)
    B, H, T, M, D = (sizes[k] for k in "BHTMD")
    fl = {"mixed": mixed_floor(fq, fk), "low": torch.full((B, T), 1e-3, dtype=torch.float64),
          "high": mixed_floor(fq, fk) * 1e3, None: None}[floor]
    gen = torch.Generator().manual_seed(3)
    kv0 = torch.randn(B, H, M, D, generator=gen, dtype=torch.float64) if state else None
    z0 = torch.rand(B, H, M, generator=gen, dtype=torch.float64) * 3 if state else None
    g_out = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    g_kv = torch.randn(B, H, M, D, generator=gen, dtype=torch.float64)
    g_z = torch.randn(B, H, M, generator=gen, dtype=torch.float64)
    inputs = [t for t in (fq, fk, v, kv0, z0) if t is not None]

    def run(fn, cast):
        leaves = [cast(t).clone().requires_grad_() for t in inputs]
        fq_, fk_, v_, *st = leaves
        kv0_, z0_ = st if st else (None, None)
        floor_ = fl.to(fq_.dtype) if fl is not None else None
        out, kv, z = fn(fq_, fk_, v_, floor_, kv0_, z0_)
        loss = (out * cast(g_out)).sum() + (kv * cast(g_kv)).sum() + (z * cast(g_z)).sum()
        return (out, kv, z, *torch.autograd.grad(loss, leaves))

    def reference(fq_, fk_, v_, f, k0, z0_):
        return reference_linear_attention(fq_, fk_, v_, chunk, k0, z0_, f)

    tested = (lambda *a: triton_linear_attention(*a, chunk_size=chunk, blocks=blocks)) if kernel else reference
    return run(tested, lambda t: t.to(dtype)), run(reference, lambda t: t)


NAMES = ("out", "kv", "z", "dfq", "dfk", "dv", "dkv0", "dz0")


@pytest.mark.parametrize("floor", ["mixed", "low", "high", None])
def test_fp32_matches_reference(floor):
    got, want = run_both(floor=floor)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == torch.float32
        assert rel_err(g, w) < 2e-6, name


def test_fp32_with_incoming_state_and_its_gradients():
    got, want = run_both(state=True)
    assert len(got) == 8
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 2e-6, name


@pytest.mark.parametrize("blocks", [
    LinearAttentionBlocks(chunk=16, block_cols=16, segments=3, num_warps=1, num_stages=1),  # 3 segments, 1 col block
    LinearAttentionBlocks(chunk=32, block_cols=16, segments=2, num_warps=1, num_stages=1),
], ids=["seg3", "seg2-chunk32"])
def test_fp32_segments_and_column_blocks(blocks):
    sizes = dict(B=1, H=2, T=53, M=20, D=18)  # two column blocks of 16 for both widths
    got, want = run_both(state=True, blocks=blocks, sizes=sizes)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 2e-6, name


def test_one_token_decoding_step():
    got, want = run_both(state=True, sizes=dict(B=2, H=1, T=1, M=12, D=10))
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 2e-6, name


def test_bf16_close_to_reference():
    """Within 1% of the fp64 reference, or twice the error of the reference itself run in bf16 where that is
    larger; dfq within 5%. dfq is nearly orthogonal to fq (the output does not change when fq_i is scaled, the
    floor aside), a cancellation that costs the kernel 3.8% here and the bf16 reference (fp32 running sums)
    0.7%: a known gap of the kernel's dfq scan (neither fp32 operands in that scan nor an fp32 saved output
    closed it), docs/kernels.md."""
    got, want = run_both(dtype=torch.bfloat16)
    ref16, _ = run_both(dtype=torch.bfloat16, kernel=False)
    for name, g, w, r in zip(NAMES, got, want, ref16):
        assert g.dtype == torch.bfloat16
        assert rel_err(g, w) < max(5e-2 if name == "dfq" else 1e-2, 2 * rel_err(r, w)), name


def test_registry_picks_triton_on_gpus_and_the_reference_on_cpu():
    meta = {"feature_width": 64, "head_dim": 64, "has_state": False, "floor_grad": False}
    assert registry.select("linear_attention", "cuda", "bfloat16", meta).impl == "triton"
    assert registry.select("linear_attention", "rocm", "float32", meta).impl == "triton"
    assert registry.select("linear_attention", "cpu", "float32", meta).impl == "reference"
    assert registry.select("linear_attention", "cuda", "float64", meta).impl == "reference"
    assert registry.select("linear_attention", "cuda", "float32", {**meta, "floor_grad": True}).impl == "reference"
    assert registry.select("linear_attention", "cuda", "float32", {**meta, "feature_width": 512}).impl == "reference"


def test_forced_triton_runs_the_kernel_through_the_entry_point(monkeypatch):
    fq, fk, v = features(B=1, H=2, T=21, dtype=torch.float32)
    calls = []
    from revnet_kernels import linear_attn_triton

    real = linear_attn_triton.linear_attention_forward
    monkeypatch.setattr(linear_attn_triton, "linear_attention_forward",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    out, _ = TritonRFAttention(block_size=16, impl="triton")(fq, fk, v)
    assert calls == [1]
    torch.testing.assert_close(out, reference_linear_attention(fq, fk, v, 16)[0], rtol=1e-5, atol=1e-6)


def test_rf_attention_runs_the_kernel_when_the_registry_says_so(monkeypatch):
    """The torch RF attention goes through the registry: forced to Triton on CPU (as CUDA selects it) it
    gives the reference's output and input gradients."""
    from revnet_torch.rf_attention import RationalFourierAttention

    torch.manual_seed(0)
    att = RationalFourierAttention(16, 2, num_fourier_features=6, kernel="cauchy", chunk_size=16)
    x = torch.randn(2, 19, 16)

    def run():
        leaf = x.clone().requires_grad_()
        out = att(leaf)
        return out, torch.autograd.grad(out.square().sum(), leaf)[0]

    monkeypatch.setenv(registry.ENV_VAR, "linear_attention=reference")
    want = run()
    monkeypatch.setenv(registry.ENV_VAR, "linear_attention=triton")
    got = run()
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_backward_failure_of_a_forced_kernel_is_raised(monkeypatch):
    from revnet_kernels import linear_attn_triton

    def broken(*args, **kwargs):
        raise RuntimeError("no shared memory")

    monkeypatch.setattr(linear_attn_triton, "linear_attention_backward", broken)
    fq, fk, v = (t.requires_grad_() for t in features(B=1, H=1, T=5, dtype=torch.float32))
    out, _, _ = linear_attention(fq, fk, v, impl="triton")
    with pytest.raises(RuntimeError, match="no shared memory"):
        out.sum().backward()


def test_failing_backward_of_a_selected_kernel_recomputes_with_the_reference_once(monkeypatch):
    """The real (interpreted) kernel, auto-selected on CPU through a test plugin, whose backward fails."""
    from revnet_core.registry import register_plugin, unregister_plugin
    from revnet_kernels import linear_attn_triton

    from .test_registry import KernelPlugin, broken_kernel

    name = register_plugin(KernelPlugin(registry.KernelImpl(
        "linear_attention", "triton-on-cpu", "revnet_kernels.linear_attn_triton:triton_impl",
        devices=frozenset({"cpu"}), priority=100)), name="test-linear-attention")
    try:
        monkeypatch.setattr(linear_attn_triton, "linear_attention_backward", broken_kernel)
        fq, fk, v = (t.requires_grad_() for t in features(B=1, H=2, T=19, dtype=torch.float32))
        floor = mixed_floor(fq.detach(), fk.detach())
        with pytest.warns(registry.KernelFallbackWarning, match="backward kernel 'triton-on-cpu'") as rec:
            out, _, _ = linear_attention(fq, fk, v, floor=floor, chunk_size=16)
            got = torch.autograd.grad(out.sum(), (fq, fk, v))
        assert len([r for r in rec if issubclass(r.category, registry.KernelFallbackWarning)]) == 1
        ref = reference_linear_attention(fq, fk, v, 16, floor=floor)[0]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        for g, want in zip(got, torch.autograd.grad(ref.sum(), (fq, fk, v))):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)
        meta = {"feature_width": 12, "head_dim": 10, "has_state": False, "floor_grad": False}
        assert registry.select("linear_attention", "cpu", torch.float32, meta).impl == "reference"
    finally:
        unregister_plugin(name)


def test_kernels_run_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    from revnet_kernels import linear_attn_triton

    assert isinstance(linear_attn_triton._la_fwd, InterpretedFunction)
    assert isinstance(linear_attn_triton._la_scan, InterpretedFunction)


@given(T=st.integers(1, 70), M=st.integers(1, 24), D=st.integers(1, 20), chunk=st.sampled_from([1, 16, 33]),
       state=st.booleans())
def test_fp32_matches_reference_over_shapes(T, M, D, chunk, state):
    got, want = run_both(state=state, chunk=chunk, sizes=dict(B=1, H=2, T=T, M=M, D=D))
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 5e-6, name
