"""FFN activations, plain and gated: public entry point, input checks, plain reference.

``kind`` is one of ``revnet_core.config.ACTIVATIONS``:
    gelu        y = gelu_tanh(u)                     u (..., F) -> (..., F)
    gelu_exact  y = gelu(u) (erf)                    u (..., F) -> (..., F)
    relu        y = max(u, 0)                        u (..., F) -> (..., F)
    silu        y = silu(u)                          u (..., F) -> (..., F)
    geglu       y = gelu_tanh(a) * b,  [a, b] = u    u (..., 2F) -> (..., F)
    swiglu      y = silu(a) * b,  [a, b] = u         u (..., 2F) -> (..., F)
with gelu_tanh the tanh approximation 0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3))) (the canonical choice
of every backend) and silu(a) = a sigmoid(a). For gated kinds a is the first half of the last dim and b the
second, as ``u.chunk(2, -1)`` splits it. Output in u's dtype.

Implementations: ``torch`` (``torch_activation``: the eager ops the torch blocks call, in u's dtype),
``triton`` (``activations_triton``; TRITON_KINDS only), ``reference`` (math in fp32, fp64 for fp64 inputs).
This module imports no triton.
"""

from __future__ import annotations

from revnet_core.config import ACTIVATIONS, GATED_ACTIVATIONS

from .registry import dispatch

KINDS = ACTIVATIONS
GATED = GATED_ACTIVATIONS
TRITON_KINDS = ("gelu", "silu", "geglu", "swiglu")  # what the fused Triton kernels implement


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
    """The FFN activation ``kind`` of u (..., W): (..., W), or (..., W/2) for the gated geglu/swiglu."""
    check_activation_inputs(u, kind)
    return dispatch("activation", (u, kind), {}, device=u.device, dtype=u.dtype,
                    meta={"kind": kind, "width": u.shape[-1]}, impl=impl)


def torch_activation(u, kind: str):
    """The eager ops of the torch blocks (``revnet_torch.blocks.activate``), call for call: the same bits."""
    import torch.nn.functional as F

    if kind in GATED:
        a, b = u.chunk(2, dim=-1)
        return (F.gelu(a, approximate="tanh") if kind == "geglu" else F.silu(a)) * b
    if kind == "gelu":
        return F.gelu(u, approximate="tanh")
    if kind == "gelu_exact":
        return F.gelu(u)
    if kind == "relu":
        return F.relu(u)
    return F.silu(u)


def reference_activation(u, kind: str):
    """The ground truth for ``activation``, by autograd over plain ops in fp32 (fp64 for fp64 inputs)."""
    import torch
    import torch.nn.functional as F

    acc = torch.promote_types(u.dtype, torch.float32)
    uf = u.to(acc)
    a, b = uf.chunk(2, dim=-1) if kind in GATED else (uf, None)
    if kind in ("gelu", "geglu"):
        y = F.gelu(a, approximate="tanh")
    elif kind == "gelu_exact":
        y = F.gelu(a)
    elif kind == "relu":
        y = F.relu(a)
    else:
        y = F.silu(a)
    if b is not None:
        y = y * b
    return y.to(u.dtype)
