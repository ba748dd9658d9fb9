"""Weights in the canonical layout every backend shares: safetensors, float32, torch ``state_dict`` names
and (out_features, in_features) matrices (``docs/jax.md`` lists the names). The numba model's ``params``
are already that dict, so saving and loading are a cast and a check."""

from __future__ import annotations

import os

import numpy as np

from revnet_core.errors import ConfigError

FORMAT = "revnet-zero-canonical-v1"


def save_weights(params: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write ``params`` (canonical name -> array) as float32 safetensors, atomically (temp file, then rename)."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata={"format": FORMAT})
    os.replace(tmp, path)


def check_fits(tensors: dict, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """ConfigError listing the first few missing, unexpected and wrongly shaped names, if any."""
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    bad = sorted(k for k in set(shapes) & set(tensors) if tuple(np.shape(tensors[k])) != tuple(shapes[k]))
    if missing or unexpected or bad:
        raise ConfigError(f"weight file {source!r} does not fit this model: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}, wrong shape {bad[:5]}")


def load_weights(path: str | os.PathLike, shapes: dict[str, tuple[int, ...]], dtype) -> dict[str, np.ndarray]:
    """Read a canonical weight file (any backend's ``save_weights``): canonical name -> array in ``dtype``,
    checked against ``shapes`` (``layers.parameter_shapes``)."""
    from safetensors.numpy import load_file

    tensors = load_file(os.fspath(path))
    check_fits(tensors, shapes, os.fspath(path))
    return {k: np.ascontiguousarray(tensors[k], dtype) for k in shapes}
