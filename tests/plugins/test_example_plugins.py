"""The example plugins in plugins/, installed: listed with their distributions, loaded without importing a
framework, and run on JAX arrays through the core's sweep (their own tests cover the torch and jax models)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from revnet_core.registry import describe

from .helpers import EXAMPLE_PLUGINS


def test_listed_with_plugin_and_distribution(example_plugins):
    rows = {(r["kind"], r["name"]): r for r in describe()}
    assert rows["coupling", "momentum"] == {"kind": "coupling", "name": "momentum", "plugin": "revnet_momentum",
                                            "distribution": "revnet-momentum 0.1.0", "reason": ""}
    assert rows["coupling", "momentum_learned"]["distribution"] == "revnet-momentum 0.1.0"
    assert rows["coupling", "gated"]["plugin"] == "revnet_gated"
    assert rows["coupling", "gated"]["distribution"] == "revnet-gated 0.1.0"
    assert rows["coupling", "additive"]["distribution"].startswith("revnet-zero ")
    assert not [r for r in rows.values() if r["kind"] == "failed" and r["plugin"] in EXAMPLE_PLUGINS]


def test_loading_and_probing_plugins_imports_no_framework(example_plugins):
    code = ("import sys; from revnet_core.registry import registry; reg = registry(); "
            "assert {'momentum', 'momentum_learned', 'gated'} <= set(reg.couplings), reg.failures; "
            "print(sorted(m for m in ('torch', 'jax', 'numba', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# float64 needs JAX_ENABLE_X64, which is process-wide: its own process. Blocks are tanh(x @ w); the
# reversible backward (core backward_step with jax.vjp for blocks, and for couplings without a vjp rule)
# must rebuild the inputs and equal jax.vjp through the plain forward.
SWEEP_ON_JAX = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from revnet_core.registry import get_coupling
from revnet_core.sweep import LayerSpec, backward_step, forward_step

class Block:
    def __init__(self, w):
        self.w = w
    def __call__(self, x):
        return jnp.tanh(x @ self.w)

def block_vjp(block, x):
    out, pull = jax.vjp(lambda x, w: jnp.tanh(x @ w), x, block.w)
    return out, lambda ct: pull(ct)

def coupling_autodiff(coupling, x, fx, dy):
    return jax.vjp(coupling.forward, x, fx)[1](dy)

rng, d, report = np.random.default_rng(0), 6, {}
for name in sys.argv[1:]:
    cf, cg = get_coupling(name), get_coupling(name)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape))
    wf, wg = arr(d, cf.fx_features(d)), arr(d, cg.fx_features(d))
    x1, x2, dy1, dy2 = arr(2, 5, d), arr(2, 5, d), arr(2, 5, d), arr(2, 5, d)
    plain = lambda x1, x2, wf, wg: forward_step(x1, x2, LayerSpec(Block(wf), Block(wg), cf, cg))
    (y1, y2), pull = jax.vjp(plain, x1, x2, wf, wg)
    want = pull((dy1, dy2))
    rx1, rx2, dx1, dx2, dwf, dwg = backward_step(y1, y2, dy1, dy2, LayerSpec(Block(wf), Block(wg), cf, cg),
                                                 block_vjp, coupling_autodiff)
    assert y1.dtype == jnp.float64 and dx1.dtype == jnp.float64
    report[name] = {"inverse": max(float(jnp.max(jnp.abs(a - b))) for a, b in ((rx1, x1), (rx2, x2))),
                    "grads": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip((dx1, dx2, dwf, dwg), want))}
print(json.dumps(report))
"""


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_couplings_run_the_core_sweep_on_jax_arrays_fp64(example_plugins):
    names = sorted(example_plugins) + ["additive", "affine"]
    out = subprocess.run([sys.executable, "-c", SWEEP_ON_JAX, *names], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_ENABLE_X64": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert sorted(report) == sorted(names)
    for name, err in report.items():
        assert err["inverse"] < 1e-12, (name, err)
        assert err["grads"] < 1e-10, (name, err)
