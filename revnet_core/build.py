"""``build``: a config in, the chosen framework's native model out."""

from __future__ import annotations

from typing import Any

from .config import ModelConfig, model_fields
from .registry import backend_record, get_coupling


def build(backend: str = "torch", *, config: ModelConfig | None = None, weights: str | None = None, **fields: Any):
    """Build a reversible LM on ``backend`` ("torch", "jax", ... as installed).

    Pass either ``config`` or config fields as keywords (``num_layers=24, d_model=1024, ...``), the
    backend's options among them (``use_flash_attention=False``: its ``backend_options`` section). ``weights``
    is a canonical safetensors file (any backend's ``save_weights``) to load. Unknown backends, couplings
    and fields raise errors that list the valid names.
    """
    record = backend_record(backend)
    if record.options is not None:
        config = model_fields(config, fields, backend, record.load("options"))
    elif config is None:
        config = ModelConfig.from_kwargs(**fields)
    elif fields:
        config = config.replace(**fields)
    resolve_coupling(config)  # fail early, before the framework is imported
    return record.build(config, weights=weights)


def resolve_coupling(config: ModelConfig):
    """The coupling instance a config names (with its ``coupling_options``)."""
    return get_coupling(config.coupling, **config.coupling_options)
