"""Weights in the canonical layout every backend shares: safetensors, fp32, torch ``state_dict`` names and
(out_features, in_features) matrices. ``docs/weights.md`` lists the names."""

from __future__ import annotations

import os

import torch

from revnet_core.errors import ConfigError


def save_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write the model's parameters as fp32 safetensors, atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata={"format": "revnet-zero-canonical-v1"})
    os.replace(tmp, path)


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a canonical weight file; names or shapes that do not match the model raise ConfigError."""
    from safetensors.torch import load_file

    tensors = load_file(os.fspath(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    bad = sorted(k for k in set(own) & set(tensors) if tuple(own[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or bad:
        raise ConfigError(
            f"weight file {os.fspath(path)!r} does not fit this model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {bad[:5]}"
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k])
