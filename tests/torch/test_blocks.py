"""The blocks' own pieces against plain references (the engine tests cannot see an error both paths share)."""

import torch

from revnet_torch import blocks
from revnet_torch.blocks import FeedForwardBlock, Rotary


def plain_rope(x, cos, sin):
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def test_rotary_matches_plain_formula_and_gradcheck(monkeypatch):
    monkeypatch.setattr(blocks, "ROPE_CHUNK", 3)  # several chunks on a short sequence
    rope = Rotary(8, 10000.0)
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = rope.cos_sin(7, x.device)
    torch.testing.assert_close(rope(x), plain_rope(x, cos.double(), sin.double()).to(x.dtype), rtol=1e-6, atol=1e-6)
    torch.autograd.gradcheck(lambda t: rope(t), (x,))


def test_rotary_preserves_norm_and_relative_positions():
    torch.manual_seed(0)
    rope = Rotary(16, 10000.0)
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64).expand(1, 1, 9, 16).contiguous()
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64).expand(1, 1, 9, 16).contiguous()
    rq, rk = rope(q), rope(k)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    scores = rq[0, 0] @ rk[0, 0].T  # depends on i - j only
    # the angles are fp32 tables (as the model uses them): equal to fp32 rounding, not fp64's
    torch.testing.assert_close(torch.diagonal(scores, 2)[:-1], torch.diagonal(scores, 2)[1:], rtol=1e-6, atol=1e-6)


def test_ffn_chunks_equal_whole_sequence():
    torch.manual_seed(0)
    ffn = FeedForwardBlock(8, 16, 8, activation="swiglu").double()
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    whole = ffn(x)
    ffn.chunk_size = 4
    torch.testing.assert_close(ffn(x), whole, rtol=0, atol=1e-14)
    assert len(ffn.chunks(11)) == 3


def test_blocks_run_their_norms_and_activations_through_the_kernel_registry(monkeypatch):
    """Forcing an implementation by REVNET_KERNELS reaches the blocks: each FFN norm and activation call is
    the registry's, and the forced reference computes the same function (fp64)."""
    import revnet_kernels.activations as acts
    import revnet_kernels.norms as norms
    from revnet_kernels import registry

    torch.manual_seed(0)
    ffn = FeedForwardBlock(16, 24, 16, activation="swiglu", chunk_size=5).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    default = ffn(x)
    calls = []
    monkeypatch.setattr(registry, "_loaded", {})  # load the spies below, not the cached functions
    monkeypatch.setattr(norms, "reference_layer_norm",
                        lambda *a: calls.append("norm") or norms.torch_layer_norm(*a))
    monkeypatch.setattr(acts, "reference_activation", lambda u, k: calls.append(k) or acts.torch_activation(u, k))
    monkeypatch.setenv(registry.ENV_VAR, "layer_norm=reference,activation=reference")
    forced = ffn(x)
    assert calls == ["norm", "swiglu"] * 3  # three sequence chunks of 5, 5 and 2 tokens
    torch.testing.assert_close(forced, default, rtol=0, atol=0)
