"""ModelConfig: every architectural choice in one validated, framework-free record."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from . import policies
from .errors import ConfigError

ACTIVATIONS = ("gelu", "gelu_exact", "relu", "silu", "geglu", "swiglu")
GATED_ACTIVATIONS = ("geglu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
ATTENTIONS = ("sdpa", "reference")
STREAM_DTYPES = ("float32", "float64", "bfloat16", "float16")
LOSS_KERNELS = ("auto", "chunked", "fused")


@dataclass(frozen=True)
class ModelConfig:
    """A causal decoder LM built from reversible layers. Defaults give a small CPU-friendly model."""

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
    attention: str = "sdpa"  # sdpa: torch's fused kernels where they apply; reference: plain matmuls
    use_flash_attention: bool = True  # False pins SDPA to its math kernel
    activation: str = "gelu"  # gelu is the tanh approximation in every backend; gelu_exact is erf
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    stream_dtype: str = "float32"  # the two residual streams; never below the parameters' dtype
    policy: str = policies.DEFAULT  # per-layer default: a name of revnet_core.policies
    loss_chunk_size: int = 1024  # tokens per chunk of the LM head: bounds the logits held at once
    # LM head + loss: "fused" is revnet_kernels' linear cross-entropy (Triton on CUDA/ROCm, its own chunk size),
    # "chunked" the backend's PyTorch head (loss_chunk_size rows), "auto" fused on CUDA/ROCm, chunked elsewhere
    loss_kernel: str = "auto"
    ffn_chunk_size: int = 16384  # tokens per chunk of the FFN (0: whole sequence): bounds its 4x-wide intermediate
    attn_head_chunk: int = 0  # heads per attention chunk (0: from the length, ~2^20 token-heads per chunk)
    attention_window: int | None = None  # sliding-window attention: each token sees the last N (None: all)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        validate(self)

    @property
    def ffn_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ModelConfig":
        """Like ``ModelConfig(**kwargs)`` but an unknown keyword raises ConfigError listing the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**kwargs)

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
    _choice(cfg, "attention", ATTENTIONS)
    _choice(cfg, "activation", ACTIVATIONS)
    _choice(cfg, "norm", NORMS)
    _choice(cfg, "stream_dtype", STREAM_DTYPES)
    policies.check(cfg.policy)
    _choice(cfg, "loss_kernel", LOSS_KERNELS)
    if not cfg.norm_eps > 0:
        raise ConfigError(f"norm_eps={cfg.norm_eps!r} must be > 0")
    if not cfg.rope_base > 1:
        raise ConfigError(f"rope_base={cfg.rope_base!r} must be > 1")
    if not cfg.init_std > 0:
        raise ConfigError(f"init_std={cfg.init_std!r} must be > 0")
