"""Hierarchical causal attention: exact attention nearby, attention over mean-pooled keys further back.

Every past token of a query is covered exactly once, by the finest level whose region holds it. Tokens
are cut into local blocks of W = ``local_window`` tokens; query i lies in block b = i // W. With ratios
r_1 < ... < r_L (``compression_ratios``, each dividing the next, r_1 dividing W) and n = ``level_blocks``,
query i sees (all bounds depend on b alone, so a whole local block shares them)::

    level 0 (exact):   tokens j in [e_0, i],          e_0 = max(0, (b - 1) W)
    level l < L:       pooled blocks of r_l tokens   filling [e_l, e_{l-1}),
                       e_l = max(0, r_{l+1} * floor((e_{l-1} - n r_l) / r_{l+1}))
    level L (coarsest): pooled blocks of r_L tokens   filling [0, e_{L-1})

Each e_{l-1} is a multiple of r_l, so the regions are tiled by whole pooled blocks and each region
[e_l, e_{l-1}) of a level l < L holds between n and n + r_{l+1}/r_l - 1 blocks (fewer where it reaches
token 0). The regions are disjoint and their union is [0, i]: a token is seen once, at one level. Every
pooled block ends at or before e_0 <= b W <= i, so no query sees a block holding any of its future tokens
(causal), and the pooled blocks a query sees are the same for all queries of its local block.

The maths, per head, with s_ij = q_i . k_j / sqrt(hd) (q, k after RoPE). A pooled block P of r tokens has
the mean key k_P = mean_{j in P} k_j and mean value v_P. Its score s_iP = q_i . k_P / sqrt(hd) + log r: the
first term is the mean of the block's exact scores (the score is linear in k), the log r makes the one
pooled key stand for its r tokens, exp(s_iP) = r exp(mean_{j in P} s_ij). One softmax over all of them::

    out_i = (sum_{j exact} e^{s_ij} v_j + sum_{P pooled} e^{s_iP} v_P) / (sum_{j exact} e^{s_ij} + sum_P e^{s_iP})

so r e^{mean s} v_P replaces sum_{j in P} e^{s_ij} v_j (exact when a block's keys are equal; by Jensen
e^{mean s} <= mean e^{s}, so a far block never weighs more than its tokens would). It is computed as a
log-sum-exp merge of the parts (exact, each level): one running max m_i, l_i = sum over parts of
sum e^{s - m_i}, lse_i = m_i + log l_i, out_i = sum over parts of e^{s - lse_i} V. The backward is the
flash-attention one, part by part: p = e^{s - lse}, D_i = dout_i . out_i, ds = p (dout . v - D);
dq = sum ds k / sqrt(hd), dk = ds^T q / sqrt(hd), dv = p^T dout; a pooled key's gradient is spread evenly
(1/r each) over its r tokens, the pooling being a mean.

Cost, with T tokens, K = 2W + sum_{l<L} (n + r_{l+1}/r_l - 1) + ceil(T / r_L) keys per query at most:
time O(T K hd) per head, so O(T (W + L n) hd + T^2 hd / r_L): the coarsest level keeps a quadratic term
divided by r_L (it covers the whole far past; a bounded per-query cost needs r_L ~ T / budget). Memory:
the autograd node saves q, k, v, out (B, H, T, hd) and lse (B, H, T) only; the forward and the backward
run over query chunks of ``chunk_size`` tokens, whose scores (B, H, chunk, K) are the only other buffer.
No (T, T) matrix is ever formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from revnet_core.errors import ConfigError, InputError

from .blocks import Rotary, make_norm
from .layers import _CoupledHalf

DEFAULT_WINDOW = 128  # tokens of a local block when local_window is None (rounded up to a multiple of r_1)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
    return value


@dataclass(frozen=True)
class Hierarchy:
    """The coverage rule of the module docstring: local block ``window`` W, ``ratios`` (r_1, ..., r_L) and
    ``level_blocks`` n. Checked on construction (ConfigError)."""

    window: int
    ratios: tuple[int, ...]
    level_blocks: int

    def __post_init__(self):
        _positive_int("local_window", self.window)
        _positive_int("level_blocks", self.level_blocks)
        for i, r in enumerate(self.ratios):
            if isinstance(r, bool) or not isinstance(r, int) or r < 2:
                raise ConfigError(f"compression_ratios[{i}]={r!r} must be an integer >= 2")
        for i, (a, b) in enumerate(zip(self.ratios, self.ratios[1:])):
            if b <= a or b % a:
                raise ConfigError(f"compression_ratios={list(self.ratios)}: each ratio must be a larger multiple "
                                  f"of the one before (compression_ratios[{i + 1}]={b} vs {a}), e.g. [4, 16, 64]")
        if self.ratios and self.window % self.ratios[0]:
            raise ConfigError(f"local_window={self.window} must be a multiple of compression_ratios[0]="
                              f"{self.ratios[0]} (pooled blocks end where a local block starts)")

    def regions(self, blocks: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level l = 0..L, the token range [start, end) it covers for queries of local blocks ``blocks``
        (int64, any shape): level 0's end is the query itself (returned as the block's end), level l >= 1 is
        tiled by pooled blocks of ratios[l-1] tokens."""
        W, n = self.window, self.level_blocks
        e = ((blocks - 1) * W).clamp_min(0)
        out = [(e, (blocks + 1) * W)]
        for l, r in enumerate(self.ratios):
            if l + 1 < len(self.ratios):
                nxt = self.ratios[l + 1]
                start = (torch.div(e - n * r, nxt, rounding_mode="floor") * nxt).clamp_min(0)
            else:
                start = torch.zeros_like(e)
            out.append((start, e))
            e = start
        return out

    def max_blocks(self, level: int) -> int:
        """The most pooled blocks level ``level`` (1-based, below the coarsest) gives one query."""
        r = self.ratios[level - 1]
        return self.level_blocks + self.ratios[level] // r - 1

    def keys_per_query(self, T: int) -> int:
        """An upper bound on the keys (exact + pooled) one query of a length-T sequence scores."""
        if not self.ratios:
            return 2 * self.window
        return (2 * self.window + sum(self.max_blocks(l) for l in range(1, len(self.ratios)))
                + -(-T // self.ratios[-1]))


def _pool(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, H, T, hd) -> (B, H, T // r, hd) means over consecutive blocks of r tokens (a ragged tail dropped)."""
    P = x.shape[2] // r
    return x[:, :, :P * r].unflatten(2, (P, r)).mean(3)


@dataclass
class _Part:
    """Keys one chunk of local blocks scores: ``blocked`` (B, H, nb, K, hd) per block, else shared
    (B, H, K, hd); ``drop`` (nb, W | 1, K) bool, True where a query may not see a key; ``bias`` added to
    every score (log r for pooled keys);
    ``kind`` and ``where`` say how the keys' gradients go back (the backward's scatter)."""

    keys: torch.Tensor
    values: torch.Tensor
    drop: torch.Tensor
    bias: float
    blocked: bool
    kind: str  # "exact" | "gather" | "prefix"
    level: int = 0
    where: torch.Tensor | None = None  # "gather": the (nb * K,) pooled indices


def _parts(k, v, pooled, h: Hierarchy, b0: int, b1: int) -> list[_Part]:
    """The parts (exact, then each level) the queries of local blocks b0..b1-1 attend to. k, v padded
    (B, H, NB * W, hd); pooled[l] = (keys, values) of level l + 1."""
    W, dev = h.window, k.device
    B, H, Tp, hd = k.shape
    nb = b1 - b0
    kb, vb = k.view(B, H, -1, W, hd), v.view(B, H, -1, W, hd)
    if b0 > 0:
        prev_k, prev_v = kb[:, :, b0 - 1:b1 - 1], vb[:, :, b0 - 1:b1 - 1]
    else:  # block 0 has no block before it: a zero block, masked out
        zero = kb.new_zeros(B, H, 1, W, hd)
        prev_k, prev_v = torch.cat([zero, kb[:, :, :b1 - 1]], 2), torch.cat([zero, vb[:, :, :b1 - 1]], 2)
    blocks = torch.arange(b0, b1)
    t = torch.arange(W)
    tk = torch.arange(2 * W)
    keep = (tk[None, None, :] <= t[None, :, None] + W) & (((blocks - 1) * W)[:, None, None] + tk >= 0)
    parts = [_Part(torch.cat([prev_k, kb[:, :, b0:b1]], 3), torch.cat([prev_v, vb[:, :, b0:b1]], 3),
                   (~keep).to(dev), 0.0, True, "exact")]
    regions = h.regions(blocks)
    L = len(h.ratios)
    for l, r in enumerate(h.ratios, start=1):
        pk, pv = pooled[l - 1]
        start, end = (x // r for x in regions[l])
        if int(end.max()) <= int(start.min()):
            continue  # no query of the chunk reaches this level
        if l < L:
            M = h.max_blocks(l)
            idx = start[:, None] + torch.arange(M)  # (nb, M)
            keep = (idx < end[:, None])[:, None, :]
            flat = idx.clamp_max(pk.shape[2] - 1).flatten().to(dev)
            parts.append(_Part(pk[:, :, flat].unflatten(2, (nb, M)), pv[:, :, flat].unflatten(2, (nb, M)),
                               (~keep).to(dev), math.log(r), True, "gather", l, flat))
        else:
            Pc = int(end.max())
            keep = (torch.arange(Pc)[None, :] < end[:, None])[:, None, :]
            parts.append(_Part(pk[:, :, :Pc], pv[:, :, :Pc], (~keep).to(dev), math.log(r), False, "prefix", l))
    return parts


def _scores(qs: torch.Tensor, part: _Part) -> torch.Tensor:
    """(B, H, nb, W, K) masked scores (-inf where not kept) of scaled queries qs (B, H, nb, W, hd)."""
    if part.blocked:
        s = qs @ part.keys.transpose(-1, -2)
    else:
        s = torch.einsum("bhnwd,bhkd->bhnwk", qs, part.keys)
    if part.bias:
        s.add_(part.bias)
    return s.masked_fill_(part.drop, float("-inf"))


def _weighted(p: torch.Tensor, part: _Part) -> torch.Tensor:
    """sum_K p * values: (B, H, nb, W, K) weights -> (B, H, nb, W, hd)."""
    if part.blocked:
        return p @ part.values
    return torch.einsum("bhnwk,bhkd->bhnwd", p, part.values)


def _pad(x: torch.Tensor, Tp: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, Tp - x.shape[2]))


class _HierarchicalFn(torch.autograd.Function):
    """q, k, v (B, H, T, hd), one float dtype -> (B, H, T, hd); saves q, k, v, out and lse only."""

    @staticmethod
    def forward(ctx, q, k, v, h: Hierarchy, chunk_blocks: int):
        B, H, T, hd = q.shape
        W = h.window
        NB = -(-T // W)
        Tp = NB * W
        scale = hd ** -0.5
        # Padded keys lie after every real query (masked by causality) and outside every pooled block a
        # real query sees (those end at or before its local block's start): they change nothing real.
        qp, kp, vp = _pad(q, Tp), _pad(k, Tp), _pad(v, Tp)
        pooled = [(_pool(kp, r), _pool(vp, r)) for r in h.ratios]
        out = torch.empty_like(qp)
        lse = qp.new_empty(B, H, Tp)
        for b0 in range(0, NB, chunk_blocks):
            b1 = min(NB, b0 + chunk_blocks)
            qs = qp[:, :, b0 * W:b1 * W].unflatten(2, (b1 - b0, W)) * scale
            parts = _parts(kp, vp, pooled, h, b0, b1)
            scores = [_scores(qs, part) for part in parts]
            m = torch.stack([s.amax(-1) for s in scores]).amax(0)  # finite: a query always sees itself
            den = torch.zeros_like(m)
            num = torch.zeros_like(qs)
            for s, part in zip(scores, parts):
                e = s.sub_(m[..., None]).exp_()
                den += e.sum(-1)
                num += _weighted(e, part)
            del scores
            out[:, :, b0 * W:b1 * W] = (num / den[..., None]).flatten(2, 3)
            lse[:, :, b0 * W:b1 * W] = (m + den.log()).flatten(2, 3)
        out, lse = out[:, :, :T].contiguous(), lse[:, :, :T].contiguous()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.h, ctx.chunk_blocks = h, chunk_blocks
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        h, chunk_blocks = ctx.h, ctx.chunk_blocks
        B, H, T, hd = q.shape
        W = h.window
        NB = -(-T // W)
        Tp = NB * W
        scale = hd ** -0.5
        qp, kp, vp = _pad(q, Tp), _pad(k, Tp), _pad(v, Tp)
        dop, op, lsep = _pad(dout.to(q.dtype), Tp), _pad(out, Tp), F.pad(lse, (0, Tp - T))
        pooled = [(_pool(kp, r), _pool(vp, r)) for r in h.ratios]
        dq, dk, dv = torch.zeros_like(qp), torch.zeros_like(kp), torch.zeros_like(vp)
        dpooled = [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in pooled]
        dkb, dvb = dk.view(B, H, NB, W, hd), dv.view(B, H, NB, W, hd)
        for b0 in range(0, NB, chunk_blocks):
            b1 = min(NB, b0 + chunk_blocks)
            nb = b1 - b0
            sl = slice(b0 * W, b1 * W)
            qs, doc = qp[:, :, sl].unflatten(2, (nb, W)) * scale, dop[:, :, sl].unflatten(2, (nb, W))
            lc = lsep[:, :, sl].unflatten(2, (nb, W))[..., None]
            delta = (doc * op[:, :, sl].unflatten(2, (nb, W))).sum(-1, keepdim=True)
            dqc = torch.zeros_like(qs)  # the gradient of the scaled queries
            for part in _parts(kp, vp, pooled, h, b0, b1):
                p = _scores(qs, part).sub_(lc).exp_()
                if part.blocked:
                    dvals = p.transpose(-1, -2) @ doc
                    ds = (doc @ part.values.transpose(-1, -2)).sub_(delta).mul_(p)
                    dqc += ds @ part.keys
                    dkeys = ds.transpose(-1, -2) @ qs
                else:
                    dvals = torch.einsum("bhnwk,bhnwd->bhkd", p, doc)
                    ds = torch.einsum("bhnwd,bhkd->bhnwk", doc, part.values).sub_(delta).mul_(p)
                    dqc += torch.einsum("bhnwk,bhkd->bhnwd", ds, part.keys)
                    dkeys = torch.einsum("bhnwk,bhnwd->bhkd", ds, qs)
                del p, ds
                if part.kind == "exact":
                    dkb[:, :, b0:b1] += dkeys[..., W:, :]
                    dvb[:, :, b0:b1] += dvals[..., W:, :]
                    lo = max(b0, 1)  # block 0's "previous block" is the masked zero block
                    dkb[:, :, lo - 1:b1 - 1] += dkeys[:, :, lo - b0:, :W]
                    dvb[:, :, lo - 1:b1 - 1] += dvals[:, :, lo - b0:, :W]
                elif part.kind == "gather":
                    dpk, dpv = dpooled[part.level - 1]
                    dpk.index_add_(2, part.where, dkeys.flatten(2, 3))
                    dpv.index_add_(2, part.where, dvals.flatten(2, 3))
                else:
                    dpk, dpv = dpooled[part.level - 1]
                    K = dkeys.shape[2]
                    dpk[:, :, :K] += dkeys
                    dpv[:, :, :K] += dvals
            dq[:, :, sl] = dqc.flatten(2, 3) * scale
        for r, (dpk, dpv) in zip(h.ratios, dpooled):
            P = dpk.shape[2]
            dk[:, :, :P * r].unflatten(2, (P, r)).add_(dpk[:, :, :, None] / r)
            dv[:, :, :P * r].unflatten(2, (P, r)).add_(dpv[:, :, :, None] / r)
        return dq[:, :, :T], dk[:, :, :T], dv[:, :, :T], None, None


def hierarchical_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hierarchy: Hierarchy,
                           chunk_size: int = 1024) -> torch.Tensor:
    """Hierarchical causal attention (module docstring) of (B, H, T, hd) q, k, v -> (B, H, T, hd) in v's
    dtype. Math in promote(dtype, float32) whatever the autocast state; ``chunk_size`` tokens of queries
    (rounded down to whole local blocks, at least one) at a time."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise InputError(f"q, k, v must share one shape (B, H, T, hd); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    out_dtype = v.dtype
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        o = _HierarchicalFn.apply(q.to(dtype), k.to(dtype), v.to(dtype), hierarchy,
                                  max(1, chunk_size // hierarchy.window))
    return o.to(out_dtype)


class HierarchicalAttentionBlock(nn.Module):
    """F(x) = proj(hierarchical_attention(rope(q), rope(k), v)) over norm(x): (B, T, d) -> (B, T, out_features).

    Pre-norm, one qkv projection, RoPE from the shared ``rotary``, like ``blocks.AttentionBlock``. Draws no
    random numbers unless ``dropout`` > 0 (output dropout; the engine replays its draws).

    ``decode(x, state) -> (F(x), state)`` (what ``revnet_torch.generate.Decoder`` calls): the state is the
    block's input so far (B, t, d), and each call runs the block again over all of it, so cached generation
    computes exactly the function of the full forward (pooled blocks change as tokens arrive), at the cost
    of the whole prefix per step; ``init_state`` starts an empty one."""

    def __init__(self, d_model: int, num_heads: int, out_features: int, rotary: Rotary, hierarchy: Hierarchy, *,
                 chunk_size: int = 1024, norm: str = "layernorm", eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.hierarchy = hierarchy
        self.chunk_size = chunk_size
        self.norm = make_norm(norm, d_model, eps)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, out_features, bias=False)
        self.rotary = [rotary]  # a list so the shared module is not registered once per layer
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        rope = self.rotary[0]
        o = hierarchical_attention(rope(q), rope(k), v, self.hierarchy, self.chunk_size)  # (B, H, T, hd)
        return self.drop(self.proj(o.transpose(1, 2).reshape(B, T, d)))

    def init_state(self, batch: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
        """The state before the first token: no input yet, (batch, 0, d_model)."""
        return torch.zeros(batch, 0, self.qkv.in_features, device=device, dtype=dtype)

    def decode(self, x: torch.Tensor, state: torch.Tensor):
        """F of new tokens x (B, t, d) after the inputs in ``state``: (F(x) (B, t, out_features), new state)."""
        full = torch.cat([state, x.to(state.dtype)], dim=1)
        return self(full)[:, -x.shape[1]:], full


class HierarchicalReversibleAttention(_CoupledHalf):
    """Hierarchical causal attention coupled into a stream: the F half of a reversible layer, used like
    ``ReversibleAttention`` (e.g. ``ReversibleLayer(HierarchicalReversibleAttention(...), ReversibleFFN(...))``).

    ``num_levels`` pooled levels over the exact local one, ``compression_ratios`` their pooled block sizes
    (one per level: increasing, each a multiple of the one before; None: 4, 16, 64, ...). ``num_levels=0``
    is block-local exact attention alone. ``local_window`` W: a query sees its own local block of W tokens
    (causally) and the one before it exactly (None: the smallest multiple of compression_ratios[0] >= 128).
    ``level_blocks``: the fewest pooled blocks a level below the coarsest gives a query (where the sequence
    is long enough). ``chunk_size``: query tokens computed at a time (memory (B, H, chunk_size, keys)).

    ``forward(hidden_states, other=None, sequence_length=None) -> (hidden_states, coupling_output)``,
    (B, T, d_model) each: ``sequence_length``, where given, states the length the caller means to run and
    must equal T (InputError otherwise); the computation is the same for any T. ``inverse`` rebuilds ``other``.
    """

    def __init__(self, d_model: int, num_heads: int, num_levels: int = 3, compression_ratios=None,
                 local_window: int | None = None, coupling="additive", *, level_blocks: int = 16,
                 chunk_size: int = 1024, dropout: float = 0.0, norm: str = "layernorm", norm_eps: float = 1e-5,
                 rope_base: float = 10000.0, rotary: Rotary | None = None):
        super().__init__(coupling)
        _positive_int("d_model", d_model)
        _positive_int("num_heads", num_heads)
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise ConfigError(f"{d_model=} must be divisible by {num_heads=} into an even head size (RoPE "
                              "rotates pairs)")
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 0:
            raise ConfigError(f"num_levels={num_levels!r} must be an integer >= 0")
        ratios = tuple(4 ** (l + 1) for l in range(num_levels)) if compression_ratios is None else tuple(
            compression_ratios)
        if len(ratios) != num_levels:
            raise ConfigError(f"compression_ratios={list(ratios)} must give one ratio per pooled level "
                              f"(num_levels={num_levels})")
        if local_window is None:
            r1 = ratios[0] if ratios and isinstance(ratios[0], int) and ratios[0] > 0 else 1
            local_window = r1 * -(-DEFAULT_WINDOW // r1)
        self.d_model = d_model
        self.hierarchy = Hierarchy(local_window, ratios, level_blocks)
        _positive_int("chunk_size", chunk_size)
        rotary = rotary if rotary is not None else Rotary(d_model // num_heads, rope_base)
        self.block = HierarchicalAttentionBlock(d_model, num_heads, self.coupling.fx_features(d_model), rotary,
                                                self.hierarchy, chunk_size=chunk_size, norm=norm, eps=norm_eps,
                                                dropout=dropout)

    def forward(self, hidden_states: torch.Tensor, other: torch.Tensor | None = None,
                sequence_length: int | None = None):
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise InputError(f"hidden_states must be (batch, seq, {self.d_model}), got {tuple(hidden_states.shape)}")
        T = hidden_states.shape[1]
        if sequence_length is not None and sequence_length != T:
            raise InputError(f"sequence_length={sequence_length!r} but hidden_states holds {T} tokens: pass the "
                             "length of the input (or leave sequence_length out)")
        if other is not None and other.shape[:-1] != hidden_states.shape[:-1]:
            raise InputError(f"other must be (batch, seq, ...) like hidden_states {tuple(hidden_states.shape)}, "
                             f"got {tuple(other.shape)}")
        return super().forward(hidden_states, other)
