"""Weights in the canonical layout every backend shares: safetensors, fp32, torch ``state_dict`` names and
(out_features, in_features) matrices. ``docs/weights.md`` lists the names."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from revnet_core import atomic
from revnet_core.errors import ConfigError

from . import checkpoint as ckpt

SHA_PREFIX = "sha256:"  # metadata key of a tensor's SHA-256 (``revnet_torch.checkpoint.checksums``)


def save_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write the model's parameters as fp32 safetensors with a SHA-256 per tensor in the metadata, atomically
    (temp file, fsync, rename, folder sync): a crash leaves the old file or the new one."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "revnet-zero-canonical-v1",
                **{f"{SHA_PREFIX}{k}": ckpt.checksums({k: v})[k] for k, v in tensors.items()}}
    path = Path(path)
    with ckpt.deferred_sigint():
        ckpt.remove_stale_temps(path)
        with atomic.replacing(path) as tmp:
            save_file(tensors, os.fspath(tmp), metadata=metadata)


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a canonical weight file; names or shapes that do not match the model raise ConfigError."""
    tensors = read_weights(path)
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


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a canonical weight file, each checked against its SHA-256 where the file has one (files
    written before checksums load unverified). CheckpointTruncatedError / CheckpointCorruptError name the damage."""
    from safetensors import SafetensorError, safe_open

    where = os.fspath(path)
    _check_length(Path(path))
    try:
        with safe_open(where, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise ckpt.CheckpointCorruptError(f"weight file {where!r} is corrupt and cannot be read ({exc})") from None
    for name, tensor in tensors.items():
        stated = metadata.get(f"{SHA_PREFIX}{name}")
        if stated is not None and stated != ckpt.checksums({name: tensor})[name]:
            raise ckpt.CheckpointCorruptError(f"weight file {where!r} is damaged: tensor {name!r} fails its SHA-256 "
                                              "check; restore it from a copy")
    return tensors


def _check_length(path: Path) -> None:
    # safetensors: an 8-byte header length, the JSON header, then the tensors. A file shorter than they say
    # raises our error (safetensors' own is a bare SafetensorError); an absurd header length is corruption.
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = f.read(n) if 8 + n <= size else b""
    try:
        needed = 8 + n + max(v["data_offsets"][1] for k, v in json.loads(header).items() if k != "__metadata__")
    except (ValueError, KeyError, TypeError, AttributeError):  # no header to read: judge by its length alone
        needed = 8 + n if n < 1 << 27 else 0
    if len(head) < 8 or needed > size:
        raise ckpt.CheckpointTruncatedError(f"weight file {os.fspath(path)!r} is truncated ({size:,} bytes): a write "
                                            "or copy was cut short; restore it from a copy")
