"""revnet_torch.hf: Hugging Face models made reversible for fine-tuning (``convert_to_reversible``).

Needs the optional extra ``revnet-zero[hf]`` (transformers); importing this package does not import it
(exports load on first access, and the converter imports transformers only when called).
"""

from revnet_core.lazy import lazy_exports

_EXPORTS = {
    "convert_to_reversible": ".convert",
    "is_converted": ".convert",
    "ReversibleStack": ".convert",
    "UnsupportedModelError": ".errors",
    "MissingExtraError": ".errors",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
