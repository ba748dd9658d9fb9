"""ReversibleTransformer: a causal decoder LM whose layers rebuild their inputs in the backward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from revnet_core import policies as policy_table
from revnet_core.config import ModelConfig, model_fields
from revnet_core.errors import ConfigError, InputError
from revnet_core.inputs import check_id_range, check_labels_shape, check_length, check_loss_length

from .blocks import Rotary, make_norm
from .engine import run_layers
from .layers import ReversibleLayer, attention_from_config
from .loss import IGNORE_INDEX, lm_loss, shift_targets
from .options import TorchOptions, options

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def init_weights(model: nn.Module, config: ModelConfig) -> None:
    """GPT-2's rule: matrices ~ N(0, init_std); projections into a stream scaled down with depth (2 per layer)."""
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        scale = (2 * config.num_layers) ** -0.5 if name.endswith(("proj.weight", "down.weight")) else 1.0
        nn.init.normal_(p, mean=0.0, std=config.init_std * scale)


def _attention_parts(block: nn.Module) -> dict[str, nn.Module]:
    """The weights every attention block has, by role: softmax's ``AttentionBlock`` holds qkv and proj
    itself, the RF block inside its ``RationalFourierAttention``."""
    inner = getattr(block, "attn", block)
    return {"norm": block.norm, "qkv": inner.qkv, "proj": inner.proj}


@dataclass
class ModelOutput:
    """loss: scalar fp32 (None without targets); logits: (B, T, V) only if asked; last_hidden_state: (B, T, d)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


class ReversibleTransformer(nn.Module):
    """Token embedding, reversible layers over two fp32 streams (both start from the embedding), the streams
    merged (``config.stream_merge``: their sum less the embedding, or their mean) through a final norm, and
    an untied LM head.

    ``ReversibleTransformer(num_layers=24, d_model=1024, num_heads=16, max_seq_len=262144)`` or
    ``ReversibleTransformer(config)``; every field of ``revnet_core.ModelConfig`` is accepted, and the torch
    backend's options (``revnet_torch.options.TorchOptions``: ``use_flash_attention``, ``attention``,
    ``loss_kernel``) go to the config's torch section.
    """

    encoder = False  # ReversibleBERT: a bidirectional model needs a loss without the next-token shift

    def __init__(self, config: ModelConfig | None = None, **fields):
        super().__init__()
        config = model_fields(config, fields, "torch", TorchOptions)
        if not config.causal and not self.encoder:  # next-token loss over bidirectional attention sees the answer
            raise ConfigError(f"causal=False in {type(self).__name__}: its next-token loss would let every token "
                              "see the one it predicts; a bidirectional model is ReversibleBERT (masked LM)")
        self.config = config
        self.options = options(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.rotary = Rotary(config.head_dim, config.rope_base)
        self.layers = nn.ModuleList(ReversibleLayer.from_config(config, self.rotary) for _ in range(config.num_layers))
        self.norm = make_norm(config.norm, config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.policies: list[str] = [config.policy] * config.num_layers
        self.scheduler = None  # the memory scheduler set_scheduler attached (revnet_torch.scheduler), if any
        init_weights(self, config)

    # --- policies -------------------------------------------------------------------------------------
    def set_policy(self, policy: str | Sequence[str]) -> None:
        """One policy for every layer, or a list with one per layer: a name of ``revnet_core.policies``."""
        self.policies = list(policy_table.check_all(policy, len(self.layers)))

    def set_scheduler(self, scheduler) -> None:
        """Let ``scheduler`` (a ``revnet_torch.scheduler.LayerScheduler`` or ``MemoryScheduler``) choose the
        layers' policies at every forward; ``None`` detaches it and restores the previous policies."""
        from .scheduler import attach

        attach(self, scheduler)

    def set_attention_window(self, window: int | None) -> None:
        """Sliding-window attention in every layer: each token sees itself and the ``window - 1`` before it
        (None: full causal attention). Recorded in ``config`` so checkpoints rebuild the same model."""
        self.config = self.config.replace(attention_window=window)  # validates
        for layer in self.layers:
            layer.attn.block.window = window

    def set_attention_kind(self, kind: str, **attention_options) -> None:
        """Every layer's attention becomes ``kind`` ("softmax" | "rf"; ``attention_options`` for "rf": kernel,
        num_fourier_features, learnable_features, chunk_size, as ``ModelConfig.attention_options``), keeping
        the layers' norm, qkv and output weights (RF attention has the very same ones), so a softmax model
        becomes its RF approximation; the random features are drawn from torch's global RNG. The current
        ``attention_window`` stays: with "rf" it makes the windowed hybrid (exact softmax inside the window).
        Recorded in ``config`` so checkpoints rebuild the same model."""
        config = self.config.replace(attention_kind=kind, attention_options=dict(attention_options))  # validates
        if config == self.config:
            return
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, ReversibleLayer):
                raise ConfigError(f"layer {i} is a {type(layer).__name__}: set_attention_kind replaces the "
                                  "attention of ReversibleLayer stacks")
        for layer in self.layers:
            old = layer.attn.block
            p = next(old.parameters())
            new = attention_from_config(config, self.rotary).block.to(device=p.device, dtype=p.dtype)
            for name, module in _attention_parts(new).items():  # in the weights' own dtype: no rounding
                module.load_state_dict(_attention_parts(old)[name].state_dict())
            layer.attn.block = new
        self.config = config

    def compile_blocks(self, **options) -> "ReversibleTransformer":
        """``torch.compile`` every attention and FFN block in place; the sweep itself stays eager."""
        for layer in self.layers:
            layer.attn.block.compile(**options)
            layer.ffn.block.compile(**options)
        return self

    # --- forward --------------------------------------------------------------------------------------
    def _check_ids(self, ids: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise InputError(f"{what} must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise InputError(f"{what} must have shape (batch, seq) or (seq,), got {tuple(ids.shape)}")
        if ids.shape[0] == 0:
            raise InputError(f"{what} has batch size 0 (shape {tuple(ids.shape)}): pass at least one sequence")
        check_length(ids.shape[1], self.config.max_seq_len, what)
        return ids

    def _check_range(self, ids: torch.Tensor, what: str, allow_ignore: bool = False) -> None:
        real = ids[ids != IGNORE_INDEX] if allow_ignore else ids
        if real.numel():
            check_id_range(int(real.min()), int(real.max()), self.config.vocab_size, what)

    def streams(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams start from the embedding: (B, T) ids -> two (B, T, d) tensors in the stream dtype."""
        x = self.embed(input_ids)
        dtype = torch.promote_types(x.dtype, _DTYPES[self.config.stream_dtype])
        x = x.to(dtype)
        return x, x

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (B, T, d) of validated ids."""
        x1, x2 = self.streams(input_ids)
        exact = self.options.exact_streams  # "auto" defers to an engine.exact_streams context, if any
        y1, y2 = run_layers(self.layers, self.policies, x1, x2, private_outputs=True,
                            exact_streams=None if exact == "auto" else exact)
        return self.norm(self.merge_streams(y1, y2, input_ids))

    def merge_streams(self, y1: torch.Tensor, y2: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The top streams (B, t, d) of ids (B, t) as one (B, t, d), before the final norm
        (``config.stream_merge``): "mean" (y1 + y2) / 2, "sum" (y1 + y2 - e) / 2 with e the embedding."""
        # y1*0.5 + y2*0.5 rounds exactly like (y1 + y2)*0.5 (halving is exact) but its backward gives each
        # stream a cotangent buffer of its own, which the engine can then reuse in place.
        merged = y1 * 0.5 + y2 * 0.5
        if self.config.stream_merge == "sum":
            # The embedding is looked up again rather than kept: hidden()'s x1 would hold its gradient
            # buffer, (B, T, d), through the whole backward; a second lookup holds the (V, d) one at most.
            merged = merged.sub_(self.streams(input_ids)[0], alpha=0.5)
        return merged

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, return_logits: bool = False,
                return_hidden: bool = False, compute_loss: bool = True) -> ModelOutput:
        """Next-token LM. input_ids (B, T) or (T,) int; labels like input_ids (default: input_ids), shifted here.

        The loss is computed over sequence chunks; logits (B, T, V) are materialised only with return_logits,
        and the final hidden states (B, T, d) are kept only with return_hidden (at 256k tokens they are 1 GiB).
        """
        input_ids = self._check_ids(input_ids, "input_ids")
        self._check_range(input_ids, "input_ids")
        if labels is not None:
            labels = self._check_ids(labels, "labels")
            check_labels_shape(labels.shape, input_ids.shape)
            self._check_range(labels, "labels", allow_ignore=True)
        h = self.hidden(input_ids)
        loss = None
        if compute_loss:
            if labels is None:
                check_loss_length(input_ids.shape[1])
            targets = shift_targets(input_ids if labels is None else labels.to(torch.int64))
            loss = lm_loss(h, self.head.weight, targets, self.config.loss_chunk_size, self.options.loss_kernel)
        logits = self.head(h) if return_logits else None
        return ModelOutput(loss=loss, logits=logits, last_hidden_state=h if return_hidden else None)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue ids (B, T) or (T,) by max_new_tokens with a cache: ``revnet_torch.generate.generate``."""
        from .generate import generate

        return generate(self, ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)

    def save_weights(self, path) -> None:
        """Write the canonical safetensors file any backend can load (see ``revnet_core.build(weights=...)``)."""
        from .weights import save_weights

        save_weights(self, path)
