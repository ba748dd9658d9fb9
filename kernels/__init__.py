"""revnet_kernels: device kernels beside their plain PyTorch references (installed from ``kernels/``).

Public functions validate their inputs, then ask the registry (``revnet_kernels.registry``) which
implementation serves this device, dtype and shape (``plugin`` ranks them: Triton, PyTorch's own ops, the
plain references). ``REVNET_KERNELS=reference`` or ``impl="reference"`` forces the reference.

Exports load on first access: importing this package imports neither torch nor triton.
"""

from revnet_core.lazy import lazy_exports

_EXPORTS = {
    "attention": ".attn",
    "reference_attention": ".attn",
    "layer_norm": ".norms",
    "rms_norm": ".norms",
    "reference_layer_norm": ".norms",
    "reference_rms_norm": ".norms",
    "activation": ".activations",
    "reference_activation": ".activations",
    "chunked_ffn": ".ffn",
    "linear_cross_entropy": ".cross_entropy",
    "reference_linear_cross_entropy": ".cross_entropy",
    "KernelImpl": ".registry",
    "KernelFallbackWarning": ".registry",
    "select": ".registry",
    "describe": ".registry",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
