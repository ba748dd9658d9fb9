"""Windowed Rational-Fourier attention: exact softmax over the last ``window`` tokens, the RF estimate beyond.

Query i weighs key j by exp(s_ij), s_ij = q_i . k_j / sqrt(hd) (q, k RoPE-rotated), exactly for the keys
inside its window, i - window < j <= i, and by phi(q_i) . phi(k_j) for every key further back, j <= i - window,
with phi the gaussian kernel's positive random features (FAVOR+: an unbiased estimate of the same exp(s_ij)).
Both go into one normalisation::

    out_i = (sum_near e^{s_ij} v_j + sum_far phi_i . phi_j v_j) / (sum_near e^{s_ij} + sum_far phi_i . phi_j)

So it is a consistent estimator of full causal softmax attention, exact within the window ("sparse plus
low-rank"): with window >= T it *is* softmax attention, and the far part's error falls with the number of
features as pure RF attention's does. Only the gaussian kernel estimates exp(s_ij), so only it combines.

How it is computed without overflow and in memory linear in T: as two normalised attentions and their log
normalisers, merged by them (the way split-K flash attention merges partial results):

- near: ``band_attention``, softmax over the band by query chunks of ``chunk_size`` (each chunk's logits are
  (C, C + window - 1)), with l_near = logsumexp of the band's logits;
- far: causal linear attention (``revnet_kernels.linear_attention``: the Triton kernel on CUDA, the reference
  elsewhere) of the query features against the key features delayed by ``window`` positions, with
  l_far = log(phi_i . sum_far phi_j), the features' shifts (``RationalFourierAttention.feature_map``) added back;
- out = sigmoid(l_near - l_far) o_near + sigmoid(l_far - l_near) o_far, the very ratio above.

Every term is bounded: the near weights are <= 1 after the row max, the features <= 1 after their shifts, the
merge weights in [0, 1]. The sums run in float32 at least, autocast or not.

Decoding keeps ``WindowState``: the last window - 1 rotated keys and values (the near keys of the next query
but itself) and the RF sums of every key older than those; one token costs O(window * hd + M * hd) per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from revnet_core.errors import InputError
from revnet_kernels.linear_attn import linear_attention


@dataclass
class WindowState:
    """Windowed RF attention after ``position`` tokens: ``k``, ``v`` (B, H, L, hd) the rotated keys and values
    of the last L = min(position, window - 1) positions; ``kv`` (B, H, M, hd) and ``z`` (B, H, M) the RF sums
    phi(k) v^T and phi(k) of every key before them (the keys every later query sees through features only)."""

    k: torch.Tensor
    v: torch.Tensor
    kv: torch.Tensor
    z: torch.Tensor
    position: int


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, offset: int,
                   chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of t queries over a causal band of ``window`` keys, by query chunks.

    q (B, H, t, hd); k, v (B, H, offset + t, hd), query r sitting at key r + offset (``offset`` earlier keys
    first, offset <= window - 1). Query r sees keys r + offset - window < j <= r + offset. Returns
    (out (B, H, t, hd), lse (B, H, t): the log of each query's sum of exp(logits))."""
    B, H, t, hd = q.shape
    if offset > window - 1:
        raise InputError(f"{offset=} earlier keys but a window of {window}: at most window - 1 are near keys")
    W = min(window, offset + t)  # no band reaches further back than the first key
    P = W - 1 - offset  # front padding: the band of query 0 starts W - 1 before its own key
    C = max(1, min(chunk_size, t))
    n = -(-t // C)
    # Padded keys: index P + j holds key j; chunk c's queries see padded keys [cC, cC + C + W - 1).
    kp, vp = (F.pad(x, (0, 0, P, n * C - t)) for x in (k, v))
    kw = kp.unfold(2, C + W - 1, C)  # (B, H, n, hd, C + W - 1)
    vw = vp.unfold(2, C + W - 1, C).transpose(-1, -2)  # (B, H, n, C + W - 1, hd)
    qc = F.pad(q, (0, 0, 0, n * C - t)).unflatten(2, (n, C))  # (B, H, n, C, hd)
    s = (qc @ kw) * hd ** -0.5  # (B, H, n, C, C + W - 1)
    r = torch.arange(C, device=q.device)[:, None]
    u = torch.arange(C + W - 1, device=q.device)[None, :]
    padded = torch.arange(n, device=q.device)[:, None, None] * C + u  # (n, 1, C + W - 1)
    mask = (u >= r) & (u <= r + W - 1) & (padded >= P) & (padded < P + offset + t)  # (n, C, C + W - 1)
    s = s.masked_fill(~mask, float("-inf"))
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # padded queries see no key: no -inf - -inf
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    den = torch.where(den > 0, den, torch.ones_like(den))
    out = (e @ vw) / den
    lse = (m + torch.log(den)).squeeze(-1)
    return out.flatten(2, 3)[:, :, :t], lse.flatten(2, 3)[:, :, :t]


def far_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, delay: int, chunk_size: int,
                  kv0: torch.Tensor | None = None, z0: torch.Tensor | None = None):
    """Causal linear attention of t queries against keys ``delay`` positions behind them.

    fq (B, H, t, M); fk (B, H, S, M) and v (B, H, S, hd) the features and values of local keys 0..S-1, query
    r seeing local keys j <= r - delay (delay >= 1), plus the sums kv0, z0 of keys before them. Returns
    (out (B, H, t, hd): the far keys' RF-weighted mean of v, 0 where there is none; den (B, H, t): phi(q_r) .
    sum phi(k_j) over them, in the features' shifted scale)."""
    t = fq.shape[2]
    # Key j enters at query j + delay: the keys shifted right by ``delay``, zeros (no key) in front.
    fkd = F.pad(fk, (0, 0, delay, 0))[:, :, :t]
    vd = F.pad(v, (0, 0, delay, 0))[:, :, :t]
    out, _, _ = linear_attention(fq, fkd, vd, kv0=kv0, z0=z0, chunk_size=chunk_size)
    z = fkd.cumsum(2)
    if z0 is not None:
        z = z + z0[:, :, None]
    return out, (fq * z).sum(-1)


def merge(o_near: torch.Tensor, lse_near: torch.Tensor, o_far: torch.Tensor, den_far: torch.Tensor,
          log_scale: torch.Tensor) -> torch.Tensor:
    """One normalisation over both parts: ``den_far * exp(log_scale)`` is the far keys' true weight sum
    (log_scale (B, H, t) the features' shifts); a query without far keys (den_far = 0) keeps o_near."""
    has = den_far > 0
    lse_far = torch.where(has, log_scale + torch.log(torch.where(has, den_far, torch.ones_like(den_far))),
                          torch.full_like(den_far, float("-inf")))
    w_far = torch.sigmoid(lse_far - lse_near)[..., None]  # = den_far / (den_near + den_far), in [0, 1]
    return o_near + w_far * (o_far - o_near)


def windowed_rf_heads(att, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                      state: WindowState | None = None, keep_state: bool = False):
    """The windowed attention of rotated heads q, k, v (B, H, t, hd) of new tokens, continuing ``state``
    (None: the first tokens). ``att``: the ``RationalFourierAttention`` whose features and chunk size are used.
    Returns (out (B, H, t, hd), the state after them, or None unless ``keep_state``)."""
    t = q.shape[2]
    if state is not None:
        k_loc, v_loc = torch.cat([state.k, k], 2), torch.cat([state.v, v], 2)
        offset, start = state.k.shape[2], state.position
    else:
        k_loc, v_loc, offset, start = k, v, 0, 0
    out, lse = band_attention(q, k_loc, v_loc, window, offset, att.chunk_size)
    delay = window - offset  # local key j is near for queries up to j + delay - 1
    kept = min(start + t, window - 1)
    leaving = offset + t - kept  # local keys that become far keys of every later query
    far_before = state is not None and start > offset  # the state holds some key
    fk = None
    if far_before or delay < t or (keep_state and leaving):
        fk, c = att.feature_map(k_loc, False, return_shift=True)
    if far_before or delay < t:
        fq, sq = att.feature_map(q, True, return_shift=True)
        kv0, z0 = (state.kv, state.z) if far_before else (None, None)
        o_far, den = far_attention(fq, fk, v_loc, delay, att.chunk_size, kv0, z0)
        out = merge(out, lse, o_far, den, sq.squeeze(-1) + c)
    if not keep_state:
        return out, None
    B, H, _, hd = q.shape
    if state is None:
        kv = q.new_zeros(B, H, att.feature_width, hd)
        z = q.new_zeros(B, H, att.feature_width)
    else:
        kv, z = state.kv, state.z
    if leaving:
        kv = kv + fk[:, :, :leaving].transpose(-1, -2) @ v_loc[:, :, :leaving]
        z = z + fk[:, :, :leaving].sum(2)
    return out, WindowState(k_loc[:, :, leaving:], v_loc[:, :, leaving:], kv, z, start + t)


def naive_windowed_rf(att, q, k, v, window: int) -> torch.Tensor:
    """The same function by its (T, T) definition (a test oracle): weights exp(s_ij) inside the window and the
    unshifted features' phi_i . phi_j beyond, one normalisation. (B, H, T, hd) each -> (B, H, T, hd)."""
    T, hd = q.shape[2], q.shape[3]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    near = (j <= i) & (j > i - window)
    far = j <= i - window
    fq, fk = att.feature_map(q, True, stabilize=False), att.feature_map(k, False, stabilize=False)
    w = torch.exp(q @ k.transpose(-1, -2) * hd ** -0.5) * near + (fq @ fk.transpose(-1, -2)) * far
    return (w @ v) / w.sum(-1, keepdim=True)
