"""``convert_to_reversible``: a Hugging Face GPT-2 or Llama model whose fine-tuning backward rebuilds each
layer's input instead of storing it.

The converted model is a twin of the original: an object of the same transformers class whose modules
and parameters are the original's own (same ``Parameter`` objects, same state-dict names), so
``save_pretrained``, the original class's ``from_pretrained``, ``generate`` and tokenizers work unchanged.
Only its layer list differs: a ``ReversibleStack`` that the model's own forward iterates as before. Outside
training (``eval()`` or no grad) each layer runs exactly as in the original, so outputs are the original's
bit for bit. In training with grad, the first layer runs the whole stack as BDIA in fixed point
(``bdia``) through ``revnet_torch.engine.run_layers``, and the remaining layers pass the result on.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import sdpa_kernel
from torch.utils.checkpoint import checkpoint

from revnet_core import policies
from revnet_core.errors import ConfigError, InputError

from ..blocks import FUSED_SDPA
from ..engine import run_layers
from . import families
from .bdia import BDIAPair, StepContext, grid_step, range_limit, stream_dtype
from .errors import UnsupportedModelError, require_transformers

# The table's two ends: BDIA reverses the whole stack or stores it (no per-block recompute here).
POLICIES = (policies.DEFAULT, policies.NAMES[0])


@dataclass(frozen=True)
class Plan:
    """How the converted stack trains: BDIA with |gamma| = 2**-bits (bits None: gamma = 0, the original's
    function, in ``segments`` checkpointed segments or stored), by ``policy``."""

    bits: int | None
    segments: int | None
    policy: str


class _SnapSTE(torch.autograd.Function):
    """x onto the grid of ``step`` (a new tensor); the rounding passes cotangents unchanged."""

    @staticmethod
    def forward(ctx, x, step):
        return x.div(step).round_().mul_(step)

    @staticmethod
    def backward(ctx, g):
        return g, None


@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def layer_arguments(layer: nn.Module, hidden, args, kwargs) -> dict:
    """The keyword arguments the model passed its layer (positional ones named), with the KV cache
    dropped: a training forward fills no cache (it would hold every layer's keys and values)."""
    bound = _signature(type(layer)).bind(layer, hidden, *args, **kwargs)
    params = _signature(type(layer)).parameters
    kw = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        if i < 2:  # self, hidden_states
            continue
        if params[name].kind is inspect.Parameter.VAR_KEYWORD:
            kw.update(value)
        else:
            kw[name] = value
    if kw.get("encoder_hidden_states") is not None:
        raise InputError("convert_to_reversible: encoder_hidden_states (cross-attention) are not supported")
    for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if name in kw:
            kw[name] = None
    if "use_cache" in kw:
        kw["use_cache"] = False
    return kw


def _call_layer(kw: dict, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    # One SDPA priority list in the forward and in the backward's recompute: the rebuilt input is exact only
    # if the recomputed layer is the same function bit for bit.
    with sdpa_kernel(FUSED_SDPA, set_priority=True):
        out = layer(hidden, **kw)
    if not isinstance(out, torch.Tensor):  # older transformers: (hidden, ...) tuples the loop unpacks itself
        raise UnsupportedModelError(
            f"convert_to_reversible: {type(layer).__name__} returned a {type(out).__name__}, not the hidden "
            "states tensor transformers>=5.25 layers return; upgrade transformers (pip install 'revnet-zero[hf]')")
    return out


def _run_segment(layers, kw, hidden):
    for layer in layers:
        hidden = layer(hidden, **kw)
    return hidden


class _Forward:
    """One iteration of the stack by the model's forward: the first layer decides how the stack runs."""

    def __init__(self, stack: "ReversibleStack"):
        self.stack = stack
        self.mode = "plain"

    def first(self, layer, hidden, args, kwargs):
        stack, plan = self.stack, self.stack._plan
        if not (stack.training and torch.is_grad_enabled()) or (plan.bits is None and not plan.segments):
            return layer(hidden, *args, **kwargs)  # the original, layer by layer
        kw = layer_arguments(layer, hidden, args, kwargs)
        layers = list(stack._modules.values())
        self.mode = "whole"
        if plan.bits is None:  # gamma = 0: the original's function, in checkpointed segments
            bounds = [round(i * len(layers) / plan.segments) for i in range(plan.segments + 1)]
            for a, b in zip(bounds, bounds[1:]):
                hidden = checkpoint(_run_segment, layers[a:b], kw, hidden, use_reentrant=False)
            return hidden
        return self._bdia(layers, kw, hidden, plan)

    def _bdia(self, layers, kw, hidden, plan):
        sd = stream_dtype(hidden.dtype, hidden.device.type)
        x = hidden.to(sd)
        step = grid_step(x)
        x0 = _SnapSTE.apply(x, step)
        del x
        ctx = StepContext(step, plan.bits, hidden.dtype, functools.partial(_call_layer, kw))
        L, B = len(layers), hidden.shape[0]
        sigma = torch.randint(0, 2, (L, B, 1, 1), device=hidden.device).to(sd).mul_(2).sub_(1)
        pairs = self.stack._pairs
        for j, pair in enumerate(pairs):
            k = 2 * j
            pair.bind(ctx, sigma[k], sigma[k + 1] if k + 1 < L else None)
            pair.train(True)
        try:
            y1, y2 = run_layers(pairs, [plan.policy] * len(pairs), x0, x0, exact_streams=False)
        finally:
            for pair in pairs:  # each forward's blocks and couplings now live in its graph alone
                pair._bound = None
        out = y1 if L % 2 else y2
        if bool(ctx.peak >= range_limit(step)):
            warnings.warn("convert_to_reversible: the residual stream grew past the fixed-point range "
                          "(2**headroom times the embeddings' magnitude); sums rounded and this step's rebuilt "
                          "inputs (and gradients) are approximate", RuntimeWarning, stacklevel=2)
        return out.to(hidden.dtype)

    def rest(self, layer, hidden, args, kwargs):
        if self.mode == "whole":
            return hidden  # the first layer ran the whole stack
        return layer(hidden, *args, **kwargs)


class _Proxy:
    """What the model's loop calls in place of layer ``index``."""

    __slots__ = ("run", "index", "layer")

    def __init__(self, run: _Forward, index: int, layer: nn.Module):
        self.run, self.index, self.layer = run, index, layer

    def __call__(self, hidden, *args, **kwargs):
        if self.index == 0:
            return self.run.first(self.layer, hidden, args, kwargs)
        return self.run.rest(self.layer, hidden, args, kwargs)

    def __getattr__(self, name):  # attributes the loop may read (layer_idx, attention_type, ...)
        return getattr(self.layer, name)


class ReversibleStack(nn.ModuleList):
    """The original layers, registered under their original names; iterating it (what the model's forward
    does) yields proxies that run the stack reversibly in training. Indexing an int gives the layer itself."""

    def __init__(self, layers: nn.ModuleList, plan: Plan):
        super().__init__(list(layers))
        mods = list(self._modules.values())
        # plain attributes, not submodules: the pairs hold the same layers and must add no state-dict names
        self.__dict__["_plan"] = plan
        self.__dict__["_pairs"] = [BDIAPair(mods[i], mods[i + 1] if i + 1 < len(mods) else None)
                                   for i in range(0, len(mods), 2)]

    def __iter__(self):
        run = _Forward(self)
        return iter([_Proxy(run, i, m) for i, m in enumerate(self._modules.values())])

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # Llama iterates self.layers[:n]
            return list(self.__iter__())[idx]
        return super().__getitem__(idx)


def _twin(module: nn.Module) -> nn.Module:
    """A new object of the same class sharing every submodule, parameter and buffer with ``module``."""
    twin = type(module).__new__(type(module))
    twin.__dict__ = module.__dict__.copy()
    for name in ("_modules", "_parameters", "_buffers"):
        twin.__dict__[name] = module.__dict__[name].copy()
    return twin


def _plan(coupling, checkpoint_segments, gamma, policy, n_layers) -> Plan:
    if coupling == "affine":
        raise ConfigError("convert_to_reversible: coupling='affine' has no construction equal to the original "
                          "model at conversion (a learned scale would have to stay 1, i.e. additive); use "
                          "coupling='additive' (docs/hf_conversion.md)")
    if coupling != "additive":
        raise ConfigError(f"convert_to_reversible: coupling={coupling!r}; supported: 'additive'")
    bits = None
    if gamma != 0:
        m = -math.log2(gamma) if isinstance(gamma, (int, float)) and gamma > 0 else 0.5
        if not (m == int(m) and 1 <= m <= 8):
            raise ConfigError(f"convert_to_reversible: gamma={gamma!r}; it must be 0 (the original's function, "
                              "not reversible) or 2**-m for m in 1..8 (0.5, 0.25, ...), so gamma * x is exact "
                              "in fixed point up to m kept bits")
        bits = int(m)
    if checkpoint_segments is not None and (isinstance(checkpoint_segments, bool) or not isinstance(
            checkpoint_segments, int) or not 1 <= checkpoint_segments <= n_layers):
        raise ConfigError(f"convert_to_reversible: checkpoint_segments={checkpoint_segments!r} must be None or "
                          f"an int in 1..{n_layers} (the number of layers)")
    if policy not in POLICIES:
        raise ConfigError(f"convert_to_reversible: policy={policy!r}; one of {POLICIES}")
    return Plan(bits, checkpoint_segments, policy)


def convert_to_reversible(model: nn.Module, coupling: str = "additive", checkpoint_segments: int | None = None,
                          *, gamma: float = 0.5, policy: str = "reverse",
                          allow_modules: tuple[type, ...] = ()) -> nn.Module:
    """A twin of a Hugging Face ``GPT2Model``/``GPT2LMHeadModel``/``LlamaModel``/``LlamaForCausalLM`` that
    fine-tunes reversibly; same class, call signature, outputs and parameters (shared, not copied).

    Args:
        model: the pretrained model (any dtype/device; it is not modified).
        coupling: "additive" (the BDIA step's coupling ``y = fx + gamma x``, exact in fixed point).
        checkpoint_segments: with ``gamma=0`` (train the original's function itself, which is not
            invertible) the layers run in this many ``torch.utils.checkpoint`` segments; ``None``: stored.
            Unused when gamma != 0 (every layer is reversible).
        gamma: BDIA's |gamma_k| in training, drawn +-gamma per sample and layer; 2**-m, m in 1..8 (m side
            bits per element per layer are kept), or 0.
        policy: "reverse" (rebuild inputs in the backward) or "store" (the same construction by plain
            autograd; a reference).
        allow_modules: extra module classes inside the layers that the caller vouches are deterministic and
            stateless (e.g. a LoRA linear).

    Eval mode or no grad: every layer runs as in the original (outputs equal to the original's, ``generate``
    and the KV cache unchanged). Training with grad: input ids (B, T) -> the original outputs' fields
    (``last_hidden_state`` (B, T, d) in the model dtype, ``logits``, ``loss``), computed by the BDIA stack.
    Raises ``UnsupportedModelError`` for other classes, unknown modules or flags; ``ConfigError`` for bad
    arguments; ``MissingExtraError`` without transformers.
    """
    require_transformers()
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"convert_to_reversible: expected a transformers model, got "
                                    f"{type(model).__name__}; supported: {', '.join(families.SUPPORTED)}")
    family = families.identify(model)
    families.check(model, family, tuple(allow_modules))
    owner = families.stack_owner(model, family)
    layers = getattr(owner, family.stack[-1])
    plan = _plan(coupling, checkpoint_segments, gamma, policy, len(layers))
    twin = _twin(model)
    if len(family.stack) == 2:  # the LM head model: twin its base model too, so the original keeps its stack
        base = _twin(owner)
        twin._modules[family.stack[0]] = base
    else:
        base = twin
    base._modules[family.stack[-1]] = ReversibleStack(layers, plan)
    twin.__dict__["revnet_conversion"] = {"coupling": coupling, "gamma": gamma,
                                          "checkpoint_segments": checkpoint_segments, "policy": policy}
    return twin


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` came from ``convert_to_reversible``."""
    return "revnet_conversion" in model.__dict__


__all__ = ["convert_to_reversible", "is_converted", "ReversibleStack", "UnsupportedModelError"]
