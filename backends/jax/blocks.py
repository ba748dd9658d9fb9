"""The two functions a reversible layer couples: F (causal self-attention) and G (feed-forward).

Pure functions of ``(params, x, key)``: a stream (B, T, d) in, a function output (B, T, out_features) out,
the coupling decides out_features (d for additive, 2d for affine). Parameters use the canonical layout of
every backend: matrices are (out_features, in_features), as torch's ``nn.Linear`` stores them.

The math is the torch backend's (``backends/torch/blocks.py``), with these canonical choices made explicit:
norms, activations and block outputs are in ``promote(compute dtype, float32)``, and a narrower compute
dtype (bf16) is used for matmul operands only (see ``linear``); RoPE angles are float32 (``inv_freq``
rounded once from float64, so every framework gets the same table) and cos, sin and the rotation are in
``promote(x.dtype, float32)``; matmuls of float32 or wider run at full precision (no TF32), as torch's do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from revnet_core.config import GATED_ACTIVATIONS

GATED = GATED_ACTIVATIONS


@dataclass(frozen=True)
class BlockConfig:
    """What a block needs besides its parameters; hashable so jitted functions can close over it."""

    d_model: int
    num_heads: int
    d_ff: int
    out_features: int  # width of the block output the coupling consumes
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    attention: str = "sdpa"  # sdpa | reference
    use_flash_attention: bool = True  # False pins the XLA kernel (torch: the math kernel)
    dropout: float = 0.0
    attention_dropout: float = 0.0
    compute_dtype: str | None = None  # matmul dtype; None: the parameters' dtype (torch: autocast off)
    ffn_chunk_size: int = 0  # tokens per FFN chunk (0: whole sequence); bounds the (T, d_ff) intermediate
    window: int | None = None  # sliding-window attention: query i sees keys i - window < j <= i (None: all j <= i)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def _wide(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def compute_dtype(cfg: BlockConfig, param) -> jnp.dtype:
    return jnp.dtype(cfg.compute_dtype) if cfg.compute_dtype is not None else jnp.dtype(param.dtype)


def linear(x, w, dtype):
    """x (..., in) @ w (out, in).T with operands in ``dtype``; (..., out) in promote(dtype, float32).

    Narrow dtypes appear only as matmul operands, never as a value an elementwise op reads back: XLA may
    skip a bf16 rounding followed by an upcast (excess precision) where ops fuse, and fuses the recompute
    differently from the forward, so a rounded intermediate would make the reversible recompute differ.
    """
    # jax's default fp32 matmul may use TF32 on GPU; torch's does not, and the recompute must match.
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else None
    return jnp.einsum("...i,oi->...o", x.astype(dtype), w.astype(dtype), precision=precision,
                      preferred_element_type=_wide(dtype))


def norm(p, x, kind: str, eps: float):
    """LayerNorm (weight, bias) or RMSNorm (weight) over the last axis; (..., d) -> (..., d) in >= float32."""
    dt = _wide(jnp.promote_types(x.dtype, p["weight"].dtype))
    xf = x.astype(dt)
    if kind == "rmsnorm":
        return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * p["weight"].astype(dt)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    xc = xf - mu
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    return xc * jax.lax.rsqrt(var + eps) * p["weight"].astype(dt) + p["bias"].astype(dt)


def rope_angles(T: int, head_dim: int, base: float):
    """Rotary angles (T, head_dim/2) float32: position * inv_freq, inv_freq rounded once from float64."""
    inv = (base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)
    return jnp.arange(T, dtype=jnp.float32)[:, None] * jnp.asarray(inv)[None, :]


def apply_rope(x, angles):
    """Rotate pairs (x[2i], x[2i+1]) of x (B, T, H, hd) by angles (T, hd/2); math in >= float32, x's dtype out."""
    dt = _wide(x.dtype)
    cos = jnp.cos(angles.astype(dt))[:, None, :]  # (T, 1, hd/2)
    sin = jnp.sin(angles.astype(dt))[:, None, :]
    xf = x.astype(dt).reshape(*x.shape[:-1], -1, 2)  # (B, T, H, hd/2, 2)
    a, b = xf[..., 0], xf[..., 1]
    out = jnp.stack((a * cos - b * sin, a * sin + b * cos), axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def dropout(x, rate: float, key):
    """Inverted dropout; identity when ``key`` is None or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def band_mask(T: int, window: int | None = None):
    """(T, T) bool, True where query i (row) may see key j (column): j <= i, and i - window < j with a window."""
    i = jnp.arange(T)[:, None]
    j = jnp.arange(T)[None, :]
    return (j <= i) if window is None else (j <= i) & (j > i - window)


def reference_attention(q, k, v, dropout_rate: float = 0.0, key=None, window: int | None = None):
    """Plain causal attention, (B, T, H, hd) -> (B, T, H, hd): the ground truth the kernels are tested on;
    with ``window``, query i sees only keys i - window < j <= i (``band_mask``).

    Scores and softmax in promote(q.dtype, float32); probabilities cast back to v's dtype.
    """
    T, hd = q.shape[1], q.shape[-1]
    precision = jax.lax.Precision.HIGHEST if q.dtype.itemsize >= 4 else None
    scores = jnp.einsum("bthd,bshd->bhts", q, k, precision=precision).astype(_wide(q.dtype)) / math.sqrt(hd)
    mask = band_mask(T, window)
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)  # (B, H, T, T)
    probs = dropout(probs, dropout_rate, key).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v, precision=precision)


def registry_attention(cfg: BlockConfig, dtype) -> str:
    """The kernel registry's attention record for framework jax on the default device: "xla" (ranked first
    until the Pallas kernel is measured faster), "pallas" or "reference" (``REVNET_KERNELS=attention=...``
    forces one)."""
    from revnet_kernels.registry import select

    meta = {"head_dim": cfg.head_dim, "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_heads, "causal": True,
            "window": cfg.window, "return_lse": False}
    return select("attention", jax.devices()[0], jnp.dtype(dtype).name, meta, framework="jax").impl


def attention_implementation(cfg: BlockConfig, dtype, training: bool) -> str:
    """Which kernel attention runs: "cudnn", "xla", "pallas" or "reference". Fixed at trace time, so the
    reversible backward's recompute runs the very kernel the forward ran."""
    dtype = jnp.dtype(dtype)
    if cfg.attention == "reference" or (training and cfg.attention_dropout > 0):
        return "reference"  # no fused kernel here takes a dropout rate
    if dtype == jnp.float64:
        return "reference"  # dot_product_attention's XLA path rounds float64 scores to float32 for softmax
    chosen = registry_attention(cfg, dtype)
    if chosen in ("pallas", "reference"):
        return chosen
    if (cfg.use_flash_attention and jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
            and cfg.head_dim <= 128 and cfg.head_dim % 8 == 0):
        return "cudnn"
    return "xla"


def fused_attention(q, k, v, implementation: str, window: int | None = None):
    """``jax.nn.dot_product_attention`` (``implementation`` "xla" or "cudnn"), causal, over the last ``window``
    positions when given; (B, T, H, hd) -> (B, T, H, hd)."""
    # A token sees itself and the window - 1 before it: (left, right) = (window - 1, 0), as torch's band.
    local = None if window is None else (window - 1, 0)
    # XLA's kernel takes the default matmul precision, TF32 for float32 on recent GPUs: pin full precision.
    precision = "highest" if q.dtype.itemsize >= 4 else None
    with jax.default_matmul_precision(precision):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(q.shape[-1]),
                                            local_window_size=local, implementation=implementation)


def attention_block(p, x, key, cfg: BlockConfig):
    """F(x) = proj(attention(rope(q), rope(k), v)) over norm(x); (B, T, d) -> (B, T, out_features) in
    promote(compute dtype, float32).

    ``key`` (a PRNG key or None) drives attention and output dropout; None means no dropout.
    """
    B, T, d = x.shape
    cd = compute_dtype(cfg, p["qkv"]["weight"])
    h = norm(p["norm"], x, cfg.norm, cfg.norm_eps)
    qkv = linear(h, p["qkv"]["weight"], cd).reshape(B, T, 3, cfg.num_heads, cfg.head_dim)  # >= float32
    angles = rope_angles(T, cfg.head_dim, cfg.rope_base)
    q, k = apply_rope(qkv[:, :, 0], angles).astype(cd), apply_rope(qkv[:, :, 1], angles).astype(cd)
    v = qkv[:, :, 2].astype(cd)  # each (B, T, H, hd)
    k_attn, k_out = jax.random.split(key) if key is not None else (None, None)
    impl = attention_implementation(cfg, cd, key is not None)
    if impl == "reference":
        o = reference_attention(q, k, v, cfg.attention_dropout, k_attn, window=cfg.window)
    elif impl == "pallas":
        from revnet_kernels.attn_pallas import flash_attention

        o = flash_attention(q, k, v, window=cfg.window, interpret=jax.default_backend() == "cpu")
    else:
        o = fused_attention(q, k, v, impl, cfg.window)
    o = o.reshape(B, T, d)  # (B, T, d)
    return dropout(linear(o, p["proj"]["weight"], cd), cfg.dropout, k_out)


def activate(kind: str, u):
    """The FFN nonlinearity; gated kinds split u's last axis in halves (act(a) * b). gelu is tanh-approximate."""
    if kind in GATED:
        a, b = jnp.split(u, 2, axis=-1)
        return (jax.nn.gelu(a, approximate=True) if kind == "geglu" else jax.nn.silu(a)) * b
    if kind == "gelu":
        return jax.nn.gelu(u, approximate=True)
    if kind == "gelu_exact":
        return jax.nn.gelu(u, approximate=False)
    if kind == "relu":
        return jax.nn.relu(u)
    return jax.nn.silu(u)


def ffn_transform(p, x, key, cfg: BlockConfig):
    """G on one chunk of tokens: down(act(up(norm(x)))), dropout on the output. (B, t, d) -> (B, t, out) in
    promote(compute dtype, float32); the activation runs in that dtype too (see ``linear``)."""
    cd = compute_dtype(cfg, p["up"]["weight"])
    h = norm(p["norm"], x, cfg.norm, cfg.norm_eps)
    u = activate(cfg.activation, linear(h, p["up"]["weight"], cd))
    return dropout(linear(u, p["down"]["weight"], cd), cfg.dropout, key)


def ffn_chunks(T: int, chunk_size: int) -> tuple[int, int]:
    """(step, number of full chunks) of a T-token sequence; the tail T - n*step (< step) is one more chunk.
    Chunks are torch's: ``step = chunk_size if 0 < chunk_size < T else T``."""
    step = chunk_size if 0 < chunk_size < T else T
    return step, T // step


def chunk_key(key, i):
    """Dropout key of chunk ``i`` (None stays None), so a recompute chunk by chunk draws the same masks."""
    return None if key is None else jax.random.fold_in(key, i)


def map_chunks(fn, x, chunk_size: int):
    """Apply a token-wise ``fn(x_chunk, i)`` over sequence chunks of x (B, T, ...) and join the results.

    Full chunks run under ``lax.scan`` (one compiled body whatever T is); the tail is one more call.
    """
    T = x.shape[1]
    step, n = ffn_chunks(T, chunk_size)
    if n == 1 and step == T:
        return fn(x, 0)

    def body(_, i):
        return None, fn(jax.lax.dynamic_slice_in_dim(x, i * step, step, axis=1), i)

    _, ys = jax.lax.scan(body, None, jnp.arange(n))  # (n, B, step, ...)
    out = jnp.moveaxis(ys, 0, 1).reshape(x.shape[0], n * step, *ys.shape[3:])
    if n * step < T:
        out = jnp.concatenate([out, fn(x[:, n * step:], n)], axis=1)
    return out


def ffn_block(p, x, key, cfg: BlockConfig):
    """G(x) = down(act(up(norm(x)))); gated activations double ``up``. (B, T, d) -> (B, T, out_features).

    Token-wise, so it runs over sequence chunks of ``cfg.ffn_chunk_size`` tokens (dropout key folded with the
    chunk index); the reversible backward walks the very same chunks.
    """
    return map_chunks(lambda xc, i: ffn_transform(p, xc, chunk_key(key, i), cfg), x, cfg.ffn_chunk_size)


def init_norm(kind: str, d: int, dtype, layers: int | None = None):
    shape = (d,) if layers is None else (layers, d)
    p = {"weight": jnp.ones(shape, dtype)}
    if kind == "layernorm":
        p["bias"] = jnp.zeros(shape, dtype)
    return p
