"""BDIA in fixed point: a residual stack made exactly reversible, over the engine's two-stream layers.

A pretrained stack runs ``x_{k+1} = x_k + D_k(x_k)`` (``D_k(x) = layer_k(x) - x``). BDIA (Zhang et al. 2024)
trains instead ``x_{k+1} = gamma_k x_{k-1} + (1 - gamma_k) x_k + D_k(x_k)`` with ``gamma_k = +-2**-bits``
drawn per sample and layer; ``gamma = 0`` is the original network. For ``gamma != 0`` the step inverts:
``x_{k-1} = (x_{k+1} - (1 - gamma_k) x_k - D_k(x_k)) / gamma_k``. In fixed point (every stream value a
multiple of one power of two ``step``) every term is exact except ``gamma_k x_{k-1}``, which drops the low
``bits`` bits of ``x_{k-1} / step``; those bits are kept (packed, ``bits`` per element per layer) and the
inverse is exact bit for bit at any depth.

Two consecutive BDIA steps are one of the engine's layers: with streams ``(x1, x2) = (x_{k-1}, x_k)``,
``y1 = cf(x1, F(x2)) = x_{k+1}`` and ``y2 = cg(x2, G(y1)) = x_{k+2}``, where the block is
``F(u) = (1 - gamma) u + D(u)`` and the coupling ``cf(x, fx) = fx + gamma x``. So the reversible backward is
``revnet_torch.engine.run_layers`` unchanged: one autograd node per pair of layers, nothing stored but the
side bits. Derivatives are those of the real-valued recurrence (the roundings pass cotangents unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from revnet_core.couplings import AdditiveCoupling, BaseCoupling
from revnet_core.sweep import LayerSpec, forward_step

from ..engine import snap

# Headroom above the stack input's magnitude before fixed-point sums would round: fp64 streams (fp32/fp64
# models) keep 53 - 24 = 29 bits below the input's top bit, fp32 streams (bf16/fp16 models) 24 - 16 = 8, as
# many as bf16 itself has; residual streams of pretrained models grow by ~10**3 over depth.
HEADROOM_BITS = {torch.float64: 24, torch.float32: 16}


def stream_dtype(model_dtype: torch.dtype, device_type: str = "cpu") -> torch.dtype:
    """The fixed-point streams' dtype: fp64 for fp32/fp64 models, fp32 for bf16/fp16 models and for any
    model under half-precision autocast (its layers compute in 8 or 11 bits anyway)."""
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in (
            torch.bfloat16, torch.float16):
        return torch.float32
    return torch.float64 if model_dtype in (torch.float32, torch.float64) else torch.float32


def grid_step(x: torch.Tensor) -> torch.Tensor:
    """The power of two all stream values are multiples of, chosen from max|x| (a 0-d tensor of x's dtype)."""
    amax = x.detach().abs().amax().clamp_min(torch.finfo(x.dtype).tiny)
    _, e = torch.frexp(amax)
    return torch.ldexp(torch.ones_like(amax), e + HEADROOM_BITS[x.dtype] - _precision(x.dtype))


def range_limit(step: torch.Tensor) -> torch.Tensor:
    """The magnitude beyond which sums of grid values stop being exact."""
    return step * 2.0 ** _precision(step.dtype)


def _precision(dtype: torch.dtype) -> int:
    """Significand bits, the implicit one included (53 for float64)."""
    return 1 - int(math.log2(torch.finfo(dtype).eps))


_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(r: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers r in [0, 2**bits) (any float/int dtype) -> uint8 (bits, ceil(n/8)): one bit plane each."""
    flat = r.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = _SHIFTS.to(flat.device)
    planes = [((flat >> j) & 1).view(-1, 8).bitwise_left_shift(shifts).sum(1, dtype=torch.uint8)
              for j in range(bits)]
    return torch.stack(planes)


def unpack_bits(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of ``pack_bits``: a tensor of ``shape`` and ``dtype``."""
    n = shape.numel()
    shifts = _SHIFTS.to(packed.device)
    out = None
    for j, plane in enumerate(packed):
        b = ((plane.unsqueeze(1) >> shifts) & 1).reshape(-1)[:n].to(dtype)
        out = b if out is None else out.add_(b.mul_(2 ** j))
    return out.view(shape)


@dataclass
class StepContext:
    """What one forward's steps share: the grid, gamma's size, the HF layers' extra arguments."""

    step: torch.Tensor  # 0-d, stream dtype
    bits: int  # |gamma| = 2**-bits
    model_dtype: torch.dtype
    call: Any  # call(layer, hidden) -> hidden: the HF layer with this forward's mask, positions, ...
    peak: torch.Tensor | None = None  # max |stream| so far, to warn past the fixed-point range

    def note(self, y: torch.Tensor) -> None:
        top = y.detach().abs().amax()
        self.peak = top if self.peak is None else torch.maximum(self.peak, top)


class _BlockOut(torch.autograd.Function):
    """``(1 - gamma) u + snap(h)`` on the grid, exactly; derivative ``((1 - gamma) g, g)``."""

    @staticmethod
    def forward(ctx, u, h, sigma, step, bits):
        ctx.gamma = sigma / 2 ** bits
        q = torch.floor(u / (step * 2 ** bits))  # exact: power-of-two scalings of grid values
        return snap(h, step, u.dtype).sub_(q.mul_(sigma).mul_(step)).add_(u)

    @staticmethod
    def backward(ctx, g):
        return g * (1 - ctx.gamma), g, None, None, None


class _Mix(torch.autograd.Function):
    """``fx + sigma * q * step`` (= ``fx + gamma x`` less x's dropped low bits); derivative ``(gamma g, g)``."""

    @staticmethod
    def forward(ctx, x, fx, gamma, step, q):
        ctx.gamma = gamma
        return (q * gamma.sign()).mul_(step).add_(fx)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.gamma, g, None, None, None


class BDIACoupling(BaseCoupling):
    """``y = fx + gamma x`` in fixed point, the low bits of x kept so ``inverse`` is exact.

    Built per forward (it holds that forward's side bits); ``sigma`` (B, 1, 1) is +-1 per sample.
    """

    name = "bdia"

    def __init__(self, sigma: torch.Tensor, ctx: StepContext):
        self.sigma = sigma
        self.ctx = ctx
        self.side: torch.Tensor | None = None

    @property
    def gamma(self) -> torch.Tensor:
        return self.sigma / 2 ** self.ctx.bits

    def forward(self, x, fx):
        step, M = self.ctx.step, 2 ** self.ctx.bits
        with torch.no_grad():
            n = x.detach() / step
            q = torch.floor(n / M)
            self.side = pack_bits(n - q * M, self.ctx.bits)
            del n
        y = _Mix.apply(x, fx, self.gamma, step, q)
        self.ctx.note(y)
        return y

    def inverse(self, y, fx):
        if self.side is None:
            raise RuntimeError("BDIACoupling.inverse: no side bits (its forward did not run, or ran twice "
                               "backward)")
        step, M = self.ctx.step, 2 ** self.ctx.bits
        q = (y - fx).div_(step).mul_(self.sigma)
        r = unpack_bits(self.side, y.shape, y.dtype)
        self.side = None  # consumed: each layer is rebuilt once
        return q.mul_(M).add_(r).mul_(step)

    def vjp(self, x, fx, dy):
        return dy * self.gamma, dy


class Step(nn.Module):
    """One HF decoder layer as a BDIA block: ``F(u) = (1 - gamma) u + snap(layer(u) - u)`` on the grid.

    u: (B, T, d) stream (fp64 or fp32); the layer runs in the model's dtype (or autocast's) on ``u`` cast."""

    def __init__(self, layer: nn.Module, sigma: torch.Tensor, ctx: StepContext):
        super().__init__()
        self.layer = layer
        self.sigma = sigma
        self.ctx = ctx

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        ub = u.to(self.ctx.model_dtype)
        out = self.ctx.call(self.layer, ub)
        h = out.to(u.dtype) - ub.to(u.dtype)
        return _BlockOut.apply(u, h, self.sigma, self.ctx.step, self.ctx.bits)


class _Zero(nn.Module):
    """The G block of an odd stack's last pair: contributes nothing (``y2 = x2``)."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u * 0


class BDIAPair(nn.Module):
    """Two HF decoder layers (or one, at the top of an odd stack) as one engine layer.

    ``bind`` gives it one forward's context and signs before ``run_layers``; ``spec`` (called once per
    forward by the engine) builds that forward's blocks and couplings, so their side bits belong to it.
    Not registered in the model: it holds the model's own layers, which keep their state-dict names.
    """

    def __init__(self, first: nn.Module, second: nn.Module | None):
        super().__init__()
        self.first = first
        self.second = second
        self._bound = None

    def bind(self, ctx: StepContext, sigma_first: torch.Tensor, sigma_second: torch.Tensor | None) -> None:
        self._bound = (ctx, sigma_first, sigma_second)

    def spec(self) -> LayerSpec:
        ctx, sa, sb = self._bound
        f, cf = Step(self.first, sa, ctx), BDIACoupling(sa, ctx)
        if self.second is None:
            return LayerSpec(f, _Zero(), cf, AdditiveCoupling())
        return LayerSpec(f, Step(self.second, sb, ctx), cf, BDIACoupling(sb, ctx))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """Plain autograd through the pair (the ``store`` policy): the construction with stored activations."""
        return forward_step(x1, x2, self.spec())
