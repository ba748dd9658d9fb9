"""LayerNorm and RMSNorm over the last dimension: public entry points, input checks, plain references.

x (..., N) in any float dtype; weight (N,) and bias (N,) in their own dtype; the output has x's dtype and
the statistics are computed in fp32 (fp64 for fp64 inputs).

    LayerNorm: y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(mean((x - mean)^2) + eps)
    RMSNorm:   y = x * rstd * w,               rstd = 1 / sqrt(mean(x^2) + eps)

Implementations: ``torch`` (``torch_layer_norm`` / ``torch_rms_norm``: F.layer_norm / F.rms_norm, the very
calls nn.LayerNorm / nn.RMSNorm make, so a block switched to the registry computes the same bits; autocast's
rules for those ops apply), ``triton`` (``norms_triton``), ``reference`` (plain ops below). This module
imports no triton.
"""

from __future__ import annotations

from .registry import dispatch

MAX_HIDDEN = 65536  # one row is one Triton block; wider rows run the reference


def check_norm_inputs(x, weight, bias=None) -> None:
    n = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or n < 1:
        raise ValueError(f"x must be (..., N) with N >= 1; got {tuple(x.shape)=}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.shape != (n,):
            raise ValueError(f"{name} must be ({n},) to match x (..., {n}); got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a float tensor; got dtype={x.dtype}")


def layer_norm(x, weight, bias=None, eps: float = 1e-5, *, impl: str | None = None):
    """LayerNorm over the last dim: x (..., N), weight (N,), bias (N,) or None -> (..., N) in x's dtype."""
    check_norm_inputs(x, weight, bias)
    return dispatch("layer_norm", (x, weight, bias, eps), {}, device=x.device, dtype=x.dtype,
                    meta={"hidden": x.shape[-1]}, impl=impl)


def rms_norm(x, weight, eps: float = 1e-5, *, impl: str | None = None):
    """RMSNorm over the last dim: x (..., N), weight (N,) -> (..., N) in x's dtype."""
    check_norm_inputs(x, weight)
    return dispatch("rms_norm", (x, weight, eps), {}, device=x.device, dtype=x.dtype,
                    meta={"hidden": x.shape[-1]}, impl=impl)


def torch_layer_norm(x, weight, bias=None, eps: float = 1e-5):
    """F.layer_norm over the last dim, as nn.LayerNorm calls it: x (..., N), weight, bias (N,) -> (..., N)."""
    import torch.nn.functional as F

    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def torch_rms_norm(x, weight, eps: float = 1e-5):
    """F.rms_norm over the last dim, as nn.RMSNorm calls it: x (..., N), weight (N,) -> (..., N)."""
    import torch.nn.functional as F

    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def reference_layer_norm(x, weight, bias=None, eps: float = 1e-5):
    """The ground truth for ``layer_norm``, by autograd over plain ops."""
    import torch

    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    xc = xf - xf.mean(-1, keepdim=True)
    y = xc * torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps) * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def reference_rms_norm(x, weight, eps: float = 1e-5):
    """The ground truth for ``rms_norm``, by autograd over plain ops."""
    import torch

    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    return (xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps) * weight.to(acc)).to(x.dtype)
