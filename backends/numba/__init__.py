"""revnet_numba: the numba-CPU backend of RevNet-Zero (installed from ``backends/numba``).

Exports load on first access, so discovering the backend (``revnet_numba.plugin``) does not import numba.
"""

from revnet_core.lazy import lazy_exports

_EXPORTS = {
    "ModelOutput": ".model",
    "ReversibleTransformerNumba": ".model",
    "run_layers": ".engine",
    "chunked_lm_loss": ".loss",
    "load_weights": ".weights",
    "save_weights": ".weights",
    "live_array_bytes": ".memory",
    "causal_attention": ".attention",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
