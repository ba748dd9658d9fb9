"""Errors of the Hugging Face converter, each a subclass of the closest one in ``revnet_core.errors``."""

from revnet_core.errors import BackendFeatureError, ConfigError


class UnsupportedModelError(ConfigError):
    """The model's class, one of its modules or a config flag is not one the converter knows; the message
    names it and lists what is supported."""


class MissingExtraError(BackendFeatureError, ImportError):
    """``transformers`` is not installed; the message names the extra that brings it."""


def require_transformers():
    """Import and return ``transformers``, or raise one line naming the extra."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised by blocking the import in a subprocess
        raise MissingExtraError(
            "convert_to_reversible needs Hugging Face transformers: pip install 'revnet-zero[hf]'") from exc
    return transformers
