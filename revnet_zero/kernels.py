"""Device kernels beside their references (``revnet_kernels``): Triton on GPUs, the PyTorch reference elsewhere.
Among them the README's ``TritonRFAttention`` (``revnet_kernels.linear_attn``).

Loaded on first access, like ``revnet_kernels`` itself: importing this module imports neither torch nor triton.
"""

import revnet_kernels

__all__ = list(revnet_kernels.__all__)


def __getattr__(name):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(revnet_kernels, name)


def __dir__():
    return __all__
