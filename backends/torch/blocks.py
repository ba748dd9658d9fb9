"""The two functions a reversible layer couples: F (self-attention, causal or bidirectional) and G (feed-forward).

Both are pre-norm and map a stream (B, T, d) to a function output (B, T, out_features); the coupling decides
out_features (d for additive, 2d for affine). Neither touches a stream in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from revnet_core.errors import ConfigError, InputError

from revnet_kernels.activations import activation
from revnet_kernels.norms import layer_norm, rms_norm

from . import kept_attention

# Pinned in both passes so the recompute runs the very kernel the forward ran (bit-identical outputs).
FUSED_SDPA = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
MATH_SDPA = [SDPBackend.MATH]


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm's parameters, run through revnet_kernels' ``layer_norm`` (the registry picks per device)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm's parameters, run through revnet_kernels' ``rms_norm`` (the registry picks per device)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(kind: str, d: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(d, eps=eps)
    return LayerNorm(d, eps=eps)


ROPE_CHUNK = 16384  # tokens per chunk of the rotation: bounds its fp32 temporaries


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of (..., T, hd) by angles with cos/sin (T, hd/2).

    Math in fp32, or in x's dtype where that is wider (fp64 tests); the result in x's dtype."""
    out = torch.empty_like(x)
    T = x.shape[-2]
    math_dtype = torch.promote_types(x.dtype, torch.float32)
    for s in range(0, T, ROPE_CHUNK):
        xc = x[..., s:s + ROPE_CHUNK, :].to(math_dtype).unflatten(-1, (-1, 2))  # (..., t, hd/2, 2)
        a, b = xc[..., 0], xc[..., 1]
        c, n = cos[s:s + ROPE_CHUNK].to(math_dtype), sin[s:s + ROPE_CHUNK].to(math_dtype)
        out[..., s:s + ROPE_CHUNK, :] = torch.stack((a * c - b * n, a * n + b * c), dim=-1).flatten(-2)
    return out


class _RotaryFn(torch.autograd.Function):
    """A rotation is orthogonal: its backward is the rotation by the opposite angle. Saves only cos/sin."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


class Rotary(nn.Module):
    """Rotary positions shared by every layer. The canonical angles (every backend computes the same):
    inv_freq computed in float64 and rounded once to float32, angles = position * inv_freq in float32,
    cos/sin taken in the rotation's dtype, promote(x.dtype, float32)."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, T: int, device: torch.device, dtype: torch.dtype = torch.float32):
        """(cos, sin), each (T, head_dim/2) in ``dtype`` (at least float32)."""
        dtype = torch.promote_types(dtype, torch.float32)
        key = (T, device, dtype)
        if key not in self._cache:
            self._cache.clear()  # one length at a time: at 1M tokens a table is 128 MiB
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
            inv = (self.base ** -exponents).to(device=device, dtype=torch.float32)
            ang = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv).to(dtype)  # (T, hd/2)
            self._cache[key] = (ang.cos(), ang.sin())
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate (B, H, T, hd) pairs (x[2i], x[2i+1]) by position; result in x's dtype."""
        cos, sin = self.cos_sin(x.shape[-2], x.device, x.dtype)
        return _RotaryFn.apply(x, cos, sin)

    def rotate_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate (B, H, t, hd) as positions start .. start + t - 1: the angles ``forward`` gives those
        positions, bit for bit, computed for the t positions only (a decoding step must not rebuild, or
        evict, the whole table)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
        inv = (self.base ** -exponents).to(device=x.device, dtype=torch.float32)
        pos = torch.arange(start, start + x.shape[-2], device=x.device, dtype=torch.float32)
        ang = torch.outer(pos, inv).to(dtype)  # (t, hd/2)
        return _RotaryFn.apply(x, ang.cos(), ang.sin())


HEAD_CHUNK_TOKENS = 1 << 20  # automatic head chunks hold about this many (token, head) pairs


def heads_per_chunk(num_heads: int, head_chunk: int, tokens: int) -> int:
    """Heads of one attention chunk: ``head_chunk`` (config ``attn_head_chunk``), or when 0 as many as keep
    tokens x heads near HEAD_CHUNK_TOKENS (one chunk up to 64k tokens at batch 1); at most ``num_heads``."""
    return min(num_heads, head_chunk or max(1, HEAD_CHUNK_TOKENS // max(1, tokens)))


class AttentionBlock(nn.Module):
    """F(x) = proj(attention(rope(q), rope(k), v)) over norm(x). (B, T, d) -> (B, T, out_features).

    Long sequences run the attention over chunks of heads (``head_chunks``): heads are independent, so the
    function is the same, but only one chunk's q, k, v and kernel buffers exist at a time. The reversible
    engine's backward walks the same chunks (``additive_vjp``), so the recompute is bit-identical.
    ``window``: each token attends to itself and the ``window - 1`` tokens before it (None: all before it).
    ``causal=False``: every token attends to every token (an encoder; no window). ``key_mask`` (B, T) bool,
    a keyword of ``forward``, ``attend_heads`` and ``additive_vjp`` of bidirectional blocks: keys where it is
    False get no weight (padding); ``masked(key_mask)`` binds one to the block for the reversible engine,
    which calls blocks with the stream alone.
    """

    def __init__(self, d_model, num_heads, out_features, rotary: Rotary, *, norm="layernorm", eps=1e-5,
                 attention="sdpa", use_flash_attention=True, attention_dropout=0.0, dropout=0.0,
                 head_chunk: int = 0, window: int | None = None, causal: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.norm = make_norm(norm, d_model, eps)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, out_features, bias=False)
        self.rotary = [rotary]  # a list so the shared module is not registered once per layer
        self.attention = attention
        self.sdpa_backends = FUSED_SDPA if use_flash_attention else MATH_SDPA
        self.attention_dropout = attention_dropout
        self.drop = nn.Dropout(dropout)
        self.head_chunk = head_chunk
        self.window = window
        self.causal = causal

    def head_chunks(self, B: int, T: int) -> list[slice]:
        """The head slices the attention runs over, in order (``heads_per_chunk`` each)."""
        H = self.num_heads
        per = heads_per_chunk(H, self.head_chunk, B * T)
        return [slice(s, min(s + per, H)) for s in range(0, H, per)]

    def _core(self, q, k, v, key_mask: torch.Tensor | None = None):
        """(B, h, T, hd) q, k, v -> (B, h, T, hd) attention: causal (windowed if ``window``) or, with
        ``causal=False``, over every key; keys where ``key_mask`` (B, T) bool is False get no weight."""
        p = self.attention_dropout if self.training else 0.0
        if self.window is not None:
            if not self.causal or key_mask is not None:
                raise ConfigError(f"window={self.window} needs causal attention without a padding mask (a sliding "
                                  "window looks back only); set the window to None")
            from .window import windowed_attention  # only windowed models need the kernels package

            return windowed_attention(q, k, v, self.window, p)
        if self.attention == "reference":
            if key_mask is not None:
                raise ConfigError("attention='reference' takes no padding mask; use attention='sdpa' (the torch "
                                  "option) for padded batches, or pass sequences without padding")
            from revnet_kernels.attn import reference_attention  # the one plain-matmul ground truth

            return reference_attention(q, k, v, causal=self.causal, dropout_p=p, return_lse=False)
        mask = None
        if key_mask is not None:
            if self.causal:  # a left-padded query would see no key at all: NaN rows that reach every stream
                raise InputError("a padding mask needs bidirectional attention (causal=False, ReversibleBERT); a "
                                 "causal model needs none: right padding with labels -100 is never attended to")
            mask = key_mask[:, None, None, :]  # (B, 1, 1, T): one row of visible keys for every query and head
        with sdpa_kernel(self.sdpa_backends, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=self.causal)

    def masked(self, key_mask: torch.Tensor) -> "KeyMasked":
        """This block with a padding mask bound: callable on the stream alone (what the engine calls)."""
        return KeyMasked(self, key_mask)

    def _heads(self, qkv: torch.Tensor, n: int):
        """(B, T, 3*n*hd) projection -> rope(q), rope(k), v, each (B, n, T, hd)."""
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, 3, n, -1).permute(2, 0, 3, 1, 4).unbind(0)
        rope = self.rotary[0]
        # q and k become new tensors; a contiguous v lets the projection be freed now rather than live as
        # v's base until the attention backward (1 GiB at 256k tokens).
        return rope(q), rope(k), v.contiguous()

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        """norm(x), cast once to the autocast dtype so every head chunk's projection shares the copy."""
        h = self.norm(x)
        if torch.is_autocast_enabled(x.device.type):
            h = h.to(torch.get_autocast_dtype(x.device.type))
        return h

    def head_qkv(self, h: torch.Tensor, heads: slice):
        """rope(q), rope(k), v of the heads in ``heads`` over normed input h (B, T, d), each (B, n, T, hd)."""
        d = h.shape[-1]
        w = self.qkv.weight.view(3, self.num_heads, -1, d)[:, heads].reshape(-1, d)
        return self._heads(F.linear(h, w), heads.stop - heads.start)

    def attend_heads(self, h: torch.Tensor, heads: slice, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the heads in ``heads`` over normed input h (B, T, d) -> (B, n, T, hd)."""
        return self._core(*self.head_qkv(h, heads), key_mask)

    def keep_refusal(self) -> str | None:
        """Why this block cannot keep its attention for the backward (policy ``reverse_keep_attention``),
        or None: it needs the fused softmax kernels without a window or dropout."""
        if self.window is not None:
            return f"a sliding window ({self.window}) runs its own kernel"
        if self.attention != "sdpa" or self.sdpa_backends is MATH_SDPA:
            return f"attention={self.attention!r} / use_flash_attention=False runs no fused kernel"
        if self.attention_dropout > 0 and self.training:
            return "attention dropout draws random numbers"
        return None

    def forward_keeping(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        """(F(x), kept): F(x) (B, T, out_features) over the head chunks, each chunk's attention run by
        ``kept_attention.forward``; kept: one (o (B, n, T, hd), kept_attention.Kept) per chunk, what
        ``additive_vjp(..., kept=kept)`` differentiates the attention from without running it again."""
        reason = self.keep_refusal()
        if reason is not None:
            raise ConfigError(f"policy 'reverse_keep_attention': {reason}; use 'reverse'")
        kept = []

        def attend(h, heads):
            kept.append(kept_attention.forward(*self.head_qkv(h, heads), self.causal))
            return kept[-1][0]

        return self._over_head_chunks(x, attend), kept

    def _over_head_chunks(self, x: torch.Tensor, attend) -> torch.Tensor:
        """F(x) with the attention run chunk by chunk of heads: ``attend(h, heads) -> (B, n, T, hd)`` over the
        normed input h, each chunk's output copied into one (B, T, H, hd) buffer before the next runs."""
        B, T, d = x.shape
        h = self.normed(x)
        o = None
        for heads in self.head_chunks(B, T):
            o_c = attend(h, heads)
            if o is None:
                o = o_c.new_empty(B, T, self.num_heads, o_c.shape[-1])
            o[:, :, heads] = o_c.transpose(1, 2)
            del o_c
        return self.drop(self.proj(o.view(B, T, d)))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, d = x.shape
        chunks = self.head_chunks(B, T)
        if len(chunks) == 1:
            q, k, v = self._heads(self.qkv(self.norm(x)), self.num_heads)
            o = self._core(q, k, v, key_mask)  # (B, H, T, hd)
            o = o.transpose(1, 2).reshape(B, T, d)
            return self.drop(self.proj(o))
        return self._over_head_chunks(x, lambda h, heads: self.attend_heads(h, heads, key_mask))

    def additive_vjp(self, x: torch.Tensor, dy: torch.Tensor, params: list, settle,
                     key_mask: torch.Tensor | None = None, kept: list | None = None):
        """Pullback of ``self`` at x for an additive coupling, with head chunks: (dx, dparams in ``params``'
        order); ``settle(self(x))`` is called once the output is complete (``revnet_core.sweep``'s
        ``additive_vjp``: it rebuilds the other stream, in place in the engine).

        Each chunk's attention is run once with its graph and differentiated at once: its output cotangent
        ``dy @ W_proj`` does not depend on F(x), because the coupling is additive. Only the normed input,
        the attention output and its cotangent (each (B, T, d) in the compute dtype) outlive a chunk.
        Requires a block that draws no random numbers (the caller checks).

        ``kept`` (``forward_keeping``'s list, consumed chunk by chunk): the attention is not run again; its
        backward kernel takes the kept output and log-sum-exp, and only q, k, v are rebuilt (with their graph,
        for the projection's and the norm's gradients).
        """
        B, T, d = x.shape
        grads: dict[torch.Tensor, torch.Tensor] = {}

        def add(p, g):
            if g is not None:
                grads[p] = g if p not in grads else grads[p].add_(g)

        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            h = self.normed(xg)
        h_leaf = h.detach().requires_grad_(True)
        w_qkv, w_proj = self.qkv.weight, self.proj.weight
        do = torch.matmul(dy, w_proj).view(B, T, self.num_heads, -1)  # the cotangent of proj's input
        o, dh = None, None
        chunks = self.head_chunks(B, T)
        if kept is not None and len(kept) != len(chunks):
            raise RuntimeError(f"kept attention of {len(kept)} head chunks for {len(chunks)}: the sequence changed")
        for heads in chunks:
            wanted = [h_leaf] + ([w_qkv] if w_qkv.requires_grad else [])
            if kept is None:
                with torch.enable_grad():
                    o_c = self.attend_heads(h_leaf, heads, key_mask)
                # The cotangent laid out like the output: fused kernels' backwards expect matching strides.
                do_c = torch.empty_like(o_c).copy_(do[:, :, heads].transpose(1, 2))
                got = torch.autograd.grad(o_c, wanted, do_c)
            else:
                o_c, state = kept.pop(0)  # the kept output goes once its chunk is done
                with torch.enable_grad():
                    qkv = self.head_qkv(h_leaf, heads)
                do_c = torch.empty_like(o_c).copy_(do[:, :, heads].transpose(1, 2))
                dqkv = kept_attention.backward(do_c, *(t.detach() for t in qkv), o_c, state, self.causal)
                got = torch.autograd.grad(qkv, wanted, dqkv)
                del qkv, dqkv, state
            dh = got[0] if dh is None else dh.add_(got[0])
            if len(got) > 1:
                add(w_qkv, got[1])
            if o is None:
                o = o_c.new_empty(B, T, self.num_heads, o_c.shape[-1])
            o[:, :, heads] = o_c.detach().transpose(1, 2)
            del o_c, do_c, got
        del do
        with torch.enable_grad():
            fx = self.drop(self.proj(o.view(B, T, d)))
        if w_proj.requires_grad:
            add(w_proj, torch.autograd.grad(fx, [w_proj], dy.to(fx.dtype))[0])
        settle(fx.detach())  # before the norm's backward: the output's memory is free for it
        del fx, o
        norm_params = [p for p in self.norm.parameters() if p.requires_grad]
        got = torch.autograd.grad(h, [xg, *norm_params], dh)
        dx = got[0]
        for p, g in zip(norm_params, got[1:]):
            add(p, g)
        return dx, [grads.get(p) for p in params]


class KeyMasked:
    """An ``AttentionBlock`` with a padding mask bound: key_mask (B, T) bool, False at keys no query may see.

    The reversible engine calls a block on the stream alone, in the forward and again in the backward;
    binding the mask here, once per forward, gives both passes the forward's mask under every policy.
    It owns nothing: parameters, training mode and compilation are the block's.
    """

    def __init__(self, block: AttentionBlock, key_mask: torch.Tensor):
        if key_mask.dtype != torch.bool or key_mask.dim() != 2:
            raise InputError(f"key_mask must be a (batch, seq) bool tensor, got {key_mask.dtype} "
                             f"{tuple(key_mask.shape)}")
        self.block = block
        self.key_mask = key_mask

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(self.key_mask.shape) != tuple(x.shape[:2]):
            raise InputError(f"key_mask {tuple(self.key_mask.shape)} does not match the stream's (batch, seq) "
                             f"{tuple(x.shape[:2])}")
        return self.block(x, key_mask=self.key_mask)

    def parameters(self, recurse: bool = True):
        return self.block.parameters(recurse)

    @property
    def training(self) -> bool:
        return self.block.training

    @property
    def _compiled_call_impl(self):  # what the engine checks before taking the eager head-chunked backward
        return self.block._compiled_call_impl

    def head_chunks(self, B: int, T: int) -> list[slice]:
        return self.block.head_chunks(B, T)

    def additive_vjp(self, x: torch.Tensor, dy: torch.Tensor, params: list, settle):
        return self.block.additive_vjp(x, dy, params, settle, key_mask=self.key_mask)


def activate(kind: str, u: torch.Tensor) -> torch.Tensor:
    """The FFN activation through revnet_kernels' ``activation``: the torch ops everywhere, except the gated
    kinds on GPUs, where the fused Triton kernel is 3.7-4.3x faster (kernels/plugin.py has the numbers)."""
    return activation(u, kind)


class FeedForwardBlock(nn.Module):
    """G(x) = down(act(up(norm(x)))); gated activations double ``up``. (B, T, d) -> (B, T, out_features).

    Acts token by token, so it runs over sequence chunks of ``chunk_size`` tokens (0: whole sequence): the
    (T, d_ff) intermediate never exists for the whole sequence. The reversible engine's backward walks the
    very same chunks, so every policy computes the same function, dropout draws included.
    """

    tokenwise = True

    def __init__(self, d_model, d_ff, out_features, *, activation="gelu", norm="layernorm", eps=1e-5, dropout=0.0,
                 chunk_size: int = 0):
        super().__init__()
        self.chunk_size = chunk_size
        gated = activation in ("geglu", "swiglu")
        self.activation = activation
        self.norm = make_norm(norm, d_model, eps)
        self.up = nn.Linear(d_model, (2 if gated else 1) * d_ff, bias=False)
        self.down = nn.Linear(d_ff, out_features, bias=False)
        self.drop = nn.Dropout(dropout)

    def chunks(self, T: int) -> list[tuple]:
        """Index tuples selecting each chunk of a (..., T, d) tensor, in order."""
        step = self.chunk_size if 0 < self.chunk_size < T else T
        return [(..., slice(s, min(s + step, T)), slice(None)) for s in range(0, T, step)]

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(activate(self.activation, self.up(self.norm(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.chunks(x.shape[-2])
        if len(parts) == 1:
            return self._transform(x)
        return torch.cat([self._transform(x[sl]) for sl in parts], dim=-2)
