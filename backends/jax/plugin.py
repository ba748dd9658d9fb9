"""Registers the JAX backend's record. Importing this module does not import jax: ``build`` does."""

from revnet_core.hookspecs import hookimpl
from revnet_core.registry import BackendRecord


def build(config, *, weights=None):
    """A ``ReversibleTransformerJAX`` for ``config`` (a ModelConfig), with ``weights`` loaded if given."""
    from .model import ReversibleTransformerJAX

    model = ReversibleTransformerJAX(config)
    if weights is not None:
        model.load_weights(weights)
    return model


# No bench yet (issue 17): `revnet bench --backend jax` says so.
RECORD = BackendRecord(
    "jax", build,
    trainer="revnet_jax.trainer",
    scheduler="revnet_jax.scheduler",
    memory="revnet_jax.memory",
    options="revnet_jax.options:JAXOptions",
)


@hookimpl
def register_backends(register):
    register(RECORD)
