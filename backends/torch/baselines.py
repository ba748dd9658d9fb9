"""What users have today, built from the same blocks, for fair comparisons.

``PlainGPT`` is a standard single-stream pre-norm GPT (``x = x + F(x); x = x + G(x)``) with the same
attention, FFN, norm, RoPE and chunked loss head as ``ReversibleTransformer`` and the same parameter count
(additive coupling). ``memory="checkpoint"`` recomputes each layer in the backward
(``torch.utils.checkpoint``); ``memory="offload"`` also moves the saved layer inputs to pinned host memory.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from revnet_core import policies as policy_table
from revnet_core.config import ModelConfig, model_fields

from .blocks import AttentionBlock, FeedForwardBlock, Rotary, make_norm
from .model import ModelOutput, init_weights
from .loss import lm_loss, shift_targets
from .options import TorchOptions, options

# A plain GPT's memory modes: the table's policies it can run (no inverse, no block recompute), and offload.
MEMORY_MODES = tuple(p for p in policy_table.WHOLE_LAYER if not policy_table.BY_NAME[p].needs_inverse) + ("offload",)


class PlainLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        opts = options(cfg)
        self.attn = AttentionBlock(
            cfg.d_model, cfg.num_heads, cfg.d_model, rotary, norm=cfg.norm, eps=cfg.norm_eps,
            attention=opts.attention, use_flash_attention=opts.use_flash_attention,
            attention_dropout=cfg.attention_dropout, dropout=cfg.dropout, head_chunk=cfg.attn_head_chunk,
            window=cfg.attention_window,
        )
        self.ffn = FeedForwardBlock(cfg.d_model, cfg.ffn_dim, cfg.d_model, activation=cfg.activation, norm=cfg.norm,
                                    eps=cfg.norm_eps, dropout=cfg.dropout, chunk_size=cfg.ffn_chunk_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ffn(x)


class PlainGPT(nn.Module):
    """A standard GPT of the config's width and depth. ``memory``: store | checkpoint | offload."""

    def __init__(self, config: ModelConfig | None = None, memory: str = "store", **fields):
        super().__init__()
        if memory not in MEMORY_MODES:
            raise ValueError(f"{memory=} is not one of {list(MEMORY_MODES)}")
        config = model_fields(config, fields, "torch", TorchOptions)
        self.config = config
        self.options = options(config)
        self.memory = memory
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.rotary = Rotary(config.head_dim, config.rope_base)
        self.layers = nn.ModuleList(PlainLayer(config, self.rotary) for _ in range(config.num_layers))
        self.norm = make_norm(config.norm, config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self, config)  # the same rule as the reversible model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                return_logits: bool = False) -> ModelOutput:
        """Same contract as ``ReversibleTransformer.forward`` (without its input validation)."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        x = self.embed(input_ids)
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 stream under autocast; fp64 stays fp64
        grad = torch.is_grad_enabled()
        offload = torch.autograd.graph.save_on_cpu(pin_memory=True) if self.memory == "offload" and grad \
            else contextlib.nullcontext()
        with offload:
            for layer in self.layers:
                if self.memory != "store" and grad:
                    x = checkpoint(layer, x, use_reentrant=False)
                else:
                    x = layer(x)
        h = self.norm(x)
        targets = shift_targets(input_ids if labels is None else labels)
        loss = lm_loss(h, self.head.weight, targets, self.config.loss_chunk_size, self.options.loss_kernel)
        return ModelOutput(loss=loss, logits=self.head(h) if return_logits else None, last_hidden_state=h)
