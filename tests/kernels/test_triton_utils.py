"""The shared dot helper: fp32 IEEE products, and bf16 widened under the interpreter exactly as a GPU's
bf16 dot with fp32 accumulation computes them."""

import pytest
import torch
import triton
import triton.language as tl

from revnet_kernels.triton_utils import dot
from revnet_kernels.utils import upcast_dots


@triton.jit
def _matmul(A, B, C, N: tl.constexpr, UPCAST: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(A + i[:, None] * N + i[None, :])
    b = tl.load(B + i[:, None] * N + i[None, :])
    tl.store(C + i[:, None] * N + i[None, :], dot(a, b, None, "ieee", UPCAST))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dot_matches_fp64_product_of_the_same_operands(dtype):
    a, b = torch.randn(16, 16).to(dtype), torch.randn(16, 16).to(dtype)
    c = torch.empty(16, 16)
    _matmul[(1,)](a, b, c, N=16, UPCAST=upcast_dots(dtype))
    torch.testing.assert_close(c.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-5)
