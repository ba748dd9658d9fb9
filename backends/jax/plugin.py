"""Registers the JAX backend. Importing this module does not import jax: ``build`` does."""

from revnet_core.hookspecs import hookimpl


def build(config, *, weights=None):
    """A ``ReversibleTransformerJAX`` for ``config`` (a ModelConfig), with ``weights`` loaded if given."""
    from .model import ReversibleTransformerJAX

    model = ReversibleTransformerJAX(config)
    if weights is not None:
        model.load_weights(weights)
    return model


@hookimpl
def register_backends(register):
    register("jax", build)
