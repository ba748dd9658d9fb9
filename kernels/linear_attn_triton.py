"""Chunked causal linear attention in Triton: forward with the normaliser and its floor, backward for the
features, the values and the incoming state.

Layers: private ``@triton.jit`` kernels; host ``linear_attention_forward`` / ``linear_attention_backward``;
the autograd ``LinearAttention``; the registry entry ``triton_impl``. The reference, the math and the public
entry point are in ``linear_attn``.

Schedule. A program owns one (batch x head, block of value columns, segment of the sequence) and walks the
segment's chunks in order, keeping the running sums S (M x columns) and Z (M) in fp32 registers: per chunk the
masked (C, C) product of the chunk's features, then fq S for the earlier tokens, then S += fk^T v. Long
sequences are cut into segments so that a few heads still fill the GPU: a first pass (the same kernel, sums
only) gives each segment's own sums, an exclusive prefix sum over segments (torch) gives each segment its
starting state. The backward is three scans of one generic kernel (``_la_scan``), each a linear attention
without normaliser, causal or anti-causal.

Saved for the backward: the inputs, the output and the raw sums s (B, H, T) fp32; no per-chunk states
(the backward rebuilds what it needs in its scans). Dots take the inputs' dtype (bf16/fp16 operands, the
(C, C) product and the state rounded to it as FlashAttention rounds P) and accumulate in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import registry
from .linear_attn import DEFAULT_CHUNK, check_linear_attention_inputs, normaliser, reference_linear_attention
from .registry import LINEAR_ATTENTION_MAX_WIDTH
from .triton_utils import dot
from .utils import cdiv, dot_precision, interpreting, multiprocessors, next_power_of_2, upcast_dots

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class LinearAttentionBlocks:
    """Launch settings. ``chunk``: tokens per chunk, a power of two >= 16; ``block_cols``: value (or output)
    columns per program; ``segments``: pieces of the sequence scanned in parallel (None: enough programs for
    about two per multiprocessor, one under the interpreter)."""

    chunk: int = DEFAULT_CHUNK
    block_cols: int = 64
    segments: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def get_default(cls, chunk_size: int = DEFAULT_CHUNK) -> "LinearAttentionBlocks":
        """The chunk rounded to a power of two in [16, 128] (a tiling choice: the math is the reference's).
        Not tuned: nothing of this kernel has been timed on a GPU yet (benchmarks/rf_kernel_bench.py)."""
        chunk = min(max(next_power_of_2(chunk_size), 16), 128)
        if interpreting():
            return cls(chunk, 64, 1, 1, 1)
        return cls(chunk)

    def validate(self) -> None:
        for name in ("chunk", "block_cols"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two >= 16")
        if self.segments is not None and self.segments < 1:
            raise ValueError(f"segments={self.segments} must be >= 1 or None")


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _la_fwd(FQ, FK, V, FLOOR, KV0, Z0, O, SUMS, KV1, Z1,
            stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
            stride_ob, stride_oh, stride_ot, stride_fb, stride_ft,
            num_heads, seq_len, M, D, seg_len, num_segs,
            CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_FLOOR: tl.constexpr,
            HAS_STATE: tl.constexpr, STATE_ONLY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Per chunk of queries/keys i, j in [c, c + C) of one segment, columns [d0, d0 + BLOCK_D) of v:
    a_ij = fq_i . fk_j (j <= i), s_i = sum_j a_ij + fq_i . Z, num_i = sum_j a_ij v_j + fq_i^T S,
    out_i = num_i / den_i with den_i = max(floor_i, s_i) (1 where 0); then S += fk^T v, Z += sum_j fk_j.
    S, Z start from the segment's state (KV0, Z0) or zero and end in (KV1, Z1). The column block 0 stores s
    (SUMS) and Z. STATE_ONLY: the sums alone, no output."""
    bh = tl.program_id(0)
    db = tl.program_id(1)
    seg = tl.program_id(2)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    FQ += b * stride_qb + h * stride_qh
    FK += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows = tl.arange(0, CHUNK)
    state = bh.to(tl.int64) * num_segs + seg
    s_ptrs = offs_m[:, None] * D + offs_d[None, :]
    s_ok = m_ok[:, None] & d_ok[None, :]
    if HAS_STATE:
        S = tl.load(KV0 + state * M * D + s_ptrs, mask=s_ok, other=0.0)
        Z = tl.load(Z0 + state * M + offs_m, mask=m_ok, other=0.0)
    else:
        S = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        Z = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo = seg * seg_len
    hi = tl.minimum(lo + seg_len, seq_len)
    causal = rows[:, None] >= rows[None, :]
    for start in range(lo, hi, CHUNK):
        t = start + rows
        t_ok = t < hi
        t64 = t.to(tl.int64)  # a row stride of a packed (B, T, 3, H, hd) projection times 1M passes 2^31
        fk = tl.load(FK + t64[:, None] * stride_kt + offs_m[None, :], mask=t_ok[:, None] & m_ok[None, :], other=0.0)
        v = tl.load(V + t64[:, None] * stride_vt + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        if not STATE_ONLY:
            fq = tl.load(FQ + t64[:, None] * stride_qt + offs_m[None, :], mask=t_ok[:, None] & m_ok[None, :],
                         other=0.0)
            a = dot(fq, tl.trans(fk), None, PRECISION, UPCAST)  # (C, C)
            a = tl.where(causal, a, 0.0)
            s = tl.sum(a, 1) + tl.sum(fq.to(tl.float32) * Z[None, :], 1)
            num = dot(a.to(v.dtype), v, None, PRECISION, UPCAST)
            num = dot(fq, S.to(fq.dtype), num, PRECISION, UPCAST)
            den = s
            if HAS_FLOOR:
                fl = tl.load(FLOOR + b * stride_fb + t64 * stride_ft, mask=t_ok, other=1.0).to(tl.float32)
                den = tl.maximum(den, fl)
            den = tl.where(den == 0.0, 1.0, den)
            tl.store(O + t64[:, None] * stride_ot + offs_d[None, :], (num / den[:, None]).to(O.dtype.element_ty),
                     mask=t_ok[:, None] & d_ok[None, :])
            if db == 0:
                tl.store(SUMS + bh.to(tl.int64) * seq_len + t64, s, mask=t_ok)
        S = dot(tl.trans(fk), v, S, PRECISION, UPCAST)
        Z += tl.sum(fk.to(tl.float32), 0)
    tl.store(KV1 + state * M * D + s_ptrs, S, mask=s_ok)
    if db == 0:
        tl.store(Z1 + state * M + offs_m, Z, mask=m_ok)


@triton.jit
def _la_scan(A, Bk, C, SC, S0, Z0, OUT, S1, Z1,
             stride_ab, stride_ah, stride_at, stride_bb, stride_bh, stride_bt, stride_cb, stride_ch, stride_ct,
             stride_ob, stride_oh, stride_ot,
             num_heads, seq_len, DA, DC, seg_len, num_segs,
             CHUNK: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, REVERSE: tl.constexpr,
             SCALAR: tl.constexpr, HAS_STATE: tl.constexpr, STATE_ONLY: tl.constexpr, PRECISION: tl.constexpr,
             UPCAST: tl.constexpr):
    """Linear attention without normaliser over one segment, columns [c0, c0 + BLOCK_C) of c:
    out_i = sum_{j in W(i)} (a_i . b_j + alpha_i beta_j) c_j + a_i^T S + alpha_i z, S (DA x DC) and z (DC) the
    sums of b_j c_j^T and beta_j c_j over the tokens already passed (from S0, Z0 or zero; stored to S1, Z1).
    W(i) is j <= i, walking forward; with REVERSE j >= i, walking backward. SCALAR 0: no alpha, beta;
    1: alpha = SC, beta = 1; 2: alpha = 1, beta = SC (SC (B*H, T) fp32)."""
    bh = tl.program_id(0)
    cb = tl.program_id(1)
    seg = tl.program_id(2)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    A += b * stride_ab + h * stride_ah
    Bk += b * stride_bb + h * stride_bh
    C += b * stride_cb + h * stride_ch
    OUT += b * stride_ob + h * stride_oh
    SC += bh.to(tl.int64) * seq_len
    offs_a = tl.arange(0, BLOCK_A)
    a_ok = offs_a < DA
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < DC
    rows = tl.arange(0, CHUNK)
    state = bh.to(tl.int64) * num_segs + seg
    s_ptrs = offs_a[:, None] * DC + offs_c[None, :]
    s_ok = a_ok[:, None] & c_ok[None, :]
    if HAS_STATE:
        S = tl.load(S0 + state * DA * DC + s_ptrs, mask=s_ok, other=0.0)
        z = tl.load(Z0 + state * DC + offs_c, mask=c_ok, other=0.0)
    else:
        S = tl.zeros([BLOCK_A, BLOCK_C], dtype=tl.float32)
        z = tl.zeros([BLOCK_C], dtype=tl.float32)
    if REVERSE:
        visible = rows[:, None] <= rows[None, :]
    else:
        visible = rows[:, None] >= rows[None, :]
    lo = seg * seg_len
    hi = tl.minimum(lo + seg_len, seq_len)
    n = tl.cdiv(hi - lo, CHUNK)
    for it in range(0, n):
        if REVERSE:
            start = lo + (n - 1 - it) * CHUNK
        else:
            start = lo + it * CHUNK
        t = start + rows
        t_ok = t < hi
        t64 = t.to(tl.int64)
        bk = tl.load(Bk + t64[:, None] * stride_bt + offs_a[None, :], mask=t_ok[:, None] & a_ok[None, :], other=0.0)
        c = tl.load(C + t64[:, None] * stride_ct + offs_c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        if SCALAR != 0:
            x = tl.load(SC + t64, mask=t_ok, other=0.0)
        if not STATE_ONLY:
            a = tl.load(A + t64[:, None] * stride_at + offs_a[None, :], mask=t_ok[:, None] & a_ok[None, :],
                        other=0.0)
            w = dot(a, tl.trans(bk), None, PRECISION, UPCAST)  # (C, C)
            if SCALAR == 1:
                w += x[:, None]
            if SCALAR == 2:
                w += x[None, :]
            w = tl.where(visible, w, 0.0)
            out = dot(w.to(c.dtype), c, None, PRECISION, UPCAST)
            out = dot(a, S.to(a.dtype), out, PRECISION, UPCAST)
            if SCALAR == 1:
                out += x[:, None] * z[None, :]
            if SCALAR == 2:
                out += z[None, :]
            tl.store(OUT + t64[:, None] * stride_ot + offs_c[None, :], out.to(OUT.dtype.element_ty),
                     mask=t_ok[:, None] & c_ok[None, :])
        S = dot(tl.trans(bk), c, S, PRECISION, UPCAST)
        if SCALAR == 1:
            z += tl.sum(c.to(tl.float32), 0)
        if SCALAR == 2:
            z += tl.sum(x[:, None] * c.to(tl.float32), 0)
    tl.store(S1 + state * DA * DC + s_ptrs, S, mask=s_ok)
    tl.store(Z1 + state * DC + offs_c, z, mask=c_ok)


# ------------------------------------------------------------------------------------------------- host


def _check(fq, fk, v, kv0, z0, floor, blocks: LinearAttentionBlocks | None, chunk_size: int):
    check_linear_attention_inputs(fq, fk, v, kv0, z0, floor)
    if fq.dtype not in _DTYPES:
        raise ValueError(f"dtype={fq.dtype} must be one of {_DTYPES}")
    for name, width in (("feature width", fq.shape[3]), ("head dim", v.shape[3])):
        if width > LINEAR_ATTENTION_MAX_WIDTH:
            raise ValueError(f"{name} {width} must be <= {LINEAR_ATTENTION_MAX_WIDTH}")
    blocks = blocks or LinearAttentionBlocks.get_default(chunk_size)
    blocks.validate()
    return blocks


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _segments(blocks: LinearAttentionBlocks, seq_len: int, programs: int, device) -> tuple[int, int]:
    """(number of segments, tokens per segment, a multiple of the chunk)."""
    chunks = cdiv(seq_len, blocks.chunk)
    wanted = blocks.segments
    if wanted is None:  # a segment costs an extra read of its inputs: only where programs are too few
        wanted = cdiv(2 * multiprocessors(device), programs) if chunks >= 16 else 1
    wanted = max(1, min(wanted, chunks))
    seg_len = cdiv(chunks, wanted) * blocks.chunk
    return cdiv(seq_len, seg_len), seg_len


def _starts(sums: torch.Tensor, init: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    """Each segment's starting state from the segments' own sums (BH, nseg, ...): the exclusive prefix sum in
    the scan's direction, plus ``init`` (BH, ...) if given."""
    if reverse:
        before = sums.flip(1).cumsum(1).flip(1) - sums
    else:
        before = sums.cumsum(1) - sums
    return before if init is None else before + init[:, None]


def _launch_fwd(fq, fk, v, floor, kv0, z0, out, sums, kv1, z1, H, nseg, seg_len, blocks, state_only):
    B, _, T, M = fq.shape
    D = v.shape[3]
    block_d = min(max(next_power_of_2(D), 16), blocks.block_cols)
    f = floor if floor is not None else sums  # a placeholder pointer when there is no floor
    f_strides = (floor.stride(0), floor.stride(1)) if floor is not None else (0, 0)
    o = out if out is not None else v
    _la_fwd[(B * H, cdiv(D, block_d), nseg)](
        fq, fk, v, f, kv0 if kv0 is not None else kv1, z0 if z0 is not None else z1, o, sums, kv1, z1,
        *fq.stride()[:3], *fk.stride()[:3], *v.stride()[:3], *o.stride()[:3], *f_strides,
        H, T, M, D, seg_len, nseg,
        CHUNK=blocks.chunk, BLOCK_M=max(next_power_of_2(M), 16), BLOCK_D=block_d, HAS_FLOOR=floor is not None,
        HAS_STATE=kv0 is not None, STATE_ONLY=state_only, PRECISION=dot_precision(fq.dtype),
        UPCAST=upcast_dots(fq.dtype), num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )


def linear_attention_forward(fq, fk, v, floor=None, kv0=None, z0=None, chunk_size: int = DEFAULT_CHUNK,
                             blocks: LinearAttentionBlocks | None = None):
    """(out (B, H, T, hd) in v's dtype, sums s (B*H, T) fp32, kv (B, H, M, hd), z (B, H, M) in fq's dtype).
    No autograd."""
    blocks = _check(fq, fk, v, kv0, z0, floor, blocks, chunk_size)
    fq, fk, v = (_rows_contiguous(t) for t in (fq, fk, v))
    B, H, T, M = fq.shape
    D = v.shape[3]
    dev = fq.device
    f32 = dict(dtype=torch.float32, device=dev)
    col_blocks = cdiv(D, min(max(next_power_of_2(D), 16), blocks.block_cols))
    nseg, seg_len = _segments(blocks, T, B * H * col_blocks, dev)
    init_kv = kv0.reshape(B * H, M, D).float() if kv0 is not None else None
    init_z = z0.reshape(B * H, M).float() if z0 is not None else None
    sums = torch.empty(B * H, T, **f32)
    kv1 = torch.empty(B * H, nseg, M, D, **f32)
    z1 = torch.empty(B * H, nseg, M, **f32)
    if nseg > 1:  # each segment's own sums first, then its starting state
        _launch_fwd(fq, fk, v, None, None, None, None, sums, kv1, z1, H, nseg, seg_len, blocks, True)
        start_kv = _starts(kv1, init_kv, False).contiguous()
        start_z = _starts(z1, init_z, False).contiguous()
    else:
        start_kv = init_kv[:, None].contiguous() if init_kv is not None else None
        start_z = init_z[:, None].contiguous() if init_z is not None else None
    out = torch.empty(B, H, T, D, dtype=v.dtype, device=dev)
    _launch_fwd(fq, fk, v, floor, start_kv, start_z, out, sums, kv1, z1, H, nseg, seg_len, blocks, False)
    kv_end = kv1[:, -1].reshape(B, H, M, D).to(fq.dtype)
    z_end = z1[:, -1].reshape(B, H, M).to(fq.dtype)
    return out, sums, kv_end, z_end


def _scan(a, bk, c, sc, scalar: int, reverse: bool, init_s, init_z, blocks: LinearAttentionBlocks,
          want_out: bool = True):
    """The generic scan ``_la_scan`` over (B, H, T, DA) a, bk and (B, H, T, DC) c -> (out (B, H, T, DC) in c's
    dtype or None, the final S (B*H, DA, DC) and z (B*H, DC) in fp32). ``init_s`` (B*H, DA, DC) and ``init_z``
    (B*H, DC) fp32 or None."""
    B, H, T, DA = a.shape
    DC = c.shape[3]
    dev = a.device
    f32 = dict(dtype=torch.float32, device=dev)
    block_c = min(max(next_power_of_2(DC), 16), blocks.block_cols)
    grid_c = cdiv(DC, block_c)
    nseg, seg_len = _segments(blocks, T, B * H * grid_c, dev)
    s1 = torch.empty(B * H, nseg, DA, DC, **f32)
    z1 = torch.empty(B * H, nseg, DC, **f32)
    sc = sc if sc is not None else z1  # a placeholder pointer for SCALAR 0

    def launch(s0, z0, out, state_only):
        o = out if out is not None else c
        _la_scan[(B * H, grid_c, nseg)](
            a, bk, c, sc, s0 if s0 is not None else s1, z0 if z0 is not None else z1, o, s1, z1,
            *a.stride()[:3], *bk.stride()[:3], *c.stride()[:3], *o.stride()[:3],
            H, T, DA, DC, seg_len, nseg,
            CHUNK=blocks.chunk, BLOCK_A=max(next_power_of_2(DA), 16), BLOCK_C=block_c, REVERSE=reverse,
            SCALAR=scalar, HAS_STATE=s0 is not None, STATE_ONLY=state_only, PRECISION=dot_precision(c.dtype),
            UPCAST=upcast_dots(c.dtype), num_warps=blocks.num_warps, num_stages=blocks.num_stages,
        )

    if init_s is not None and init_z is None:
        init_z = torch.zeros(B * H, DC, **f32)
    if init_z is not None and init_s is None:
        init_s = torch.zeros(B * H, DA, DC, **f32)
    if nseg > 1:
        launch(None, None, None, True)
        s0 = _starts(s1, init_s, reverse).contiguous()
        z0 = _starts(z1, init_z, reverse).contiguous()
    else:
        s0 = init_s[:, None].contiguous() if init_s is not None else None
        z0 = init_z[:, None].contiguous() if init_z is not None else None
    out = torch.empty(B, H, T, DC, dtype=c.dtype, device=dev) if want_out else None
    launch(s0, z0, out, not want_out)
    last = 0 if reverse else -1
    return out, s1[:, last], z1[:, last]


def linear_attention_backward(fq, fk, v, out, sums, dout, floor=None, kv0=None, z0=None, dkv_end=None,
                              dz_end=None, chunk_size: int = DEFAULT_CHUNK, blocks: LinearAttentionBlocks | None = None,
                              needs=(True, True, True, True, True)):
    """Gradients (dfq, dfk, dv, dkv0, dz0) from the forward's out and sums; dkv_end, dz_end the gradients of
    the returned state (None: zero). ``needs`` (fq, fk, v, kv0, z0): what to compute (None elsewhere). No
    autograd.

    With g = dout and den = max(floor, s) (1 where 0): dn_i = g_i / den_i, ds_i = -(g_i . out_i) / den_i
    where s_i is above the floor (half at a tie, as torch.maximum; 0 where the floor wins or den was 0):

        dfq_i = sum_{j<=i} (dn_i . v_j + ds_i) fk_j + kv0 dn_i + ds_i z0             (causal scan)
        dfk_j = sum_{i>=j} (v_j . dn_i + ds_i) fq_i + dkv_end v_j + dz_end           (anti-causal scan)
        dv_j  = sum_{i>=j} (fk_j . fq_i) dn_i + dkv_end^T fk_j                       (anti-causal scan)
        dkv0 = dkv_end + sum_i fq_i dn_i^T,  dz0 = dz_end + sum_i ds_i fq_i          (the scans' end states)
    """
    blocks = _check(fq, fk, v, kv0, z0, floor, blocks, chunk_size)
    fq, fk, v = (_rows_contiguous(t) for t in (fq, fk, v))
    B, H, T, M = fq.shape
    D = v.shape[3]
    s = sums.view(B, H, T)
    den = normaliser(s, None if floor is None else floor.float())
    # d den / d s: 1 where s is above the floor, 1/2 at a tie (torch.maximum's rule), 0 below it and where
    # the denominator was 0 (replaced by the constant 1)
    if floor is None:
        w = (s != 0).float()
    else:
        f = floor.float()[:, None]
        w = torch.where(s > f, 1.0, torch.where(s == f, 0.5, 0.0))
        w = torch.where(torch.maximum(s, f) == 0, 0.0, w)
    g = dout.float()  # fp32 (B, H, T, hd) temporaries on the host: a fused kernel would save them (not done)
    ds = (torch.linalg.vecdot(g, out.float()) * (-w / den)).reshape(B * H, T).contiguous()
    dn = (g / den[..., None]).to(v.dtype)  # (B, H, T, hd), contiguous
    need_q, need_k, need_v, need_kv0, need_z0 = needs
    kv_t = kv0.reshape(B * H, M, D).float().transpose(1, 2) if kv0 is not None else None  # (BH, hd, M)
    zi = z0.reshape(B * H, M).float() if z0 is not None else None
    g_kv = dkv_end.reshape(B * H, M, D).float() if dkv_end is not None else None
    g_z = dz_end.reshape(B * H, M).float() if dz_end is not None else None
    dfq = dfk = dv = dkv0 = dz0 = None
    if need_q:
        dfq, _, _ = _scan(dn, v, fk, ds, 1, False, kv_t, zi, blocks)
    if need_k or need_z0:
        dfk, _, z_end = _scan(v, dn, fq, ds, 2, True, g_kv.transpose(1, 2) if g_kv is not None else None, g_z,
                              blocks, want_out=need_k)
        if need_z0:
            dz0 = z_end.reshape(B, H, M).to(z0.dtype)
    if need_v or need_kv0:
        dv, s_end, _ = _scan(fk, fq, dn, None, 0, True, g_kv, None, blocks, want_out=need_v)
        if need_kv0:
            dkv0 = s_end.reshape(B, H, M, D).to(kv0.dtype)
    return dfq, dfk, dv, dkv0, dz0


class LinearAttention(torch.autograd.Function):
    """(fq, fk, v, floor, kv0, z0) -> (out, kv, z); saves fq, fk, v, out, the sums s and the optional floor
    and state. The floor gets no gradient (the registry gives a floor that needs one to the reference)."""

    @staticmethod
    def forward(ctx, fq, fk, v, floor, kv0, z0, chunk_size, blocks):
        out, sums, kv_end, z_end = linear_attention_forward(fq, fk, v, floor, kv0, z0, chunk_size, blocks)
        ctx.save_for_backward(fq, fk, v, out, sums, floor, kv0, z0)
        ctx.args = (chunk_size, blocks)
        ctx.selected = registry.auto_selected()
        ctx.set_materialize_grads(False)  # unused outputs (often the state) cost no scan
        return out, kv_end, z_end

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dkv_end, dz_end):
        fq, fk, v, out, sums, floor, kv0, z0 = ctx.saved_tensors
        chunk_size, blocks = ctx.args
        need = ctx.needs_input_grad
        needs = (need[0], need[1], need[2], kv0 is not None and need[4], z0 is not None and need[5])
        if dout is None:
            dout = torch.zeros_like(out)
        try:
            grads = linear_attention_backward(fq, fk, v, out, sums, dout, floor, kv0, z0, dkv_end, dz_end,
                                              chunk_size, blocks, needs)
        except Exception as exc:
            if not registry.backward_failed(ctx.selected, fq.device, exc):
                raise
            grads = _reference_grads(fq, fk, v, floor, kv0, z0, dout, dkv_end, dz_end, chunk_size, needs)
        dfq, dfk, dv, dkv0, dz0 = grads
        return dfq, dfk, dv, None, dkv0, dz0, None, None


def _reference_grads(fq, fk, v, floor, kv0, z0, dout, dkv_end, dz_end, chunk_size, needs):
    """The same gradients by autograd through the reference (a failing backward kernel's fallback)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None and n else t
                  for t, n in zip((fq, fk, v, kv0, z0), needs)]
        out, kv, z = reference_linear_attention(leaves[0], leaves[1], leaves[2], chunk_size, leaves[3], leaves[4],
                                                floor)
        pairs = [(out, dout)] + [(t, g) for t, g in ((kv, dkv_end), (z, dz_end)) if g is not None]
        wanted = [t for t, n in zip(leaves, needs) if n]
        got = iter(torch.autograd.grad([p for p, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    return tuple(next(got) if n else None for n in needs)


def triton_linear_attention(fq, fk, v, floor=None, kv0=None, z0=None, chunk_size: int = DEFAULT_CHUNK,
                            blocks: LinearAttentionBlocks | None = None):
    """Differentiable (out, kv, z) = linear attention (``linear_attn`` module docstring) by the Triton kernels:
    fq, fk (B, H, T, M), v (B, H, T, hd) fp16/bf16/fp32, floor (B, T) without gradient, kv0 (B, H, M, hd) and
    z0 (B, H, M) or None -> out (B, H, T, hd) in v's dtype, kv (B, H, M, hd), z (B, H, M) in fq's dtype."""
    if floor is not None and floor.requires_grad:
        raise ValueError("the Triton kernel gives the floor no gradient: detach it, or use the reference")
    return LinearAttention.apply(fq, fk, v, floor, kv0, z0, chunk_size, blocks)


def triton_impl(fq, fk, v, *, floor=None, kv0=None, z0=None, chunk_size=DEFAULT_CHUNK):
    """Registry entry."""
    return triton_linear_attention(fq, fk, v, floor, kv0, z0, chunk_size)
