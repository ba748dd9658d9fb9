"""Reversible half-layers (attention, FFN) and the layer that couples them.

``ReversibleAttention`` and ``ReversibleFFN`` each own a block and a coupling::

    hidden_states, coupling_output = half(hidden_states, other)   # coupling(other, block(hidden_states))

``ReversibleLayer`` chains them over two streams: y1 = cf(x1, F(x2)); y2 = cg(x2, G(y1)).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from revnet_core.build import resolve_coupling
from revnet_core.config import ModelConfig
from revnet_core.couplings import BaseCoupling
from revnet_core.errors import ConfigError
from revnet_core.policies import check_all
from revnet_core.registry import get_coupling
from revnet_core.sweep import LayerSpec, forward_step, inverse_step

from .blocks import AttentionBlock, FeedForwardBlock, Rotary
from .options import options
from .rf_attention import RFAttentionBlock


def as_coupling(coupling) -> BaseCoupling:
    """A coupling instance from an instance, a registered name, or an enum whose value is a name."""
    if isinstance(coupling, BaseCoupling):
        return coupling
    return get_coupling(getattr(coupling, "value", coupling))


class _CoupledHalf(nn.Module):
    block: nn.Module

    def __init__(self, coupling):
        super().__init__()
        self.coupling = as_coupling(coupling)

    def forward(self, hidden_states: torch.Tensor, other: torch.Tensor | None = None):
        """(B, T, d) -> (hidden_states, coupling(other, block(hidden_states))); ``other`` defaults to the input."""
        other = hidden_states if other is None else other
        return hidden_states, self.coupling.forward(other, self.block(hidden_states))

    def inverse(self, hidden_states: torch.Tensor, coupling_output: torch.Tensor) -> torch.Tensor:
        """The ``other`` stream rebuilt from the coupling output."""
        return self.coupling.inverse(coupling_output, self.block(hidden_states))


class ReversibleAttention(_CoupledHalf):
    """Self-attention coupled into a stream (RoPE positions, SDPA kernels): causal, or with ``causal=False``
    bidirectional (an encoder such as ``ReversibleBERT``; no window).

    ``use_rational_attention=True``: linear-time Rational-Fourier attention instead of softmax
    (``revnet_torch.rf_attention``; ``num_fourier_features``, ``rf_kernel`` gaussian | laplacian | cauchy,
    ``learnable_features``, ``rf_chunk_size``). It has no attention dropout; with ``window`` (gaussian kernel
    only) it is the windowed hybrid of ``revnet_torch.rf_hybrid``: exact softmax over the last ``window`` keys,
    the RF estimate of the same exp(q.k) for every key beyond, in one normalisation.
    """

    def __init__(self, d_model: int, num_heads: int, coupling="additive", *, attention_dropout: float = 0.0,
                 dropout: float = 0.0, norm: str = "layernorm", norm_eps: float = 1e-5, attention: str = "sdpa",
                 use_flash_attention: bool = True, rope_base: float = 10000.0, rotary: Rotary | None = None,
                 head_chunk: int = 0, window: int | None = None, use_rational_attention: bool = False,
                 num_fourier_features: int = 64, rf_kernel: str = "gaussian", learnable_features: bool = False,
                 rf_chunk_size: int = 64, causal: bool = True):
        super().__init__(coupling)
        if d_model % num_heads:
            raise ValueError(f"{d_model=} must be divisible by {num_heads=}")
        rotary = rotary if rotary is not None else Rotary(d_model // num_heads, rope_base)
        if use_rational_attention:
            if not causal:
                raise ConfigError("causal=False with use_rational_attention=True: the Rational-Fourier layer is "
                                  "causal linear attention (prefix sums); use softmax attention for an encoder")
            if attention_dropout:
                raise ConfigError(f"attention_dropout={attention_dropout!r} with use_rational_attention=True: "
                                  "Rational-Fourier attention has no attention dropout (its weights are never formed)")
            self.block = RFAttentionBlock(
                d_model, num_heads, self.coupling.fx_features(d_model), rotary,
                num_fourier_features=num_fourier_features, kernel=rf_kernel, learnable_features=learnable_features,
                chunk_size=rf_chunk_size, norm=norm, eps=norm_eps, dropout=dropout, window=window,
            )
            return
        self.block = AttentionBlock(
            d_model, num_heads, self.coupling.fx_features(d_model), rotary, norm=norm, eps=norm_eps,
            attention=attention, use_flash_attention=use_flash_attention, attention_dropout=attention_dropout,
            dropout=dropout, head_chunk=head_chunk, window=window, causal=causal,
        )


def attention_from_config(cfg: ModelConfig, rotary: Rotary) -> ReversibleAttention:
    """The attention half ``cfg`` describes: softmax, or with ``attention_kind="rf"`` Rational-Fourier attention
    with ``cfg.rf_options`` (windowed when ``attention_window`` is set)."""
    opts = options(cfg)
    rf = cfg.rf_options
    extra = {} if not rf else dict(
        use_rational_attention=True, num_fourier_features=rf["num_fourier_features"], rf_kernel=rf["kernel"],
        learnable_features=rf["learnable_features"], rf_chunk_size=rf["chunk_size"])
    return ReversibleAttention(
        cfg.d_model, cfg.num_heads, resolve_coupling(cfg), attention_dropout=cfg.attention_dropout,
        dropout=cfg.dropout, norm=cfg.norm, norm_eps=cfg.norm_eps, attention=opts.attention,
        use_flash_attention=opts.use_flash_attention, rotary=rotary, head_chunk=cfg.attn_head_chunk,
        window=cfg.attention_window, causal=cfg.causal, **extra,
    )


class ReversibleFFN(_CoupledHalf):
    """A feed-forward block (GELU, GeGLU, SwiGLU, ...) coupled into a stream."""

    def __init__(self, d_model: int, d_ff: int, coupling_fn="additive", *, activation: str = "gelu",
                 use_geglu: bool = False, dropout: float = 0.0, norm: str = "layernorm", norm_eps: float = 1e-5,
                 chunk_size: int = 0):
        super().__init__(coupling_fn)
        if use_geglu:
            activation = "geglu"
        self.block = FeedForwardBlock(
            d_model, d_ff, self.coupling.fx_features(d_model), activation=activation, norm=norm, eps=norm_eps,
            dropout=dropout, chunk_size=chunk_size,
        )


class PairCoupling(nn.Module):
    """A whole-pair invertible layer that owns its functions (the user's README ``BaseCoupling``).

    Subclass it with ``forward(x1, x2) -> (y1, y2)`` and ``inverse(y1, y2) -> (x1, x2)``, streams (B, T, d).
    The engine rebuilds the inputs with ``inverse`` (no grad) and re-runs ``forward`` for the gradients,
    both under the forward's autocast and RNG state, so it can hold any parameters and any functions.
    """

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y1: torch.Tensor, y2: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError


_HALVES = ("attention", "ffn")  # the blocks a stored layer can recompute on their own: F, G


class _Checkpointed:
    """A block called under ``torch.utils.checkpoint``: keeps its input, runs it again in the backward."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


class ReversibleLayer(nn.Module):
    """One reversible transformer layer over two streams (B, T, d) each."""

    def __init__(self, attn: ReversibleAttention, ffn: ReversibleFFN):
        super().__init__()
        self.attn = attn
        self.ffn = ffn

    @classmethod
    def from_config(cls, cfg: ModelConfig, rotary: Rotary) -> "ReversibleLayer":
        attn = attention_from_config(cfg, rotary)
        ffn = ReversibleFFN(
            cfg.d_model, cfg.ffn_dim, resolve_coupling(cfg), activation=cfg.activation, dropout=cfg.dropout,
            norm=cfg.norm, norm_eps=cfg.norm_eps, chunk_size=cfg.ffn_chunk_size,
        )
        return cls(attn, ffn)

    def spec(self) -> LayerSpec:
        return LayerSpec(self.attn.block, self.ffn.block, self.attn.coupling, self.ffn.coupling)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, *, recompute: str = ""):
        """Plain autograd through the layer (the ``store`` policy). ``recompute="attention"`` (or ``"ffn"``):
        that block runs under ``torch.utils.checkpoint`` when grad is enabled, so the layer keeps the block's
        input instead of its activations and runs it again in the backward (``recompute_attention``,
        ``recompute_ffn``)."""
        spec = self.spec()
        if recompute:
            if recompute not in _HALVES:
                raise ValueError(f"recompute={recompute!r} is not one of {list(_HALVES)} (or empty)")
            if torch.is_grad_enabled():
                f, g = spec.f, spec.g
                if recompute == "attention":
                    f = _Checkpointed(f)
                else:
                    g = _Checkpointed(g)
                spec = LayerSpec(f, g, spec.cf, spec.cg)
        return forward_step(x1, x2, spec)

    def inverse(self, y1: torch.Tensor, y2: torch.Tensor):
        """The layer's inputs rebuilt from its outputs."""
        return inverse_step(y1, y2, self.spec())


class ReversibleSequence(nn.Module):
    """A stack of reversible layers (``ReversibleLayer`` or ``PairCoupling``) over two streams (B, T, d).

    ``policies``: one per layer (reverse | store | checkpoint), default all ``reverse``.
    """

    def __init__(self, layers, policies=None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        # Checked here: run_layers treats any name it does not know as plain autograd, so a typo would run.
        self.policies = list(check_all("reverse" if policies is None else policies, len(self.layers)))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor | None = None):
        from .engine import run_layers

        return run_layers(self.layers, self.policies, x1, x1 if x2 is None else x2)

    def inverse(self, y1: torch.Tensor, y2: torch.Tensor):
        for layer in reversed(self.layers):
            y1, y2 = layer.inverse(y1, y2)
        return y1, y2
