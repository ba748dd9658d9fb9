"""The JAX implementation (``revnet_jax``): ``ReversibleTransformerJAX`` with ``init``/``apply``, and
``JAXMemoryScheduler``. Loaded on first access: importing this module does not import jax."""

import importlib

_EXPORTS = {
    "ReversibleTransformerJAX": "revnet_jax.model",
    "JAXMemoryScheduler": "revnet_jax.memory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return __all__
