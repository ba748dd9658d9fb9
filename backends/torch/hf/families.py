"""The Hugging Face architectures the converter knows, and the checks that refuse everything else.

Each supported class is named with the path to its stack of decoder layers and the module classes those
layers may contain. The converter calls each layer as a whole, so any deterministic layer would work; it
still refuses a module it has not seen (a custom attention, an adapter) unless the caller vouches for it,
because a stateful or random module would make the rebuilt inputs wrong without any error.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UnsupportedModelError, require_transformers

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")  # the recompute must be the forward's function, bit for bit


@dataclass(frozen=True)
class Family:
    """One supported model class: where its layer stack is and which modules its layers may hold."""

    name: str  # the transformers class name
    stack: tuple[str, ...]  # attribute path from the model to the nn.ModuleList of decoder layers
    layer_modules: tuple[str, ...]  # transformers class names allowed inside a layer (torch.nn ones below)


_GPT2 = ("GPT2Block", "GPT2Attention", "GPT2MLP", "Conv1D")
_LLAMA = ("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm")
FAMILIES = {
    "GPT2Model": Family("GPT2Model", ("h",), _GPT2),
    "GPT2LMHeadModel": Family("GPT2LMHeadModel", ("transformer", "h"), _GPT2),
    "LlamaModel": Family("LlamaModel", ("layers",), _LLAMA),
    "LlamaForCausalLM": Family("LlamaForCausalLM", ("model", "layers"), _LLAMA),
}
SUPPORTED = tuple(FAMILIES)
_TORCH_MODULES = (nn.Linear, nn.LayerNorm, nn.Dropout, nn.Identity, nn.SiLU, nn.GELU, nn.ReLU, nn.Tanh)


def identify(model: nn.Module) -> Family:
    """The model's family; ``UnsupportedModelError`` listing the supported classes otherwise. The class
    must be transformers' own (a subclass may override forward)."""
    transformers = require_transformers()
    cls = type(model)
    family = FAMILIES.get(cls.__name__)
    if family is None or getattr(transformers, cls.__name__, None) is not cls:
        raise UnsupportedModelError(
            f"convert_to_reversible: {cls.__module__}.{cls.__qualname__} is not supported; supported: "
            f"{', '.join(SUPPORTED)} (transformers' own classes, not subclasses)")
    return family


def stack_owner(model: nn.Module, family: Family) -> nn.Module:
    """The module whose attribute ``family.stack[-1]`` is the layer list."""
    owner = model
    for name in family.stack[:-1]:
        owner = getattr(owner, name)
    return owner


def _is_activation(cls: type) -> bool:
    return cls.__module__ == "transformers.activations"


def check(model: nn.Module, family: Family, allow_modules: tuple[type, ...] = ()) -> None:
    """Refuse, with ``UnsupportedModelError`` naming it, what the conversion could get silently wrong."""
    cfg = model.config
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in ATTN_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"convert_to_reversible: attn_implementation={impl!r} is not supported (supported: "
            f"{', '.join(ATTN_IMPLEMENTATIONS)}): the backward recomputes each layer and needs the very "
            "function the forward ran")
    if getattr(cfg, "add_cross_attention", False):
        raise UnsupportedModelError("convert_to_reversible: add_cross_attention=True (a decoder reading an "
                                    "encoder) is not supported; convert a decoder-only model")
    layers = getattr(stack_owner(model, family), family.stack[-1])
    if type(layers) is not nn.ModuleList:
        raise UnsupportedModelError(f"convert_to_reversible: {'.'.join(family.stack)} is a "
                                    f"{type(layers).__name__}, not the nn.ModuleList {family.name} builds "
                                    "(already converted?)")
    if len(layers) != cfg.num_hidden_layers:
        raise UnsupportedModelError(f"convert_to_reversible: {len(layers)} layers but config.num_hidden_layers="
                                    f"{cfg.num_hidden_layers}; the stack must run every layer")
    allowed = set(family.layer_modules)
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            cls = type(mod)
            known = (cls.__name__ in allowed and cls.__module__.startswith("transformers.")) or \
                cls in _TORCH_MODULES or _is_activation(cls) or issubclass(cls, tuple(allow_modules))
            if not known:
                where = f"layer {i}" + (f".{name}" if name else "")
                raise UnsupportedModelError(
                    f"convert_to_reversible: {where} is a {cls.__module__}.{cls.__qualname__}, which the "
                    f"converter does not know (it knows {', '.join(family.layer_modules)} and torch.nn "
                    "Linear/LayerNorm/Dropout/activations); if it is deterministic and keeps no state "
                    "between calls, pass it in allow_modules=")
            if "forward" in mod.__dict__:
                raise UnsupportedModelError(f"convert_to_reversible: layer {i}.{name or '(layer)'} has its forward "
                                            "replaced on the instance; the converter cannot vouch for it")
