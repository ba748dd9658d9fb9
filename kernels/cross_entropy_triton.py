"""Fused linear + cross-entropy in Triton: per chunk of rows, one matmul into a reused logits buffer, one
Triton pass that turns those logits into the loss and, in place, into their gradient, then two matmuls for
dh and dW. The buffer is (chunk, V) in the compute dtype; nothing else is vocabulary-wide per row. The
weight is zero-padded to a multiple of 64 rows when it is not one (cuBLAS is 5-6x slower on V = 50257).

Layers: the private ``@triton.jit`` kernel; the host ``linear_cross_entropy_forward`` (loss and gradients);
the shared autograd Function in ``cross_entropy`` (through ``apply_linear_ce``); the functional
``triton_linear_cross_entropy``.
Reference: ``cross_entropy.reference_linear_cross_entropy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .cross_entropy import IGNORE_INDEX, apply_linear_ce, fused_layout
from .utils import compute_dtype, interpreting, next_power_of_2


@dataclass(frozen=True)
class CrossEntropyBlocks:
    """Vocabulary columns per step of the row program, and warps."""

    block_v: int = 4096
    num_warps: int = 8

    @classmethod
    def get_default(cls, vocab: int) -> "CrossEntropyBlocks":
        if interpreting():
            return cls(min(next_power_of_2(vocab), 256), 1)
        return cls(min(next_power_of_2(vocab), 4096), 8)


@triton.jit
def _ce_rows(LOGITS, TARGETS, LOSS, INV_COUNT, stride_l, V, ignore_index,
             NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row r of z = LOGITS with target t: lse = log sum_v exp(z_v) (one streaming pass, running max and sum),
    LOSS[r] = lse - z_t, or 0 when t = ignore_index (NaN when t is outside [0, V)). With NEED_GRAD a second
    pass overwrites z in place by dL/dz = (exp(z - lse) - [v = t]) * INV_COUNT (0 on ignored rows), in z's
    dtype."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    t = tl.load(TARGETS + row)
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))  # finite: every step holds at least one column < V
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    valid = t != ignore_index
    in_range = (t >= 0) & (t < V)
    # A target outside [0, V) reads nothing out of bounds and makes its loss and gradients NaN: loud, not wrong.
    z_t = tl.load(base + tl.where(valid & in_range, t, 0)).to(tl.float32)
    z_t = tl.where(in_range, z_t, float("nan"))
    tl.store(LOSS + row, tl.where(valid, lse - z_t, 0.0))
    if NEED_GRAD:
        scale = tl.where(valid, tl.where(in_range, tl.load(INV_COUNT), float("nan")), 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) * scale
            g = tl.where(cols == t, g - scale, g)
            tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=cols < V)


def linear_cross_entropy_forward(h, w, targets, ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None,
                                 need_dh: bool = True, need_dw: bool = True, blocks: CrossEntropyBlocks | None = None,
                                 pad_vocab: bool | None = None):
    """(loss, dh, dw): loss scalar fp32; dh (N, d) in h's dtype; dw (V, d) fp32 (unscaled by the upstream
    gradient). h (N, d), w (V, d), targets (N,) int64. No autograd.

    ``pad_vocab`` (default: when V is not a multiple of 64) multiplies by a zero-padded copy of the weight,
    (V rounded up to 64, d). With V = 50257 as a matmul dimension cuBLAS ran at 91-116 TFLOP/s on an H100,
    padded at 600-645: the whole loss 86 ms -> 30 ms at 32k tokens. The copy takes the memory of half the
    default logits chunk, so the default chunk is halved when padding (measured: 39 ms, 0.34 GiB above the
    inputs, 0.11 of the bf16 logits; docs/benchmarks/kernels.md).
    """
    cdt = compute_dtype(h)
    (n_rows, d), vocab = h.shape, w.shape[0]
    chunk, padded, pad_vocab = fused_layout(vocab, n_rows, pad_vocab, chunk_size)
    blocks = blocks or CrossEntropyBlocks.get_default(vocab)
    need_grad = need_dh or need_dw
    targets = targets.contiguous()
    valid_count = (targets != ignore_index).sum()
    inv_count = (1.0 / valid_count.clamp(min=1).float()).reshape(1)
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=h.device)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_dh else None
    # Rows of the logits buffer start 128-byte aligned: with an odd vocabulary (50257) as leading dimension
    # cuBLAS leaves its tensor-core path.
    width = padded if pad_vocab else vocab  # the matmuls' vocabulary dimension
    dw = torch.zeros((width, d), dtype=torch.float32, device=w.device) if need_dw else None
    with torch.autocast(h.device.type, enabled=False):
        if pad_vocab:
            wc = torch.zeros((padded, d), dtype=cdt, device=w.device)
            wc[:vocab] = w  # pad rows stay 0, so their logits are exactly 0 and their gradients never matter
        else:
            wc = w.to(cdt)
        logits = torch.empty((chunk, padded), dtype=cdt, device=h.device)  # reused by every chunk
        # dW's chunk product lands here before the fp32 sum (cuBLAS cannot add a bf16 product into fp32)
        dw_part = torch.empty(wc.shape, dtype=cdt, device=w.device) if need_dw and cdt != torch.float32 else None
        for s in range(0, n_rows, chunk):
            hc = h[s:s + chunk].to(cdt)
            z = logits[:hc.shape[0], :width]  # (n, width), row stride `padded`
            torch.mm(hc, wc.T, out=z)
            _ce_rows[(hc.shape[0],)](z, targets[s:s + chunk], loss_rows[s:s + chunk], inv_count, z.stride(0), vocab,
                                     ignore_index, NEED_GRAD=need_grad, BLOCK_V=blocks.block_v,
                                     num_warps=blocks.num_warps)
            if dh is not None:
                if dh.dtype == cdt:
                    torch.mm(z, wc, out=dh[s:s + chunk])
                else:
                    dh[s:s + chunk] = z @ wc
            if dw is not None:
                if dw_part is None:
                    dw.addmm_(z.T, hc)
                else:
                    torch.mm(z.T, hc, out=dw_part)
                    dw.add_(dw_part)
    return loss_rows.sum() * inv_count[0], dh, (dw[:vocab] if dw is not None else None)


def _forward_fn(h, w, targets, ignore_index, chunk_size, need_dh, need_dw):
    return linear_cross_entropy_forward(h, w, targets, ignore_index, chunk_size, need_dh, need_dw)


def triton_linear_cross_entropy(hidden, weight, targets, ignore_index: int = IGNORE_INDEX,
                                chunk_size: int | None = None):
    """Differentiable mean cross-entropy: hidden (N, d), weight (V, d), targets (N,) int64 -> scalar fp32."""
    return apply_linear_ce(hidden, weight, targets.long(), ignore_index, chunk_size, _forward_fn)


def triton_impl(hidden, weight, targets, *, ignore_index=IGNORE_INDEX, chunk_size=None):
    """Registry entry."""
    return triton_linear_cross_entropy(hidden, weight, targets, ignore_index, chunk_size)
