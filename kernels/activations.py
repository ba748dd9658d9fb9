"""FFN activations, plain and gated: public entry point, input checks, plain reference.

``kind`` is one of:
    gelu    y = gelu(u)                          u (..., F) -> (..., F)
    silu    y = silu(u)                          u (..., F) -> (..., F)
    geglu   y = gelu(a) * b,  [a, b] = u         u (..., 2F) -> (..., F)
    swiglu  y = silu(a) * b,  [a, b] = u         u (..., 2F) -> (..., F)
with gelu the tanh approximation 0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3))) (the canonical choice of
every backend) and silu(a) = a sigmoid(a). For gated kinds a is the first half of the last dim and b the
second, as ``u.chunk(2, -1)`` splits it. Math in fp32 (fp64 for fp64 inputs), output in u's dtype.

The Triton kernels are in ``activations_triton``; this module imports no triton.
"""

from __future__ import annotations

from .registry import dispatch

KINDS = ("gelu", "silu", "geglu", "swiglu")
GATED = ("geglu", "swiglu")


def check_activation_inputs(u, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"{kind=} must be one of {KINDS}")
    if u.dim() < 1 or u.shape[-1] < 1:
        raise ValueError(f"u must be (..., W) with W >= 1; got {tuple(u.shape)=}")
    if kind in GATED and u.shape[-1] % 2:
        raise ValueError(f"width={u.shape[-1]} must be even for the gated {kind=} (halves [a, b])")
    if not u.dtype.is_floating_point:
        raise ValueError(f"u must be a float tensor; got dtype={u.dtype}")


def activation(u, kind: str, *, impl: str | None = None):
    """The FFN activation ``kind`` of u (..., W): (..., W) for gelu/silu, (..., W/2) for geglu/swiglu."""
    check_activation_inputs(u, kind)
    return dispatch("activation", (u, kind), {}, device=u.device, dtype=u.dtype,
                    meta={"kind": kind, "width": u.shape[-1]}, impl=impl)


def reference_activation(u, kind: str):
    """The ground truth for ``activation``, by autograd over plain ops."""
    import torch
    import torch.nn.functional as F

    acc = torch.promote_types(u.dtype, torch.float32)
    uf = u.to(acc)
    a, b = uf.chunk(2, dim=-1) if kind in GATED else (uf, None)
    y = F.gelu(a, approximate="tanh") if kind in ("gelu", "geglu") else F.silu(a)
    if b is not None:
        y = y * b
    return y.to(u.dtype)
