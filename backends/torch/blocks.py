"""The two functions a reversible layer couples: F (causal self-attention) and G (feed-forward).

Both are pre-norm and map a stream (B, T, d) to a function output (B, T, out_features); the coupling decides
out_features (d for additive, 2d for affine). Neither touches a stream in place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# Pinned in both passes so the recompute runs the very kernel the forward ran (bit-identical outputs).
FUSED_SDPA = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
MATH_SDPA = [SDPBackend.MATH]


def make_norm(kind: str, d: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(d, eps=eps)
    return nn.LayerNorm(d, eps=eps)


ROPE_CHUNK = 16384  # tokens per chunk of the rotation: bounds its fp32 temporaries


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of (..., T, hd) by angles with cos/sin (T, hd/2).

    Math in fp32, or in x's dtype where that is wider (fp64 tests); the result in x's dtype."""
    out = torch.empty_like(x)
    T = x.shape[-2]
    math_dtype = torch.promote_types(x.dtype, torch.float32)
    for s in range(0, T, ROPE_CHUNK):
        xc = x[..., s:s + ROPE_CHUNK, :].to(math_dtype).unflatten(-1, (-1, 2))  # (..., t, hd/2, 2)
        a, b = xc[..., 0], xc[..., 1]
        c, n = cos[s:s + ROPE_CHUNK].to(math_dtype), sin[s:s + ROPE_CHUNK].to(math_dtype)
        out[..., s:s + ROPE_CHUNK, :] = torch.stack((a * c - b * n, a * n + b * c), dim=-1).flatten(-2)
    return out


class _RotaryFn(torch.autograd.Function):
    """A rotation is orthogonal: its backward is the rotation by the opposite angle. Saves only cos/sin."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


class Rotary(nn.Module):
    """Rotary positions shared by every layer. The canonical angles (every backend computes the same):
    inv_freq computed in float64 and rounded once to float32, angles = position * inv_freq in float32,
    cos/sin taken in the rotation's dtype, promote(x.dtype, float32)."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, T: int, device: torch.device, dtype: torch.dtype = torch.float32):
        """(cos, sin), each (T, head_dim/2) in ``dtype`` (at least float32)."""
        dtype = torch.promote_types(dtype, torch.float32)
        key = (T, device, dtype)
        if key not in self._cache:
            self._cache.clear()  # one length at a time: at 1M tokens a table is 128 MiB
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
            inv = (self.base ** -exponents).to(device=device, dtype=torch.float32)
            ang = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv).to(dtype)  # (T, hd/2)
            self._cache[key] = (ang.cos(), ang.sin())
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate (B, H, T, hd) pairs (x[2i], x[2i+1]) by position; result in x's dtype."""
        cos, sin = self.cos_sin(x.shape[-2], x.device, x.dtype)
        return _RotaryFn.apply(x, cos, sin)


def reference_attention(q, k, v, dropout_p: float = 0.0, training: bool = False):
    """Plain causal attention, (B, H, T, hd) -> (B, H, T, hd): the ground truth the kernels are tested on."""
    T = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    if dropout_p and training:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


class AttentionBlock(nn.Module):
    """F(x) = proj(attention(rope(q), rope(k), v)) over norm(x). (B, T, d) -> (B, T, out_features)."""

    def __init__(self, d_model, num_heads, out_features, rotary: Rotary, *, norm="layernorm", eps=1e-5,
                 attention="sdpa", use_flash_attention=True, attention_dropout=0.0, dropout=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm = make_norm(norm, d_model, eps)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, out_features, bias=False)
        self.rotary = [rotary]  # a list so the shared module is not registered once per layer
        self.attention = attention
        self.sdpa_backends = FUSED_SDPA if use_flash_attention else MATH_SDPA
        self.attention_dropout = attention_dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        qkv = self.qkv(self.norm(x)).view(B, T, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
        rope = self.rotary[0]
        # q and k become new tensors; a contiguous v lets the (B, T, 3d) projection be freed now rather
        # than live as v's base until the attention backward (1 GiB at 256k tokens).
        q, k, v = rope(q), rope(k), v.contiguous()
        del qkv
        p = self.attention_dropout if self.training else 0.0
        if self.attention == "reference":
            o = reference_attention(q, k, v, p, self.training)
        else:
            with sdpa_kernel(self.sdpa_backends, set_priority=True):
                o = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        o = o.transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        return self.drop(self.proj(o))


def activate(kind: str, u: torch.Tensor) -> torch.Tensor:
    if kind in ("geglu", "swiglu"):
        a, b = u.chunk(2, dim=-1)
        return (F.gelu(a, approximate="tanh") if kind == "geglu" else F.silu(a)) * b
    if kind == "gelu":
        return F.gelu(u, approximate="tanh")
    if kind == "gelu_exact":
        return F.gelu(u)
    if kind == "relu":
        return F.relu(u)
    return F.silu(u)


class FeedForwardBlock(nn.Module):
    """G(x) = down(act(up(norm(x)))); gated activations double ``up``. (B, T, d) -> (B, T, out_features).

    Acts token by token, so it runs over sequence chunks of ``chunk_size`` tokens (0: whole sequence): the
    (T, d_ff) intermediate never exists for the whole sequence. The reversible engine's backward walks the
    very same chunks, so every policy computes the same function, dropout draws included.
    """

    tokenwise = True

    def __init__(self, d_model, d_ff, out_features, *, activation="gelu", norm="layernorm", eps=1e-5, dropout=0.0,
                 chunk_size: int = 0):
        super().__init__()
        self.chunk_size = chunk_size
        gated = activation in ("geglu", "swiglu")
        self.activation = activation
        self.norm = make_norm(norm, d_model, eps)
        self.up = nn.Linear(d_model, (2 if gated else 1) * d_ff, bias=False)
        self.down = nn.Linear(d_ff, out_features, bias=False)
        self.drop = nn.Dropout(dropout)

    def chunks(self, T: int) -> list[tuple]:
        """Index tuples selecting each chunk of a (..., T, d) tensor, in order."""
        step = self.chunk_size if 0 < self.chunk_size < T else T
        return [(..., slice(s, min(s + step, T)), slice(None)) for s in range(0, T, step)]

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(activate(self.activation, self.up(self.norm(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.chunks(x.shape[-2])
        if len(parts) == 1:
            return self._transform(x)
        return torch.cat([self._transform(x[sl]) for sl in parts], dim=-2)
