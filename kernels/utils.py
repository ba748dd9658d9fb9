"""Host-side helpers shared by the kernels: launch sizes, the interpreter switch, compute dtypes.

Imports neither torch nor triton at module level.
"""

from __future__ import annotations

import os
from typing import Any

_SM_COUNT: dict[Any, int] = {}


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def multiprocessors(device: Any) -> int:
    """Streaming multiprocessors (CUDA) or compute units (ROCm); a small number for the interpreter."""
    if interpreting() or getattr(device, "type", "cpu") != "cuda":
        return 4  # the interpreter runs programs one after another: few programs, less Python overhead
    if device not in _SM_COUNT:
        import torch

        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def compute_dtype(x: Any) -> Any:
    """The dtype matmuls run in: autocast's when it is on for ``x``'s device, else ``x``'s own."""
    import torch

    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def add_matmul(acc: Any, a: Any, b: Any) -> None:
    """acc += a @ b in acc's dtype (a weight gradient summed over chunks): fused into the matmul when a, b
    share acc's dtype, so no (rows, cols) product temporary exists; otherwise the product in a's dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


def dot_precision(dtype: Any) -> str:
    """Input precision for ``tl.dot``: always IEEE. For fp32 operands Triton's default on NVIDIA GPUs is TF32
    (about 3e-4 relative error); for fp16/bf16 operands the setting changes nothing, and "ieee" is accepted
    on every target, where "tf32" is not."""
    return "ieee"


def upcast_dots(dtype: Any) -> bool:
    """Whether bf16 dot operands must be widened to fp32 before ``tl.dot``.

    The Triton interpreter (3.x) multiplies bf16 operands as their raw 16-bit integers. A bf16 x bf16
    product is exact in fp32, so widening the operands computes what the GPU's bf16 dot computes (an fp32
    accumulation of exact products); only the summation order may differ.
    """
    import torch

    return interpreting() and dtype == torch.bfloat16
