"""ModelConfig: every architectural choice in one validated, framework-free record."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from . import policies
from .errors import ConfigError

ACTIVATIONS = ("gelu", "gelu_exact", "relu", "silu", "geglu", "swiglu")
GATED_ACTIVATIONS = ("geglu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
STREAM_DTYPES = ("float32", "float64", "bfloat16", "float16")
# How the two streams become the final hidden state. Both start from the embedding e, so their mean holds
# e + (sum F + sum G) / 2: "sum" subtracts the extra e, giving the plain residual stream's e + sum F + sum G
# (halved; the final norm is scale-free). Measured better (docs/benchmarks/parity.md); "mean" is the
# merge of models saved before the field existed.
STREAM_MERGES = ("sum", "mean")
# Fields a saved config may lack, and what such a model used (every model saved before ``causal`` was causal).
LEGACY_DEFAULTS = {"stream_merge": "mean", "causal": True, "attention_kind": "softmax", "attention_options": {}}
# The attention family of every layer: exact softmax, or Rational-Fourier random-feature attention (linear in
# length; the torch backend only). RF_KERNELS and RF_OPTIONS (with their defaults) are defined here once:
# revnet_torch.rf_attention imports them.
ATTENTION_KINDS = ("softmax", "rf")
RF_KERNELS = ("gaussian", "laplacian", "cauchy")
RF_OPTIONS = {"kernel": "gaussian", "num_fourier_features": 64, "learnable_features": False, "chunk_size": 64}


@dataclass(frozen=True)
class ModelConfig:
    """A reversible transformer LM: a causal decoder by default, a bidirectional encoder with ``causal=False``
    (``revnet_torch.bert.ReversibleBERT``). Defaults give a small CPU-friendly model."""

    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 4
    d_ff: int | None = None  # None: 4 * d_model
    vocab_size: int = 256  # byte-level by default; the seed model uses 50257
    max_seq_len: int = 2048
    dropout: float = 0.0  # on each block's output
    attention_dropout: float = 0.0
    coupling: str = "additive"  # a registered coupling name (built-ins: additive, affine; plugins add more)
    coupling_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"scale_init": 0.1} for affine
    activation: str = "gelu"  # gelu is the tanh approximation in every backend; gelu_exact is erf
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    stream_dtype: str = "float32"  # the two residual streams; never below the parameters' dtype
    stream_merge: str = "sum"  # STREAM_MERGES: how the two streams become the final hidden state
    policy: str = policies.DEFAULT  # per-layer default: a name of revnet_core.policies
    loss_chunk_size: int = 1024  # tokens per chunk of the LM head: bounds the logits held at once
    ffn_chunk_size: int = 16384  # tokens per chunk of the FFN (0: whole sequence): bounds its 4x-wide intermediate
    attn_head_chunk: int = 0  # heads per attention chunk (0: from the length, ~2^20 token-heads per chunk)
    attention_window: int | None = None  # sliding-window attention: each token sees the last N (None: all)
    causal: bool = True  # False: every token attends to every other (an encoder; torch backend only)
    attention_kind: str = "softmax"  # ATTENTION_KINDS; "rf": Rational-Fourier attention (torch backend only)
    attention_options: dict[str, Any] = field(default_factory=dict)  # "rf": RF_OPTIONS, e.g. {"kernel": "cauchy"}
    init_std: float = 0.02
    # Kernel choices, which are not architecture: one section per backend, validated by that backend when it
    # builds (revnet_torch.options, revnet_jax.options), e.g. {"torch": {"loss_kernel": "fused"}}.
    backend_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def ffn_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def rf_options(self) -> dict[str, Any]:
        """The RF attention settings with their defaults filled in (RF_OPTIONS); empty for softmax."""
        return {**RF_OPTIONS, **self.attention_options} if self.attention_kind == "rf" else {}

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ModelConfig":
        """Like ``ModelConfig(**kwargs)`` but an unknown keyword raises ConfigError listing the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            from .registry import option_names  # only on the error path: it discovers the backends

            owners = {n: b for b, names in option_names().items() for n in names if n in unknown}
            hint = "".join(f"; {n} is an option of the {b} backend: backend_options={{{b!r}: {{{n!r}: ...}}}}"
                           for n, b in sorted(owners.items()))
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}{hint}")
        return cls(**kwargs)

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> "ModelConfig":
        """A config read back from a checkpoint or file: fields it predates take the value its model used
        (``LEGACY_DEFAULTS``), not today's default, so an old model rebuilds the function it was trained as."""
        return cls.from_kwargs(**{**LEGACY_DEFAULTS, **saved})

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive_int(cfg: ModelConfig, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def _choice(cfg: ModelConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {list(choices)}")


def validate(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first bad field and why."""
    for name in ("num_layers", "d_model", "num_heads", "vocab_size", "max_seq_len", "loss_chunk_size"):
        _positive_int(cfg, name)
    if isinstance(cfg.ffn_chunk_size, bool) or not isinstance(cfg.ffn_chunk_size, int) or cfg.ffn_chunk_size < 0:
        raise ConfigError(f"ffn_chunk_size={cfg.ffn_chunk_size!r} must be a non-negative integer (0: no chunks)")
    if cfg.d_ff is not None:
        _positive_int(cfg, "d_ff")
    if isinstance(cfg.attn_head_chunk, bool) or not isinstance(cfg.attn_head_chunk, int) or cfg.attn_head_chunk < 0:
        raise ConfigError(f"attn_head_chunk={cfg.attn_head_chunk!r} must be a non-negative integer (0: automatic)")
    if cfg.attention_window is not None:
        _positive_int(cfg, "attention_window")
    if not isinstance(cfg.causal, bool):
        raise ConfigError(f"causal={cfg.causal!r} must be True (a decoder) or False (a bidirectional encoder)")
    if not cfg.causal and cfg.attention_window is not None:
        raise ConfigError(f"attention_window={cfg.attention_window} with causal=False: a sliding window looks back "
                          "only; leave attention_window=None for a bidirectional model")
    if cfg.d_model % cfg.num_heads:
        raise ConfigError(f"d_model={cfg.d_model} must be divisible by num_heads={cfg.num_heads}")
    if cfg.head_dim % 2:
        raise ConfigError(f"head_dim = d_model/num_heads = {cfg.head_dim} must be even for rotary positions")
    for name in ("dropout", "attention_dropout"):
        p = getattr(cfg, name)
        if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ConfigError(f"{name}={p!r} must be a probability in [0, 1)")
    if not isinstance(cfg.coupling, str) or not cfg.coupling:
        raise ConfigError(f"coupling={cfg.coupling!r} must be a registered coupling name")
    _choice(cfg, "activation", ACTIVATIONS)
    _choice(cfg, "norm", NORMS)
    _choice(cfg, "stream_dtype", STREAM_DTYPES)
    _choice(cfg, "stream_merge", STREAM_MERGES)
    policies.check(cfg.policy)
    _check_attention_kind(cfg)
    if not isinstance(cfg.backend_options, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in cfg.backend_options.items()):
        raise ConfigError(f"backend_options={cfg.backend_options!r} must map backend names to dicts of options")
    # Finite too: an inf init_std or rope_base passes "> 0" and gives NaN weights or angles.
    for name, low in (("norm_eps", 0), ("rope_base", 1), ("init_std", 0)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < math.inf:
            raise ConfigError(f"{name}={value!r} must be a finite number > {low}")


def _check_attention_kind(cfg: ModelConfig) -> None:
    _choice(cfg, "attention_kind", ATTENTION_KINDS)
    opts, allowed = cfg.attention_options, RF_OPTIONS if cfg.attention_kind == "rf" else {}
    if not isinstance(opts, dict) or set(opts) - set(allowed):
        raise ConfigError(f"attention_options={opts!r} with attention_kind={cfg.attention_kind!r}: a dict of "
                          f"{sorted(allowed) or 'nothing (the options are for attention_kind=rf)'}")
    if cfg.attention_kind == "softmax":
        return
    rf = cfg.rf_options
    for name, good, what in (("kernel", rf["kernel"] in RF_KERNELS, f"one of {list(RF_KERNELS)}"),
                             ("learnable_features", isinstance(rf["learnable_features"], bool), "True or False"),
                             *((n, type(rf[n]) is int and rf[n] > 0, "a positive integer")
                               for n in ("num_fourier_features", "chunk_size"))):
        if not good:
            raise ConfigError(f"attention_options {name}={rf[name]!r} must be {what}")
    # (causal=False and attention_dropout are refused by the layer that would build them: revnet_torch.layers)
    if cfg.attention_window is not None and rf["kernel"] != "gaussian":
        raise ConfigError(f"attention_window={cfg.attention_window} with attention_kind='rf' and kernel="
                          f"{rf['kernel']!r}: the windowed hybrid adds the RF estimate of softmax's exp(q.k) beyond the window, which "
                          "only kernel='gaussian' estimates")


def require_softmax(cfg: ModelConfig, backend: str) -> None:
    """ConfigError unless ``cfg``'s attention is softmax: RF attention is built in the torch backend only."""
    if cfg.attention_kind != "softmax":
        raise ConfigError(f"attention_kind={cfg.attention_kind!r} is built in the torch backend only, not in "
                          f"{backend}; build this config with backend='torch'")


def backend_section(cfg: ModelConfig, backend: str, options_cls: type) -> Any:
    """``cfg.backend_options[backend]`` as an ``options_cls`` (a dataclass that validates itself); an unknown
    name raises ConfigError listing the known ones."""
    given = cfg.backend_options.get(backend, {})
    known = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"unknown {backend} backend option(s) {unknown}; known: {sorted(known)}")
    return options_cls(**given)


def with_backend_options(cfg: ModelConfig, backend: str, options_cls: type, **changes: Any) -> ModelConfig:
    """``cfg`` with its ``backend`` section updated by ``changes``, validated now by ``options_cls``."""
    new = cfg.replace(backend_options={**cfg.backend_options, backend: {**cfg.backend_options.get(backend, {}),
                                                                        **changes}})
    backend_section(new, backend, options_cls)
    return new


def model_fields(config: ModelConfig | None, fields: dict[str, Any], backend: str, options_cls: type) -> ModelConfig:
    """The config a backend's model constructor means: ``config`` (or one from ``fields``) with ``fields``
    applied, the names of ``options_cls`` going to the ``backend`` section (``Model(num_layers=4,
    use_flash_attention=False)`` takes both kinds)."""
    names = {f.name for f in dataclasses.fields(options_cls)}
    arch = {k: v for k, v in fields.items() if k not in names}
    if config is None:
        config = ModelConfig.from_kwargs(**arch)
    elif arch:
        config = config.replace(**arch)
    opts = {k: v for k, v in fields.items() if k in names}
    return with_backend_options(config, backend, options_cls, **opts)
