"""Autoregressive generation for ``ReversibleTransformer``: a cache per layer, the reversible stack forward only.

Inference needs no reconstruction: each layer maps the new tokens' two streams (y1 = cf(x1, F(x2)),
y2 = cg(x2, G(y1))) and nothing else of them is kept. What a later token needs is in the cache of its
attention block: for softmax attention the rotated keys and the values of every earlier position (only the
last ``window`` of them for a sliding-window model, in a ring buffer), for an attention block with a
recurrent state (``RationalFourierAttention``'s block: it has ``init_state`` and ``decode``) that state.
The FFN acts token by token and needs nothing.

The cached logits equal the full forward's last-token logits (tests/torch/test_generate.py: 1e-5 in fp32,
1e-10 in fp64). The streams run as plain floats: the fixed-point rounding of ``exact_streams`` exists to
make a backward's reconstruction exact, and inference has no backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from revnet_core.errors import ConfigError, InputError

from .layers import ReversibleLayer


@dataclass
class KVCache:
    """One softmax attention layer's keys and values: k, v (B, H, capacity, hd), rotated k, allocated at the
    first write in the dtype the attention computes in (the weights', or autocast's); ``pos`` (capacity,) the
    absolute position held in each slot (-1: empty). Position p lives in slot p % capacity."""

    capacity: int
    pos: torch.Tensor
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @classmethod
    def empty(cls, capacity: int, *, device) -> "KVCache":
        return cls(capacity, torch.full((capacity,), -1, dtype=torch.long, device=device))

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store (B, H, t, hd) keys and values of positions start .. start + t - 1 (the last ``capacity``)."""
        cap, t = self.capacity, k.shape[2]
        if self.k is None:
            self.k = k.new_zeros(*k.shape[:2], cap, k.shape[3])
            self.v = v.new_zeros(*v.shape[:2], cap, v.shape[3])
        keep = min(t, cap)
        positions = torch.arange(start + t - keep, start + t, device=self.pos.device)
        slots = positions % cap
        self.k[:, :, slots] = k[:, :, t - keep:]
        self.v[:, :, slots] = v[:, :, t - keep:]
        self.pos[slots] = positions


def _softmax_step(block, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
    """``AttentionBlock`` F(x) of new tokens x (B, t, d) at positions start.., attending to the cache too."""
    B, t, d = x.shape
    H = block.num_heads
    h = block.norm(x)
    q, k, v = F.linear(h, block.qkv.weight).view(B, t, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
    rope = block.rotary[0]
    q, k = rope.rotate_from(q, start), rope.rotate_from(k, start)  # (B, H, t, hd)
    window = block.window
    filled = min(start, cache.capacity)
    if t == 1:
        # One new token: after the write every filled slot is visible (the slot it overwrote held the one
        # position that just left the window), so no mask is needed.
        cache.write(k, v, start)
        n = min(start + 1, cache.capacity)
        o = F.scaled_dot_product_attention(q, cache.k[:, :, :n], cache.v[:, :, :n])
    else:
        keys, values = k, v
        if filled:
            keys = torch.cat([cache.k[:, :, :filled], k], dim=2)
            values = torch.cat([cache.v[:, :, :filled], v], dim=2)
        kpos = torch.cat([cache.pos[:filled], torch.arange(start, start + t, device=x.device)])
        qpos = torch.arange(start, start + t, device=x.device)
        mask = kpos[None, :] <= qpos[:, None]
        if window is not None:
            mask &= kpos[None, :] > qpos[:, None] - window
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        cache.write(k, v, start)
    return block.drop(block.proj(o.transpose(1, 2).reshape(B, t, d)))


class Decoder:
    """Runs a ``ReversibleTransformer`` over new tokens with a cache: ``feed(ids)`` -> next-token logits.

    ``Decoder(model, batch, max_len)``: room for ``max_len`` positions in all (prompt and generated).
    ``feed(ids)`` takes (B, t) ids that continue what was fed before (t >= 1: a whole prompt at once, then
    one token per step) and returns the logits (B, V) of the last one, in the head's dtype.
    """

    def __init__(self, model, batch: int, max_len: int):
        cfg = model.config
        check_causal(model)
        if max_len > cfg.max_seq_len:
            raise InputError(f"generation needs {max_len} positions but the model has max_seq_len={cfg.max_seq_len}")
        for i, layer in enumerate(model.layers):
            if not isinstance(layer, ReversibleLayer):
                raise ConfigError(f"layer {i} is a {type(layer).__name__}; generation runs ReversibleLayer stacks")
        self.model = model
        self.batch = batch
        self.max_len = max_len
        self.length = 0
        p = model.embed.weight
        self.caches = []
        for layer in model.layers:
            block = layer.attn.block
            if hasattr(block, "init_state"):  # recurrent-state attention (linear time, O(1) per token)
                self.caches.append(block.init_state(batch, device=p.device, dtype=p.dtype))
                continue
            window = block.window
            capacity = max_len if window is None else min(window, max_len)
            self.caches.append(KVCache.empty(capacity, device=p.device))

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, t) int ids -> (B, V) logits of the last of them."""
        model = self.model
        if ids.dim() != 2 or ids.shape[0] != self.batch or ids.shape[1] == 0:
            raise InputError(f"feed takes ids of shape ({self.batch}, t >= 1), got {tuple(ids.shape)}")
        t = ids.shape[1]
        if self.length + t > self.max_len:
            raise InputError(f"{self.length} positions fed and {t} more exceed the decoder's max_len={self.max_len}")
        model._check_range(ids, "ids")
        x1, x2 = model.streams(ids)
        for i, layer in enumerate(model.layers):
            block = layer.attn.block
            if hasattr(block, "init_state"):
                fx, self.caches[i] = block.decode(x2, self.caches[i])
            else:
                fx = _softmax_step(block, x2, self.caches[i], self.length)
            x1 = layer.attn.coupling.forward(x1, fx)
            x2 = layer.ffn.coupling.forward(x2, layer.ffn.block(x1))
        self.length += t
        last = model.merge_streams(x1[:, -1:], x2[:, -1:], ids[:, -1:])  # the last token only
        return model.head(model.norm(last))[:, 0]


def check_causal(model) -> None:
    """ConfigError unless ``model`` is causal: a bidirectional model (``causal=False``, ``ReversibleBERT``)
    conditions every position on tokens after it, which generation has not produced yet."""
    if not getattr(model.config, "causal", True):
        raise ConfigError(f"{type(model).__name__} is bidirectional (causal=False): every position sees the "
                          "tokens after it, so it cannot generate left to right; fill [MASK] positions with its "
                          "logits instead, or generate with a causal model (ReversibleGPT)")


def check_sampling(temperature: float, top_k: int | None, vocab_size: int) -> None:
    """InputError unless temperature is a finite number >= 0 and top_k is None or an integer >= 1."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise InputError(f"temperature={temperature!r} must be a finite number >= 0 (0: greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k={top_k!r} must be None or an integer >= 1 (at most vocab_size={vocab_size} "
                         "is used)")


def sample(logits: torch.Tensor, temperature: float, top_k: int | None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) int64 ids: argmax at temperature 0, else a draw from softmax(logits / T)
    over the ``top_k`` largest (all when None; more than V means all)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def generate(model, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue ``ids`` (B, T) or (T,) int by ``max_new_tokens`` tokens: the prompt is fed at once, then one
    token per step through the cache (``Decoder``). Returns (B, T + max_new_tokens) int64 (1-D in, 1-D out).

    ``temperature`` 0 is greedy (deterministic); otherwise tokens are drawn from softmax(logits / temperature)
    over the ``top_k`` most likely (None: all), with ``generator`` (a ``torch.Generator`` on the model's
    device) if given. The model runs in eval mode (no dropout) and is put back as it was.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    check_causal(model)
    check_sampling(temperature, top_k, model.config.vocab_size)
    flat = isinstance(ids, torch.Tensor) and ids.dim() == 1
    ids = model._check_ids(ids, "ids").to(device=model.embed.weight.device, dtype=torch.int64)
    model._check_range(ids, "ids")
    if max_new_tokens == 0:
        return ids[0] if flat else ids
    was_training = model.training
    model.eval()
    try:
        decoder = Decoder(model, ids.shape[0], ids.shape[1] + max_new_tokens)
        out = [ids]
        logits = decoder.feed(ids)
        for step in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, generator)
            out.append(nxt)
            if step + 1 < max_new_tokens:
                logits = decoder.feed(nxt)
    finally:
        model.train(was_training)
    result = torch.cat(out, dim=1)
    return result[0] if flat else result


CAUSAL_CLASSES = ("ReversibleTransformer", "ReversibleGPT")  # the model classes whose checkpoints generate


def load_for_inference(path, device: str | torch.device = "cpu"):
    """The ``ReversibleTransformer`` of a training checkpoint (a file or a run folder), in eval mode on
    ``device`` ("auto": the GPU when present). CheckpointError (``revnet_torch.checkpoint``) if it
    is damaged or is not a torch model's."""
    from revnet_core.config import ModelConfig

    from . import checkpoint as ckpt
    from .model import ReversibleTransformer

    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} was asked for but CUDA is not available here")
    where = ckpt.resolve(path)
    state = ckpt.load_checkpoint(where, map_location=device)
    if state["backend"] != ckpt.BACKEND or state.get("model_class", "ReversibleTransformer") not in CAUSAL_CLASSES:
        raise ckpt.CheckpointIncompatibleError(
            f"checkpoint {str(where)!r} holds a {state.get('model_class')} of the {state['backend']!r} backend; "
            "this loader builds the torch ReversibleTransformer")
    # Newer checkpoints carry the whole config; older ones only the fields a resume compares (the rest,
    # policy and loss chunking, do not change the function). from_saved gives fields a config predates the
    # value its model was trained with.
    config = ModelConfig.from_saved(state.get("model_config", state["config"]))
    model = ReversibleTransformer(config).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


def generate_text(model, prompt: str, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                  seed: int = 0) -> str:
    """A byte-level model's continuation of ``prompt`` (UTF-8 bytes are the ids, as in the embedded corpus):
    the prompt and the new text, undecodable bytes replaced."""
    vocab = model.config.vocab_size
    if vocab != 256:
        raise ConfigError(f"text generation needs a byte-level model (vocab_size=256); this one has "
                          f"vocab_size={vocab}: call generate(model, ids, ...) with your tokenizer's ids")
    data = prompt.encode("utf-8")
    if not data:
        raise InputError("the prompt is empty: give at least one character")
    device = model.embed.weight.device
    ids = torch.tensor(list(data), dtype=torch.int64, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return bytes(out.tolist()).decode("utf-8", errors="replace")
