"""revnet_kernels: device kernels beside their plain PyTorch references (installed from ``kernels/``).

Public functions validate their inputs, then ask the registry (``revnet_kernels.registry``) which
implementation serves this device, dtype and shape (``plugin`` ranks them: Triton, PyTorch's own ops, the
plain references). ``REVNET_KERNELS=reference`` or ``impl="reference"`` forces the reference.

Exports load on first access: importing this package imports neither torch nor triton.
"""

import sys as _sys


def _hand_the_name_back(name: str) -> None:
    """This folder is the package ``revnet_kernels``. Imported by its folder name, ``kernels`` (the repository
    root on ``sys.path``: a REPL, ``python -c`` or ``python -m`` started there), it would hide PyPI's ``kernels``,
    which transformers imports. Load that one under the name instead, searching ``sys.path`` without the root;
    the import statement then returns it. ImportError if no other ``kernels`` is installed."""
    import importlib.machinery
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in _sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:
        raise ImportError(f"No module named {name!r} (the folder {os.path.join(root, name)!r} is the package "
                          "revnet_kernels: import that)", name=name)
    module = importlib.util.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_the_name_back(__name__)

from revnet_core.lazy import lazy_exports  # noqa: E402

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
    "linear_attention": ".linear_attn",
    "reference_linear_attention": ".linear_attn",
    "TritonRFAttention": ".linear_attn",
    "KernelImpl": ".registry",
    "KernelFallbackWarning": ".registry",
    "select": ".registry",
    "describe": ".registry",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
