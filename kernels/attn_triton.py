"""Flash attention in Triton: forward with log-sum-exp, backward, causal or not, sliding window, GQA.

Layers: private ``@triton.jit`` kernels; host ``attention_forward`` / ``attention_backward``; the autograd
``FlashAttention``; the functional ``flash_attention``. The reference is ``attn.reference_attention``.

Shapes: q (B, H, T, D), k and v (B, Hkv, T, D), D a power of two in [16, 256]; any T (the ragged last block
is masked). Offsets that can pass 2^31 elements (batch, head and row bases) are computed in int64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import registry
from .attn import check_attention_inputs, reference_attention
from .triton_utils import LN2, LOG2E, dot
from .utils import cdiv, dot_precision, interpreting, is_power_of_2, upcast_dots

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class AttentionBlocks:
    """Tile sizes and launch settings of the three kernels.

    Forward and dQ tile the queries by ``*block_m`` and walk the keys by ``*block_n`` (``block_m`` a
    multiple of ``block_n``); dK/dV tiles the keys by ``kv_block_n`` and walks the queries by ``kv_block_m``
    (``kv_block_n`` a multiple of ``kv_block_m``).
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    dq_block_m: int = 128
    dq_block_n: int = 32
    dq_num_warps: int = 8
    dq_num_stages: int = 3
    kv_block_m: int = 32
    kv_block_n: int = 128
    kv_num_warps: int = 8
    kv_num_stages: int = 3
    int64_offsets: bool | None = None  # None: int64 row offsets only where T * stride can reach 2^31
    # dQ from the dK/dV kernel through fp32 atomics (5 matmuls per block pair instead of 7, one fp32 (B, H, T,
    # D) buffer more, run-to-run bit differences); off under torch.use_deterministic_algorithms.
    atomic_dq: bool = False

    @classmethod
    def get_default(cls, head_dim: int, dtype: torch.dtype | None = None,
                    device: torch.device | None = None) -> "AttentionBlocks":
        """Tiles without register spills on sm_90 (cuobjdump), timed on an H100 (docs/benchmarks/kernels.md);
        small tiles for the interpreter, and for fp32, whose IEEE dots only serve correctness checks."""
        if interpreting() or (device is not None and device.type == "cpu"):
            return cls(32, 16, 1, 1, 32, 16, 1, 1, 16, 32, 1, 1)  # fewer Python-level steps per program
        if dtype == torch.float32:  # FMA dots: small tiles compile in seconds and do not spill
            return cls(32, 32, 4, 1, 32, 16, 4, 1, 16, 32, 4, 1)
        if head_dim > 128:
            return cls(64, 32, 4, 2, 64, 32, 4, 2, 32, 64, 4, 2)
        if head_dim <= 64:
            return cls(128, 64, 8, 3, 128, 64, 8, 3, 32, 64, 4, 3)
        # head dim 128: the atomic-dQ backward, 1.5x the two-kernel one at 16k (docs/benchmarks/kernels.md); the
        # dQ tiles serve deterministic mode
        return cls(128, 64, 8, 3, 64, 32, 4, 3, 64, 128, 8, 3, atomic_dq=True)

    def validate(self) -> None:
        for name in ("block_m", "block_n", "dq_block_m", "dq_block_n", "kv_block_m", "kv_block_n"):
            value = getattr(self, name)
            if not is_power_of_2(value) or value < 16:
                raise ValueError(f"{name}={value} must be a power of two >= 16")
        if self.block_m % self.block_n:
            raise ValueError(f"{self.block_m=} must be a multiple of {self.block_n=}")
        if self.dq_block_m % self.dq_block_n:
            raise ValueError(f"{self.dq_block_m=} must be a multiple of {self.dq_block_n=}")
        if self.kv_block_n % self.kv_block_m:
            raise ValueError(f"{self.kv_block_n=} must be a multiple of {self.kv_block_m=}")


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _row_index(offs, OFFSETS_64: tl.constexpr):
    """Row indices for row * stride: int64 when the host found that T * stride can reach 2^31 (e.g. q, k, v
    as views of a packed (B, T, 3, H, D) projection past ~700k tokens), int32 otherwise (fewer registers)."""
    if OFFSETS_64:
        return offs.to(tl.int64)
    else:
        return offs


@triton.jit
def _fwd_keys(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, lo, hi, seq_len, window, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        OFFSETS_64: tl.constexpr):
    """Online-softmax update of one query block over key blocks [lo, hi); MASK=False only where every
    (query, key) pair of the range is visible and in bounds."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows_n = _row_index(offs_n, OFFSETS_64)
        k_ptrs = K + rows_n[None, :] * stride_kt + offs_d[:, None]  # (D, BN)
        v_ptrs = V + rows_n[:, None] * stride_vt + offs_d[None, :]  # (BN, D)
        if MASK:
            kT = tl.load(k_ptrs, mask=offs_n[None, :] < seq_len, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < seq_len, other=0.0)
        else:
            kT = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = dot(q, kT, None, PRECISION, UPCAST) * qk_scale  # (BM, BN), log2 units
        if MASK:
            visible = offs_n[None, :] < seq_len
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] > offs_m[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no visible key yet keeps m = -inf; exponentiate against 0 so no NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = m_new
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
              num_heads, seq_len, window, qk_scale,
              GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        OFFSETS_64: tl.constexpr):
    """o_i = sum_j softmax_j(s_ij) v_j and lse_i = log sum_j exp(s_ij), s_ij = scale q_i.k_j over visible j,
    one program per (query block, batch x head), keys streamed with FlashAttention-2's running max/sum.
    Causal work grows with the query block, so the last blocks are launched first (less tail idling)."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    Q += b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_qt
    O += b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_ot
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh

    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    q = tl.load(Q + rows[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        full_lo = 0
        if HAS_WINDOW:
            # keys before full_lo are visible to some rows of the block only: masked
            lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
            full_lo = tl.minimum(tl.cdiv(tl.maximum(start_m + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N, start_m)
            acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, lo, full_lo, seq_len,
                                      window, qk_scale, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, PRECISION,
                                      UPCAST, OFFSETS_64)
        acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, full_lo, start_m, seq_len,
                                  window, qk_scale, BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW,
                                  PRECISION, UPCAST, OFFSETS_64)
        diag_hi = tl.minimum(start_m + BLOCK_M, seq_len)
        acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, start_m, diag_hi, seq_len,
                                  window, qk_scale, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW,
                                  PRECISION, UPCAST, OFFSETS_64)
    else:
        full_hi = (seq_len // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, 0, full_hi, seq_len,
                                  window, qk_scale, BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW,
                                  PRECISION, UPCAST, OFFSETS_64)
        acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, full_hi, seq_len, seq_len,
                                  window, qk_scale, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW,
                                  PRECISION, UPCAST, OFFSETS_64)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows past seq_len only; they are not stored
    o = acc / l_safe[:, None]
    tl.store(O + rows[:, None] * stride_ot + offs_d[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_safe)) * LN2
    tl.store(LSE + bh.to(tl.int64) * seq_len + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                    num_heads, seq_len, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta_i = sum_d o_id do_id (= sum_j p_ij dp_ij), fp32, one program per (query block, batch x head)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (start_m + rows) < seq_len
    O += b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_ot
    DO += b * stride_dob + h * stride_doh + start_m.to(tl.int64) * stride_dot
    o = tl.load(O + rows[:, None] * stride_ot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * seq_len + start_m + rows, delta, mask=row_ok)


@triton.jit
def _bwd_kv_queries(dk, dv, k, v, Q, DO, LSE, DELTA, DQ, stride_qt, stride_dot, stride_dqt, offs_n, lo, hi,
                    seq_len, window, qk_scale, sm_scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr, OFFSETS_64: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """dv_j += sum_i p_ij do_i and dk_j += sum_i ds_ij q_i (unscaled) over query blocks [lo, hi); with
    ATOMIC_DQ also dq_i += scale sum_j ds_ij k_j, added atomically into DQ (fp32)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows_m = _row_index(offs_m, OFFSETS_64)
        q_ptrs = Q + rows_m[None, :] * stride_qt + offs_d[:, None]  # (D, BM)
        do_ptrs = DO + rows_m[:, None] * stride_dot + offs_d[None, :]  # (BM, D)
        if MASK:
            row_ok = offs_m < seq_len
            qT = tl.load(q_ptrs, mask=row_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        else:
            qT = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        sT = dot(k, qT, None, PRECISION, UPCAST) * qk_scale  # (BN, BM), log2 units
        pT = tl.math.exp2(sT - (lse * LOG2E)[None, :])
        if MASK:
            visible = row_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_m[None, :] >= offs_n[:, None])
            if HAS_WINDOW:
                visible = visible & (offs_m[None, :] < offs_n[:, None] + window)
            pT = tl.where(visible, pT, 0.0)
        dv = dot(pT.to(do.dtype), do, dv, PRECISION, UPCAST)
        dpT = dot(v, tl.trans(do), None, PRECISION, UPCAST)  # (BN, BM)
        dsT = pT * (dpT - delta[None, :])
        dk = dot(dsT.to(qT.dtype), tl.trans(qT), dk, PRECISION, UPCAST)
        if ATOMIC_DQ:
            # FlashAttention-2's order: one pass over (key block, query block) pairs does five matmuls,
            # where separate dK/dV and dQ kernels do seven; the price is fp32 atomics on dQ.
            dq = dot(tl.trans(dsT).to(k.dtype), k, None, PRECISION, UPCAST) * sm_scale  # (BM, D)
            dq_ptrs = DQ + rows_m[:, None] * stride_dqt + offs_d[None, :]
            if MASK:
                tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, DQ, LSE, DELTA,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                   stride_dqb, stride_dqh, stride_dqt,
                   num_heads, num_kv_heads, seq_len, window, qk_scale, sm_scale,
                   GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   OFFSETS_64: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """dk_j = scale sum_i ds_ij q_i and dv_j = sum_i p_ij do_i, one program per (key block, batch x kv head),
    summing over the GROUP query heads that share the kv head (GQA without atomics on dK/dV). With ATOMIC_DQ
    it also adds dq_i into DQ (fp32, zeroed by the caller), and no dQ kernel is needed."""
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // num_kv_heads).to(tl.int64)
    hk = (bhk % num_kv_heads).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    offs_n = start_n + cols
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seq_len
    K += b * stride_kb + hk * stride_kh + start_n.to(tl.int64) * stride_kt
    V += b * stride_vb + hk * stride_vh + start_n.to(tl.int64) * stride_vt
    k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    q_end = tl.cdiv(seq_len, BLOCK_M) * BLOCK_M
    full_end = (seq_len // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = start_n
        diag_hi = tl.minimum(start_n + BLOCK_N, q_end)
        if HAS_WINDOW:
            # query blocks up to mid_end see every key of this block; up to end, some
            mid_end = tl.minimum(full_end, ((start_n + window) // BLOCK_M) * BLOCK_M)
            end = tl.minimum(q_end, tl.cdiv(start_n + BLOCK_N - 1 + window, BLOCK_M) * BLOCK_M)
        else:
            mid_end = full_end
            end = q_end
        mid_end = tl.maximum(mid_end, diag_hi)
        end = tl.maximum(end, mid_end)
    else:
        lo = 0
        diag_hi = 0
        mid_end = full_end
        end = q_end

    for g in range(GROUP):
        h = hk * GROUP + g
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        LSEh = LSE + (b * num_heads + h) * seq_len
        DELTAh = DELTA + (b * num_heads + h) * seq_len
        DQh = DQ + b * stride_dqb + h * stride_dqh
        # the key block's diagonal (masked), query blocks that see all its keys, then the window's edge or the
        # ragged last block (masked)
        if CAUSAL:
            dk, dv = _bwd_kv_queries(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, DQh, stride_qt, stride_dot, stride_dqt,
                                     offs_n, lo, diag_hi, seq_len, window, qk_scale, sm_scale, BLOCK_M, HEAD_DIM,
                                     True, CAUSAL, HAS_WINDOW, PRECISION, UPCAST, OFFSETS_64, ATOMIC_DQ)
        dk, dv = _bwd_kv_queries(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, DQh, stride_qt, stride_dot, stride_dqt,
                                 offs_n, diag_hi, mid_end, seq_len, window, qk_scale, sm_scale, BLOCK_M, HEAD_DIM,
                                 False, CAUSAL, HAS_WINDOW, PRECISION, UPCAST, OFFSETS_64, ATOMIC_DQ)
        dk, dv = _bwd_kv_queries(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, DQh, stride_qt, stride_dot, stride_dqt,
                                 offs_n, mid_end, end, seq_len, window, qk_scale, sm_scale, BLOCK_M, HEAD_DIM,
                                 True, CAUSAL, HAS_WINDOW, PRECISION, UPCAST, OFFSETS_64, ATOMIC_DQ)

    DK += b * stride_dkb + hk * stride_dkh + start_n.to(tl.int64) * stride_dkt
    DV += b * stride_dvb + hk * stride_dvh + start_n.to(tl.int64) * stride_dvt
    tl.store(DK + cols[:, None] * stride_dkt + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(DV + cols[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_q_keys(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, offs_m, lo, hi, seq_len, window, qk_scale,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        OFFSETS_64: tl.constexpr):
    """dq_i += sum_j ds_ij k_j (unscaled) over key blocks [lo, hi)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows_n = _row_index(offs_n, OFFSETS_64)
        k_ptrs = K + rows_n[None, :] * stride_kt + offs_d[:, None]  # (D, BN)
        v_ptrs = V + rows_n[None, :] * stride_vt + offs_d[:, None]  # (D, BN)
        if MASK:
            kT = tl.load(k_ptrs, mask=offs_n[None, :] < seq_len, other=0.0)
            vT = tl.load(v_ptrs, mask=offs_n[None, :] < seq_len, other=0.0)
        else:
            kT = tl.load(k_ptrs)
            vT = tl.load(v_ptrs)
        s = dot(q, kT, None, PRECISION, UPCAST) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASK:
            visible = offs_n[None, :] < seq_len
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] > offs_m[:, None] - window)
            p = tl.where(visible, p, 0.0)
        dp = dot(do, vT, None, PRECISION, UPCAST)  # (BM, BN)
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(kT.dtype), tl.trans(kT), dq, PRECISION, UPCAST)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                 stride_dqb, stride_dqh, stride_dqt,
                 num_heads, seq_len, window, qk_scale, sm_scale,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        OFFSETS_64: tl.constexpr):
    """dq_i = scale sum_j p_ij (do_i.v_j - delta_i) k_j, one program per (query block, batch x head),
    the heaviest (last) query blocks launched first."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    Q += b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_qt
    DO += b * stride_dob + h * stride_doh + start_m.to(tl.int64) * stride_dot
    DQ += b * stride_dqb + h * stride_dqh + start_m.to(tl.int64) * stride_dqt
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    q = tl.load(Q + rows[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        full_lo = 0
        if HAS_WINDOW:
            lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
            full_lo = tl.minimum(tl.cdiv(tl.maximum(start_m + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N, start_m)
            dq = _bwd_q_keys(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, offs_m, lo, full_lo, seq_len, window,
                             qk_scale, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, PRECISION, UPCAST, OFFSETS_64)
        dq = _bwd_q_keys(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, offs_m, full_lo, start_m, seq_len, window,
                         qk_scale, BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW, PRECISION, UPCAST, OFFSETS_64)
        diag_hi = tl.minimum(start_m + BLOCK_M, seq_len)
        dq = _bwd_q_keys(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, offs_m, start_m, diag_hi, seq_len, window,
                         qk_scale, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, PRECISION, UPCAST, OFFSETS_64)
    else:
        full_hi = (seq_len // BLOCK_N) * BLOCK_N
        dq = _bwd_q_keys(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, offs_m, 0, full_hi, seq_len, window,
                         qk_scale, BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW, PRECISION, UPCAST, OFFSETS_64)
        dq = _bwd_q_keys(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, offs_m, full_hi, seq_len, seq_len, window,
                         qk_scale, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, PRECISION, UPCAST, OFFSETS_64)
    tl.store(DQ + rows[:, None] * stride_dqt + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------------- host


def _check(q, k, v, causal, window, blocks) -> AttentionBlocks:
    check_attention_inputs(q, k, v, causal, window)
    head_dim = q.shape[-1]
    if not is_power_of_2(head_dim) or not 16 <= head_dim <= 256:
        raise ValueError(f"{head_dim=} must be a power of two between 16 and 256")
    if q.dtype not in _DTYPES:
        raise ValueError(f"dtype={q.dtype} must be one of {_DTYPES}")
    blocks = blocks or AttentionBlocks.get_default(head_dim, q.dtype, q.device)
    blocks.validate()
    return blocks


def _needs_int64(blocks: AttentionBlocks, *tensors: torch.Tensor) -> bool:
    """Whether a row offset read inside the kernels' loops (row index x row stride, up to a whole block past
    T) can reach 2^31. Block bases are int64 regardless."""
    if blocks.int64_offsets is not None:
        return blocks.int64_offsets
    pad = max(blocks.block_m, blocks.block_n, blocks.dq_block_m, blocks.dq_block_n, blocks.kv_block_m,
              blocks.kv_block_n)
    return any((t.shape[2] + pad) * t.stride(2) >= 2**31 for t in tensors)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _like_bthd(x: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, T, D) tensor laid out as (B, T, H, D): the caller's move back to (B, T, H*D) is free."""
    B, H, T, D = x.shape
    return torch.empty((B, T, H, D), dtype=x.dtype, device=x.device).transpose(1, 2)


def attention_forward(q, k, v, causal: bool = True, window: int | None = None, scale: float | None = None,
                      blocks: AttentionBlocks | None = None):
    """(o, lse): o (B, H, T, D) in q's dtype, lse (B, H, T) fp32 natural log. No autograd."""
    blocks = _check(q, k, v, causal, window, blocks)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    o = _like_bthd(q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    grid = (cdiv(T, blocks.block_m), B * H)
    _attn_fwd[grid](
        q, k, v, o, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, T, window or 0, scale * _LOG2E,
        GROUP=H // k.shape[1], BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, HEAD_DIM=D, CAUSAL=causal,
        HAS_WINDOW=window is not None, PRECISION=dot_precision(q.dtype), UPCAST=upcast_dots(q.dtype),
        OFFSETS_64=_needs_int64(blocks, q, k, v), num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return o, lse


def attention_backward(q, k, v, o, lse, do, causal: bool = True, window: int | None = None,
                       scale: float | None = None, blocks: AttentionBlocks | None = None):
    """(dq, dk, dv) from the forward's o and lse, shaped like q, k, v. No autograd."""
    blocks = _check(q, k, v, causal, window, blocks)
    q, k, v, o, do = (_last_dim_contiguous(t) for t in (q, k, v, o, do))
    B, H, T, D = q.shape
    Hk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    common = dict(HEAD_DIM=D, CAUSAL=causal, HAS_WINDOW=window is not None, PRECISION=dot_precision(q.dtype),
                  UPCAST=upcast_dots(q.dtype), OFFSETS_64=_needs_int64(blocks, q, k, v, do))
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(cdiv(T, blocks.dq_block_m), B * H)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T, BLOCK_M=blocks.dq_block_m, HEAD_DIM=D,
        num_warps=4,
    )
    dq, dk, dv = _like_bthd(q), _like_bthd(k), _like_bthd(v)
    atomic = blocks.atomic_dq and not torch.are_deterministic_algorithms_enabled()
    dq_acc = torch.zeros((B, H, T, D), dtype=torch.float32, device=q.device) if atomic else dq
    _attn_bwd_dkdv[(cdiv(T, blocks.kv_block_n), B * Hk)](
        q, k, v, do, dk, dv, dq_acc, lse, delta,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        *dq_acc.stride()[:3], H, Hk, T, window or 0, scale * _LOG2E, scale,
        GROUP=H // Hk, BLOCK_M=blocks.kv_block_m, BLOCK_N=blocks.kv_block_n, ATOMIC_DQ=atomic, **common,
        num_warps=blocks.kv_num_warps, num_stages=blocks.kv_num_stages,
    )
    if atomic:
        dq.copy_(dq_acc)
        return dq, dk, dv
    _attn_bwd_dq[(cdiv(T, blocks.dq_block_m), B * H)](
        q, k, v, do, dq, lse, delta,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        H, T, window or 0, scale * _LOG2E, scale,
        GROUP=H // Hk, BLOCK_M=blocks.dq_block_m, BLOCK_N=blocks.dq_block_n, **common,
        num_warps=blocks.dq_num_warps, num_stages=blocks.dq_num_stages,
    )
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """(q, k, v) -> (o, lse); saves q, k, v, o, lse (no (T, T) tensor); lse is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, causal, window, scale, blocks):
        o, lse = attention_forward(q, k, v, causal, window, scale, blocks)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (causal, window, scale, blocks)
        ctx.selected = registry.auto_selected()
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        causal, window, scale, _ = ctx.args
        try:
            dq, dk, dv = attention_backward(q, k, v, o, lse, do, *ctx.args)
        except Exception as exc:
            if not registry.backward_failed(ctx.selected, q.device, exc):
                raise
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_() for t in (q, k, v)]
                ref = reference_attention(*inputs, causal, window, scale, return_lse=False)
                dq, dk, dv = torch.autograd.grad(ref, inputs, do)
        return dq, dk, dv, None, None, None, None


def flash_attention(q, k, v, causal: bool = True, window: int | None = None, scale: float | None = None,
                    blocks: AttentionBlocks | None = None):
    """Differentiable (o, lse) = attention(q, k, v): (B, H, T, D), (B, Hkv, T, D) -> (B, H, T, D), (B, H, T)."""
    return FlashAttention.apply(q, k, v, causal, window, scale, blocks)


def triton_impl(q, k, v, *, causal=True, window=None, scale=None, return_lse=False):
    """Registry entry."""
    o, lse = flash_attention(q, k, v, causal, window, scale)
    return (o, lse) if return_lse else o
