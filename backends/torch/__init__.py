"""revnet_torch: the PyTorch backend of RevNet-Zero (installed from ``backends/torch``).

Exports load on first access, so discovering the backend (``revnet_torch.plugin``) does not import torch.
"""

from revnet_core.lazy import lazy_exports

_EXPORTS = {
    "ModelOutput": ".model",
    "ReversibleTransformer": ".model",
    "ReversibleAttention": ".layers",
    "ReversibleFFN": ".layers",
    "ReversibleLayer": ".layers",
    "ReversibleSequence": ".layers",
    "PairCoupling": ".layers",
    "run_layers": ".engine",
    "chunked_lm_loss": ".loss",
    "load_weights": ".weights",
    "save_weights": ".weights",
    "RationalFourierAttention": ".rf_attention",
    "load_for_inference": ".generate",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
