"""The Triton flash attention (interpreted on CPU) against the plain reference: outputs, log-sum-exp, and
gradients of q, k, v, on ragged lengths, odd head counts, grouped-query heads and sliding windows."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from revnet_kernels.attn import reference_attention
from revnet_kernels.attn_triton import AttentionBlocks, _needs_int64, attention_forward, flash_attention

from .helpers import rel_err


def run_both(B, H, Hk, T, D, causal, window, dtype=torch.float32, blocks=None, layout="bhtd"):
    """(kernel (o, lse, dq, dk, dv), fp64 reference of the same inputs)."""
    if layout == "bhtd":
        q = torch.randn(B, H, T, D, dtype=dtype)
        k = torch.randn(B, Hk, T, D, dtype=dtype)
        v = torch.randn(B, Hk, T, D, dtype=dtype)
    else:  # q, k, v as the strided views a fused QKV projection gives: (B, T, H, D) memory
        q = torch.randn(B, T, H, D, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, T, Hk, D, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, T, Hk, D, dtype=dtype).transpose(1, 2)
    do = torch.randn(B, H, T, D, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = flash_attention(*leaves, causal, window, None, blocks)
    got = (o, lse, *torch.autograd.grad(o, leaves, do))
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rlse = reference_attention(*ref_leaves, causal, window)
    want = (ro, rlse, *torch.autograd.grad(ro, ref_leaves, do.double()))
    return got, want


FP32_CASES = [
    # B, H, Hk, T, D, causal, window
    (1, 1, 1, 1, 16, True, None),
    (1, 1, 1, 17, 32, True, None),
    (2, 3, 3, 17, 16, False, None),
    (1, 3, 1, 129, 16, True, None),  # GQA 3:1; 129 = 4 blocks of 32 + 1
    (1, 4, 2, 129, 32, True, 7),  # window inside one key block
    (1, 2, 1, 129, 16, True, 48),  # window across key blocks
    (1, 1, 1, 129, 16, False, None),
    (1, 1, 1, 40, 64, True, None),
    (1, 1, 1, 33, 128, True, None),
]


@pytest.mark.parametrize("B,H,Hk,T,D,causal,window", FP32_CASES)
def test_fp32_matches_reference(B, H, Hk, T, D, causal, window):
    got, want = run_both(B, H, Hk, T, D, causal, window)
    for name, g, w in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("blocks", [
    AttentionBlocks(64, 16, 1, 1, 16, 16, 1, 1, 16, 64, 1, 1),  # wide query tiles, narrow key steps
    AttentionBlocks(16, 16, 1, 1, 64, 32, 1, 1, 32, 32, 1, 1),
])
def test_fp32_other_tilings(blocks):
    got, want = run_both(1, 2, 1, 100, 16, True, 21, blocks=blocks)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("window", [None, 20])
def test_half_precision_close_to_reference(dtype, tol, window):
    got, want = run_both(1, 3, 1, 65, 32, True, window, dtype=dtype)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for name, g, w in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        assert rel_err(g, w) < tol, name


ATOMIC = AttentionBlocks(**{**AttentionBlocks.get_default(16).__dict__, "atomic_dq": True})


@pytest.mark.parametrize("B,H,Hk,T,D,causal,window", [
    (1, 1, 1, 1, 16, True, None),
    (2, 3, 3, 17, 16, False, None),
    (1, 3, 1, 129, 16, True, None),  # GQA: three query heads add into their own dq from one kv program
    (1, 2, 1, 129, 16, True, 48),
])
def test_atomic_dq_matches_reference(B, H, Hk, T, D, causal, window):
    got, want = run_both(B, H, Hk, T, D, causal, window, blocks=ATOMIC)
    for name, g, w in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_atomic_dq_is_off_under_deterministic_algorithms(monkeypatch):
    """Deterministic mode runs the dQ kernel: bit-equal to the default tiles, whose dQ has no atomics."""
    torch.manual_seed(11)
    plain, _ = run_both(1, 2, 1, 40, 16, True, None)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    torch.manual_seed(11)
    forced, _ = run_both(1, 2, 1, 40, 16, True, None, blocks=ATOMIC)
    assert all(torch.equal(a, b) for a, b in zip(plain, forced))


def test_strided_inputs_give_the_same_result():
    torch.manual_seed(3)
    got_strided, _ = run_both(2, 3, 1, 33, 16, True, None, layout="bthd")
    torch.manual_seed(3)
    q = torch.randn(2, 33, 3, 16).transpose(1, 2)
    o, _ = attention_forward(q.contiguous(), *(torch.randn(2, 33, 1, 16).transpose(1, 2).contiguous()
                                               for _ in range(2)))
    assert torch.equal(got_strided[0], o)


def test_int64_row_offsets_give_the_same_result():
    blocks = AttentionBlocks.get_default(16)
    wide = AttentionBlocks(**{**blocks.__dict__, "int64_offsets": True})
    torch.manual_seed(5)
    got64, want = run_both(1, 3, 1, 45, 16, True, 9, blocks=wide, layout="bthd")
    torch.manual_seed(5)
    got32, _ = run_both(1, 3, 1, 45, 16, True, 9, blocks=blocks, layout="bthd")
    for a, b, w in zip(got64, got32, want):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.double(), w, rtol=2e-5, atol=2e-5)


def test_int64_offsets_switch_on_where_rows_times_stride_reach_2_31():
    """q, k, v as views of a packed (B, T, 3, H, D) projection: row stride 3 * H * D = 3072."""
    blocks = AttentionBlocks.get_default(64, torch.bfloat16, torch.device("cuda"))
    for T, want in ((600_000, False), (700_000, True)):
        qkv = torch.empty(1, T, 3, 16, 64, device="meta", dtype=torch.bfloat16)
        q = qkv[:, :, 0].transpose(1, 2)  # (B, H, T, D) view, no memory
        assert _needs_int64(blocks, q) is want


def test_output_is_laid_out_for_the_output_projection():
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    o, lse = attention_forward(q, k, v)
    assert o.shape == (1, 2, 9, 16) and o.transpose(1, 2).is_contiguous()  # (B, T, H, D) memory
    assert lse.shape == (1, 2, 9) and lse.dtype == torch.float32


def test_lse_is_not_differentiable():
    q, k, v = (torch.randn(1, 1, 5, 16, requires_grad=True) for _ in range(3))
    o, lse = flash_attention(q, k, v)
    assert o.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("kwargs,match", [
    (dict(D=24), "head_dim=24 must be a power of two"),
    (dict(D=8), "head_dim=8 must be a power of two between 16"),
    (dict(Hk=2, H=3), "heads=3 must be a multiple of kv_heads=2"),
    (dict(window=4, causal=False), "window=4 needs causal=True"),
    (dict(window=0), "window=0 must be a positive integer"),
])
def test_bad_inputs_raise(kwargs, match):
    args = dict(H=2, Hk=1, D=16, causal=True, window=None) | kwargs
    q = torch.randn(1, args["H"], 5, args["D"])
    k = torch.randn(1, args["Hk"], 5, args["D"])
    with pytest.raises(ValueError, match=match):
        attention_forward(q, k, k.clone(), args["causal"], args["window"])


def test_bad_blocks_raise():
    q = torch.randn(1, 1, 5, 16)
    with pytest.raises(ValueError, match=r"self.block_m=16 must be a multiple of self.block_n=32"):
        attention_forward(q, q, q, blocks=AttentionBlocks(16, 32, 1, 1, 32, 16, 1, 1, 16, 32, 1, 1))
    with pytest.raises(ValueError, match="kv_block_m=24 must be a power of two"):
        attention_forward(q, q, q, blocks=AttentionBlocks(32, 16, 1, 1, 32, 16, 1, 1, 24, 48, 1, 1))


@given(T=st.integers(1, 70), kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]),
       D=st.sampled_from([16, 32]), causal=st.booleans(), window=st.none() | st.integers(1, 80))
def test_property_any_shape_matches_reference(T, kv_heads, group, D, causal, window):
    window = window if causal else None
    got, want = run_both(1, kv_heads * group, kv_heads, T, D, causal, window)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-5)
