"""Rational-Fourier attention: causal attention through random features of a kernel, linear in length.

An attention whose weights are a kernel, a_ij = k(q_i, k_j) / sum_{j' <= i} k(q_i, k_j'), needs no (T, T)
matrix once k(q, k) ~ phi(q) . phi(k) for a finite feature map phi: the output of query i is
phi(q_i) S_i / phi(q_i) . z_i with S_i = sum_{j <= i} phi(k_j) v_j^T and z_i = sum_{j <= i} phi(k_j).

Kernels (``kernel=``), on head vectors q, k (RoPE-rotated when the block has positions):

- ``gaussian``: softmax attention's kernel exp(q . k / sqrt(hd)) (a Gaussian kernel times key and query
  norms), by FAVOR+'s positive random features phi(x) = exp(w . x - |x|^2 / 2) / sqrt(m) on x = q or k
  scaled by hd^-1/4, w ~ N(0, I) (in orthogonal blocks by default). Unbiased and positive.
- ``laplacian``: exp(-|q - k|_1 / hd), by random Fourier features phi(x) = [cos(w . x), sin(w . x)] / sqrt(m)
  on x scaled by 1/hd, w with i.i.d. standard Cauchy entries (its spectral density).
- ``cauchy``: the rational kernel prod_i 1 / (1 + (q_i - k_i)^2 / hd), by the same Fourier features on x
  scaled by hd^-1/2, w with i.i.d. Laplace(0, 1) entries (its spectral density).
(The scales keep a typical kernel value of random unit-variance heads near 0.1-0.3, not e^-hd: Fourier
features estimate a kernel value to about 1/sqrt(m), so a kernel far below that is noise.)

The Fourier features estimate the kernel without bias but not positively: with few features a denominator
can come near zero or below. It is floored at ``eps`` times the number of keys the query sees (a kernel
value of ``eps`` on average); as |phi(q) . phi(k)| <= 1 for these features, every output is then bounded by
max|v| / eps. The positive features of ``gaussian`` need no floor, which is why FAVOR+ uses them.

Causal sums run over chunks of ``chunk_size`` tokens: inside a chunk the masked (C, C) product, across
chunks a running state (exclusive prefix sums of each chunk's phi(k)^T v), through
``revnet_kernels.linear_attention``: the Triton kernel on CUDA and ROCm, the PyTorch reference elsewhere.
The state after a call is returned with ``use_cache=True`` and continues exactly where it stopped, so
decoding one token costs O(m * hd) per head whatever the position.

``window=W`` (gaussian only) makes it the windowed hybrid of ``rf_hybrid``: exact softmax over the last W keys,
this module's features for every key further back, one normalisation.

The features are a buffer (a parameter with ``learnable_features=True``), drawn at construction from torch's
global RNG and changed only by ``redraw_features()``: never inside a forward, so a reversible layer's
recompute in the backward uses the very features its forward used and is bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from revnet_core.config import RF_KERNELS
from revnet_core.errors import ConfigError, InputError
from revnet_kernels.linear_attn import linear_attention, naive_linear_attention, reference_linear_attention

from .blocks import Rotary, make_norm

KERNELS = RF_KERNELS  # defined once in revnet_core.config (a config names its kernel before torch loads)


def draw_features(kernel: str, num_features: int, head_dim: int, *, orthogonal: bool = True,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(num_features, head_dim) float64 random frequencies of ``kernel``'s spectral density, drawn on the CPU
    (the same draw on every device). ``gaussian`` with ``orthogonal``: blocks of head_dim orthogonal rows, each
    row rescaled to the norm of a fresh Gaussian vector, so each row is still marginally N(0, I)."""
    if kernel not in KERNELS:
        raise ConfigError(f"kernel={kernel!r} is not one of {list(KERNELS)}")
    shape = (num_features, head_dim)
    if kernel == "gaussian":
        if not orthogonal:
            return torch.randn(shape, generator=generator, dtype=torch.float64)
        blocks = []
        for _ in range(math.ceil(num_features / head_dim)):
            q, r = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64))
            # Signs fixed so that diag(r) > 0: only then is q uniform over orthogonal matrices (LAPACK's
            # Householder QR alone gives a biased q, and biased features: tests/torch/test_rf_attention.py)
            blocks.append((q * torch.sign(torch.diagonal(r))).T)  # orthonormal rows
        rows = torch.cat(blocks)[:num_features]
        norms = torch.randn(shape, generator=generator, dtype=torch.float64).norm(dim=-1, keepdim=True)
        return rows * norms
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)  # u = 0: an infinite draw
    if kernel == "laplacian":  # standard Cauchy by its inverse CDF
        return torch.tan(math.pi * (u - 0.5))
    # Laplace(0, 1) by its inverse CDF; u in [0, 1) so 1 - 2|u - 0.5| lies in (0, 1]
    return -torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())


def exact_kernel(kernel: str, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The kernel the features estimate, exactly: (..., T, hd) q and (..., S, hd) k -> (..., T, S)."""
    hd = q.shape[-1]
    if kernel == "gaussian":
        return torch.exp(q @ k.transpose(-1, -2) / math.sqrt(hd))
    delta = q[..., :, None, :] - k[..., None, :, :]
    if kernel == "laplacian":
        return torch.exp(-delta.abs().sum(-1) / hd)
    if kernel == "cauchy":
        return torch.prod(1.0 / (1.0 + delta * delta / hd), dim=-1)
    raise ConfigError(f"kernel={kernel!r} is not one of {list(KERNELS)}")


def exact_causal_attention(kernel: str, q, k, v) -> torch.Tensor:
    """Ground truth: causal attention with weights exactly ``kernel`` (softmax for gaussian), quadratic.
    (B, H, T, hd) each -> (B, H, T, hd)."""
    T = q.shape[-2]
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if kernel == "gaussian":  # softmax with its max subtracted: the same weights, without overflow
        s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
        return torch.softmax(s, dim=-1) @ v
    w = exact_kernel(kernel, q, k) * mask
    return (w @ v) / w.sum(-1, keepdim=True)


@dataclass
class RFState:
    """The recurrent state of causal RF attention after ``position`` tokens: kv = sum phi(k) v^T
    (B, H, M, hd) and z = sum phi(k) (B, H, M), M the feature width (2m for Fourier features); ``keys``
    (B,) the number of keys seen (those the attention mask let through)."""

    kv: torch.Tensor
    z: torch.Tensor
    keys: torch.Tensor
    position: int


def causal_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, chunk_size: int,
                            state: RFState | None = None, floor: torch.Tensor | None = None):
    """Causal sum phi(q_i) . sum_{j<=i} phi(k_j) v_j / phi(q_i) . sum_{j<=i} phi(k_j) over chunks, by the
    PyTorch reference (``revnet_kernels.linear_attn``, the one implementation of this math).

    fq, fk (B, H, T, M) features, v (B, H, T, hd), one dtype; ``state``: sums of earlier tokens (None: none).
    ``floor`` (B, T) or None: the least denominator of each query. Returns (out (B, H, T, hd), the kv and z
    sums after the last token).
    """
    kv0, z0 = (state.kv, state.z) if state is not None else (None, None)
    return reference_linear_attention(fq, fk, v, chunk_size, kv0, z0, floor)


def naive_causal_linear_attention(fq, fk, v, floor: torch.Tensor | None = None):
    """The same function as ``causal_linear_attention`` by the full masked (T, T) product (a test oracle)."""
    return naive_linear_attention(fq, fk, v, floor)


class RationalFourierAttention(nn.Module):
    """Causal multi-head attention through random features of ``kernel`` (module docstring): linear time,
    O(1) state per token when decoding. (B, T, d_model) -> (B, T, out_features) (default d_model).

    ``num_fourier_features`` m: random frequencies, shared by the heads (feature width m for ``gaussian``,
    2m for the Fourier kernels). ``learnable_features``: the frequencies are a trained parameter instead of
    a fixed buffer. ``chunk_size``: tokens per chunk of the causal sums. ``rotary``: a shared ``Rotary``
    (None: its own, when ``use_rope``), applied to q and k before the features.

    ``forward(hidden_states, attention_mask=None, use_cache=False, past_state=None)``: ``attention_mask``
    (B, T) bool or 0/1, False/0 for keys no query may see (padding); ``past_state`` an ``RFState`` to continue
    from; with ``use_cache`` it returns (output, state).
    """

    def __init__(self, d_model: int, num_heads: int, num_fourier_features: int = 64, kernel: str = "gaussian",
                 learnable_features: bool = False, *, out_features: int | None = None, chunk_size: int = 64,
                 orthogonal: bool = True, rotary: Rotary | None = None, use_rope: bool = True,
                 rope_base: float = 10000.0, eps: float = 1e-2, window: int | None = None):
        super().__init__()
        if d_model % num_heads:
            raise ConfigError(f"{d_model=} must be divisible by {num_heads=}")
        if kernel not in KERNELS:
            raise ConfigError(f"kernel={kernel!r} is not one of {list(KERNELS)}")
        for name, value in (("num_fourier_features", num_fourier_features), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.kernel = kernel
        self.num_fourier_features = num_fourier_features
        self.learnable_features = learnable_features
        self.orthogonal = orthogonal
        self.chunk_size = chunk_size
        self.eps = eps
        self.window = window  # validated by the property below
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, out_features or d_model, bias=False)
        if rotary is None and use_rope:
            rotary = Rotary(self.head_dim, rope_base)
        self.rotary = [rotary]  # a list: a shared module is not registered once per layer
        w = draw_features(kernel, num_fourier_features, self.head_dim, orthogonal=orthogonal).float()
        if learnable_features:
            self.features = nn.Parameter(w)
        else:
            self.register_buffer("features", w)

    @property
    def window(self) -> int | None:
        """None: RF attention over every earlier key. An int W: the windowed hybrid (``rf_hybrid``): exact
        softmax over the last W keys (the query's own included), the RF estimate of exp(q.k) beyond them.
        Gaussian kernel only (the one whose features estimate softmax's exp(q.k))."""
        return self._window

    @window.setter
    def window(self, window: int | None) -> None:
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise ConfigError(f"window={window!r} must be a positive integer (or None: no window)")
            if self.kernel != "gaussian":
                raise ConfigError(f"window={window} with kernel={self.kernel!r}: the windowed hybrid adds exact "
                                  "softmax inside the window to the RF estimate of the same exp(q.k) beyond it, "
                                  "which only the gaussian kernel's features estimate; use kernel='gaussian'")
        self._window = window

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw new fixed features (FAVOR+'s redraw). Call it between steps, never between a forward and its
        backward: a reversible layer's recompute must see the features its forward saw."""
        if self.learnable_features:
            raise ConfigError("learnable_features=True: the features are trained, not redrawn")
        w = draw_features(self.kernel, self.num_fourier_features, self.head_dim, orthogonal=self.orthogonal,
                          generator=generator)
        self.features.copy_(w)

    @property
    def feature_width(self) -> int:
        return self.num_fourier_features * (1 if self.kernel == "gaussian" else 2)

    def feature_map(self, x: torch.Tensor, is_query: bool, stabilize: bool = True, return_shift: bool = False):
        """(B, H, T, hd) -> (B, H, T, M) features of queries or keys, in x's dtype (at least float32).
        ``stabilize=False``: gaussian features without the shifts that cancel in attention (for tests).
        ``return_shift``: also the shift taken out of the gaussian exponents (the features times e^shift are
        the unshifted ones): (B, H, T, 1) for queries, a scalar for keys (0 without stabilising or for the
        Fourier kernels). The windowed hybrid (``rf_hybrid``) needs it to put both parts on one scale."""
        w = self.features.to(x.dtype)
        m = self.num_fourier_features
        if self.kernel == "gaussian":
            x = x * self.head_dim ** -0.25
            expo = x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)
            # Shifts that cancel in the ratio: per query its largest exponent; for keys one constant,
            # max |w|^2 / 2, the bound of w.x - |x|^2/2, so no key feature exceeds 1 (no overflow in the
            # running sums) and a decoding step shifts exactly like the whole-sequence pass.
            if not stabilize:
                shift = 0.0
            elif is_query:
                shift = expo.detach().amax(-1, keepdim=True)
            else:
                shift = 0.5 * (w.detach() * w.detach()).sum(-1).max()
            phi = torch.exp(expo - shift) * m ** -0.5
            return (phi, torch.as_tensor(shift, dtype=x.dtype, device=x.device)) if return_shift else phi
        ang = (x * (self.head_dim ** -0.5 if self.kernel == "cauchy" else 1.0 / self.head_dim)) @ w.T
        phi = torch.cat([ang.cos(), ang.sin()], dim=-1) * m ** -0.5
        return (phi, x.new_zeros(())) if return_shift else phi

    def init_state(self, batch: int, *, device=None, dtype=torch.float32):
        """The state before the first token: zero sums at position 0 (an ``RFState``, or with a window a
        ``rf_hybrid.WindowState`` holding no keys yet)."""
        dtype = torch.promote_types(dtype, torch.float32)
        kv = torch.zeros(batch, self.num_heads, self.feature_width, self.head_dim, device=device, dtype=dtype)
        z = kv.new_zeros(batch, self.num_heads, self.feature_width)
        if self.window is not None:
            from .rf_hybrid import WindowState

            empty = kv.new_zeros(batch, self.num_heads, 0, self.head_dim)
            return WindowState(empty, empty, kv, z, 0)
        return RFState(kv, z, kv.new_zeros(batch), 0)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False, past_state: RFState | None = None):
        if hidden_states.dim() != 3:
            raise InputError(f"hidden_states must be (batch, seq, d_model), got {tuple(hidden_states.shape)}")
        B, T, d = hidden_states.shape
        H = self.num_heads
        q, k, v = self.qkv(hidden_states).view(B, T, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
        start = past_state.position if past_state is not None else 0
        rope = self.rotary[0]
        if rope is not None:
            q, k = rope.rotate_from(q, start), rope.rotate_from(k, start)
        out_dtype = v.dtype
        # Features and sums in float32 at least, autocast or not: exp and the running sums need the range.
        with torch.autocast(hidden_states.device.type, enabled=False):
            dtype = torch.promote_types(q.dtype, torch.float32)
            if past_state is not None:
                dtype = torch.promote_types(dtype, past_state.kv.dtype)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            if self.window is not None:
                o, state = self._windowed(q, k, v, attention_mask, use_cache, past_state)
                out = self.proj(o.to(out_dtype).transpose(1, 2).reshape(B, T, d))
                return (out, state) if use_cache else out
            fq, fk = self.feature_map(q, True), self.feature_map(k, False)
            if attention_mask is not None:
                if tuple(attention_mask.shape) != (B, T):
                    raise InputError(f"attention_mask must have shape {(B, T)}, got {tuple(attention_mask.shape)}")
                keep = attention_mask.to(dtype)
                fk = fk * keep[:, None, :, None]
            else:
                keep = q.new_ones(B, T)
            seen = keep.cumsum(1) + (past_state.keys[:, None] if past_state is not None else 0)  # (B, T)
            floor = None if self.kernel == "gaussian" else self.eps * seen.clamp_min(1)
            kv0, z0 = (past_state.kv, past_state.z) if past_state is not None else (None, None)
            # through the registry: the Triton kernel on CUDA/ROCm, the reference elsewhere
            o, kv, z = linear_attention(fq, fk, v, floor=floor, kv0=kv0, z0=z0, chunk_size=self.chunk_size)
            state = RFState(kv, z, seen[:, -1], start + T)
        o = o.to(out_dtype).transpose(1, 2).reshape(B, T, d)
        out = self.proj(o)
        return (out, state) if use_cache else out

    def _windowed(self, q, k, v, attention_mask, use_cache, past_state):
        """The windowed hybrid's heads (``rf_hybrid.windowed_rf_heads``): (out (B, H, T, hd), state or None)."""
        from .rf_hybrid import WindowState, windowed_rf_heads

        if attention_mask is not None:
            raise InputError("attention_mask with a window: the windowed RF attention takes no padding mask; "
                             "pass window=None for masked keys, or give unpadded sequences")
        if past_state is not None and not isinstance(past_state, WindowState):
            raise InputError(f"past_state is a {type(past_state).__name__} but this attention has window="
                             f"{self.window}: start from init_state() of the same attention")
        return windowed_rf_heads(self, q, k, v, self.window, past_state, keep_state=use_cache)


class RFAttentionBlock(nn.Module):
    """F(x) = RationalFourierAttention(norm(x)) for a reversible layer: (B, T, d) -> (B, T, out_features).

    ``decode(x, state) -> (F(x), state)`` continues from a recurrent state (generation); ``init_state``
    starts one. No random draws in the forward (the features are fixed), so the recompute is exact.
    """

    def __init__(self, d_model: int, num_heads: int, out_features: int, rotary: Rotary | None, *,
                 num_fourier_features: int = 64, kernel: str = "gaussian", learnable_features: bool = False,
                 chunk_size: int = 64, norm: str = "layernorm", eps: float = 1e-5, dropout: float = 0.0,
                 window: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.norm = make_norm(norm, d_model, eps)
        self.attn = RationalFourierAttention(d_model, num_heads, num_fourier_features, kernel, learnable_features,
                                             out_features=out_features, chunk_size=chunk_size, rotary=rotary,
                                             use_rope=rotary is not None, window=window)
        self.drop = nn.Dropout(dropout)

    @property
    def window(self) -> int | None:
        """The attention's window (``RationalFourierAttention.window``): None, or exact softmax over the last
        W keys plus RF beyond. Settable, as the model's ``set_attention_window`` does for every block."""
        return self.attn.window

    @window.setter
    def window(self, window: int | None) -> None:
        self.attn.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.attn(self.norm(x)))

    def init_state(self, batch: int, *, device=None, dtype=torch.float32):
        return self.attn.init_state(batch, device=device, dtype=dtype)

    def decode(self, x: torch.Tensor, state: RFState):
        """F of new tokens x (B, t, d) continuing ``state``: (F(x), the state after them)."""
        out, state = self.attn(self.norm(x), use_cache=True, past_state=state)
        return self.drop(out), state
