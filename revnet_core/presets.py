"""Named model sizes: ``preset_config('1.3B', max_seq_len=262144)`` -> a ModelConfig of that shape.

The GPT-3 shapes (Brown et al. 2020, Table 2.1: layers, width, heads; FFN 4x) under their nominal parameter
counts, plus small shapes that train on a CPU in seconds. The XL model lists 24 heads of 128 for a width of
2048, which does not divide: 16 heads of 128 are used instead. The vocabulary is not part of a shape: the
default is ModelConfig's (256, bytes, the embedded corpus); the counts are nominal at GPT-2's 50257.
"""

from __future__ import annotations

import re
from typing import Any

from .config import ModelConfig
from .errors import ConfigError

# name: (layers, d_model, heads)
MODEL_SIZES = {
    "125M": (12, 768, 12),
    "350M": (24, 1024, 16),
    "760M": (24, 1536, 16),
    "1B": (24, 2048, 16),
    "1.3B": (24, 2048, 16),
    "2.7B": (32, 2560, 32),
    "6.7B": (32, 4096, 32),
    "7B": (32, 4096, 32),
    "13B": (40, 5120, 40),
}
# Shapes for this machine's tests and examples; "base" is the 125M shape under the name the user's README
# gives a base model ("revnet-zero-base").
SMALL_SIZES = {
    "tiny": (2, 64, 4),
    "small": (4, 128, 4),
    "base": MODEL_SIZES["125M"],
    "revnet-zero-base": MODEL_SIZES["125M"],
}
PRESETS = {**SMALL_SIZES, **MODEL_SIZES}

_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbB])\s*$")
_SCALE = {"k": 1e3, "m": 1e6, "b": 1e9}


def size_name(size: str | int | float) -> str:
    """The preset name for ``size``: a name (``'1.3B'``, ``'1.3b'``, ``'tiny'``) or a parameter count
    (``125e6``: the nominal size it names). Raises ConfigError listing the sizes for anything else."""
    if isinstance(size, str):
        key = size.strip()
        if key in PRESETS:
            return key
        m = _COUNT.match(key)
        if m:
            size = float(m.group(1)) * _SCALE[m.group(2).lower()]
        elif key.lower() in PRESETS:
            return key.lower()
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        for name in MODEL_SIZES:
            nominal = float(name[:-1]) * _SCALE[name[-1].lower()]
            if abs(size - nominal) <= 0.01 * nominal:
                return name
    raise ConfigError(f"model size {size!r} is not one of {list(PRESETS)} (or their parameter counts, e.g. 125e6)")


def preset_shape(size: str | int | float) -> tuple[int, int, int]:
    """(layers, d_model, heads) of a named size."""
    return PRESETS[size_name(size)]


def preset_config(size: str | int | float, **fields: Any) -> ModelConfig:
    """A ModelConfig of a named shape (FFN 4x d_model); ``fields`` override anything, e.g. ``vocab_size``."""
    layers, d, heads = preset_shape(size)
    return ModelConfig(**{"num_layers": layers, "d_model": d, "num_heads": heads, "d_ff": 4 * d, **fields})
