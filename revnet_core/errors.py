"""Errors users see. Each names the bad value and what would be accepted."""


class RevNetError(Exception):
    """Base class for every error this library raises on purpose."""


class ConfigError(RevNetError, ValueError):
    """A configuration field is invalid; the message names the field and why."""


class InputError(RevNetError, ValueError):
    """A model input (ids, labels, embeddings) has the wrong shape, dtype or range."""


class UnknownNameError(RevNetError, KeyError):
    """A backend, coupling or kernel name is not registered; the message lists those that are."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class ReversibilityError(RevNetError, RuntimeError):
    """The reversible backward was used in a way it cannot support (e.g. run twice)."""


class BackendFeatureError(RevNetError, LookupError):
    """An installed backend lacks a part a command needs (a trainer, a bench, ...); the message names it and
    the backends that have one."""
