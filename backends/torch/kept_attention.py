"""Attention whose forward hands back what its backward needs, so a reversible backward can skip the kernel.

A fused attention backward needs q, k, v, the output o and the log-sum-exp of each score row; it does not need
the forward to run again. The ``reverse_keep_attention`` policy keeps o and the log-sum-exp of every head from
the forward (2 bytes x d + 4 bytes x heads a token under bf16) and rebuilds q, k, v from the rebuilt stream,
which costs three matmuls instead of the attention kernel (most of a long-context step).

``forward(q, k, v, causal) -> (o, Kept)`` and ``backward(do, q, k, v, o, kept, causal) -> (dq, dk, dv)`` call
PyTorch's own fused kernels by their ATen names, chosen per device and dtype:

- CUDA, 16-bit: cuDNN's attention where it takes the inputs (PyTorch's first choice on Hopper), else
  FlashAttention-2; the choice is made once per (device, dtype, head dim) and remembered.
- CUDA, fp32: the memory-efficient kernel (flash and cuDNN take 16-bit inputs only).
- CPU: PyTorch's CPU flash kernel, which takes fp32 and fp64 (the fp64 tests).

All q, k, v, o, do are (B, h, T, hd); ``Kept`` holds the log-sum-exp and the kernel's bookkeeping.
No dropout: the policy refuses layers that draw random numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

aten = torch.ops.aten

_CHOICE: dict[tuple, str] = {}  # (device, dtype, head dim) -> the CUDA kernel family that took the inputs


@dataclass
class Kept:
    """What one head chunk's backward needs besides q, k, v and o: the kernel family that ran and its
    outputs (the log-sum-exp first, then kernel-specific bookkeeping such as sequence offsets)."""

    family: str
    lse: torch.Tensor
    aux: tuple[Any, ...] = ()


def family(q: torch.Tensor) -> str:
    """The kernel family ``forward`` will run for inputs like q: "cpu", "efficient", "cudnn" or "flash"."""
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type != "cuda":
        raise NotImplementedError(f"reverse_keep_attention has no kernel for device {q.device.type!r}")
    if q.dtype == torch.float32:
        return "efficient"
    return _CHOICE.get((q.device, q.dtype, q.shape[-1]), "cudnn")


def _run(fam: str, q, k, v, causal: bool):
    if fam == "cpu":
        o, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
        return o, Kept(fam, lse)
    if fam == "efficient":
        o, lse, seed, offset = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)
        return o, Kept(fam, lse, (seed, offset))
    if fam == "cudnn":
        o, lse, cq, ck, mq, mk, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False)
        return o, Kept(fam, lse, (cq, ck, mq, mk, seed, offset))
    o, lse, cq, ck, mq, mk, seed, offset, _ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)
    return o, Kept("flash", lse, (cq, ck, mq, mk, seed, offset))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> tuple[torch.Tensor, Kept]:
    """softmax(q k^T / sqrt(hd)) v, causal or not: (B, h, T, hd) each -> (o (B, h, T, hd), Kept)."""
    fam = family(q)
    if fam != "cudnn":
        return _run(fam, q, k, v, causal)
    key = (q.device, q.dtype, q.shape[-1])
    try:
        out = _run("cudnn", q, k, v, causal)
    except RuntimeError:  # cuDNN refuses some shapes or builds: FlashAttention-2 takes them
        _CHOICE[key] = "flash"
        return _run("flash", q, k, v, causal)
    _CHOICE[key] = "cudnn"
    return out


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, kept: Kept,
             causal: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each (B, h, T, hd), of ``forward``'s output at cotangent do, from the kept state.
    do must be laid out like o (the fused backwards read both with one set of strides)."""
    fam, lse = kept.family, kept.lse
    if fam == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o, lse, 0.0, causal)
    if fam == "efficient":
        seed, offset = kept.aux
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            do, q, k, v, None, o, lse, seed, offset, 0.0, [True, True, True, False], causal)
        return dq, dk, dv
    cq, ck, mq, mk, seed, offset = kept.aux
    if fam == "cudnn":
        return aten._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, o, lse, seed, offset, None, cq, ck, mq, mk, 0.0, causal)
    return aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, o, lse, cq, ck, mq, mk, 0.0, causal, seed, offset)
