"""Registers the numba-CPU backend's record. Importing this module imports neither numba nor numpy: ``build``
does, and a missing numba is one line saying how to install it (``NumbaMissingError``)."""

from revnet_core.errors import RevNetError
from revnet_core.hookspecs import hookimpl
from revnet_core.registry import BackendRecord
from revnet_kernels.registry import KernelImpl

INSTALL_HINT = "pip install 'revnet-zero[numba]'"


class NumbaMissingError(RevNetError, ImportError):
    """numba is not installed; the message says how to install it (the CLI prints it as one line)."""


def require_numba():
    """The numba module, or NumbaMissingError naming the install command (never a traceback from deep inside)."""
    try:
        import numba
    except ImportError as exc:
        raise NumbaMissingError(f"the numba backend needs numba ({exc}); install it with {INSTALL_HINT}") from None
    return numba


def build(config, *, weights=None):
    """A ``ReversibleTransformerNumba`` for ``config`` (a ModelConfig), with ``weights`` loaded if given."""
    require_numba()
    from .model import ReversibleTransformerNumba

    model = ReversibleTransformerNumba(config)
    if weights is not None:
        model.load_weights(weights)
    return model


RECORD = BackendRecord(
    "numba", build,
    trainer="revnet_numba.trainer",
    memory="revnet_numba.memory",
    options="revnet_numba.options:NumbaOptions",
)


# The norms and activations the blocks ask the kernel registry for (``revnet_numba.kernel_impls``): framework
# "numba", so the torch blocks never select them, nor these blocks a torch kernel.
_CPU, _NUMBA, _FLOATS = frozenset({"cpu"}), frozenset({"numba"}), frozenset({"float32", "float64"})
KERNELS = tuple(
    rec
    for op in ("layer_norm", "rms_norm", "activation")
    for rec in (
        KernelImpl(op, "numba", f"revnet_numba.kernel_impls:numba_{op}", _CPU, _FLOATS, priority=30,
                   requires=("numba",), description="numba kernel, rows over prange threads", frameworks=_NUMBA),
        KernelImpl(op, "reference", f"revnet_numba.kernel_impls:reference_{op}", is_reference=True,
                   description="plain numpy", frameworks=_NUMBA),
    )
)


@hookimpl
def register_backends(register):
    register(RECORD)


@hookimpl
def register_kernels(register):
    for rec in KERNELS:
        register(rec)
