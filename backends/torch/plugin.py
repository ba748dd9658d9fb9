"""Registers the torch backend. Importing this module does not import torch: ``build`` does."""

from revnet_core.hookspecs import hookimpl


def build(config, *, weights=None):
    """A ``ReversibleTransformer`` for ``config`` (a ModelConfig), with ``weights`` loaded if given."""
    from .model import ReversibleTransformer
    from .weights import load_weights

    model = ReversibleTransformer(config)
    if weights is not None:
        load_weights(model, weights)
    return model


@hookimpl
def register_backends(register):
    register("torch", build)
