"""revnet_core: the framework-neutral heart of RevNet-Zero.

Couplings over the Array API, the per-layer steps of the reversible sweep, the model config, and the
plugin registry. Imports no framework: backends are found through entry points when first asked for.
"""

from .build import build, resolve_coupling
from .config import ModelConfig
from .couplings import AdditiveCoupling, AffineCoupling, BaseCoupling, CouplingType
from .errors import BackendFeatureError, ConfigError, InputError, ReversibilityError, RevNetError, UnknownNameError
from .hookspecs import hookimpl
from .sweep import LayerSpec, backward_step, forward_step, inverse_step

__version__ = "0.1.0"

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "BackendFeatureError",
    "BaseCoupling",
    "ConfigError",
    "CouplingType",
    "InputError",
    "LayerSpec",
    "ModelConfig",
    "ReversibilityError",
    "RevNetError",
    "UnknownNameError",
    "backward_step",
    "build",
    "forward_step",
    "hookimpl",
    "inverse_step",
    "resolve_coupling",
]
