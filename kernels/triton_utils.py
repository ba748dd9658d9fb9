"""Triton device functions shared by the kernels. Importing this module imports triton."""

import triton
import triton.language as tl

# Globals read inside kernels must be constexpr.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): softmaxes run in base 2, on the fast exp2
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32 (acc may be None); UPCAST widens bf16 operands (interpreter only: utils.upcast_dots)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc=acc, input_precision=PRECISION)
