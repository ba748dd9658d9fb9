"""Reversible layers as the core's sweep sees them: two blocks bound to the model's arrays, two couplings.

Layer i's parameters are the model's canonical arrays ``layers.{i}.attn.block.*`` and
``layers.{i}.ffn.block.*``, handed to the blocks under their short names (``qkv.weight``, ...)::

    y1 = cf(x1, F(x2));  y2 = cg(x2, G(y1))
"""

from __future__ import annotations

import numpy as np

from revnet_core.build import resolve_coupling
from revnet_core.config import ModelConfig
from revnet_core.couplings import BaseCoupling
from revnet_core.errors import ConfigError
from revnet_core.sweep import LayerSpec

from .blocks import GATED, AttentionBlock, BlockConfig, FeedForwardBlock, RopeCache
from .options import options

HALVES = ("attn", "ffn")


def block_config(config: ModelConfig, out_features: int) -> BlockConfig:
    return BlockConfig(
        d_model=config.d_model, num_heads=config.num_heads, d_ff=config.ffn_dim, out_features=out_features,
        activation=config.activation, norm=config.norm, norm_eps=config.norm_eps, rope_base=config.rope_base,
        ffn_chunk_size=config.ffn_chunk_size, attn_block=options(config).attn_block,
        matmul_split=options(config).matmul_split,
    )


def check_coupling(coupling: BaseCoupling, d: int) -> None:
    """numpy has no autodiff: a coupling must bring its own ``vjp`` rule. ConfigError naming it otherwise."""
    x = np.linspace(-1.0, 1.0, 2 * d).reshape(2, d)
    fx = np.linspace(-0.5, 0.5, 2 * coupling.fx_features(d)).reshape(2, -1)
    if coupling.vjp(x, fx, np.ones_like(x)) is NotImplemented:
        raise ConfigError(f"coupling {coupling!r} has no vjp rule; the numba backend (numpy, no autodiff) needs "
                          "couplings that define vjp(x, fx, dy) (additive, affine and momentum do)")


def coupling_autodiff(coupling, x, fx, dy):
    """Never reached: ``check_coupling`` refuses couplings without a vjp when the model is built."""
    raise ConfigError(f"coupling {coupling!r} has no vjp rule (the numba backend has no autodiff)")


class Layers:
    """The model's layers: one ``LayerSpec`` per layer over the arrays of ``params`` (canonical names)."""

    def __init__(self, config: ModelConfig, params: dict):
        cf, cg = resolve_coupling(config), resolve_coupling(config)
        out = cf.fx_features(config.d_model)
        if cg.fx_features(config.d_model) != out:
            raise ConfigError("the two couplings of a layer must take block outputs of the same width")
        check_coupling(cf, config.d_model)
        self.config, self.cf, self.cg = config, cf, cg
        self.block = block_config(config, out)
        self.rope = RopeCache(config.head_dim, config.rope_base)
        self.params = params

    def __len__(self) -> int:
        return self.config.num_layers

    def prefix(self, i: int, half: str) -> str:
        return f"layers.{i}.{half}.block."

    def block_params(self, i: int, half: str) -> dict:
        pre = self.prefix(i, half)
        return {k[len(pre):]: v for k, v in self.params.items() if k.startswith(pre)}

    def spec(self, i: int) -> LayerSpec:
        f = AttentionBlock(self.block_params(i, "attn"), self.block, self.rope)
        g = FeedForwardBlock(self.block_params(i, "ffn"), self.block)
        return LayerSpec(f, g, self.cf, self.cg)


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every parameter, torch's ``state_dict`` names (docs/jax.md lists them)."""
    d, V, ff = config.d_model, config.vocab_size, config.ffn_dim
    out = resolve_coupling(config).fx_features(d)
    up = (2 if config.activation in GATED else 1) * ff
    norm = ("weight",) if config.norm == "rmsnorm" else ("weight", "bias")
    shapes = {"embed.weight": (V, d)}
    for i in range(config.num_layers):
        a, f = f"layers.{i}.attn.block.", f"layers.{i}.ffn.block."
        shapes.update({a + "norm." + n: (d,) for n in norm})
        shapes.update({a + "qkv.weight": (3 * d, d), a + "proj.weight": (out, d)})
        shapes.update({f + "norm." + n: (d,) for n in norm})
        shapes.update({f + "up.weight": (up, d), f + "down.weight": (out, ff)})
    shapes.update({"norm." + n: (d,) for n in norm})
    shapes["head.weight"] = (V, d)
    return shapes


def init_params(config: ModelConfig, seed: int, dtype) -> dict[str, np.ndarray]:
    """Fresh parameters, torch's rule: matrices ~ N(0, init_std), projections into a stream (proj, down)
    scaled by (2 L)^-1/2, norm weights 1 and biases 0. Drawn in float64 from ``seed``, then cast."""
    rng = np.random.default_rng(seed)
    scaled = (2 * config.num_layers) ** -0.5
    params = {}
    for name, shape in parameter_shapes(config).items():
        if len(shape) == 1:
            params[name] = (np.ones if name.endswith("weight") else np.zeros)(shape, dtype)
        else:
            std = config.init_std * (scaled if name.endswith(("proj.weight", "down.weight")) else 1.0)
            params[name] = (std * rng.standard_normal(shape)).astype(dtype)
    return params
