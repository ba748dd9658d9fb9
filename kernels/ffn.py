"""The feed-forward middle over sequence chunks: y = act(x W_up^T) W_down^T, never full-width for all rows.

The activation's input (rows, W) and output (rows, F) exist for one chunk of rows at a time, in the
forward and in the backward (which recomputes them from x: the same matmul on the same chunk, so the
same values). Only x and the weights are saved. Matmuls run in the compute dtype (autocast's when it is on,
as ``nn.Linear`` would); the activation goes through the registry (its choice per device). Weight gradients
accumulate in fp32 across chunks.
"""

from __future__ import annotations

import torch

from .activations import GATED, KINDS, activation
from .utils import add_matmul, compute_dtype


class _ChunkedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_up, w_down, kind, chunk_size, impl):
        cdt = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])  # (N, d)
        with torch.autocast(x.device.type, enabled=False):
            wu, wd = w_up.to(cdt), w_down.to(cdt)
            y = torch.empty((x2.shape[0], wd.shape[0]), dtype=cdt, device=x.device)  # (N, out)
            for s in range(0, x2.shape[0], chunk_size):
                h = x2[s:s + chunk_size].to(cdt) @ wu.T  # (n, W)
                torch.mm(activation(h, kind, impl=impl), wd.T, out=y[s:s + chunk_size])
        ctx.save_for_backward(x, w_up, w_down)
        ctx.cdt, ctx.kind, ctx.chunk_size, ctx.impl = cdt, kind, chunk_size, impl
        return y.view(*x.shape[:-1], wd.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w_up, w_down = ctx.saved_tensors
        cdt, n = ctx.cdt, ctx.chunk_size
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        dwu = torch.zeros(w_up.shape, dtype=torch.float32, device=w_up.device)
        dwd = torch.zeros(w_down.shape, dtype=torch.float32, device=w_down.device)
        with torch.autocast(x.device.type, enabled=False):
            wu, wd = w_up.to(cdt), w_down.to(cdt)
            for s in range(0, x2.shape[0], n):
                xc, dyc = x2[s:s + n].to(cdt), dy2[s:s + n].to(cdt)
                with torch.enable_grad():
                    h = (xc @ wu.T).requires_grad_()  # recomputed, as in the forward
                    a = activation(h, ctx.kind, impl=ctx.impl)  # (n, F)
                add_matmul(dwd, dyc.T, a.detach())
                (dh,) = torch.autograd.grad(a, h, dyc @ wd)
                dx[s:s + n] = dh @ wu
                add_matmul(dwu, dh.T, xc)
        return dx.view(x.shape), dwu.to(w_up.dtype), dwd.to(w_down.dtype), None, None, None


def chunked_ffn(x, w_up, w_down, kind: str = "gelu", chunk_size: int = 4096, *, impl: str | None = None):
    """act(x @ w_up.T) @ w_down.T over chunks of rows: x (..., d), w_up (W, d), w_down (out, F) with F = W
    (W/2 for geglu/swiglu) -> (..., out) in the compute dtype. ``impl`` forces the activation's kernel."""
    if kind not in KINDS:
        raise ValueError(f"{kind=} must be one of {KINDS}")
    if kind in GATED and w_up.shape[0] % 2:
        raise ValueError(f"w_up rows={w_up.shape[0]} must be even for the gated {kind=}")
    if x.shape[-1] != w_up.shape[1]:
        raise ValueError(f"x (..., {x.shape[-1]}) does not match w_up {tuple(w_up.shape)} (W, d)")
    width = w_up.shape[0] // 2 if kind in GATED else w_up.shape[0]
    if w_down.shape[1] != width:
        raise ValueError(f"w_down {tuple(w_down.shape)} must be (out, {width}) for {kind=} "
                         f"and w_up {tuple(w_up.shape)}")
    if chunk_size < 1:
        raise ValueError(f"{chunk_size=} must be >= 1")
    return _ChunkedFFN.apply(x, w_up, w_down, kind, chunk_size, impl)
