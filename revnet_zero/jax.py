"""The JAX implementation (``revnet_jax``): ``ReversibleTransformerJAX`` with ``init``/``apply``, and
``JAXMemoryScheduler``. Loaded on first access: importing this module does not import jax."""

from revnet_core.lazy import lazy_exports

_EXPORTS = {
    "ReversibleTransformerJAX": "revnet_jax.model",
    "JAXMemoryScheduler": "revnet_jax.scheduler",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
