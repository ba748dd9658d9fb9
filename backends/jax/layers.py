"""Reversible layers as the core's sweep sees them: two blocks bound to their parameters, and two couplings.

A layer's parameters are ``{"attn": {"norm", "qkv", "proj"}, "ffn": {"norm", "up", "down"}}``; the model
stacks them along a leading layer axis so ``lax.scan`` can run the stack::

    y1 = cf(x1, F(x2));  y2 = cg(x2, G(y1))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from revnet_core.build import resolve_coupling
from revnet_core.config import ModelConfig
from revnet_core.couplings import BaseCoupling
from revnet_core.errors import ConfigError
from revnet_core.sweep import LayerSpec, forward_step, inverse_step

from .blocks import GATED, BlockConfig, attention_block, ffn_block, init_norm
from .options import options


@dataclass(frozen=True, eq=False)
class LayerStatic:
    """Everything about a layer that is not an array: the block settings and the couplings."""

    block: BlockConfig
    cf: BaseCoupling
    cg: BaseCoupling

    @classmethod
    def from_config(cls, config: ModelConfig, compute_dtype: str | None = None) -> "LayerStatic":
        cf, cg = resolve_coupling(config), resolve_coupling(config)
        opts = options(config)
        out = cf.fx_features(config.d_model)
        if cg.fx_features(config.d_model) != out:
            raise ConfigError("the two couplings of a layer must take block outputs of the same width")
        block = BlockConfig(
            d_model=config.d_model, num_heads=config.num_heads, d_ff=config.ffn_dim, out_features=out,
            activation=config.activation, norm=config.norm, norm_eps=config.norm_eps, rope_base=config.rope_base,
            attention=opts.attention, use_flash_attention=opts.use_flash_attention, dropout=config.dropout,
            attention_dropout=config.attention_dropout, compute_dtype=compute_dtype,
            ffn_chunk_size=config.ffn_chunk_size, window=config.attention_window,
        )
        return cls(block, cf, cg)

    def with_coupling(self, coupling: BaseCoupling, d_model: int) -> "LayerStatic":
        """The same layer with ``coupling`` (an instance) for both halves; its block width must not change."""
        if isinstance(coupling, PairCoupling):
            raise ConfigError(f"{type(coupling).__name__} is a whole-pair coupling: it replaces a layer rather than "
                              "combining a block's output, so stack it with the model's layers through "
                              "revnet_jax.run_sequence (docs/jax.md)")
        if not isinstance(coupling, BaseCoupling):
            raise ConfigError(f"coupling must be a BaseCoupling instance, got {type(coupling).__name__}")
        if coupling.fx_features(d_model) != self.block.out_features:
            raise ConfigError(f"{coupling!r} takes block outputs of width {coupling.fx_features(d_model)}; the "
                              f"parameters produce {self.block.out_features}")
        return LayerStatic(self.block, coupling, coupling)


class PairCoupling:
    """A whole-pair invertible layer that owns its functions (torch's ``PairCoupling``, the README's
    ``BaseCoupling``), as pure functions of its own parameters.

    Subclass it with ``init(key, d_model, dtype) -> params`` (a pytree, default none),
    ``forward(params, x1, x2, key) -> (y1, y2)`` and ``inverse(params, y1, y2, key) -> (x1, x2)``, streams
    (B, T, d) each; ``key`` is the layer's PRNG key (None without dropout), the same in the forward and in
    the backward's recompute. The engine rebuilds the inputs with ``inverse`` and re-runs ``forward`` for the
    gradients, so it can hold any parameters and any functions. Stack it with ordinary layers through
    ``revnet_jax.engine.run_sequence``. Instances are compared by identity (jitted code is cached on them).
    """

    def init(self, key, d_model: int, dtype=jnp.float32):
        return {}

    def forward(self, params, x1, x2, key=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, params, y1, y2, key=None):  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Block:
    """A block bound to its parameters and dropout key: callable as ``block(x)``, as the core's sweep wants."""

    fn: Callable
    params: Any
    key: Any
    cfg: BlockConfig

    def __call__(self, x):
        return self.fn(self.params, x, self.key, self.cfg)

    def vjp(self, x):
        """(block(x), pullback) with pullback(ct) -> (dx, dparams); the same function, key and kernels."""
        out, pull = jax.vjp(lambda x_, p_: self.fn(p_, x_, self.key, self.cfg), x, self.params)

        def pullback(ct):
            # the coupling hands back cotangents in the stream's dtype; the block output may be narrower
            return pull(ct.astype(out.dtype))

        return out, pullback


def block_vjp(block: Block, x):
    return block.vjp(x)


def coupling_autodiff(coupling: BaseCoupling, x, fx, dy):
    """(dx, dfx) for a coupling that brings no vjp rule of its own."""
    _, pull = jax.vjp(coupling.forward, x, fx)
    return pull(dy)


def layer_keys(key):
    """(key_f, key_g) of one layer from its key; (None, None) without dropout."""
    if key is None:
        return None, None
    kf, kg = jax.random.split(key)
    return kf, kg


def layer_spec(static: LayerStatic, p, key) -> LayerSpec:
    """The core's view of one layer: ``p`` one layer's (unstacked) parameters, ``key`` its PRNG key or None."""
    kf, kg = layer_keys(key)
    f = Block(attention_block, p["attn"], kf, static.block)
    g = Block(ffn_block, p["ffn"], kg, static.block)
    return LayerSpec(f, g, static.cf, static.cg)


def layer_forward(static: LayerStatic, p, key, x1, x2):
    """(x1, x2) -> (y1, y2), each (B, T, d): plain autodiff through the layer."""
    return forward_step(x1, x2, layer_spec(static, p, key))


def layer_inverse(static: LayerStatic, p, key, y1, y2):
    """The layer's inputs rebuilt from its outputs."""
    return inverse_step(y1, y2, layer_spec(static, p, key))


def init_layers(key, config: ModelConfig, dtype=jnp.float32):
    """Parameters of all layers stacked on a leading axis (L, ...); torch's init: normal(init_std), the
    projections into a stream scaled by (2 L)^-1/2, norms at 1 (and 0)."""
    L, d, ff = config.num_layers, config.d_model, config.ffn_dim
    out = resolve_coupling(config).fx_features(d)
    up = (2 if config.activation in GATED else 1) * ff
    std, scaled = config.init_std, config.init_std * (2 * L) ** -0.5
    k = jax.random.split(key, 4)

    def normal(k_, shape, s):
        return (s * jax.random.normal(k_, (L, *shape), jnp.float32)).astype(dtype)

    return {
        "attn": {
            "norm": init_norm(config.norm, d, dtype, L),
            "qkv": {"weight": normal(k[0], (3 * d, d), std)},
            "proj": {"weight": normal(k[1], (out, d), scaled)},
        },
        "ffn": {
            "norm": init_norm(config.norm, d, dtype, L),
            "up": {"weight": normal(k[2], (up, d), std)},
            "down": {"weight": normal(k[3], (out, ff), scaled)},
        },
    }
