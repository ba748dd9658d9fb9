"""The load-time coupling probe in float32: a coupling exact in float64 but wrong in float32 is refused."""

import numpy as np
import pytest

from revnet_core.couplings import AdditiveCoupling, AffineCoupling
from revnet_core.plugin_checks import PluginCheckError, check_coupling


class Float16Inverse(AdditiveCoupling):
    """Exact in float64; in float32 its inverse rounds the block output through float16 (a fast path gone wrong)."""

    def inverse(self, y, fx):
        if y.dtype == np.float32:
            fx = fx.astype(np.float16).astype(np.float32)
        return y - fx


class Float64Output(AdditiveCoupling):
    """Exact, but promotes float32 streams to float64: the engine's streams would change dtype."""

    def forward(self, x, fx):
        return x.astype(np.float64) + fx


@pytest.mark.parametrize("coupling", [AdditiveCoupling(), AffineCoupling()])
def test_builtins_pass_in_float32(coupling):
    check_coupling(coupling)


def test_exact_in_float64_wrong_in_float32_is_refused():
    with pytest.raises(PluginCheckError, match="in float32 on shape"):
        check_coupling(Float16Inverse())


def test_float32_dtype_must_be_kept():
    with pytest.raises(PluginCheckError, match="dtype float64 for float32 inputs"):
        check_coupling(Float64Output())
