"""``JAXMemoryScheduler``: how the layer stack of a ``ReversibleTransformerJAX`` trades memory for recompute,
in the user's README's names (``rematerialization_policy``), each one a policy of ``revnet_core.policies``."""

from __future__ import annotations

import warnings
from typing import Any

import jax

from revnet_core.policies import REMATERIALIZATION

from .memory import host_memory_available


class ScheduledModel:
    """A model with a memory schedule applied. ``scheduled(params, inputs)`` -> logits (B, T, V);
    ``scheduled.loss(params, inputs, labels=None)`` -> scalar; both pure, for ``jax.jit`` / ``jax.grad``."""

    def __init__(self, model, description: str):
        self.model = model
        self.description = description

    def __call__(self, params, inputs, *, key=None):
        return self.model.apply(params, inputs, key=key)

    def loss(self, params, inputs, labels=None, *, key=None):
        return self.model.loss(params, inputs, labels, key=key)

    def __repr__(self) -> str:
        return f"ScheduledModel({self.description})"


class JAXMemoryScheduler:
    """How the layer stack of a ``ReversibleTransformerJAX`` keeps what its backward needs.

    ``rematerialization_policy``:

    * ``"reverse"``: the reversible backward; keeps no activation per layer (the default);
    * ``"full"``: ``jax.checkpoint`` per layer; keeps each layer's two input streams;
    * ``"selective"``: ``jax.checkpoint`` saving the outputs of the weight matmuls
      (``dots_with_no_batch_dims_saveable``) and recomputing the rest (attention, norms, activations);
    * ``"none"``: plain autodiff; keeps everything.

    ``offload_to_cpu`` moves what ``full`` / ``selective`` keep to pinned host memory (layer inputs, resp.
    the saved matmul outputs) where the platform has one; elsewhere it warns and keeps them on device.
    With ``reverse`` or ``none`` there is nothing to offload and it warns. ``scan_layers`` runs the stack with
    ``lax.scan`` (compile time flat in depth) instead of a Python loop.
    """

    def __init__(self, scan_layers: bool = True, rematerialization_policy: str = "reverse",
                 offload_to_cpu: bool = False):
        if rematerialization_policy not in REMATERIALIZATION:
            raise ValueError(f"rematerialization_policy={rematerialization_policy!r} is not one of "
                             f"{list(REMATERIALIZATION)}")
        self.scan_layers = bool(scan_layers)
        self.rematerialization_policy = rematerialization_policy
        self.offload_to_cpu = bool(offload_to_cpu)

    def schedule(self, model) -> ScheduledModel:
        """``model`` (a ReversibleTransformerJAX) with this schedule; the original model is unchanged."""
        remat = self.rematerialization_policy
        offload = self.offload_to_cpu
        if offload and remat in ("reverse", "none"):
            warnings.warn(f"offload_to_cpu has no effect with rematerialization_policy={remat!r}: "
                          + ("the reversible backward keeps no activations" if remat == "reverse"
                             else "plain autodiff keeps everything on device"), stacklevel=2)
            offload = False
        if offload and not host_memory_available():
            warnings.warn(f"offload_to_cpu=True but {jax.devices()[0].platform} has no pinned host memory "
                          "space; activations stay on device", stacklevel=2)
            offload = False
        options: dict[str, Any] = {"use_scan": self.scan_layers, "policies": REMATERIALIZATION[remat]}
        if options["policies"] == "checkpoint":
            cp = jax.checkpoint_policies
            if remat == "selective":
                options["remat_policy"] = (cp.offload_dot_with_no_batch_dims("device", "pinned_host") if offload
                                           else cp.dots_with_no_batch_dims_saveable)
            else:
                options["offload"] = offload
        description = (f"scan_layers={self.scan_layers}, rematerialization_policy={remat!r}, "
                       f"offload_to_cpu={offload}")
        return ScheduledModel(model.replace(**options), description)

    def __repr__(self) -> str:
        return (f"JAXMemoryScheduler(scan_layers={self.scan_layers}, "
                f"rematerialization_policy={self.rematerialization_policy!r}, offload_to_cpu={self.offload_to_cpu})")
