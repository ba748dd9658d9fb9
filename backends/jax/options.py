"""The JAX backend's section of ``ModelConfig.backend_options``: kernel choices, not architecture.

Imports no jax, so a config is checked (and the core's messages name these options) before jax loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from revnet_core.config import ModelConfig, backend_section
from revnet_core.errors import BackendFeatureError, ConfigError

BACKEND = "jax"
ATTENTIONS = ("sdpa", "reference")


@dataclass(frozen=True)
class JAXOptions:
    # sdpa: jax.nn.dot_product_attention (cuDNN or XLA, blocks.attention_implementation); reference: matmuls
    attention: str = "sdpa"
    use_flash_attention: bool = True  # False pins the XLA kernel where cuDNN's would apply

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"attention={self.attention!r} is not one of {list(ATTENTIONS)}")
        if not isinstance(self.use_flash_attention, bool):
            raise ConfigError(f"use_flash_attention={self.use_flash_attention!r} must be True or False")


def options(cfg: ModelConfig) -> JAXOptions:
    """The validated JAX section of ``cfg`` (defaults for what it leaves out). Every JAX model asks for it
    when it is built, so a config this backend cannot run stops here: bidirectional attention (causal=False)."""
    if not cfg.causal:
        raise BackendFeatureError("causal=False (bidirectional attention) is not built in the JAX backend; the torch "
                                  "backend has it (revnet_torch.bert.ReversibleBERT, or backend='torch')")
    return backend_section(cfg, BACKEND, JAXOptions)
