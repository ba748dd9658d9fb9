"""Errors users see. Each names the bad value and what would be accepted."""


class RevNetError(Exception):
    """Base class for every error this library raises on purpose."""


class ConfigError(RevNetError, ValueError):
    """A configuration field is invalid; the message names the field and why."""


class DatasetUnavailableError(ConfigError):
    """A dataset named by the user cannot be loaded here (no network, no local copy); the message says how to
    make a local token file or which local sources are accepted."""


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


class TrainingError(RevNetError):
    """Training cannot go on (a non-finite loss or gradient, out of memory); the message says what to change."""


class DepthLimitError(TrainingError):
    """A continuous-depth solve needed more than ``max_depth`` steps; the message says to raise it or loosen the
    tolerance."""


class CheckpointError(RevNetError):
    """A checkpoint is missing, corrupt, truncated, or was written by an incompatible run."""


class CheckpointCorruptError(CheckpointError):
    """The file's bytes are damaged: a checksum fails or the file cannot be parsed."""


class CheckpointTruncatedError(CheckpointCorruptError):
    """The file ends early (a copy or a write cut short)."""


class CheckpointUnsafeError(CheckpointError):
    """The file holds pickled code or objects that safe loading refuses to run."""


class CheckpointIncompatibleError(CheckpointError):
    """A sound file that does not fit: another format, backend, model config or run settings."""


class DistributedError(RevNetError, RuntimeError):
    """A distributed wrapping or sharding the reversible engine cannot train under (its layers' gradients would
    not arrive, or arrive unsynchronised); the message names the layer and the supported way."""
