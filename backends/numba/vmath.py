"""exp, tanh and the sigmoid that LLVM can vectorize in float32, libm's in float64 (numba functions).

numba lowers ``np.exp``/``math.tanh`` to scalar libm calls (without Intel's SVML, which numba does not
ship); in the attention softmax and the FFN's activations those calls were most of the time (about 6 ns
an element for expf, 29 ns for tanhf on the 2-core machine, against 0.65 ns for this exp vectorized).
So for float32 ``vexp`` is written in arithmetic LLVM can vectorize: Cody-Waite reduction x = k ln2 + r,
|r| <= ln2/2, a degree-7 Taylor polynomial for e^r (truncation 5e-9 relative, below float32's 6e-8 epsilon),
and 2^k built in the exponent bits. It is within a few ulp of libm's expf (``tests/numba/test_kernels.py``),
returns 0 below -87.3 (where expf turns subnormal) and inf from about 88.4 (expf: 88.7).
float64 keeps libm's ``np.exp`` and ``math.tanh``: the fp64 paths must equal torch's to 1e-10.
The choice is made when numba compiles for the argument's type (``overload``), not at run time.
"""

from __future__ import annotations

import math

import numpy as np

from .plugin import require_numba

numba = require_numba()
from llvmlite import ir  # noqa: E402  (numba's own dependency)
from numba.core import types  # noqa: E402
from numba.extending import intrinsic, overload, register_jitable  # noqa: E402

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 = HI + LO, HI with few bits so k * HI is exact
_LN2_LO = np.float32(-2.12194440e-4)
_LO, _HI = np.float32(-87.33654), np.float32(88.72283)
_C = tuple(np.float32(1.0 / math.factorial(n)) for n in range(8))
_ONE, _TWO, _HALF = np.float32(1.0), np.float32(2.0), np.float32(0.5)


@intrinsic
def _bits_as_float32(typingctx, bits):
    """The float32 whose bits are the int32 ``bits`` (a register bitcast, which vectorizes)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@register_jitable(inline="always")
def _exp32(x):
    xc = x if x > _LO else _LO  # selects, not min/max (which branch on NaN and stop vectorizing)
    xc = xc if xc < _HI else _HI
    k = np.floor(xc * _LOG2E + _HALF)
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    p = _C[7]
    p = p * r + _C[6]
    p = p * r + _C[5]
    p = p * r + _C[4]
    p = p * r + _C[3]
    p = p * r + _C[2]
    p = p * r + _C[1]
    p = p * r + _C[0]
    scale = _bits_as_float32((np.int32(k) + np.int32(127)) << 23)
    return np.float32(0.0) if x < _LO else p * scale


def vexp(x):
    """e^x: vectorizable in float32 (see the module docstring), libm's in float64."""
    return np.exp(x)


def vtanh(x):
    """tanh(x): 1 - 2 / (e^2x + 1) on ``vexp`` in float32 (absolute error ~1e-7), libm's in float64."""
    return math.tanh(x)


def vsigmoid(x):
    """1 / (1 + e^-x), on ``vexp``."""
    return 1.0 / (1.0 + np.exp(-x))


@overload(vexp, inline="always")
def _vexp(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    return lambda x: np.exp(x)


@overload(vtanh, inline="always")
def _vtanh(x):
    if x == types.float32:
        return lambda x: _ONE - _TWO / (_exp32(_TWO * x) + _ONE)
    return lambda x: math.tanh(x)


@overload(vsigmoid, inline="always")
def _vsigmoid(x):
    if x == types.float32:
        return lambda x: _ONE / (_ONE + _exp32(-x))
    return lambda x: 1.0 / (1.0 + np.exp(-x))
