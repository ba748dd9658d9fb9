"""Attention: the public entry point, its input checks, and the plain PyTorch reference.

Shapes: q (B, H, T, D); k and v (B, Hkv, T, D) with H a multiple of Hkv (grouped-query heads: query head h
reads key/value head h // (H // Hkv)). Output (B, H, T, D) in q's dtype; log-sum-exp (B, H, T) in fp32,
natural log, of the scaled scores over the keys each query sees.

Masking: with ``causal`` query i sees keys j <= i; a ``window`` w (causal only) further limits it to the
last w positions, i - w < j <= i (itself included, so window=1 attends to itself alone).

The Triton kernel is in ``attn_triton``; this module imports no triton.
"""

from __future__ import annotations

import math
from typing import Any

from .registry import dispatch


def check_attention_inputs(q, k, v, causal: bool, window: int | None) -> None:
    """Raise ValueError naming the offending argument if the inputs are not (B, H, T, D) / (B, Hkv, T, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, T, D); got {tuple(q.shape)=}, {tuple(k.shape)=}, {tuple(v.shape)=}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape; got {tuple(k.shape)=} and {tuple(v.shape)=}")
    (batch, heads, seq_len, head_dim), kv_heads = q.shape, k.shape[1]
    if k.shape[0] != batch or k.shape[2] != seq_len or k.shape[3] != head_dim:
        raise ValueError(f"k must be (B, Hkv, T, D) = ({batch}, Hkv, {seq_len}, {head_dim}); got {tuple(k.shape)}")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"{heads=} must be a multiple of {kv_heads=}")
    if seq_len < 1:
        raise ValueError(f"{seq_len=} must be >= 1")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if window is not None:
        if not causal:
            raise ValueError(f"{window=} needs causal=True (a sliding window looks back only)")
        if int(window) != window or window < 1:
            raise ValueError(f"{window=} must be a positive integer or None")


def attention_meta(q, k, causal: bool, window: int | None, return_lse: bool) -> dict[str, Any]:
    """The shape facts the registry's predicates look at."""
    return {"batch": q.shape[0], "num_heads": q.shape[1], "num_kv_heads": k.shape[1], "seq_len": q.shape[2],
            "head_dim": q.shape[3], "causal": causal, "window": window, "return_lse": return_lse}


def attention(q, k, v, *, causal: bool = True, window: int | None = None, scale: float | None = None,
              return_lse: bool = False, impl: str | None = None):
    """Softmax attention, (B, H, T, D) x (B, Hkv, T, D) -> (B, H, T, D); with ``return_lse`` also (B, H, T).

    ``scale`` defaults to 1/sqrt(D). ``impl`` forces an implementation by name ("triton", "sdpa",
    "reference"); by default the registry picks one for q's device and dtype.
    """
    check_attention_inputs(q, k, v, causal, window)
    meta = attention_meta(q, k, causal, window, return_lse)
    kwargs = {"causal": causal, "window": window, "scale": scale, "return_lse": return_lse}
    return dispatch("attention", (q, k, v), kwargs, device=q.device, dtype=q.dtype, meta=meta, impl=impl)


def visible_mask(seq_len: int, causal: bool, window: int | None, device=None):
    """(T, T) bool: True where query i (row) may attend to key j (column)."""
    import torch

    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= i
    if window is not None:
        mask &= j > i - window
    return mask


def reference_attention(q, k, v, causal: bool = True, window: int | None = None, scale: float | None = None, *,
                        dropout_p: float = 0.0, return_lse: bool = True):
    """The ground truth: (o, lse) by plain matmuls in at least fp32, materialising the (T, T) scores.

    o = dropout(softmax(scale * q k^T + mask)) v in q's dtype; lse = logsumexp(scale * q k^T + mask) (B, H, T)
    in fp32 (fp64 for fp64 inputs), of the scores before dropout. ``dropout_p`` > 0 drops probabilities
    with F.dropout (the global RNG; the caller decides whether it is training). With ``return_lse=False``
    only o is returned and no log-sum-exp is computed (nor its input kept for the backward). Differentiable
    by autograd; autocast is off inside, so the math is the same with or without it.
    """
    import torch
    import torch.nn.functional as F

    groups = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        kf, vf = k.to(acc), v.to(acc)
        if groups > 1:
            kf, vf = kf.repeat_interleave(groups, dim=1), vf.repeat_interleave(groups, dim=1)  # (B, H, T, D)
        # scaled and masked in place: the matmul's backward needs its inputs, not its output
        scores = (q.to(acc) @ kf.transpose(-1, -2)).mul_(scale)  # (B, H, T, T)
        scores.masked_fill_(~visible_mask(q.shape[2], causal, window, q.device), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1) if return_lse else None  # (B, H, T)
        probs = scores.softmax(-1)
        del scores  # only softmax's output is kept (and logsumexp's input, when it ran)
        if dropout_p:
            probs = F.dropout(probs, dropout_p)
        o = (probs @ vf).to(q.dtype)
    return (o, lse) if return_lse else o


def reference_impl(q, k, v, *, causal=True, window=None, scale=None, return_lse=False):
    """Registry entry for the reference."""
    return reference_attention(q, k, v, causal, window, scale, return_lse=return_lse)


def sdpa_impl(q, k, v, *, causal=True, window=None, scale=None, return_lse=False):
    """Registry entry for torch's scaled_dot_product_attention (no window, no log-sum-exp).

    The backend list is pinned so a recompute runs the very kernel the forward ran.
    """
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if window is not None or return_lse:
        raise ValueError("sdpa supports neither window nor return_lse")  # the registry predicate excludes these
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
    with sdpa_kernel(backends, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
