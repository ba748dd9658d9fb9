"""ReversibleBERT: a bidirectional reversible encoder with a masked-LM head.

The layers, streams, memory policies and loss head are ``ReversibleTransformer``'s with ``causal=False``:
every token attends to every other, and the head predicts the token at its own position (no shift). Only
the positions ``labels`` marks (not -100) count in the loss.

Vocabulary: bytes 0-255, then ``MASK_ID`` = 256 ([MASK]) and ``PAD_ID`` = 257 ([PAD]); ``vocab_size`` is
258 by default and may be larger (ids from 258 on are ordinary tokens of the user's own). ``mask_tokens``
draws BERT's corruption (Devlin et al. 2019): each non-[PAD] token is chosen with ``mlm_probability``;
of the chosen, 80% become [MASK], 10% a random ordinary token, 10% stay.

Padding: ``attention_mask`` (B, T), 1 at real tokens and 0 at padding (default: every position not
[PAD]); padded keys get no weight, so a padded sequence's real positions compute what the unpadded sequence
would. The mask is bound to the attention blocks for the forward it belongs to (``AttentionBlock.masked``),
so the backward of every policy (``reverse`` rebuilds inputs with it) sees the same mask.
"""

from __future__ import annotations

import torch

from revnet_core.config import ModelConfig
from revnet_core.errors import CheckpointIncompatibleError, ConfigError, InputError
from revnet_core.inputs import check_labels_shape
from revnet_core.sweep import LayerSpec

from .engine import run_layers
from .gpt import Pretrained
from .layers import ReversibleLayer
from .loss import IGNORE_INDEX, lm_loss
from .model import ModelOutput, ReversibleTransformer

BYTES = 256
MASK_ID = 256  # [MASK]
PAD_ID = 257  # [PAD]
SPECIAL_IDS = (MASK_ID, PAD_ID)
VOCAB_SIZE = 258  # bytes and the two special tokens
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens; the rest (0.1) are left as they are


class _PaddedLayer(ReversibleLayer):
    """A layer of the model with one forward's padding mask bound to its attention block. It shares the
    layer's modules (parameters, training mode) and lives as long as that forward's graph."""

    def __init__(self, layer: ReversibleLayer, key_mask: torch.Tensor):
        super().__init__(layer.attn, layer.ffn)
        self.training = layer.training
        self.key_mask = key_mask

    def spec(self) -> LayerSpec:
        return LayerSpec(self.attn.block.masked(self.key_mask), self.ffn.block, self.attn.coupling,
                         self.ffn.coupling)


class ReversibleBERT(Pretrained, ReversibleTransformer):
    """Bidirectional reversible encoder with a masked-LM head (untied, over ``vocab_size`` ids).

    ``ReversibleBERT(num_layers=2, d_model=64, num_heads=4)`` or ``ReversibleBERT(config)``: any ModelConfig
    field and torch option; ``causal`` is always False (``causal=True`` is refused) and ``vocab_size``
    defaults to 258 and must hold the special ids (>= 258): ``mask_id`` (256) and ``pad_id`` (257).
    ``set_policy`` takes every memory policy.
    """

    loads = ("ReversibleBERT",)
    encoder = True
    mask_id, pad_id = MASK_ID, PAD_ID

    def __init__(self, config: ModelConfig | None = None, **fields):
        if fields.get("causal", False) is not False:
            raise ConfigError("ReversibleBERT is bidirectional: causal=True is ReversibleGPT (revnet_torch.gpt)")
        fields["causal"] = False  # a given config's default (causal=True) gives way: this model is an encoder
        if config is None:
            fields.setdefault("vocab_size", VOCAB_SIZE)
        super().__init__(config, **fields)
        if self.config.vocab_size < VOCAB_SIZE:
            raise ConfigError(f"vocab_size={self.config.vocab_size}: ReversibleBERT needs at least {VOCAB_SIZE} "
                              f"ids (bytes 0-255, [MASK]={MASK_ID}, [PAD]={PAD_ID})")

    @classmethod
    def check_saved_config(cls, config: ModelConfig, where: str) -> None:
        if config.causal:
            raise CheckpointIncompatibleError(f"{where!r} holds a causal model; load it with "
                                              "ReversibleGPT.from_pretrained")

    # --- masking ----------------------------------------------------------------------------------------
    def mask_tokens(self, ids: torch.Tensor, mlm_probability: float = 0.15,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT's corruption of ids (B, T) or (T,) int: (inputs, labels), both int64 like ids; labels hold
        the original id where a token was chosen and -100 elsewhere. [PAD] and [MASK] are never chosen.
        ``generator``: a torch.Generator on ids' device (default: the global RNG)."""
        return mask_tokens(ids, self.config.vocab_size, mlm_probability, generator)

    # --- forward ----------------------------------------------------------------------------------------
    def key_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The (B, T) bool mask of keys that may be attended to (True: a real token), or None when every
        position is real. Default: the positions that are not [PAD]."""
        if attention_mask is None:
            mask = input_ids != PAD_ID
        else:
            if not isinstance(attention_mask, torch.Tensor):
                raise InputError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
            if attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must match input_ids "
                                 f"{tuple(input_ids.shape)} (1 at real tokens, 0 at padding)")
            if attention_mask.is_floating_point() or attention_mask.is_complex():
                raise InputError(f"attention_mask must hold 0/1 integers or bools, got dtype {attention_mask.dtype}")
            if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise InputError("attention_mask must hold only 0 (padding) and 1 (a real token)")
            mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        empty = ~mask.any(dim=1)
        if bool(empty.any()):
            rows = empty.nonzero().flatten().tolist()
            raise InputError(f"sequence(s) {rows[:5]} are all padding: each needs at least one real token to "
                             "attend to")
        return None if bool(mask.all()) else mask

    def hidden(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d) of validated ids, keys outside ``key_mask`` (B, T) unseen."""
        layers = self.layers if key_mask is None else [_PaddedLayer(layer, key_mask) for layer in self.layers]
        x1, x2 = self.streams(input_ids)
        exact = self.options.exact_streams
        y1, y2 = run_layers(layers, self.policies, x1, x2, private_outputs=True,
                            exact_streams=None if exact == "auto" else exact)
        return self.norm(self.merge_streams(y1, y2, input_ids))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, return_logits: bool = True,
                return_hidden: bool = False) -> ModelOutput:
        """Masked LM. input_ids (B, T) or (T,) int; labels like input_ids, -100 where nothing is predicted
        (``mask_tokens`` makes both); attention_mask (B, T) 0/1 or bool, 0 at padding.

        Returns ``ModelOutput``: loss (scalar, the mean cross-entropy over the labelled positions; 0 when
        none is labelled; None without labels), logits (B, T, V) unless ``return_logits=False``, and the
        final hidden states (B, T, d) with ``return_hidden``.
        """
        input_ids = self._check_ids(input_ids, "input_ids")
        self._check_range(input_ids, "input_ids")
        if labels is not None:
            labels = self._check_ids(labels, "labels")
            check_labels_shape(labels.shape, input_ids.shape)
            self._check_range(labels, "labels", allow_ignore=True)
        h = self.hidden(input_ids, self.key_mask(input_ids, attention_mask))
        loss = None
        if labels is not None:
            loss = lm_loss(h, self.head.weight, labels.to(torch.int64), self.config.loss_chunk_size,
                           self.options.loss_kernel)
        logits = self.head(h) if return_logits else None
        return ModelOutput(loss=loss, logits=logits, last_hidden_state=h if return_hidden else None)


def mask_tokens(ids: torch.Tensor, vocab_size: int = VOCAB_SIZE, mlm_probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10 corruption of ids (B, T) or (T,) int over a vocabulary of ``vocab_size`` (>= 258):
    (inputs, labels) int64. Each token that is not [PAD] or [MASK] is chosen with ``mlm_probability``;
    labels hold the original id at chosen positions and -100 elsewhere. A chosen token becomes [MASK]
    with probability 0.8, a uniformly drawn ordinary id (never a special one) with 0.1, and stays with 0.1."""
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InputError(f"ids must be a torch.Tensor of integer token ids, got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if isinstance(mlm_probability, bool) or not isinstance(mlm_probability, (int, float)) \
            or not 0 < mlm_probability <= 1:
        raise InputError(f"mlm_probability={mlm_probability!r} must be a number in (0, 1]")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < VOCAB_SIZE:
        raise ConfigError(f"vocab_size={vocab_size!r} must be an integer >= {VOCAB_SIZE} (bytes and the special ids)")
    ids = ids.to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise InputError(f"ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
    kw = {"device": ids.device, "generator": generator}
    chosen = (torch.rand(ids.shape, **kw) < mlm_probability) & (ids != PAD_ID) & (ids != MASK_ID)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    fate = torch.rand(ids.shape, **kw)  # < 0.8: [MASK]; < 0.9: a random token; else left as it is
    ordinary = torch.randint(0, vocab_size - len(SPECIAL_IDS), ids.shape, **kw)
    ordinary = ordinary + (ordinary >= BYTES) * len(SPECIAL_IDS)  # skip the two special ids after the bytes
    inputs = torch.where(chosen & (fate < MASK_SHARE), torch.full_like(ids, MASK_ID), ids)
    inputs = torch.where(chosen & (fate >= MASK_SHARE) & (fate < MASK_SHARE + RANDOM_SHARE), ordinary, inputs)
    return inputs, labels
