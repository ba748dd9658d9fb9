"""Reversible models over several processes, on PyTorch's own stack: DDP, or FSDP2 with one unit per layer.

FSDP2 (``torch.distributed.fsdp.fully_shard``) gathers a module's parameters in hooks around the module's
``forward`` and reduce-scatters their gradients in an autograd node on its inputs. The engine never calls a
reversible layer's ``forward``: each ``reverse`` layer is one autograd node (``revnet_torch.engine``) that
runs the layer's blocks itself, in the forward and again in its backward. So ``shard_model`` registers, per
layer, the engine's ``LAYER_CALL`` hook as an FSDP forward method (``register_fsdp_forward_method``, FSDP2's
public way to hook a method other than ``forward``). Then, for every policy:

* forward: FSDP2 gathers the layer, the node takes the gathered parameters as its inputs, FSDP2 frees them;
* backward: the hooks FSDP2 left on the node's outputs gather the layer again (prefetching the layer below,
  in the recorded forward order), the node rebuilds its inputs and returns the parameters' gradients to
  autograd, which accumulates them where FSDP2 expects, and FSDP2's post-backward node on the layer's inputs
  reduce-scatters them and frees the layer: exactly what it does for a plain module.

What would train silently without gradients is refused by ``DistributedError``: a layer (or a block inside
it) sharded by hand without the hook (the engine sees sharded parameters where its node runs), a model
already wrapped, and, in ``DistributedReversibleTrainer``, any trainable parameter left without a gradient
by the first backward.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch
from torch import nn

from revnet_core.errors import DistributedError

from .engine import LAYER_CALL


def _layer_call(layer: nn.Module, fn, x1: torch.Tensor, x2: torch.Tensor):
    """The body FSDP2's pre- and post-forward hooks wrap: ``fn(x1, x2)``, the engine's work for the layer."""
    return fn(x1, x2)


def _fsdp_module_type():
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def check_unwrapped(model: nn.Module) -> None:
    """DistributedError if ``model`` (or a module inside it) is already wrapped or sharded: a second wrapper
    would hide the reversible nodes from the first (DDP, FSDP1 and FSDP2 each name the fix)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    fsdp2 = _fsdp_module_type()
    for name, module in model.named_modules():
        where = f"{name!r}" if name else "the model"
        if isinstance(module, DistributedDataParallel):
            raise DistributedError(f"{where} is already wrapped in DistributedDataParallel; pass the bare model")
        if isinstance(module, FullyShardedDataParallel):
            raise DistributedError(f"{where} is wrapped in FSDP1 (FullyShardedDataParallel), whose flat "
                                   "parameters the reversible nodes cannot gather; use shard_model (FSDP2)")
        if isinstance(module, fsdp2):
            raise DistributedError(f"{where} is already sharded with fully_shard; shard the bare model with "
                                   "shard_model, which gives each reversible layer the hook its node needs")


def layer_policy(mp_policy):
    """The mixed-precision policy for a layer's unit: ``mp_policy`` with ``cast_forward_inputs`` off, since a
    layer's inputs are the two streams, which keep their own dtype (the blocks cast what they compute)."""
    if mp_policy is None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy()
    return dataclasses.replace(mp_policy, cast_forward_inputs=False)


def shard_model(model: nn.Module, *, mesh=None, reshard_after_forward: bool = True, mp_policy=None,
                offload_policy=None) -> nn.Module:
    """FSDP2 over a reversible model, in place: one ``fully_shard`` per module of ``model.layers`` (each with
    the engine's ``LAYER_CALL`` registered as an FSDP forward method) and one for the root (embedding, final
    norm, head). ``mesh``: a 1-D DeviceMesh (default: every rank, FSDP2's default); ``mp_policy``: a
    ``MixedPrecisionPolicy`` (the layers' units never cast their input streams); ``offload_policy``:
    e.g. ``CPUOffloadPolicy()``. Every policy of ``revnet_core.policies`` then trains with the gradients of
    one process over the ranks' combined batch. Returns ``model`` (now an ``FSDPModule``)."""
    from torch.distributed.fsdp import OffloadPolicy, fully_shard, register_fsdp_forward_method

    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise DistributedError(f"{type(model).__name__} has no .layers (an nn.ModuleList of reversible layers) "
                               "to shard one unit per layer; pass a revnet_torch model")
    check_unwrapped(model)
    common: dict[str, Any] = {"mesh": mesh, "offload_policy": offload_policy or OffloadPolicy()}
    root_mp = mp_policy if mp_policy is not None else layer_policy(None)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, mp_policy=layer_policy(mp_policy), **common)
        setattr(layer, LAYER_CALL, types.MethodType(_layer_call, layer))
        register_fsdp_forward_method(layer, LAYER_CALL)
    fully_shard(model, mp_policy=root_mp, **common)
    return model


def missing_gradients(model: nn.Module) -> list[str]:
    """Names of the trainable parameters of ``model`` with no gradient (after a backward that should have
    given every one of them one)."""
    return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


def check_gradients(model: nn.Module, step: int) -> None:
    """DistributedError naming the parameters a backward left without gradients: a wrapping that hides the
    reversible nodes trains those parameters not at all, which must never pass silently."""
    missing = missing_gradients(model)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise DistributedError(f"step {step}: the backward left {len(missing)} trainable parameters without a "
                               f"gradient ({shown}): the wrapping hides their layers' reversible nodes; use "
                               "DistributedReversibleTrainer's sharding_strategy, or revnet_torch.distributed."
                               "shard_model for FSDP2")
