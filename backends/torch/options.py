"""The torch backend's section of ``ModelConfig.backend_options``: kernel choices, not architecture.

Imports no torch, so a config is checked (and the core's messages name these options) before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from revnet_core.config import ModelConfig, backend_section, model_fields
from revnet_core.errors import ConfigError

BACKEND = "torch"
ATTENTIONS = ("sdpa", "reference")
LOSS_KERNELS = ("auto", "chunked", "fused")


@dataclass(frozen=True)
class TorchOptions:
    attention: str = "sdpa"  # sdpa: torch's fused kernels where they apply; reference: plain matmuls
    use_flash_attention: bool = True  # False pins SDPA to its math kernel
    # LM head + loss: "fused" is revnet_kernels' linear cross-entropy (Triton on CUDA/ROCm, its own chunk size),
    # "chunked" its PyTorch variant over loss_chunk_size rows, "auto" fused on CUDA/ROCm, chunked elsewhere
    loss_kernel: str = "auto"
    # additive stacks in fixed point, so reverse layers rebuild their inputs bit for bit (engine.run_layers):
    # "auto" under autocast (where the drift is bf16's: docs/numerics.md), True always, False never
    exact_streams: bool | str = "auto"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"attention={self.attention!r} is not one of {list(ATTENTIONS)}")
        if not isinstance(self.use_flash_attention, bool):
            raise ConfigError(f"use_flash_attention={self.use_flash_attention!r} must be True or False")
        if self.exact_streams not in (True, False, "auto") or isinstance(self.exact_streams, int) and not isinstance(
                self.exact_streams, bool):
            raise ConfigError(f"exact_streams={self.exact_streams!r} must be True, False or 'auto'")
        if self.loss_kernel not in LOSS_KERNELS:
            raise ConfigError(f"loss_kernel={self.loss_kernel!r} is not one of {list(LOSS_KERNELS)}")


def options(cfg: ModelConfig) -> TorchOptions:
    """The validated torch section of ``cfg`` (defaults for what it leaves out)."""
    return backend_section(cfg, BACKEND, TorchOptions)


def config_of(fields: dict) -> ModelConfig:
    """A ModelConfig from flat keywords, torch options among them (a bench spec's ``config``)."""
    return model_fields(None, dict(fields), BACKEND, TorchOptions)
