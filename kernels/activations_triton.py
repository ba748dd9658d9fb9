"""FFN activations fused with their gate in Triton (GELU-tanh, SiLU, GeGLU, SwiGLU), forward and backward.

Layers: private ``@triton.jit`` kernels; host ``activation_forward`` / ``activation_backward``; the autograd
``FusedActivation``; the functional ``triton_activation``. Reference: ``activations.reference_activation``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import registry
from .activations import GATED, TRITON_KINDS, check_activation_inputs, reference_activation
from .utils import cdiv, interpreting

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_C = tl.constexpr(0.044715)


@dataclass(frozen=True)
class ActivationBlocks:
    """Columns per program and warps."""

    block: int = 1024
    num_warps: int = 4

    @classmethod
    def get_default(cls) -> "ActivationBlocks":
        return cls(256, 1) if interpreting() else cls()


@triton.jit
def _act_and_grad(a, GELU: tl.constexpr):
    """(f(a), f'(a)) in fp32. GELU-tanh, with t = tanh(c (a + k a^3)):
    f = a (1 + t) / 2,  f' = (1 + t) / 2 + a (1 - t^2) c (1 + 3 k a^2) / 2.
    SiLU, with s = sigmoid(a): f = a s,  f' = s (1 + a (1 - s)).
    Both saturating functions go through e = exp(-|z|) <= 1, which never overflows."""
    if GELU:
        z = SQRT_2_OVER_PI * (a + GELU_C * a * a * a)
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(z < 0, -t, t)
        f = 0.5 * a * (1.0 + t)
        df = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * a * a)
    else:
        e = tl.exp(-tl.abs(a))
        s = tl.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        f = a * s
        df = s * (1.0 + a * (1.0 - s))
    return f, df


@triton.jit
def _act_fwd(U, Y, stride_u, stride_y, F, GELU: tl.constexpr, GATED_: tl.constexpr, BLOCK: tl.constexpr):
    """y = f(a) * b (gated, a = u[:, :F], b = u[:, F:]) or y = f(u); one (row, column block) per program."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    a = tl.load(U + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    f, _ = _act_and_grad(a, GELU)
    if GATED_:
        f = f * tl.load(U + row * stride_u + F + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, f.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _act_bwd(U, DY, DU, stride_u, stride_dy, stride_du, F, GELU: tl.constexpr, GATED_: tl.constexpr,
             BLOCK: tl.constexpr):
    """Gated: da = dy b f'(a), db = dy f(a). Plain: du = dy f'(u). f is recomputed from u, never stored."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    a = tl.load(U + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
    f, df = _act_and_grad(a, GELU)
    if GATED_:
        b = tl.load(U + row * stride_u + F + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(DU + row * stride_du + cols, (dy * b * df).to(DU.dtype.element_ty), mask=ok)
        tl.store(DU + row * stride_du + F + cols, (dy * f).to(DU.dtype.element_ty), mask=ok)
    else:
        tl.store(DU + row * stride_du + cols, (dy * df).to(DU.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_args(u, kind, blocks):
    if kind not in TRITON_KINDS:  # the kernels know GELU-tanh and SiLU only: anything else would run SiLU
        raise ValueError(f"{kind=} has no Triton kernel; those are {TRITON_KINDS}")
    blocks = blocks or ActivationBlocks.get_default()
    gated = kind in GATED
    width = u.shape[-1] // 2 if gated else u.shape[-1]
    consts = dict(GELU=kind in ("gelu", "geglu"), GATED_=gated, BLOCK=blocks.block, num_warps=blocks.num_warps)
    return width, consts, blocks


def activation_forward(u, kind: str, blocks: ActivationBlocks | None = None):
    """y = activation(u): (..., W) -> (..., W or W/2) in u's dtype. No autograd."""
    check_activation_inputs(u, kind)
    width, consts, blocks = _launch_args(u, kind, blocks)
    u2 = _rows(u)
    y = torch.empty((u2.shape[0], width), dtype=u.dtype, device=u.device)
    if u2.shape[0]:
        _act_fwd[(u2.shape[0], cdiv(width, blocks.block))](u2, y, u2.stride(0), y.stride(0), width, **consts)
    return y.view(*u.shape[:-1], width)


def activation_backward(dy, u, kind: str, blocks: ActivationBlocks | None = None):
    """du from dy (..., W or W/2) and the saved input u (..., W); du in u's dtype. No autograd."""
    width, consts, blocks = _launch_args(u, kind, blocks)
    u2, dy2 = _rows(u), _rows(dy)
    du = torch.empty_like(u2)
    if u2.shape[0]:
        _act_bwd[(u2.shape[0], cdiv(width, blocks.block))](u2, dy2, du, u2.stride(0), dy2.stride(0), du.stride(0),
                                                           width, **consts)
    return du.view(u.shape)


class FusedActivation(torch.autograd.Function):
    """u -> activation(u); saves only u (the activation is recomputed in the backward kernel)."""

    @staticmethod
    def forward(ctx, u, kind):
        ctx.save_for_backward(u)
        ctx.kind = kind
        ctx.selected = registry.auto_selected()
        return activation_forward(u, kind)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (u,) = ctx.saved_tensors
        try:
            du = activation_backward(dy, u, ctx.kind)
        except Exception as exc:
            if not registry.backward_failed(ctx.selected, u.device, exc):
                raise
            with torch.enable_grad():
                uu = u.detach().requires_grad_()
                (du,) = torch.autograd.grad(reference_activation(uu, ctx.kind), uu, dy)
        return du, None


def triton_activation(u, kind: str):
    """Differentiable fused activation: u (..., W) -> (..., W) or (..., W/2) for gated kinds."""
    return FusedActivation.apply(u, kind)
