"""Sliding-window causal attention for ``AttentionBlock(window=...)``: query i sees keys i - window < j <= i.

On CUDA it runs the Triton flash kernel of ``revnet_kernels`` (the registry's choice for windows: SDPA has no
window); elsewhere SDPA with an explicit (T, T) band mask, which is fine at the lengths a CPU trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from revnet_core.errors import ConfigError


def band_mask(T: int, window: int, device) -> torch.Tensor:
    """(T, T) bool, True where query i (row) may see key j (column): i - window < j <= i."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (j > i - window)


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                       dropout_p: float = 0.0) -> torch.Tensor:
    """(B, H, T, hd) q, k, v -> (B, H, T, hd) causal attention over the last ``window`` positions."""
    if dropout_p:
        raise ConfigError(f"attention_dropout={dropout_p} with a sliding window is not supported: the "
                          "windowed kernel has no dropout; set attention_dropout=0")
    if q.device.type == "cuda":
        from revnet_kernels.attn import attention

        return attention(q, k, v, causal=True, window=window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(q.shape[-2], window, q.device))
