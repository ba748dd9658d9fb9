"""Registers the torch backend's record. Importing this module does not import torch: ``build`` does."""

from revnet_core.hookspecs import hookimpl
from revnet_core.registry import BackendRecord

# The bench module's built-in models (revnet_torch.bench builds each), named here so `revnet bench` checks
# a name before torch is imported.
BENCH_MODELS = ("plain", "checkpoint", "offload", "reversible", "reversible_rf")


def build(config, *, weights=None):
    """A ``ReversibleTransformer`` for ``config`` (a ModelConfig), with ``weights`` loaded if given."""
    from .model import ReversibleTransformer
    from .weights import load_weights

    model = ReversibleTransformer(config)
    if weights is not None:
        load_weights(model, weights)
    return model


RECORD = BackendRecord(
    "torch", build,
    trainer="revnet_torch.trainer",
    bench="revnet_torch.bench",
    cost="revnet_torch.cost:CostModel",
    scheduler="revnet_torch.scheduler",
    memory="revnet_torch.memory",
    options="revnet_torch.options:TorchOptions",
    bench_models=BENCH_MODELS,
)


@hookimpl
def register_backends(register):
    register(RECORD)
