"""RevNet-Zero, as its README spells it: ``from revnet_zero import ReversibleTransformer, MemoryScheduler``.

Every name here is the very object of ``revnet_core``, ``revnet_torch``, ``revnet_jax`` or ``revnet_kernels``
(re-exported, never copied). PyTorch is the framework behind the top-level classes; ``revnet_zero.jax`` holds
the JAX ones. Sub-modules load on first access, so ``import revnet_zero`` imports neither torch nor jax.
"""

import importlib

from revnet_core import __version__

_EXPORTS = {
    "ReversibleTransformer": "revnet_zero.models",
    "MemoryScheduler": "revnet_zero.memory",
    "convert_to_reversible": "revnet_torch.hf",
}
_SUBMODULES = ("benchmarks", "configs", "examples", "experimental", "jax", "kernels", "layers", "memory", "models",
               "research", "training", "utils")

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*__all__, *_SUBMODULES, "__version__"])
