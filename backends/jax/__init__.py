"""revnet_jax: the JAX backend of RevNet-Zero (installed from ``backends/jax``).

Exports load on first access, so discovering the backend (``revnet_jax.plugin``) does not import jax.
"""

from revnet_core.lazy import lazy_exports

_EXPORTS = {
    "ModelOutput": ".model",
    "ReversibleTransformerJAX": ".model",
    "LayerStatic": ".layers",
    "layer_forward": ".layers",
    "layer_inverse": ".layers",
    "PairCoupling": ".layers",
    "run_sequence": ".engine",
    "reversible_stack": ".engine",
    "run_layers": ".engine",
    "chunked_lm_loss": ".loss",
    "load_weights": ".weights",
    "save_weights": ".weights",
    "JAXMemoryScheduler": ".scheduler",
    "compiled_memory": ".memory",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
