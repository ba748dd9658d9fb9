"""The two functions a reversible layer couples, F (causal self-attention) and G (feed-forward), on numpy
arrays, each with a hand-written vector-Jacobian product.

A block is bound to its parameters (a dict of short canonical names -> arrays, the model's own arrays, not
copies) and maps a stream (B, T, d) to a function output (B, T, out_features) in the parameters' dtype
(float32 or float64); out_features is the coupling's (d additive, 2d affine). ``block.vjp(x)`` returns
``(block(x), pullback)`` with ``pullback(ct) -> (dx, dparams)``, the contract of ``revnet_core.sweep``;
the pullback's closure holds the residuals, so what a ``store`` layer keeps is exactly what its closures
reach. Matmuls go through BLAS (split over numba's threads, ``matmul``); norms and activations through the
kernel registry (``kernel_impls``: the numba kernels unless a plugin ranks higher); RoPE and attention
through the numba kernels. The math is the torch backend's
(``backends/torch/blocks.py``): pre-norm, RoPE with the canonical angles, GELU-tanh for "gelu", gated
activations with the activated half first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from revnet_core.config import GATED_ACTIVATIONS

from . import kernel_impls as KI
from . import kernels as K
from .attention import causal_attention, causal_attention_backward
from .matmul import matmul

GATED = GATED_ACTIVATIONS


@dataclass(frozen=True)
class BlockConfig:
    """What a block needs besides its parameters."""

    d_model: int
    num_heads: int
    d_ff: int
    out_features: int
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    ffn_chunk_size: int = 0  # tokens per FFN chunk (0: whole sequence), torch's chunks
    attn_block: int = 256
    matmul_split: bool = True  # the big matmuls over numba's threads (``matmul``), else numpy's own

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


# --- norms ----------------------------------------------------------------------------------------------
def norm_vjp(p: dict, x2: np.ndarray, kind: str, eps: float):
    """LayerNorm (p["norm.weight"], p["norm.bias"]) or RMSNorm of rows x2 (N, d): (y, pullback), pullback(dy)
    -> (dx, {"norm.weight": ..., ["norm.bias": ...]}). The kernel comes from the registry (``kernel_impls``)."""
    if kind == "rmsnorm":
        y, pull = KI.rms_norm(x2, p["norm.weight"], eps)

        def pullback(dy):
            dx, dw = pull(dy)
            return dx, {"norm.weight": dw}
    else:
        y, pull = KI.layer_norm(x2, p["norm.weight"], p["norm.bias"], eps)

        def pullback(dy):
            dx, dw, db = pull(dy)
            return dx, {"norm.weight": dw, "norm.bias": db}

    return y, pullback


def final_norm_vjp(w: np.ndarray, b: np.ndarray | None, x: np.ndarray, kind: str, eps: float):
    """The model's final norm on (B, T, d): (y, pullback) with pullback(dy) -> (dx, {"weight", ["bias"]})."""
    p = {"norm.weight": w} if b is None else {"norm.weight": w, "norm.bias": b}
    y, pull = norm_vjp(p, x.reshape(-1, x.shape[-1]), kind, eps)

    def pullback(dy):
        dx, dp = pull(dy.reshape(-1, dy.shape[-1]))
        return dx.reshape(x.shape), {k.split(".", 1)[1]: v for k, v in dp.items()}

    return y.reshape(x.shape), pullback


def _rows(x: np.ndarray, dtype) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype)


# --- F: attention ---------------------------------------------------------------------------------------
class RopeCache:
    """cos/sin tables of one length and dtype at a time, shared by every layer of a model."""

    def __init__(self, head_dim: int, base: float):
        self.head_dim, self.base = head_dim, base
        self._key, self._tables = None, None

    def tables(self, T: int, dtype) -> tuple[np.ndarray, np.ndarray]:
        key = (T, np.dtype(dtype))
        if key != self._key:
            self._key, self._tables = key, K.rope_tables(T, self.head_dim, self.base, dtype)
        return self._tables


def _matmul(cfg: BlockConfig):
    split = cfg.matmul_split
    return lambda a, b: matmul(a, b, split)


class AttentionBlock:
    """F(x) = proj(attention(rope(q), rope(k), v)) over norm(x): (B, T, d) -> (B, T, out_features)."""

    def __init__(self, params: dict, cfg: BlockConfig, rope: RopeCache):
        self.params, self.cfg, self.rope = params, cfg, rope
        self.matmul = _matmul(cfg)

    def __call__(self, x):
        return self.vjp(x, keep=False)[0]

    def vjp(self, x, keep: bool = True):
        """(F(x), pullback); with ``keep=False`` the residuals are dropped as soon as possible (no pullback)."""
        p, cfg = self.params, self.cfg
        B, T, d = x.shape
        H, hd = cfg.num_heads, cfg.head_dim
        dtype = p["qkv.weight"].dtype
        x2 = _rows(x, dtype)
        h, norm_pull = norm_vjp(p, x2, cfg.norm, cfg.norm_eps)
        mm = self.matmul
        qkv = mm(h, p["qkv.weight"].T).reshape(B, T, 3, H, hd)
        cos, sin = self.rope.tables(T, dtype)
        q, k, v = (np.empty((B, H, T, hd), dtype) for _ in range(3))
        K.split_heads_rope(qkv, cos, sin, q, k, v)
        del qkv
        o, lse = causal_attention(q, k, v, cfg.attn_block)  # o (B, T, H, hd)
        o2 = o.reshape(B * T, d)
        out = mm(o2, p["proj.weight"].T).reshape(B, T, -1)
        if not keep:
            return out, None

        def pullback(ct):
            ct2 = _rows(ct, dtype)
            grads = {"proj.weight": mm(ct2.T, o2)}
            do = mm(ct2, p["proj.weight"]).reshape(B, T, H, hd)
            dq, dk, dv = causal_attention_backward(q, k, v, o, lse, do, cfg.attn_block)
            del do
            dqkv = np.empty((B, T, 3, H, hd), dtype)
            K.merge_heads_rope_backward(dq, dk, dv, cos, sin, dqkv)
            del dq, dk, dv
            dqkv = dqkv.reshape(B * T, 3 * d)
            grads["qkv.weight"] = mm(dqkv.T, h)
            dx, dnorm = norm_pull(mm(dqkv, p["qkv.weight"]))
            grads.update(dnorm)
            return dx.reshape(B, T, d).astype(x.dtype, copy=False), grads

        return out, pullback


# --- G: feed-forward ------------------------------------------------------------------------------------
def chunk_slices(T: int, chunk_size: int) -> list[slice]:
    """The FFN's sequence chunks, torch's: ``chunk_size`` tokens each (0, or >= T: one chunk), then the tail."""
    step = chunk_size if 0 < chunk_size < T else T
    return [slice(s, min(s + step, T)) for s in range(0, T, step)]


class FeedForwardBlock:
    """G(x) = down(act(up(norm(x)))) over sequence chunks: (B, T, d) -> (B, T, out_features). Gated
    activations double ``up``, rows of the activated half first."""

    tokenwise = True

    def __init__(self, params: dict, cfg: BlockConfig):
        self.params, self.cfg = params, cfg
        self.matmul = _matmul(cfg)

    def __call__(self, x):
        return self.vjp(x, keep=False)[0]

    def transform_vjp(self, x, keep: bool = True):
        """One chunk, no further chunking: (G(x), pullback or None)."""
        p, cfg = self.params, self.cfg
        B, T, d = x.shape
        dtype = p["up.weight"].dtype
        x2 = _rows(x, dtype)
        h, norm_pull = norm_vjp(p, x2, cfg.norm, cfg.norm_eps)
        mm = self.matmul
        u = mm(h, p["up.weight"].T)
        a, act_pull = KI.activation(u, cfg.activation)
        out = mm(a, p["down.weight"].T).reshape(B, T, -1)
        if not keep:
            return out, None

        def pullback(ct):
            ct2 = _rows(ct, dtype)
            grads = {"down.weight": mm(ct2.T, a)}
            da = mm(ct2, p["down.weight"])
            du = act_pull(da)
            del da
            grads["up.weight"] = mm(du.T, h)
            dx, dnorm = norm_pull(mm(du, p["up.weight"]))
            grads.update(dnorm)
            return dx.reshape(B, T, d).astype(x.dtype, copy=False), grads

        return out, pullback

    def chunk(self) -> "FeedForwardChunk":
        """The block restricted to one chunk (what the reversible backward's G half runs per chunk)."""
        return FeedForwardChunk(self)

    def vjp(self, x, keep: bool = True):
        """(G(x), pullback) over the chunks; the pullback splits its cotangent the same way."""
        parts = chunk_slices(x.shape[1], self.cfg.ffn_chunk_size)
        if len(parts) == 1:
            return self.transform_vjp(x, keep)
        out = np.empty((*x.shape[:2], self.cfg.out_features), self.params["up.weight"].dtype)
        pulls = []
        for sl in parts:
            out[:, sl], pull = self.transform_vjp(x[:, sl], keep)
            pulls.append(pull)
        if not keep:
            return out, None

        def pullback(ct):
            dx = np.empty(x.shape, x.dtype)
            total: dict = {}
            for sl, pull in zip(parts, pulls):
                dx[:, sl], g = pull(ct[:, sl])
                for name, value in g.items():
                    total[name] = total[name] + value if name in total else value
            return dx, total

        return out, pullback


class FeedForwardChunk:
    """A ``FeedForwardBlock`` applied to one chunk as a whole (callable, with ``vjp``)."""

    def __init__(self, block: FeedForwardBlock):
        self.block = block

    def __call__(self, x):
        return self.block.transform_vjp(x, keep=False)[0]

    def vjp(self, x):
        return self.block.transform_vjp(x)
