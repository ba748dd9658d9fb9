"""Causal linear attention with a normaliser and a floor: the public entry point, its checks, the plain
PyTorch reference, and the user's module ``TritonRFAttention``.

Features fq, fk (B, H, T, M) and values v (B, H, T, hd), one float dtype. With an incoming state kv0
(B, H, M, hd) and z0 (B, H, M) (the sums of earlier tokens; zeros when absent) and S_i, Z_i the sums up to i:

    S_i = kv0 + sum_{j<=i} fk_j v_j^T        Z_i = z0 + sum_{j<=i} fk_j
    s_i = fq_i . Z_i                          d_i = max(floor_i, s_i), and 1 where that is 0
    out_i = fq_i^T S_i / d_i

``floor`` (B, T) is the least denominator of each query (shared by the heads; None: no floor). Where d_i
would be 0 (a query that sees no key, whose numerator is 0 too) the output is 0, not 0/0. The state after
the last token, (S_T, Z_T), is returned too: a later call continues from it exactly.

Implementations (``registry.LINEAR_ATTENTION_KERNELS``): ``triton`` (``linear_attn_triton``, CUDA and ROCm)
and ``reference`` (below, everywhere). ``TritonRFAttention`` is the module over ``linear_attention``. This
module imports no triton.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from revnet_core.errors import BackendFeatureError, ConfigError, InputError

from .registry import dispatch

DEFAULT_CHUNK = 64


def check_linear_attention_inputs(fq, fk, v, kv0=None, z0=None, floor=None) -> None:
    """Raise InputError naming the offending argument unless the shapes, dtypes and devices fit together."""
    if fq.dim() != 4 or fk.dim() != 4 or v.dim() != 4:
        raise InputError(f"fq, fk, v must be (B, H, T, M), (B, H, T, M), (B, H, T, hd); got {tuple(fq.shape)}, "
                         f"{tuple(fk.shape)}, {tuple(v.shape)}")
    if fq.shape != fk.shape:
        raise InputError(f"fq and fk must have one shape; got {tuple(fq.shape)} and {tuple(fk.shape)}")
    B, H, T, M = fq.shape
    if T < 1 or M < 1:
        raise InputError(f"fq must have at least one token and one feature; got {tuple(fq.shape)}")
    if v.shape[:3] != (B, H, T):
        raise InputError(f"v must be (B, H, T, hd) = ({B}, {H}, {T}, hd); got {tuple(v.shape)}")
    if not (fq.dtype == fk.dtype == v.dtype) or not fq.dtype.is_floating_point:
        raise InputError(f"fq, fk, v must share one float dtype; got {fq.dtype}, {fk.dtype}, {v.dtype}")
    if not (fq.device == fk.device == v.device):
        raise InputError(f"fq, fk, v must be on one device; got {fq.device}, {fk.device}, {v.device}")
    if (kv0 is None) != (z0 is None):
        raise InputError("pass both kv0 and z0 (the state of earlier tokens) or neither")
    for name, t, shape in (("kv0", kv0, (B, H, M, v.shape[3])), ("z0", z0, (B, H, M)), ("floor", floor, (B, T))):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise InputError(f"{name} must have shape {shape}; got {tuple(t.shape)}")
        if t.device != fq.device:
            raise InputError(f"{name} is on {t.device} but fq is on {fq.device}")


def linear_attention_meta(fq, v, kv0=None, floor=None) -> dict[str, Any]:
    """The shape facts the registry's predicates look at."""
    return {"feature_width": fq.shape[3], "head_dim": v.shape[3], "has_state": kv0 is not None,
            "floor_grad": floor is not None and floor.requires_grad}


def linear_attention(fq, fk, v, *, floor=None, kv0=None, z0=None, chunk_size: int = DEFAULT_CHUNK,
                     impl: str | None = None):
    """Causal linear attention (module docstring): -> (out (B, H, T, hd) in v's dtype, kv (B, H, M, hd),
    z (B, H, M), the sums after the last token). Differentiable in fq, fk, v, kv0, z0 (and floor with the
    reference). ``chunk_size``: tokens per chunk (the reference's exactly; the Triton kernel rounds it to a
    power of two in [16, 128], a tiling choice that changes only the rounding). ``impl`` forces
    "triton" or "reference"; by default the registry picks for fq's device and dtype."""
    check_linear_attention_inputs(fq, fk, v, kv0, z0, floor)
    meta = linear_attention_meta(fq, v, kv0, floor)
    kwargs = {"floor": floor, "kv0": kv0, "z0": z0, "chunk_size": chunk_size}
    return dispatch("linear_attention", (fq, fk, v), kwargs, device=fq.device, dtype=fq.dtype, meta=meta, impl=impl)


def reference_linear_attention(fq, fk, v, chunk_size: int = DEFAULT_CHUNK, kv0=None, z0=None, floor=None):
    """The ground truth over chunks of ``chunk_size``: inside a chunk the masked (C, C) product, across chunks
    exclusive prefix sums of each chunk's fk^T v and fk. Plain autograd ops in the inputs' dtype.
    -> (out (B, H, T, hd), kv (B, H, M, hd), z (B, H, M))."""
    B, H, T, M = fq.shape
    C = max(1, min(chunk_size, T))
    n = -(-T // C)
    pad = n * C - T
    if pad:  # zero features add nothing to any sum; the padded queries' outputs are cut off
        fq, fk, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
    fq_c, fk_c, v_c = (t.unflatten(2, (n, C)) for t in (fq, fk, v))  # (B, H, n, C, .)
    mask = torch.ones(C, C, dtype=torch.bool, device=fq.device).tril()
    a = (fq_c @ fk_c.transpose(-1, -2)) * mask  # (B, H, n, C, C): inside each chunk
    num = a @ v_c
    den = a.sum(-1)
    # The running sums in fp32 at least (as the kernel keeps them), rounded to the inputs' dtype where they
    # meet the queries: a bf16 running sum stops growing once a chunk's share of it falls below bf16's
    # resolution (about 256 chunks), and CUDA's bf16 cumsum accumulates in bf16.
    acc = torch.promote_types(fq.dtype, torch.float32)
    kv_chunk = (fk_c.transpose(-1, -2) @ v_c).to(acc)  # (B, H, n, M, hd)
    z_chunk = fk_c.to(acc).sum(-2)  # (B, H, n, M)
    kv_before = kv_chunk.cumsum(2) - kv_chunk  # exclusive prefix sums over chunks
    z_before = z_chunk.cumsum(2) - z_chunk
    if kv0 is not None:
        kv_before = kv_before + kv0[:, :, None].to(acc)
        z_before = z_before + z0[:, :, None].to(acc)
    kv_end = (kv_before[:, :, -1] + kv_chunk[:, :, -1]).to(fq.dtype)
    z_end = (z_before[:, :, -1] + z_chunk[:, :, -1]).to(fq.dtype)
    num = num + fq_c @ kv_before.to(fq.dtype)
    den = (den.to(acc) + (fq_c.to(acc) * z_before[:, :, :, None, :]).sum(-1)).flatten(2, 3)[:, :, :T]
    out = num.flatten(2, 3)[:, :, :T] / normaliser(den, floor)[..., None].to(num.dtype)
    return out, kv_end, z_end


def normaliser(s, floor=None):
    """(B, H, T) sums s -> the denominators max(floor, s) (floor (B, T) or None), with 1 where that is 0."""
    den = s if floor is None else torch.maximum(s, floor[:, None].to(s.dtype))
    # A query that sees no key (all masked) has num = 0 and den = 0: its output is 0, not 0/0.
    return torch.where(den == 0, torch.ones_like(den), den)


def naive_linear_attention(fq, fk, v, floor=None):
    """The same function without chunks or state, by the full masked (T, T) product (a test oracle)."""
    T = fq.shape[-2]
    a = (fq @ fk.transpose(-1, -2)) * torch.ones(T, T, dtype=torch.bool, device=fq.device).tril()
    return (a @ v) / normaliser(a.sum(-1), floor)[..., None]


def reference_impl(fq, fk, v, *, floor=None, kv0=None, z0=None, chunk_size=DEFAULT_CHUNK):
    """Registry entry for the reference."""
    return reference_linear_attention(fq, fk, v, chunk_size, kv0, z0, floor)




class TritonRFAttention(nn.Module):
    """Causal linear attention over given features through the per-device kernel: Triton's on CUDA and ROCm,
    the PyTorch reference elsewhere (``impl`` forces one, e.g. "triton" on CPU under TRITON_INTERPRET=1).

    ``TritonRFAttention(kernel=None, block_size=64, impl=None)``: ``block_size`` tokens per chunk (the
    README's ``block_size=128`` works). ``kernel`` None runs the built-in forward/backward pair; a user's own
    ``@triton.jit`` kernel is refused with ``BackendFeatureError`` (its README signature carries neither the
    feature width, the floor, the state nor a backward, so it could not stand in for the built-in pair).

    ``forward(fq, fk, v, floor=None, state=None)``: features fq, fk (B, H, T, M) (such as
    ``RationalFourierAttention.feature_map`` gives), values v (B, H, T, hd), one float dtype; floor (B, T) or
    None; state None, a pair (kv0 (B, H, M, hd), z0 (B, H, M)) or an ``RFState`` to continue from. Returns
    (out (B, H, T, hd) in v's dtype, (kv, z) the sums after the last token, to pass as the next ``state``).
    """

    def __init__(self, kernel=None, block_size: int = DEFAULT_CHUNK, impl: str | None = None):
        super().__init__()
        if kernel is not None:
            raise BackendFeatureError(
                "TritonRFAttention(kernel=...) runs only its built-in Triton kernels (forward and backward, with "
                "the normaliser's floor and the decoding state); pass kernel=None, and block_size= for the chunk")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"block_size={block_size!r} must be a positive integer")
        self.block_size = block_size
        self.impl = impl

    def forward(self, fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, floor: torch.Tensor | None = None,
                state=None):
        if state is None:
            kv0 = z0 = None
        elif isinstance(state, (tuple, list)) and len(state) == 2:
            kv0, z0 = state
        elif hasattr(state, "kv") and hasattr(state, "z"):
            kv0, z0 = state.kv, state.z
        else:
            raise InputError(f"state must be None, a pair (kv0, z0) or an RFState; got {type(state).__name__}")
        out, kv, z = linear_attention(fq, fk, v, floor=floor, kv0=kv0, z0=z0, chunk_size=self.block_size,
                                      impl=self.impl)
        return out, (kv, z)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, impl={self.impl!r}"
