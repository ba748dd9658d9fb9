"""revnet_torch: the PyTorch backend of RevNet-Zero (installed from ``backends/torch``).

Exports load on first access, so discovering the backend (``revnet_torch.plugin``) does not import torch.
"""

import importlib

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
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
