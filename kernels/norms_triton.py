"""Fused LayerNorm / RMSNorm in Triton, forward and backward (input, weight and bias gradients).

Layers: private ``@triton.jit`` kernels; host ``norm_forward`` / ``norm_backward``; the autograd
``FusedNorm``; functionals ``triton_layer_norm`` / ``triton_rms_norm``. References: ``norms.reference_*``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import registry
from .norms import MAX_HIDDEN, check_norm_inputs, reference_layer_norm, reference_rms_norm
from .utils import cdiv, interpreting, multiprocessors, next_power_of_2


@dataclass(frozen=True)
class NormBlocks:
    """Launch settings: warps per row program and how many programs share the weight-gradient sums."""

    num_warps: int = 4
    programs_per_sm: int = 4

    @classmethod
    def get_default(cls, hidden: int) -> "NormBlocks":
        if interpreting():
            return cls(1, 1)
        return cls(num_warps=min(max(next_power_of_2(hidden) // 256, 1), 16))


@triton.jit
def _norm_fwd(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, N, eps,
              RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """One row per program. LayerNorm: mu = mean(x), rstd = (mean((x - mu)^2) + eps)^-1/2,
    y = (x - mu) rstd w + b. RMSNorm: mu = 0, rstd = (mean(x^2) + eps)^-1/2, y = x rstd w.
    Stores mu and rstd (fp32) for the backward."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, 0) / N
        xc = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / N + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    y = xc * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=ok)
    if not RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_bwd(X, W, DY, DX, MEAN, RSTD, DW_PART, DB_PART, stride_x, stride_dy, stride_dx, M, N, rows_per_program,
              RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """With xh = (x - mu) rstd and g = w dy:
    LayerNorm dx = rstd (g - mean(g) - xh mean(g xh)); RMSNorm dx = rstd (g - xh mean(g xh));
    dw = sum_rows dy xh, db = sum_rows dy. Each program walks a run of rows and writes its partial dw, db
    (fp32) to row pid of DW_PART / DB_PART; the host sums those."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    # advance row pointers instead of indexing by the loop variable: pointers are 64-bit, row indices not
    X += first.to(tl.int64) * stride_x
    DY += first.to(tl.int64) * stride_dy
    DX += first.to(tl.int64) * stride_dx
    MEAN += first
    RSTD += first
    for _ in range(first, last):
        x = tl.load(X + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD)
        if RMS:
            xh = x * rstd
        else:
            xh = tl.where(ok, (x - tl.load(MEAN)) * rstd, 0.0)
        g = w * dy
        c1 = tl.sum(xh * g, 0) / N
        if RMS:
            dx = (g - xh * c1) * rstd
        else:
            dx = (g - xh * c1 - tl.sum(g, 0) / N) * rstd
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=ok)
        dw += dy * xh
        if HAS_BIAS:
            db += dy
        X += stride_x
        DY += stride_dy
        DX += stride_dx
        MEAN += 1
        RSTD += 1
    tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw, mask=ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid.to(tl.int64) * N + cols, db, mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def norm_forward(x, weight, bias, eps: float, rms: bool, blocks: NormBlocks | None = None):
    """(y, mean, rstd): y like x; mean, rstd (rows,) fp32 (mean is empty for RMSNorm). No autograd."""
    check_norm_inputs(x, weight, bias)
    n = x.shape[-1]
    if n > MAX_HIDDEN:
        raise ValueError(f"hidden={n} must be <= {MAX_HIDDEN} (one row per Triton block)")
    blocks = blocks or NormBlocks.get_default(n)
    x2 = _rows(x)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    mean = torch.empty(0 if rms else m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        _norm_fwd[(m,)](x2, weight, bias if bias is not None else weight, y, mean if not rms else rstd, rstd,
                        x2.stride(0), y.stride(0), n, eps, RMS=rms, HAS_BIAS=bias is not None,
                        BLOCK_N=next_power_of_2(n), num_warps=blocks.num_warps)
    return y.view(x.shape), mean, rstd


def norm_backward(dy, x, weight, has_bias: bool, mean, rstd, rms: bool, blocks: NormBlocks | None = None):
    """(dx, dw, db): dx like x, dw like weight, db (N,) in weight's dtype or None. No autograd."""
    n = x.shape[-1]
    blocks = blocks or NormBlocks.get_default(n)
    x2, dy2 = _rows(x), _rows(dy)
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    programs = max(1, min(m, multiprocessors(x.device) * blocks.programs_per_sm))
    dw_part = torch.zeros((programs, n), dtype=torch.float32, device=x.device)
    db_part = torch.zeros((programs, n), dtype=torch.float32, device=x.device) if has_bias else dw_part
    if m:
        _norm_bwd[(programs,)](x2, weight, dy2, dx, mean if not rms else rstd, rstd, dw_part, db_part,
                               x2.stride(0), dy2.stride(0), dx.stride(0), m, n, cdiv(m, programs), RMS=rms,
                               HAS_BIAS=has_bias, BLOCK_N=next_power_of_2(n), num_warps=blocks.num_warps)
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype) if has_bias else None
    return dx.view(x.shape), dw, db


class FusedNorm(torch.autograd.Function):
    """(x, weight, bias, eps, rms) -> y; saves x, weight, mean and rstd ((rows,) fp32 each)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        y, mean, rstd = norm_forward(x, weight, bias, eps, rms)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.eps, ctx.rms = eps, rms
        ctx.selected = registry.auto_selected()
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        try:
            dx, dw, db = norm_backward(dy, x, weight, bias is not None, mean, rstd, ctx.rms)
        except Exception as exc:
            if not registry.backward_failed(ctx.selected, x.device, exc):
                raise
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
                if ctx.rms:
                    ref = reference_rms_norm(inputs[0], inputs[1], ctx.eps)
                else:
                    ref = reference_layer_norm(*inputs, ctx.eps)
                grads = torch.autograd.grad(ref, [t for t in inputs if t is not None], dy)
            dx, dw, db = (*grads, None)[:3]
        return dx, dw, db, None, None


def triton_layer_norm(x, weight, bias=None, eps: float = 1e-5):
    """Differentiable LayerNorm: x (..., N), weight (N,), bias (N,) or None -> (..., N) in x's dtype."""
    return FusedNorm.apply(x, weight, bias, eps, False)


def triton_rms_norm(x, weight, eps: float = 1e-5):
    """Differentiable RMSNorm: x (..., N), weight (N,) -> (..., N) in x's dtype."""
    return FusedNorm.apply(x, weight, None, eps, True)
