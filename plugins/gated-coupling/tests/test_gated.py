"""revnet-gated as installed: found by name, invertible in fp64, gradient-exact on every backend present.

Run after ``pip install --no-deps ./plugins/gated-coupling``. The coupling has no vjp rule, so these
gradients come from each backend's own autodiff of ``forward``.
"""

import importlib.util
import json
import os
import subprocess
import sys

import array_api_compat.numpy as xp
import numpy as np
import pytest
import torch

import revnet_core
from revnet_core.plugin_checks import check_coupling
from revnet_core.registry import get_coupling, registry
from revnet_gated import GatedAdditiveCoupling

CASES = [("gated", {}), ("gated", {"gate_bias": -2.0})]

# init_std 0.3: blocks whose outputs are O(1), so the gates spread over (0, 1) and the gate's gradient
# path is exercised (at the default 0.02 every gate would sit at sigmoid(gate_bias)).
MODEL = dict(num_layers=3, d_model=16, num_heads=2, d_ff=24, vocab_size=37, max_seq_len=64, init_std=0.3)


def test_discovered_by_name_through_the_entry_point():
    reg = registry()
    assert "revnet_gated" not in reg.failures, reg.failures.get("revnet_gated")
    entry = reg.couplings["gated"]
    assert entry.obj is GatedAdditiveCoupling
    assert entry.plugin == "revnet_gated"
    assert entry.distribution == "revnet-gated 0.1.0"


@pytest.mark.parametrize("name,options", CASES)
def test_contract_holds_at_fp64_tolerance(name, options):
    """Inverse to 1e-12 on numpy float64 (there is no vjp rule to check)."""
    assert get_coupling(name, **options).vjp(None, None, None) is NotImplemented
    check_coupling(get_coupling(name, **options), inverse_tol=1e-12)


@pytest.mark.parametrize("name,options", CASES)
def test_inverse_undoes_forward_on_torch_fp64(name, options):
    c = get_coupling(name, **options)
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(4, 7, 16, generator=g, dtype=torch.float64)
    fx = 3 * torch.randn(4, 7, c.fx_features(16), generator=g, dtype=torch.float64)
    y = c.forward(x, fx)
    assert y.dtype == torch.float64 and y.shape == x.shape
    assert (c.inverse(y, fx) - x).abs().max().item() < 1e-12 * x.abs().max().item()


def test_gate_is_a_sigmoid_of_a_plus_bias():
    c = GatedAdditiveCoupling(gate_bias=1.0)
    a = xp.asarray([[0.0, -1e6, 1e6, -1.0]])
    b = xp.asarray([[2.0, 2.0, 2.0, 2.0]])
    np.testing.assert_allclose(c.update(xp.concat([a, b], axis=-1)), [[2 / (1 + np.exp(-1.0)), 0.0, 2.0, 1.0]],
                               atol=1e-12)


def test_non_finite_gate_bias_is_refused():
    with pytest.raises(ValueError, match="gate_bias"):
        get_coupling("gated", gate_bias=float("nan"))


def torch_grads(model, ids, policy):
    model.zero_grad(set_to_none=True)
    model.set_policy(policy)
    torch.manual_seed(1234)  # the same dropout masks for both policies
    loss = model(ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,options", CASES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_torch_reverse_gradients_equal_store_fp64(name, options, dropout):
    torch.manual_seed(0)
    model = revnet_core.build("torch", coupling=name, coupling_options=options, dropout=dropout, **MODEL).double()
    assert type(model.layers[0].attn.coupling) is registry().couplings[name].obj
    ids = torch.randint(0, MODEL["vocab_size"], (2, 12))
    loss_store, g_store = torch_grads(model, ids, "store")
    loss_rev, g_rev = torch_grads(model, ids, "reverse")
    assert abs(loss_rev - loss_store) < 1e-10
    for n, g in g_store.items():
        err = (g_rev[n] - g).abs().max().item()
        assert err <= 1e-10 * max(1.0, g.abs().max().item()), f"{n}: reverse differs from store by {err:.2e}"


@pytest.mark.parametrize("name,options", CASES)
def test_torch_stack_inverse_rebuilds_inputs_fp64(name, options):
    torch.manual_seed(0)
    model = revnet_core.build("torch", coupling=name, coupling_options=options, **MODEL).double()
    x1, x2 = torch.randn(2, 2, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        y1, y2 = x1, x2
        for layer in model.layers:
            y1, y2 = layer(y1, y2)
        for layer in reversed(model.layers):
            y1, y2 = layer.inverse(y1, y2)
    assert max((y1 - x1).abs().max().item(), (y2 - x2).abs().max().item()) < 1e-12


# In its own process: jax_enable_x64 is process-wide. Two layers, not three: compiling takes ~3 s a layer on a
# CPU, and two already make the lower layer's backward start from inputs the upper one rebuilt.
JAX_MODEL = dict(MODEL, num_layers=2)
JAX = "jax" in registry().backends and importlib.util.find_spec("jax") is not None
JAX_CHECK = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
import revnet_core
name, options, model = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
cfg = dict(model, coupling=name, coupling_options=options, stream_dtype="float64")
rev, store = revnet_core.build("jax", policy="reverse", **cfg), revnet_core.build("jax", policy="store", **cfg)
params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), rev.params)
ids = jnp.asarray(np.random.default_rng(0).integers(0, model["vocab_size"], (2, 12)))
g_rev = jax.tree_util.tree_leaves(jax.jit(jax.grad(rev.loss))(params, ids))
g_store = jax.tree_util.tree_leaves(jax.jit(jax.grad(store.loss))(params, ids))
assert len(g_rev) == len(g_store) > 0
# Guard against a vacuous pass: the model must really run this coupling. A width other than d shows in the
# parameter shapes; at width d the loss must differ from the additive coupling's on the same parameters.
n_fx = revnet_core.registry.get_coupling(name, **options).fx_features(model["d_model"])
if n_fx != model["d_model"]:
    assert any(n_fx in leaf.shape for leaf in jax.tree_util.tree_leaves(params))
else:
    additive = revnet_core.build("jax", policy="store", **dict(cfg, coupling="additive", coupling_options={}))
    assert abs(float(additive.loss(params, ids)) - float(store.loss(params, ids))) > 1e-6
print(max(float(jnp.max(jnp.abs(a - b))) / max(1.0, float(jnp.max(jnp.abs(b)))) for a, b in zip(g_rev, g_store)))
"""


# One option set per coupling: compiling the two models takes ~10 s on a CPU, and options change no code path.
@pytest.mark.skipif(not JAX, reason="needs the 'jax' backend registered and jax installed (the JAX backend is a "
                                       "separate issue); this check runs as soon as both are there")
@pytest.mark.parametrize("name,options", CASES[-1:])
def test_jax_reverse_gradients_equal_store_fp64(name, options):
    out = subprocess.run([sys.executable, "-c", JAX_CHECK, name, json.dumps(options), json.dumps(JAX_MODEL)],
                         capture_output=True, text=True, env={**os.environ, "JAX_ENABLE_X64": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split()[-1]) <= 1e-10
