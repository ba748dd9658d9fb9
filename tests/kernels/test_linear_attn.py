"""The chunked causal linear attention reference against its quadratic oracle (fp64): odd sizes, every chunk
size, the floor on and off, the state continuation; its checks, its entry point, and TritonRFAttention."""

import pytest
import torch

from revnet_core.errors import BackendFeatureError, ConfigError, InputError
from revnet_kernels import registry
from revnet_kernels.linear_attn import (TritonRFAttention, linear_attention, naive_linear_attention,
                                        reference_linear_attention)


def features(B=2, H=3, T=37, M=12, D=10, dtype=torch.float64, seed=0):
    """Positive features (as gaussian RF features are) and values."""
    gen = torch.Generator().manual_seed(seed)
    fq = torch.rand(B, H, T, M, generator=gen, dtype=dtype)
    fk = torch.rand(B, H, T, M, generator=gen, dtype=dtype)
    v = torch.randn(B, H, T, D, generator=gen, dtype=dtype)
    return fq, fk, v


def mixed_floor(fq, fk, seed=1):
    """(B, T) floors near the typical sums: active for some queries and heads, inactive for others."""
    B, _, T, M = fq.shape
    gen = torch.Generator().manual_seed(seed)
    typical = (fq.mean() * fk.mean() * M).item() * torch.arange(1, T + 1, dtype=fq.dtype)
    return typical * (0.7 + 0.6 * torch.rand(B, T, generator=gen, dtype=fq.dtype))


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("with_floor", [False, True])
def test_chunked_equals_the_quadratic_oracle_fp64(chunk, with_floor):
    fq, fk, v = features()
    floor = mixed_floor(fq, fk) if with_floor else None
    out, kv, z = reference_linear_attention(fq, fk, v, chunk, floor=floor)
    torch.testing.assert_close(out, naive_linear_attention(fq, fk, v, floor), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kv, fk.transpose(-1, -2) @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, fk.sum(-2), rtol=1e-12, atol=1e-12)


def test_the_mixed_floor_is_active_somewhere_and_not_everywhere():
    fq, fk, _ = features()
    s = (fq @ fk.transpose(-1, -2)).tril().sum(-1)
    active = mixed_floor(fq, fk)[:, None] > s
    assert 0.1 < active.double().mean().item() < 0.9


def test_chunked_gradients_equal_the_oracle_gradients_fp64():
    fq, fk, v = features(T=23)
    floor = mixed_floor(fq, fk)
    leaves = [t.clone().requires_grad_() for t in (fq, fk, v)]
    ref = [t.clone().requires_grad_() for t in (fq, fk, v)]
    g = torch.randn(2, 3, 23, 10, dtype=torch.float64)
    got = torch.autograd.grad(reference_linear_attention(*leaves, 8, floor=floor)[0], leaves, g)
    want = torch.autograd.grad(naive_linear_attention(*ref, floor), ref, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("split", [1, 16, 30])
def test_state_continues_exactly(split):
    fq, fk, v = features()
    floor = mixed_floor(fq, fk)
    whole, kv, z = reference_linear_attention(fq, fk, v, 16, floor=floor)
    first, kv1, z1 = reference_linear_attention(fq[:, :, :split], fk[:, :, :split], v[:, :, :split], 16,
                                                floor=floor[:, :split])
    second, kv2, z2 = reference_linear_attention(fq[:, :, split:], fk[:, :, split:], v[:, :, split:], 7, kv1, z1,
                                                 floor[:, split:])
    torch.testing.assert_close(torch.cat([first, second], 2), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kv2, kv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z2, z, rtol=1e-12, atol=1e-12)


def test_a_query_that_sees_no_key_outputs_zero():
    fq, fk, v = features(T=9)
    fk[:, :, :4] = 0  # the first four keys masked out, as RationalFourierAttention does with padding
    out, _, _ = reference_linear_attention(fq, fk, v, 4)
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))
    assert torch.isfinite(out).all()


def test_rf_attention_delegates_to_this_reference():
    from revnet_torch.rf_attention import RFState, causal_linear_attention, naive_causal_linear_attention

    fq, fk, v = features(T=19)
    floor = mixed_floor(fq, fk)
    kv0, z0 = torch.rand(2, 3, 12, 10, dtype=torch.float64), torch.rand(2, 3, 12, dtype=torch.float64)
    got = causal_linear_attention(fq, fk, v, 8, RFState(kv0, z0, torch.zeros(2), 5), floor)
    want = reference_linear_attention(fq, fk, v, 8, kv0, z0, floor)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(naive_causal_linear_attention(fq, fk, v, floor), naive_linear_attention(fq, fk, v, floor))


def test_entry_point_runs_the_reference_on_cpu():
    fq, fk, v = features(T=11, dtype=torch.float32)
    meta = {"feature_width": 12, "head_dim": 10, "has_state": False, "floor_grad": False}
    assert registry.select("linear_attention", fq.device, fq.dtype, meta).impl == "reference"
    for a, b in zip(linear_attention(fq, fk, v, chunk_size=4), reference_linear_attention(fq, fk, v, 4)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "fk": a["fk"][..., :5]}, "one shape"),
    (lambda a: {**a, "v": a["v"][:, :, :3]}, "v must be"),
    (lambda a: {**a, "v": a["v"].float()}, "one float dtype"),
    (lambda a: {**a, "kv0": torch.zeros(2, 3, 12, 10, dtype=torch.float64)}, "both kv0 and z0"),
    (lambda a: {**a, "floor": torch.ones(2, 5, dtype=torch.float64)}, "floor must have shape"),
    (lambda a: {**a, "fq": a["fq"][0]}, "must be"),
    (lambda a: {k: t[:, :, :0] for k, t in a.items()}, "at least one token"),
])
def test_bad_inputs_raise_input_error(change, message):
    fq, fk, v = features(T=7)
    args = change({"fq": fq, "fk": fk, "v": v})
    with pytest.raises(InputError, match=message):
        linear_attention(args.pop("fq"), args.pop("fk"), args.pop("v"), **args)


def test_triton_rf_attention_takes_the_readme_call_and_continues_its_state():
    fq, fk, v = features(T=21, dtype=torch.float32)
    attn = TritonRFAttention(block_size=128)
    whole, (kv, z) = attn(fq, fk, v)
    first, state = attn(fq[:, :, :13], fk[:, :, :13], v[:, :, :13])
    second, (kv2, z2) = attn(fq[:, :, 13:], fk[:, :, 13:], v[:, :, 13:], state=state)
    torch.testing.assert_close(torch.cat([first, second], 2), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kv2, kv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z2, z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole, naive_linear_attention(fq, fk, v), rtol=1e-5, atol=1e-6)


def test_triton_rf_attention_refuses_a_custom_kernel_and_bad_settings():
    def rational_fourier_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, num_heads, seq_len, d_head, BLOCK_SIZE):
        pass

    with pytest.raises(BackendFeatureError, match="kernel=None"):
        TritonRFAttention(kernel=rational_fourier_attention_kernel, block_size=128)
    with pytest.raises(ConfigError, match="block_size"):
        TritonRFAttention(block_size=0)
    fq, fk, v = features(T=4, dtype=torch.float32)
    with pytest.raises(InputError, match="state must be"):
        TritonRFAttention()(fq, fk, v, state=torch.zeros(3))


def test_records_are_registered_and_load():
    recs = {r.impl: r for r in registry.implementations("linear_attention")}
    assert set(recs) >= {"triton", "reference"} and recs["reference"].is_reference
    for rec in registry.LINEAR_ATTENTION_KERNELS:
        assert callable(rec.load()), rec.name
