"""The memory and compute cost of one torch training step, predicted from the config alone (no tensor is
allocated): the torch backend's replay of its own code, beside it so that it imports the constants and rules it
mirrors.

Bytes are derived from what our code allocates, line by line, not fitted: the model *simulates* a training
step on a tape of allocations and frees that mirrors the torch backend (``blocks.py``, ``engine.py``,
``loss.py``, ``model.py``), with Python's lifetimes (a temporary dies when its statement ends, a local when
its function returns or the name is rebound) and autograd's (a node's saved tensors die after that node's
backward). The peak is the maximum of the tape; the breakdown says what was alive at that instant.

Sizes, for a batch of B sequences of T tokens (N = B*T), width d, H heads, FFN width f::

    A  = N * d                  elements of one stream tensor
    s  = bytes of the stream dtype (fp32: 4)      c = bytes of the compute dtype (autocast bf16: 2, else s)
    p  = bytes of the parameter dtype             st = bytes of LayerNorm/LSE statistics (fp32, fp64 for fp64)

What autograd saves for one ``store`` layer (additive coupling, GELU, fused SDPA), each one tensor::

    F: x2 (A*s, the layer input)  mean,rstd (2N*st)  norm out cast (A*c)  rope(q), rope(k), contiguous v
       (3A*c)  attention out (A*c; the proj input is a view of it)  lse (N*H*st)
    G: y1 (A*s, shared with the next layer)  mean,rstd  norm out cast (A*c)  act in + act out (2N*f*c)
    autocast: a compute-dtype copy of each of the four weights (autocast's cast of a parameter is a new tensor)
    affine coupling: tanh(r) and s (2 * N*d*c per coupling) and the stream it scales

``reverse`` saves nothing (the engine keeps only the top outputs of each run of reverse layers);
``checkpoint`` saves the layer's two inputs; ``recompute_attention``/``recompute_ffn`` are ``store`` with
one block under ``torch.utils.checkpoint`` (saving that block's input instead of its activations).

Head chunks (``AttentionBlock.head_chunks``: ``attn_head_chunk`` heads each, or when 0 about 2^20 // N of
them): with more than one chunk F is norm, one cast, then per chunk of n heads a projection through a copy
of the weight's rows (3*n*hd*d parameters, cast again under autocast, never cached), its q, k, v and kernel,
written into a (B, T, H, hd) buffer that proj reads. A stored F then saves, beside the above, that buffer
(A*c) and, without autocast, the weight rows' copies (3*d*d*p over the chunks); the rest is the same split
by chunk. Its autograd backward walks the chunks from the last (CopySlices: a clone of the buffer's
cotangent per chunk), each chunk's qkv weight gradient a zero-padded (3d, d) tensor. A ``reverse`` layer
with an additive coupling and no dropout runs the F half through ``AttentionBlock.additive_vjp``:
one chunk's graph at a time, built and differentiated at once, so its peak holds one chunk's q, k, v and
kernel buffers where the unchunked backward holds all heads' (attn_half_backward_chunked); otherwise (affine
coupling, dropout) the generic half over the chunked forward. Compiled blocks (which take the generic half
too) are not told apart. One chunk is the unchunked block, line for line.

A sliding window (``attention_window``) only changes the kernel: it is counted as a fused one ("sdpa":
output and log-sum-exp saved, no score matrix), which the CUDA windowed kernel is. The CPU fallback (SDPA
with an explicit band mask) also keeps a (T, T) mask per chunk, not counted. Attention FLOPs are counted
over the full causal triangle either way.

Bidirectional models (``causal=False``): the same tape less the causal masks (the math kernel's bias, the
reference's comparison), and attention FLOPs over the whole (T, T) score matrix. A padding mask
(``ReversibleBERT``'s ``attention_mask``) is an input, not config, and is not priced: with one, SDPA takes a
(B, 1, 1, T) mask and may choose another kernel.

Compute is counted in FLOPs of the matmuls and attention (2 per multiply-add, causal attention half of
full), backward = 2x forward for matmuls and 2.5x for fused attention (FlashAttention-2 recomputes the
scores: 5 matmuls against 2). A policy that recomputes a block pays one more forward of it.

Not modelled: allocator rounding and fragmentation (``max_memory_reserved`` minus ``max_memory_allocated``;
see docs/memory.md), cuBLAS/cuDNN workspaces, and the CPU flash-attention kernel's per-thread buffers
(their size scales with the thread count, not the tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from revnet_core import policies as policy_table
from revnet_core.build import resolve_coupling
from revnet_core.config import GATED_ACTIVATIONS, ModelConfig, with_backend_options
from revnet_core.memory import DTYPE_BYTES, StepMemory, Tape, Workload
from revnet_core.memory import chunks as _chunks
from revnet_core.sweep import has_capability

from revnet_kernels.cross_entropy import fused_layout
from revnet_kernels.registry import select

from .blocks import ROPE_CHUNK, heads_per_chunk
from .loss import uses_fused_head  # imported, not copied: the replay cannot drift
from .options import TorchOptions, options
ATTENTION_KERNELS = ("sdpa", "math", "reference")


@dataclass(frozen=True)
class Sizes:
    """Every size the tapes need, in elements or bytes, computed once per (config, workload)."""

    B: int
    T: int
    N: int
    d: int
    H: int
    ff: int
    ffu: int  # width of the FFN's up projection (2f when gated)
    fx: int  # width of a block's output (d additive, 2d affine)
    V: int
    s: int  # stream dtype bytes
    c: int  # compute dtype bytes
    p: int  # parameter dtype bytes
    st: int  # statistics bytes (LayerNorm mean/rstd, attention LSE)
    cast: bool  # autocast makes a compute-dtype copy of each linear's stream-dtype input
    wcast: bool  # autocast makes a compute-dtype copy of each weight
    affine: bool
    activation: str
    attention: str
    device: str
    drop: float  # block output dropout in effect
    attn_drop: float  # attention dropout in effect
    head_chunk: int
    ffn_chunk: int  # tokens per FFN chunk along the sequence (FeedForwardBlock.chunk_size; T when 0)
    attn_heads: int = 0  # heads per attention chunk (AttentionBlock.head_chunks); 0 or H: one chunk
    loss_fused: bool = False  # the loss head is revnet_kernels' linear cross-entropy (torch option loss_kernel)
    fused_gate: bool = False  # a gated activation through the fused Triton kernel (GPUs): it saves only u
    causal: bool = True  # config.causal: False scores every (query, key) pair and builds no causal mask

    @property
    def A(self) -> int:
        return self.N * self.d

    @property
    def hd(self) -> int:
        return self.d // self.H

    def head_counts(self) -> list[int]:
        """Heads of each attention chunk, in order (one entry: the whole block at once)."""
        per = self.attn_heads if 0 < self.attn_heads < self.H else self.H
        return [min(per, self.H - s) for s in range(0, self.H, per)]

    def ffn_rows(self) -> list[int]:
        """Rows (batch x tokens) of each FFN chunk, in order."""
        return [self.B * t for t in _chunks(self.T, self.ffn_chunk)]


def _sizes(cfg: ModelConfig, w: Workload) -> Sizes:
    p = DTYPE_BYTES[w.param_dtype]
    s = max(p, DTYPE_BYTES[cfg.stream_dtype])  # streams: the embedding promoted to the stream dtype
    c = DTYPE_BYTES[w.autocast_dtype] if w.autocast_dtype else s
    window, opts = cfg.attention_window, options(cfg)
    attention = w.attention or ("sdpa" if window is not None else  # windowed: counted as a fused kernel
                                "reference" if opts.attention == "reference" else
                                "sdpa" if opts.use_flash_attention else "math")
    attn_drop = cfg.attention_dropout if w.training else 0.0
    if attention == "sdpa" and attn_drop > 0 and w.device == "cpu":
        attention = "math"  # CPU's flash kernel has no dropout: SDPA falls back to the math kernel
    affine = cfg.coupling == "affine"
    fx = 2 * cfg.d_model if affine else cfg.d_model
    if cfg.coupling not in ("additive", "affine"):  # a plugin coupling: its width from the registry; its own
        # forward's temporaries are not modelled (counted as additive)
        fx = resolve_coupling(cfg).fx_features(cfg.d_model)
    return Sizes(
        B=w.batch, T=w.seq_len, N=w.tokens, d=cfg.d_model, H=cfg.num_heads, ff=cfg.ffn_dim,
        ffu=cfg.ffn_dim * (2 if cfg.activation in GATED_ACTIVATIONS else 1),
        fx=fx, V=cfg.vocab_size, s=s, c=c, p=p,
        st=8 if s == 8 else 4, cast=c != s, wcast=w.autocast_dtype is not None and c != p, affine=affine,
        activation=cfg.activation, attention=attention, device=w.device,
        drop=cfg.dropout if w.training else 0.0, attn_drop=attn_drop, head_chunk=cfg.loss_chunk_size,
        ffn_chunk=cfg.ffn_chunk_size, attn_heads=_heads_per_chunk(cfg, w),
        loss_fused=uses_fused_head(opts.loss_kernel, w.device),
        fused_gate=_fused_gate(cfg, w),
        causal=cfg.causal,
    )


def _fused_gate(cfg: ModelConfig, w: Workload) -> bool:
    """Whether the registry runs this config's gated activation through the Triton kernel: asked of the
    registry itself (the blocks call ``revnet_kernels.activations.activation``), so the replay cannot drift."""
    if cfg.activation not in GATED_ACTIVATIONS:
        return False
    dtype = w.autocast_dtype or w.param_dtype
    width = 2 * cfg.ffn_dim
    return select("activation", w.device, dtype, {"kind": cfg.activation, "width": width}).impl == "triton"


def fused_ce_layout(vocab: int, rows: int) -> tuple[int, int]:
    """(rows per chunk, padded vocabulary) of revnet_kernels' fused linear cross-entropy with its defaults."""
    chunk, padded, _ = fused_layout(vocab, rows)
    return chunk, padded


def _heads_per_chunk(cfg: ModelConfig, w: Workload) -> int:
    """AttentionBlock.head_chunks' chunk size for this config and workload."""
    return heads_per_chunk(cfg.num_heads, cfg.attn_head_chunk, w.tokens)


class _Step:
    """Writes one training step onto a tape, line by line of the torch backend.

    Names are unique per tensor; ``keep`` means autograd records the ops (grad mode, not under a
    checkpoint), so the tensors each op saves get an autograd owner, released by that op's backward.
    """

    def __init__(self, cm: "CostModel", tape: Tape):
        self.cm, self.z, self.t = cm, cm.sizes, tape
        self.cache: list[str] = []  # autocast's weight copies, cleared when its context exits
        self.rope_saved = False
        self.kept: dict[int, list[tuple[str, str]]] = {}  # reverse_keep_attention: each layer's kept (o, lse)

    # --- autocast -------------------------------------------------------------------------------------
    def weight(self, name: str, numel: int, keep: bool) -> str | None:
        """Autocast's compute-dtype copy of a weight: owned by its cache, and by autograd if ``keep``."""
        z, t = self.z, self.t
        if not z.wcast:
            return None
        if name in self.cache:  # a cache hit (the FFN's later chunks): the same copy, saved again
            if keep:
                t.hold(name, saved=True)
            return name
        t.alloc(name, numel * z.c, "autocast_cache", saved=keep)
        self.cache.append(name)
        return name

    def exit_autocast(self) -> None:
        """Leaving the outermost autocast context clears its cache (saved copies stay with autograd)."""
        self.t.free(*self.cache)
        self.cache.clear()

    def mixed(self, pre: str, elems: int) -> None:
        """An elementwise op between a stream-dtype and a compute-dtype tensor: on CPU, TensorIterator
        first casts the compute-dtype input to a temporary (CUDA casts inside the kernel)."""
        z, t = self.z, self.t
        if z.device == "cpu" and z.c != z.s:
            t.free(t.alloc(pre + "mixed", elems * z.s, "streams"))

    # --- forward of the blocks (blocks.py) ------------------------------------------------------------
    def layer_norm(self, pre: str, x: str, keep: bool, cat: str, rows: int) -> str:
        """F.layer_norm: output in x's dtype; saves x and mean/rstd (rows each, accumulation dtype).
        RMSNorm is composite: x.pow(2).mean(), rsqrt, x * rstd, * weight; saves x, rstd and x * rstd."""
        z, t = self.z, self.t
        A = rows * z.d
        if self.cm.config.norm == "rmsnorm":
            sq = t.alloc(pre + "ln_sq", A * z.s, cat)
            m = t.alloc(pre + "ln_mean", rows * z.st, cat)
            t.free(sq)
            e = t.alloc(pre + "ln_eps", rows * z.st, cat)
            t.free(m)
            r = t.alloc(pre + "ln_stats", rows * z.st, cat, saved=keep)
            t.free(e)
            xn = t.alloc(pre + "ln_xn", A * z.s, cat, saved=keep)
            out = t.alloc(pre + "ln", A * z.s, cat)
            t.free(xn, r)
            if keep:
                t.hold(x, saved=True)  # by pow
                t.hold(x, saved=True)  # and by x * rstd
                t.hold(r, saved=True)  # rsqrt saves its result, x * rstd saves it too
            return out
        out = t.alloc(pre + "ln", A * z.s, cat)
        t.free(t.alloc(pre + "ln_stats", 2 * rows * z.st, cat, saved=keep))
        if keep:
            t.hold(x, saved=True)
        return out

    def linear(self, pre: str, x: str, stream_input: bool, x_elems: int, w_numel: int, out_elems: int,
               keep: bool, cat: str, wname: str) -> str:
        """nn.Linear: under autocast a compute-dtype copy of a stream-dtype x and of W; saves both."""
        z, t = self.z, self.t
        xin = t.alloc(pre + "cast", x_elems * z.c, cat) if (z.cast and stream_input) else x
        self.weight(wname, w_numel, keep)
        out = t.alloc(pre + "out", out_elems * z.c, cat)
        if keep:
            t.hold(xin, saved=True)
        if xin != x:
            t.free(xin)  # the cast is a temporary of the call
        return out

    def dropout(self, pre: str, x: str, elems: int, keep: bool, cat: str) -> str:
        """nn.Dropout (p > 0): CPU multiplies by a scaled noise tensor (saved); CUDA saves a bool mask."""
        z, t = self.z, self.t
        if not z.drop:
            return x
        if z.device == "cpu":
            noise = t.alloc(pre + "noise", elems * z.c, cat, saved=keep)
            out = t.alloc(pre + "dropped", elems * z.c, cat)
        else:
            out = t.alloc(pre + "dropped", elems * z.c, cat)
            noise = t.alloc(pre + "mask", elems, cat, saved=keep)
        t.free(noise, x)
        return out

    def rope(self, pre: str, cat: str, keep: bool, heads: int | None = None) -> str:
        """Rotary.forward (_RotaryFn): an output like x, filled chunk by chunk of ROPE_CHUNK tokens with fp32
        math (a copy of the chunk unless x is fp32 already); saves only cos and sin. ``heads``: of x (all H
        unless a head chunk)."""
        z, t = self.z, self.t
        out = t.alloc(pre + "rot", self.head_elems(heads) * z.c, cat)
        self.rotate(pre, cat, heads)
        if keep and t.forward:
            self.rope_saved = True
        return out

    def rotate(self, pre: str, cat: str, heads: int | None = None) -> None:
        """The temporaries of _rotate: per chunk a cast copy, four products, two halves and their stack.
        The loop rebinds its names, so a chunk's copy is freed only once the next chunk's exists."""
        z, t = self.z, self.t
        mb = 8 if z.c == 8 else 4
        width = z.d if heads is None else heads * z.hd
        prev = None
        for k, tokens in enumerate(_chunks(z.T, ROPE_CHUNK)):
            e = z.B * tokens * width  # elements of the chunk, all its heads
            q = f"{pre}r{k}."
            xc = t.alloc(q + "xc", e * mb, cat) if z.c != mb else None
            t.free(prev)
            prev = xc
            half = e // 2 * mb
            p1, p2 = t.alloc(q + "p1", half, cat), t.alloc(q + "p2", half, cat)
            first = t.alloc(q + "first", half, cat)
            t.free(p1, p2)
            p3, p4 = t.alloc(q + "p3", half, cat), t.alloc(q + "p4", half, cat)
            second = t.alloc(q + "second", half, cat)
            t.free(p3, p4)
            stk = t.alloc(q + "stack", e * mb, cat)
            t.free(first, second, stk)  # copied (and cast) into the output
        t.free(prev)

    def head_elems(self, heads: int | None) -> int:
        """Elements of one (B, heads, T, hd) tensor: q, k, v or the attention output (all H heads: A)."""
        return self.z.A if heads is None else self.z.N * heads * self.z.hd

    def attention_core(self, pre: str, q: str, k: str, v: str, keep: bool, cat: str,
                       heads: int | None = None) -> str:
        """The attention kernel on (B, h, T, hd) q, k, v; returns its (B, h, T, hd) output (h: ``heads``,
        all H unless a head chunk)."""
        z, t = self.z, self.t
        h = z.H if heads is None else heads
        A, BHTT = self.head_elems(heads), z.B * h * z.T * z.T
        if z.attention == "sdpa":  # flash / cuDNN / CPU flash: output and log-sum-exp
            out = t.alloc(pre + "o", A * z.c, cat, saved=keep)
            t.free(t.alloc(pre + "lse", z.N * h * z.st, cat, saved=keep))
            if keep:
                for name in (q, k, v):
                    t.hold(name, saved=True)
            return out
        if z.attention == "math":
            # SDPA's math kernel: q and k each scaled by sqrt(scale), a causal bias, softmax, @ v. On CPU it
            # upcasts bf16/fp16 inputs to fp32 (copies of q, k, v) and casts the output back.
            mc, up = self.math_dtype()
            if up:
                q32, k32 = t.alloc(pre + "q32", A * 4, cat), t.alloc(pre + "k32", A * 4, cat)
                t.alloc(pre + "v32", A * 4, cat, saved=keep)  # freed by name in the backward
            qs = t.alloc(pre + "qs", A * mc, cat, saved=keep)
            ks = t.alloc(pre + "ks", A * mc, cat, saved=keep)
            if up:
                t.free(q32, k32)
            bias = t.alloc(pre + "bias", z.T * z.T * mc, cat) if z.causal else None  # no mask: no bias
            scores = t.alloc(pre + "scores", BHTT * mc, cat)
            t.free(bias)
            probs = t.alloc(pre + "probs", BHTT * mc, cat, saved=keep)  # softmax saves its output
            t.free(scores)
            pv = probs
            if z.attn_drop:
                t.free(t.alloc(pre + "anoise", BHTT * mc, cat, saved=keep))
                pv = t.alloc(pre + "dprobs", BHTT * mc, cat)
            if keep:
                t.hold(pv, saved=True)  # the @ v matmul saves its input
                if not up:
                    t.hold(v, saved=True)
            out = t.alloc(pre + "o32" if up else pre + "o", A * mc, cat)
            if up:
                t.free(out)
                out = t.alloc(pre + "o", A * z.c, cat)
                t.free(pre + "v32")
            t.free(qs, ks, probs, pv if pv != probs else None)
            return out
        # revnet_kernels.attn.reference_attention (return_lse=False), autocast off inside: k, v, q cast to the
        # accumulation dtype (copies unless already in it), q @ k^T scaled and masked in place, softmax,
        # (dropout), @ v, the output cast back to q's dtype.
        a = 8 if z.c == 8 else 4
        up = z.c != a
        kf = t.alloc(pre + "kf", A * a, cat) if up else k
        vf = t.alloc(pre + "vf", A * a, cat) if up else v
        qf = t.alloc(pre + "qf", A * a, cat) if up else q
        scores = t.alloc(pre + "scores", BHTT * a, cat)
        if keep:
            t.hold(qf, saved=True)
            t.hold(kf, saved=True)
        if up:
            t.free(qf)  # a temporary of the statement
        # visible_mask: two int64 aranges, a (T, T) mask and (causal) the comparison &-ed into it
        ai, aj = t.alloc(pre + "ar_i", z.T * 8, cat), t.alloc(pre + "ar_j", z.T * 8, cat)
        mask = t.alloc(pre + "mask", z.T * z.T, cat)
        t.free(t.alloc(pre + "causal", z.T * z.T, cat) if z.causal else None, ai, aj)
        notmask = t.alloc(pre + "notmask", z.T * z.T, cat, saved=keep)
        t.free(mask, notmask)  # temporaries of the masked_fill_ statement (kept by autograd when saved)
        probs = t.alloc(pre + "probs", BHTT * a, cat, saved=keep)  # softmax saves its output
        t.free(scores)  # del scores
        pv = probs
        if z.attn_drop:  # F.dropout: probs * noise, the noise saved
            t.free(t.alloc(pre + "anoise", BHTT * a, cat, saved=keep))
            pv = t.alloc(pre + "dprobs", BHTT * a, cat)
            t.free(probs)  # the name is rebound
        if keep:
            t.hold(pv, saved=True)
            t.hold(vf, saved=True)
        out = t.alloc(pre + ("oa" if up else "o"), A * a, cat)
        if up:  # .to(q.dtype)
            t.free(out)
            out = t.alloc(pre + "o", A * z.c, cat)
        t.free(pv, kf if up else None, vf if up else None)  # locals, released when the function returns
        return out

    def attn_forward(self, pre: str, x: str, keep: bool, cat: str, layer: int) -> str:
        """AttentionBlock.forward: x (B, T, d) -> fx (B, T, fx)."""
        z, t = self.z, self.t
        A = z.A
        if len(z.head_counts()) > 1:
            return self.attn_forward_chunked(pre, x, keep, cat, layer)
        n = self.layer_norm(pre, x, keep, cat, z.N)
        qkv = self.linear(pre + "qkv.", n, True, A, 3 * z.d * z.d, 3 * A, keep, cat, f"W{layer}.qkv")
        t.free(n)  # a temporary argument of self.qkv
        q = self.rope(pre + "ropeq.", cat, keep)
        k = self.rope(pre + "ropek.", cat, keep)
        v = t.alloc(pre + "v", A * z.c, cat)  # v.contiguous(): then qkv has no views left and goes
        t.free(qkv)
        o = self.attention_core(pre + "att.", q, k, v, keep, cat)
        if z.attention != "sdpa":  # transpose(1, 2).reshape of a contiguous (B, H, T, hd) result: a copy
            o2 = t.alloc(pre + "o_bthd", A * z.c, cat)
            t.free(o)
            o = o2
        # (The fused kernels lay their output out like q, whose rotation keeps qkv's (B, T, H, hd) order:
        # there the reshape is a view.)
        fx = self.linear(pre + "proj.", o, False, A, z.d * z.fx, z.N * z.fx, keep, cat, f"W{layer}.proj")
        fx = self.dropout(pre + "drop.", fx, z.N * z.fx, keep, cat)
        t.free(o, q, k, v)  # locals, released when forward returns
        return fx

    def normed(self, pre: str, x: str, keep: bool, cat: str) -> str:
        """AttentionBlock.normed: norm(x), then (autocast) one cast to the compute dtype, which every head
        chunk's projection saves; ToCopyBackward saves nothing, and the norm's output goes with the rebinding."""
        z, t = self.z, self.t
        n = self.layer_norm(pre, x, keep, cat, z.N)
        if not z.cast:
            return n
        h = t.alloc(pre + "h", z.A * z.c, cat)
        t.free(n)
        return h

    def attend_heads(self, pre: str, h: str, heads: int, keep: bool, cat: str) -> str:
        """AttentionBlock.attend_heads over ``heads`` heads of the normed h: their rows of the qkv weight
        (``reshape`` of a strided slice: a copy in the parameter dtype, a local of the call; under autocast
        F.linear casts it again, uncached since it is no leaf), the projection (B, T, 3*heads*hd), rope(q),
        rope(k), contiguous v and the kernel. Returns the chunk's (B, heads, T, hd) output."""
        w, q, k, v = self.head_qkv(pre, h, heads, keep, cat)
        o = self.attention_core(pre + "att.", q, k, v, keep, cat, heads)
        t = self.t
        t.free(w, q, k, v)  # attend_heads returns: its locals go in order
        return o

    def head_qkv(self, pre: str, h: str, heads: int, keep: bool, cat: str) -> tuple[str, str, str, str]:
        """AttentionBlock.head_qkv: the weight rows (a local, returned so the caller frees it), then rope(q),
        rope(k) and v of ``heads`` heads of h, each (B, heads, T, hd), alive."""
        z, t = self.z, self.t
        a = self.head_elems(heads)
        wq = 3 * heads * z.hd * z.d
        w = t.alloc(pre + "w", wq * z.p, cat)
        wc = t.alloc(pre + "wc", wq * z.c, cat, saved=keep) if z.wcast else None
        if keep and not wc:
            t.hold(w, saved=True)  # mm saves its weight operand: here a tensor of its own, not the parameter
        qkv = t.alloc(pre + "qkv.out", 3 * a * z.c, cat)
        if keep:
            t.hold(h, saved=True)
        t.free(wc)  # the cast is a temporary of the call (kept by autograd when saved)
        q = self.rope(pre + "ropeq.", cat, keep, heads)
        k = self.rope(pre + "ropek.", cat, keep, heads)
        v = t.alloc(pre + "v", a * z.c, cat)
        t.free(qkv)  # _heads returns: the projection has no views left
        return w, q, k, v

    def kept_attention(self, c: str, h: str, heads: int, cat: str, layer: int) -> str:
        """kept_attention.forward over head_qkv's q, k, v for one chunk (policy reverse_keep_attention): its
        output and log-sum-exp stay alive for the backward (``self.kept[layer]``). Returns the output."""
        z, t = self.z, self.t
        w, q, k, v = self.head_qkv(c, h, heads, False, cat)
        oc = t.alloc(c + "kept.o", self.head_elems(heads) * z.c, cat)
        lse = t.alloc(c + "kept.lse", z.N * heads * z.st, cat)
        t.free(w, q, k, v)  # the call returns: q, k, v go (the weight rows went with head_qkv)
        self.kept.setdefault(layer, []).append((oc, lse))
        t.hold(oc)  # the kept list's reference
        return oc

    def kept_heads_backward(self, c: str, h: str, heads: int, cat: str, lse: str) -> tuple[str, str]:
        """One head chunk of additive_vjp(kept=...): q, k, v rebuilt with their graph (their tuple keeps them
        to the chunk's end), the kernel's backward from the kept output and log-sum-exp (dq, dk, dv, in a
        tuple likewise), then autograd from them to the projection's input. Returns (dh, the cotangent do_c)."""
        z, t = self.z, self.t
        A = self.head_elems(heads)
        w, q, k, v = self.head_qkv(c, h, heads, True, cat)
        t.free(w)  # head_qkv returns (the saved copy stays with the graph)
        do_c = t.alloc(c + "do", A * z.c, cat)
        dq, dk, dv = (t.alloc(c + n, A * z.c, cat) for n in ("dq", "dk", "dv"))
        acc = t.alloc(c + "dq_acc", A * 4, cat)  # the kernels accumulate dq in fp32
        red = t.alloc(c + "red", (A * z.c if z.c != 4 else 0) if z.device == "cpu" else z.N * heads * 4, cat)
        t.free(acc, red)
        t.hold(dq)  # the tuple, and autograd's grad_outputs
        t.hold(dk)
        rq = self.rope_backward(c + "bq.", dq, cat, heads)
        rk = self.rope_backward(c + "bk.", dk, cat, heads)
        st = t.alloc(c + "dqkv_stack", 3 * A * z.c, cat)  # UnbindBackward: stack(dq, dk, dv)
        t.free(rq, rk)
        dqkv = t.alloc(c + "dqkv", 3 * A * z.c, cat)  # the view of a permuted tensor: a copy
        t.free(st)
        dh = self.head_linear_backward(c, dqkv, h, heads, cat)
        t.free(q, k, v, dq, dk, dv, lse)  # del qkv, dqkv, state
        return dh, do_c

    def attn_forward_chunked(self, pre: str, x: str, keep: bool, cat: str, layer: int,
                             keeping: bool = False) -> str:
        """AttentionBlock.forward over more than one head chunk (AttentionBlock._over_head_chunks): h =
        normed(x) once; per chunk attend_heads (``keeping``: kept_attention, forward_keeping's) and a copy of
        its output into a (B, T, H, hd) buffer made at the first chunk (``o[:, :, heads] =``: CopySlices saves
        nothing); then proj over the buffer."""
        z, t = self.z, self.t
        A = z.A
        h = self.normed(pre, x, keep, cat)
        o = None
        for k, heads in enumerate(z.head_counts()):
            if keeping:
                oc = self.kept_attention(f"{pre}h{k}.", h, heads, cat, layer)
            else:
                oc = self.attend_heads(f"{pre}h{k}.", h, heads, keep, cat)
            if o is None:
                o = t.alloc(pre + "obuf", A * z.c, cat)
            t.free(oc)  # del o_c (saved by the kernel when kept)
        fx = self.linear(pre + "proj.", o, False, A, z.d * z.fx, z.N * z.fx, keep, cat, f"W{layer}.proj")
        fx = self.dropout(pre + "drop.", fx, z.N * z.fx, keep, cat)
        t.free(o, h)  # locals, released when forward returns
        return fx

    def ffn_forward(self, pre: str, x: str, keep: bool, cat: str, layer: int, early_stop: bool = False) -> str | None:
        """FeedForwardBlock.forward: its transform over each sequence chunk, then torch.cat of the parts.
        ``early_stop``: a checkpoint's recompute stops once the last saved tensor exists (no cat)."""
        z, t = self.z, self.t
        rows = z.ffn_rows()
        if len(rows) == 1:
            return self.ffn_transform(pre, x, keep, cat, layer, rows[0])
        parts = [self.ffn_transform(f"{pre}c{k}.", x, keep, cat, layer, r) for k, r in enumerate(rows)]
        if early_stop:
            t.free(*parts)
            return None
        out = t.alloc(pre + "cat", z.N * z.fx * z.c, cat)
        t.free(*parts)
        return out

    def ffn_transform(self, pre: str, x: str, keep: bool, cat: str, layer: int, rows: int) -> str:
        """FeedForwardBlock._transform over ``rows`` tokens of x (a view): -> gy (rows, fx)."""
        z, t = self.z, self.t
        A = rows * z.d
        n = self.layer_norm(pre, x, keep, cat, rows)
        u = self.linear(pre + "up.", n, True, A, z.d * z.ffu, rows * z.ffu, keep, cat, f"W{layer}.up")
        t.free(n)
        act = z.activation
        if z.fused_gate:  # FusedActivation: saves u alone, recomputes act(a) * b in its backward
            h = t.alloc(pre + "h", rows * z.ff * z.c, cat)
            if keep:
                t.hold(u, saved=True)
        elif act in GATED_ACTIVATIONS:  # act(a) * b with (a, b) = u.chunk(2): both halves saved (views of u)
            ga = t.alloc(pre + "ga", rows * z.ff * z.c, cat, saved=keep)
            h = t.alloc(pre + "h", rows * z.ff * z.c, cat)
            if keep:
                t.hold(u, saved=True)
                t.hold(u, saved=True)
            t.free(ga)
        elif act == "relu":  # relu saves its result (which down saves too)
            h = t.alloc(pre + "h", rows * z.ff * z.c, cat, saved=keep)
        else:  # gelu, gelu_exact, silu save their input
            h = t.alloc(pre + "h", rows * z.ff * z.c, cat)
            if keep:
                t.hold(u, saved=True)
        t.free(u)
        gy = self.linear(pre + "down.", h, False, rows * z.ff, z.ff * z.fx, rows * z.fx, keep, cat,
                         f"W{layer}.down")
        t.free(h)
        return self.dropout(pre + "drop.", gy, rows * z.fx, keep, cat)

    def couple(self, pre: str, x: str, fx: str, keep: bool, cat: str, rows: int) -> str:
        """coupling.forward(x, fx) -> y in the stream dtype; affine saves x, s and tanh(r)."""
        z, t = self.z, self.t
        A = rows * z.d
        if z.affine:  # s = 1 + c * tanh(r); y = x * s + t
            th = t.alloc(pre + "th", A * z.c, cat, saved=keep)
            cth = t.alloc(pre + "cth", A * z.c, cat)
            sc = t.alloc(pre + "s", A * z.c, cat)
            t.free(cth, th)
            self.mixed(pre + "xs.", A)
            xs = t.alloc(pre + "xs", A * z.s, cat)
            if keep:
                t.hold(x, saved=True)
                t.hold(sc, saved=True)
            self.mixed(pre + "y.", A)
            y = t.alloc(pre + "y", A * z.s, "streams")
            t.free(xs, sc)
        else:
            self.mixed(pre + "y.", A)
            y = t.alloc(pre + "y", A * z.s, "streams")
        t.free(fx)  # the block output was a temporary argument
        return y

    # --- backward of kept blocks (autograd's node order) ---------------------------------------------
    def linear_backward(self, pre: str, dout: str, xin: str, wname: str, w_numel: int, in_elems: int,
                        cat: str) -> str:
        """MmBackward: d(weight) then d(input) (compute dtype); releases its saved input, weight, dout."""
        z, t = self.z, self.t
        gc = t.alloc(wname + ".gc", w_numel * z.c, cat) if z.wcast else None
        dx = t.alloc(pre + "dx", in_elems * z.c, cat)
        t.free(dout, wname if z.wcast else None, xin)
        self.grad(wname, w_numel * z.p)
        t.free(gc)
        return dx

    def grad(self, name: str, nbytes: int) -> None:
        """A parameter gradient: the first becomes .grad; later ones (FFN chunks) are added in place."""
        t = self.t
        if ("grad." + name) in t.live:
            t.free(t.alloc(f"grad.{name}.tmp{t.total}", nbytes, "recompute"))
        else:
            t.alloc("grad." + name, nbytes, "gradients")

    def uncast(self, pre: str, d: str, elems: int, cat: str) -> str:
        """ToCopyBackward of autocast's cast of a stream-dtype input."""
        z, t = self.z, self.t
        if not z.cast:
            return d
        out = t.alloc(pre + "uncast", elems * z.s, cat)
        t.free(d)
        return out

    def ln_backward(self, pre: str, dn: str, x: str, rows: int, cat: str, pname: str) -> str:
        z, t = self.z, self.t
        A = rows * z.d
        if self.cm.config.norm == "rmsnorm":  # autograd through the composite, node by node
            dxn = t.alloc(pre + "ln_dxn", A * z.s, cat)  # dout * weight
            t.free(t.alloc(pre + "ln_dw", A * z.s, cat))  # dout * xn, summed for the weight
            t.free(dn, pre + "ln_xn")
            dx = t.alloc(pre + "ln_dx", A * z.s, cat)  # dxn * rstd
            t.free(t.alloc(pre + "ln_dr", A * z.s, cat))  # dxn * x, summed for rstd
            t.free(dxn, x, pre + "ln_stats", pre + "ln_stats")
            t.free(t.alloc(pre + "ln_dx2", A * z.s, cat), x)  # through pow: 2x * d, added in place
            self.grad(pname, self.cm.norm_parameter_count() * z.p)
            return dx
        dx = t.alloc(pre + "ln_dx", A * z.s, cat)
        t.free(dn, pre + "ln_stats", x)
        self.grad(pname, self.cm.norm_parameter_count() * z.p)
        return dx

    def dropout_backward(self, pre: str, d: str, elems: int, cat: str) -> str:
        z, t = self.z, self.t
        if not z.drop:
            return d
        out = t.alloc(pre + "ddrop", elems * z.c, cat)
        t.free(d, pre + "noise", pre + "mask")
        return out

    def ffn_backward(self, pre: str, ct: str, x: str, layer: int, cat: str) -> str:
        """Autograd through a kept, chunked FFN: the last chunk's graph first; each chunk's input gradient
        goes through SliceBackward (a full-size zero tensor) into x's gradient buffer."""
        z, t = self.z, self.t
        rows = z.ffn_rows()
        if len(rows) == 1:
            return self.ffn_transform_backward(pre, ct, x, layer, cat, rows[0])
        buf = None
        for k in reversed(range(len(rows))):
            t.hold(ct)  # CatBackward hands each chunk a view of ct
            dxk = self.ffn_transform_backward(f"{pre}c{k}.", ct, x, layer, cat, rows[k])
            full = t.alloc(f"{pre}c{k}.slice_dx", z.A * z.s, cat)
            t.free(dxk)
            if buf is None:
                buf = full
            else:
                t.free(full)  # accumulated into the buffer in place
        t.free(ct)
        return buf

    def ffn_transform_backward(self, pre: str, ct: str, x: str, layer: int, cat: str, rows: int) -> str:
        """Backward of one kept FFN transform from its output cotangent; returns dx (stream dtype)."""
        z, t = self.z, self.t
        ct = self.dropout_backward(pre + "drop.", ct, rows * z.fx, cat)
        dh = self.linear_backward(pre + "down.", ct, pre + "h", f"W{layer}.down", z.ff * z.fx, rows * z.ff, cat)
        if z.fused_gate:  # one kernel writes du from dh and u
            du = t.alloc(pre + "du", rows * z.ffu * z.c, cat)
            t.free(dh, pre + "up.out")
        elif z.activation in GATED_ACTIVATIONS:
            dga = t.alloc(pre + "dga", rows * z.ff * z.c, cat)
            db = t.alloc(pre + "db", rows * z.ff * z.c, cat)
            t.free(dh, pre + "ga", pre + "up.out")
            da = t.alloc(pre + "da", rows * z.ff * z.c, cat)
            t.free(dga, pre + "up.out")
            du = t.alloc(pre + "du", rows * z.ffu * z.c, cat)  # SplitBackward: cat(da, db)
            t.free(da, db)
        else:
            du = t.alloc(pre + "du", rows * z.ff * z.c, cat)
            t.free(dh, pre + "h" if z.activation == "relu" else pre + "up.out")
        nin = pre + "up.cast" if z.cast else pre + "ln"
        dn = self.linear_backward(pre + "up.", du, nin, f"W{layer}.up", z.d * z.ffu, rows * z.d, cat)
        dn = self.uncast(pre + "up.", dn, rows * z.d, cat)
        return self.ln_backward(pre, dn, x, rows, cat, f"W{layer}.ln2")

    def rope_backward(self, pre: str, d: str, cat: str, heads: int | None = None) -> str:
        """_RotaryFn.backward: the rotation by the opposite angle (-sin is a new table), into a new output."""
        z, t = self.z, self.t
        neg = t.alloc(pre + "negsin", self.cm.rope_table_bytes() // 2, cat)
        out = t.alloc(pre + "rot", self.head_elems(heads) * z.c, cat)
        self.rotate(pre, cat, heads)
        t.free(neg, d)
        return out

    def math_dtype(self) -> tuple[int, bool]:
        """Bytes the math kernel computes in, and whether it upcasts (CPU, bf16/fp16 inputs)."""
        z = self.z
        up = z.device == "cpu" and z.c < 4
        return (4 if up else z.c), up

    def math_backward(self, pre: str, do: str, v: str, cat: str, heads: int | None = None) -> tuple[str, str, str]:
        """Autograd through SDPA's math kernel from the output cotangent: (dq, dk, dv)."""
        z, t = self.z, self.t
        h = z.H if heads is None else heads
        A, BHTT, a = self.head_elems(heads), z.B * h * z.T * z.T, pre + "att."
        mc, up = self.math_dtype()
        if up:  # ToCopyBackward of the output cast
            d32 = t.alloc(pre + "do32", A * 4, cat)
            t.free(do)
            do = d32
        dv = t.alloc(pre + "dv_m", A * mc, cat)
        dp = t.alloc(pre + "dp", BHTT * mc, cat)
        t.free(do, a + ("dprobs" if z.attn_drop else "probs"), a + "v32" if up else v)
        if z.attn_drop:
            dp2 = t.alloc(pre + "dp_drop", BHTT * mc, cat)
            t.free(dp, a + "anoise")
            dp = dp2
        ds = t.alloc(pre + "ds", BHTT * mc, cat)
        t.free(dp, a + "probs")
        dqs, dks = t.alloc(pre + "dqs", A * mc, cat), t.alloc(pre + "dks", A * mc, cat)
        t.free(ds, a + "qs", a + "ks")
        out = []
        for n, src in (("dq", dqs), ("dk", dks), ("dv", dv)):
            if n != "dv":  # the sqrt(scale) multiplications
                nxt = t.alloc(pre + n + "_s", A * mc, cat)
                t.free(src)
                src = nxt
            if up:  # ToCopyBackward of the input upcasts
                nxt = t.alloc(pre + n, A * z.c, cat)
                t.free(src)
                src = nxt
            out.append(src)
        return out[0], out[1], out[2]

    def attn_backward(self, pre: str, ct: str, x: str, layer: int, cat: str) -> str:
        """Backward of a kept attention block from its output cotangent; returns dx (stream dtype)."""
        z = self.z
        A = z.A
        if len(z.head_counts()) > 1:
            return self.attn_backward_chunked(pre, ct, x, layer, cat)
        ct = self.dropout_backward(pre + "drop.", ct, z.N * z.fx, cat)
        o_in = pre + ("att.o" if z.attention == "sdpa" else "o_bthd")
        do = self.linear_backward(pre + "proj.", ct, o_in, f"W{layer}.proj", z.d * z.fx, A, cat)
        dqkv = self.heads_backward(pre, do, cat)
        nin = pre + "qkv.cast" if z.cast else pre + "ln"
        dn = self.linear_backward(pre + "qkv.", dqkv, nin, f"W{layer}.qkv", 3 * z.d * z.d, A, cat)
        dn = self.uncast(pre + "qkv.", dn, A, cat)
        return self.ln_backward(pre, dn, x, z.N, cat, f"W{layer}.ln1")

    def attn_backward_chunked(self, pre: str, ct: str, x: str, layer: int, cat: str) -> str:
        """Autograd through a kept head-chunked forward (attn_forward_chunked), in node order: proj, then
        the chunks from the last. Each CopySlices clones the buffer's cotangent (handed on to the chunk
        before, with this chunk's slice zeroed) and the slice (this chunk's output cotangent); a chunk's own
        nodes, created after the earlier chunk's CopySlices, run before it: the kernel, rotations and
        projection backward, then its weight rows' path (cast back, SliceBackward's zero-padded (3, H, hd,
        d) tensor). The chunks' cotangents of h and of the weight each gather in an input buffer
        (``input_buffer``); h's goes through the cast and the norm once every chunk is done."""
        z, t = self.z, self.t
        A = z.A
        ct = self.dropout_backward(pre + "drop.", ct, z.N * z.fx, cat)
        carry = self.linear_backward(pre + "proj.", ct, pre + "obuf", f"W{layer}.proj", z.d * z.fx, A, cat)
        h = pre + ("h" if z.cast else "ln")
        counts = z.head_counts()
        dh = dw = None
        for n, k in enumerate(reversed(range(len(counts)))):
            c, heads = f"{pre}h{k}.", counts[k]
            a = self.head_elems(heads)
            res = t.alloc(c + "cs_res", A * z.c, cat)  # CopySlices: the cotangent, cloned
            do = t.alloc(c + "cs_do", a * z.c, cat)  # its slice, cloned: this chunk's output cotangent
            if k:  # CopyBackwards: zeros for the buffer's earlier version, copied into the slice
                t.free(t.alloc(c + "cs_zeros", a * z.c, cat))
            t.free(carry)
            carry = res
            if not k:
                t.free(res)  # the buffer had no earlier version to hand it to
            dqkv = self.heads_backward(c, do, cat, heads)
            dhk = self.head_linear_backward(c, dqkv, h, heads, cat)
            dh = self.input_buffer(c + "dh_sum", dh, dhk, n, A * z.c, cat)
            gw = self.head_weight_backward(c, heads, layer, cat, "gradients" if n == 0 else cat)
            dw = self.input_buffer(f"grad.W{layer}.qkv", dw, gw, n, 3 * z.d * z.d * z.p, "gradients")
        dn = self.uncast(pre + "qkv.", dh, A, cat)
        return self.ln_backward(pre, dn, x, z.N, cat, f"W{layer}.ln1")

    def input_buffer(self, name: str, buf: str | None, new: str, n: int, nbytes: int, cat: str) -> str:
        """Autograd's InputBuffer gathering the ``n``-th cotangent (from 0) of one tensor. The first is kept
        as it came, a view (ViewBackward's) that keeps its base alive, so the second is added out of place
        into a new tensor; later ones are added into that in place."""
        t = self.t
        if n == 0:
            return new
        if n == 1:
            out = t.alloc(name, nbytes, cat)
            t.free(buf, new)
            return out
        t.free(new)
        return buf

    def head_linear_backward(self, pre: str, dqkv: str, h: str, heads: int, cat: str) -> str:
        """MmBackward of a head chunk's projection: the gradient of its weight rows (compute dtype; the
        parameter dtype without autocast), then of h (B, T, d); releases the saved h and weight rows."""
        z, t = self.z, self.t
        wq = 3 * heads * z.hd * z.d
        t.alloc(pre + "gw", wq * (z.c if z.wcast else z.p), cat)
        dh = t.alloc(pre + "dh", z.A * z.c, cat)
        t.free(dqkv, pre + ("wc" if z.wcast else "w"), h)
        return dh

    def head_weight_backward(self, pre: str, heads: int, layer: int, cat: str, full_cat: str) -> str:
        """The weight rows' path back to the qkv weight: ToCopyBackward of the autocast cast, then
        SliceBackward's zero-padded (3, H, hd, d) tensor, which it returns (ViewBackward: a view of it)."""
        z, t = self.z, self.t
        wq = 3 * heads * z.hd * z.d
        gw = pre + "gw"
        if z.wcast:
            gp = t.alloc(pre + "gw_p", wq * z.p, cat)
            t.free(gw)
            gw = gp
        full = t.alloc(pre + "gw_full", 3 * z.d * z.d * z.p, full_cat)
        t.free(gw)
        return full

    def attn_half_backward_chunked(self, pre: str, layer: int, x: str, kept: list | None = None) -> str:
        """AttentionBlock.additive_vjp (the engine's F half for an additive coupling, no random
        draws, more than one head chunk), under the replayed autocast: the norm with its graph, do = dy @
        W_proj, then per chunk attend_heads with its graph and at once its backward (autograd.grad, the
        cotangent a copy of do's slice laid out like the output), the chunks' cotangents of h added into
        the first's in place, of the weight likewise (the first becomes the gradient); the (B, T, H, hd)
        buffer of the outputs, made after the first chunk's backward; proj over it with its graph for its
        weight's gradient; y -= fx in place; the norm's backward from dh. x: the block's input (the rebuilt
        x2). ``kept`` (reverse_keep_attention: the forward's (o, lse) per chunk): no kernel forward; each
        chunk's rebuilt q, k, v and the kernel's backward from the kept pair (``kept_heads_backward``), the
        kept output freed at the chunk's end. Returns dx (the stream dtype)."""
        z, t = self.z, self.t
        A, cat = z.A, "recompute"
        h = self.normed(pre, x, True, cat)
        # matmul under autocast casts W_proj (cached for proj(o) below), then dy (a temporary)
        self.weight(f"W{layer}.proj", z.d * z.fx, False)
        dyc = t.alloc(pre + "dy_c", A * z.c, cat) if z.cast else None
        do = t.alloc(pre + "do", A * z.c, cat)
        t.free(dyc)
        o = dh = None
        for k, heads in enumerate(z.head_counts()):
            c = f"{pre}h{k}."
            if kept is None:
                oc = self.attend_heads(c, h, heads, True, cat)
                do_c = t.alloc(c + "do", self.head_elems(heads) * z.c, cat)
                t.hold(do_c)  # and the backward's argument
                dqkv = self.heads_backward(c, do_c, cat, heads)
                dhk = self.head_linear_backward(c, dqkv, h, heads, cat)
            else:
                oc, lse = kept[k]
                dhk, do_c = self.kept_heads_backward(c, h, heads, cat, lse)
            gw = self.head_weight_backward(c, heads, layer, cat, "gradients" if k == 0 else cat)
            if dh is None:
                dh = dhk
            if o is None:
                o = t.alloc(pre + "obuf", A * z.c, cat)
            t.free(oc, do_c)  # del o_c, do_c, got: later chunks' got was added into the first's
            if k:
                t.free(gw, dhk)  # (a tuple lets go of its items last first)
        t.free(do)
        self.weight(f"W{layer}.proj", z.d * z.fx, False)  # proj(o): the cached cast (o needs no gradient)
        fx = t.alloc(pre + "fx", z.N * z.fx * z.c, cat)
        t.hold(o)  # mm saves its input for the weight's gradient
        dyc = t.alloc(pre + "dy_c2", A * z.c, cat) if z.cast else None  # dy.to(fx.dtype)
        gc = t.alloc(f"W{layer}.proj.gc", z.d * z.fx * z.c, cat) if z.wcast else None
        t.free(o)
        self.grad(f"W{layer}.proj", z.d * z.fx * z.p)
        t.free(gc, dyc)
        self.mixed(pre + "inv.", A)  # y.sub_(fx), in place
        t.free(fx, o)
        if z.cast:  # ToCopyBackward of the norm's cast; dh itself stays a local until the return
            dn = t.alloc(pre + "dh_s", A * z.s, cat)
        else:
            t.hold(dh)
            dn = dh
        dx = self.ln_backward(pre, dn, x, z.N, cat, f"W{layer}.ln1")
        t.free(h, dh)  # additive_vjp returns
        self.exit_autocast()  # the replayed autocast exits: its cache (W_proj's copy) goes
        return dx

    def heads_backward(self, pre: str, do: str, cat: str, heads: int | None = None) -> str:
        """Autograd from the attention output's cotangent ``do`` (B, h, T, hd) to the projection's (B, T,
        3*h*hd): the kernel's backward (releasing what it saved), the rotations', UnbindBackward's stack and
        the copy its ViewBackward makes. h: ``heads``, all H unless a head chunk."""
        z, t = self.z, self.t
        h = z.H if heads is None else heads
        A = self.head_elems(heads)
        q, k, v, a = pre + "ropeq.rot", pre + "ropek.rot", pre + "v", pre + "att."
        if z.attention == "sdpa":
            dq, dk, dv = (t.alloc(pre + n, A * z.c, cat) for n in ("dq", "dk", "dv"))
            # Both FlashAttention-2 (CUDA) and the CPU flash kernel accumulate dq in fp32.
            acc = t.alloc(pre + "dq_acc", A * 4, cat)
            red = t.alloc(pre + "red", (A * z.c if z.c != 4 else 0) if z.device == "cpu" else z.N * h * 4, cat)
            t.free(acc, red)
            t.free(q, k, v, a + "o", a + "lse", do)
        elif z.attention == "math":
            dq, dk, dv = self.math_backward(pre, do, v, cat, heads)
        else:  # the reference's autograd graph, from the output's cast back to q, k, v's casts
            BHTT = z.B * h * z.T * z.T
            ac = 8 if z.c == 8 else 4
            up = z.c != ac
            if up:  # ToCopyBackward of the output cast
                d32 = t.alloc(pre + "do_acc", A * ac, cat)
                t.free(do)
                do = d32
            dv = t.alloc(pre + "dv", A * ac, cat)
            dp = t.alloc(pre + "dp", BHTT * ac, cat)
            t.free(do, a + ("dprobs" if z.attn_drop else "probs"), a + "vf" if up else v)
            if z.attn_drop:
                dp2 = t.alloc(pre + "dp_drop", BHTT * ac, cat)
                t.free(dp, a + "anoise")
                dp = dp2
            ds = t.alloc(pre + "dsm", BHTT * ac, cat)
            t.free(dp, a + "probs")
            dm = t.alloc(pre + "dmasked", BHTT * ac, cat)  # masked_fill_'s backward: out of place
            t.free(ds, a + "notmask")
            dd = t.alloc(pre + "dscale", BHTT * ac, cat)  # mul_'s backward
            t.free(dm)
            dq = t.alloc(pre + "dq", A * ac, cat)
            dk = t.alloc(pre + "dk", A * ac, cat)
            t.free(dd, a + "qf" if up else q, a + "kf" if up else k)
            if up:  # ToCopyBackward of each input's cast (same sizes, so their order does not matter)
                cast = []
                for n, g in (("dq_c", dq), ("dv_c", dv), ("dk_c", dk)):
                    cast.append(t.alloc(pre + n, A * z.c, cat))
                    t.free(g)
                dq, dv, dk = cast
        dq = self.rope_backward(pre + "bq.", dq, cat, heads)
        dk = self.rope_backward(pre + "bk.", dk, cat, heads)
        st = t.alloc(pre + "dqkv_stack", 3 * A * z.c, cat)  # UnbindBackward: stack(dq, dk, dv)
        t.free(dq, dk, dv)
        dqkv = t.alloc(pre + "dqkv", 3 * A * z.c, cat)  # view(B, T, 3, H, hd) of a permuted tensor: a copy
        t.free(st)
        return dqkv

    def couple_backward(self, pre: str, dy: str, x: str, cat: str) -> tuple[str, str]:
        """Autograd through y = coupling(x, fx), consuming dy: (dx, dfx). Additive passes dy to both
        (autograd casts the one for fx to fx's dtype)."""
        z, t = self.z, self.t
        A, F = z.A, z.N * z.fx
        if not z.affine:
            t.hold(dy)  # dx is dy itself
            if z.c != z.s:
                dfx = t.alloc(pre + "dfx", F * z.c, cat)
            else:
                t.hold(dy)
                dfx = dy
            t.free(dy)
            return dy, dfx
        dt = t.alloc(pre + "dt", A * z.c, cat) if z.c != z.s else dy
        if dt == dy:
            t.hold(dy)
        dx = t.alloc(pre + "dx", A * z.s, cat)  # dy * s
        ds = t.alloc(pre + "ds", A * z.s, cat)  # dy * x
        t.free(pre + "s", x)
        if z.c != z.s:
            dsc = t.alloc(pre + "dsc", A * z.c, cat)
            t.free(ds)
            ds = dsc
        dth = t.alloc(pre + "dth", A * z.c, cat)
        t.free(ds)
        dr = t.alloc(pre + "dr", A * z.c, cat)
        t.free(dth, pre + "th")
        dfx = t.alloc(pre + "dfx", F * z.c, cat)  # SliceBackward: each half into a full-size zero tensor
        t.free(dr)
        t.free(t.alloc(pre + "dfx_t", F * z.c, cat), dt)  # accumulated into dfx in place
        t.free(dy)
        return dx, dfx

    def accumulate(self, pre: str, a: str, b: str, cat: str) -> str:
        """Autograd's InputBuffer: b added into a in place when nothing else owns a, else a new sum."""
        t = self.t
        if t.owners(a) == 1:
            t.free(b)
            return a
        out = t.alloc(pre, self.z.A * self.z.s, cat)
        t.free(a, b)
        return out

    # --- engine: a reverse layer's backward (engine._LayerRun.backward) -----------------------------
    def inverse_in_place(self, pre: str, rows: int) -> None:
        """coupling.inverse_: additive subtracts in place; affine builds s and t first (temporaries)."""
        z, t = self.z, self.t
        A = rows * z.d
        if z.affine:
            th = t.alloc(pre + "inv_th", A * z.c, "recompute")
            cth = t.alloc(pre + "inv_cth", A * z.c, "recompute")
            sc = t.alloc(pre + "inv_s", A * z.c, "recompute")
            t.free(th, cth)
            self.mixed(pre + "inv_t.", A)
            self.mixed(pre + "inv_d.", A)
            t.free(sc)
        else:
            self.mixed(pre + "inv.", A)

    def coupling_vjp(self, pre: str, dy: str, rows: int) -> tuple[str, str | None]:
        """coupling.vjp(x, fx, dy) -> (dx, dfx). Additive returns (dy, dy): nothing new."""
        z, t = self.z, self.t
        if not z.affine:
            return dy, None
        A = rows * z.d
        th = t.alloc(pre + "vjp_th", A * z.c, "recompute")
        t.free(t.alloc(pre + "vjp_cth", A * z.c, "recompute"))
        sc = t.alloc(pre + "vjp_s", A * z.c, "recompute")
        dyx = t.alloc(pre + "vjp_dyx", A * z.s, "recompute")  # dy * x
        tmp = [t.alloc(pre + f"vjp_t{k}", A * z.c, "recompute") for k in range(2)]  # th*th, 1 - th*th
        t.free(tmp[0])
        sc2 = t.alloc(pre + "vjp_t2", A * z.c, "recompute")  # c * (1 - th*th)
        t.free(tmp[1])
        dr = t.alloc(pre + "vjp_dr", A * z.s, "recompute")
        t.free(dyx, sc2)
        dfx = t.alloc(pre + "vjp_dfx", rows * z.fx * z.s, "recompute")  # concat([dr, dy])
        dx = t.alloc(pre + "vjp_dx", A * z.s, "streams")  # dy * s
        t.free(th, sc, dr)
        return dx, dfx

    def head_chunked_half(self) -> bool:
        """Whether the engine runs the F half through AttentionBlock.additive_vjp
        (engine.head_chunked_half): more than one head chunk, a coupling with the "additive" capability, and
        no random draws (no dropout in training). Compiled blocks take the generic half, not modelled apart."""
        z = self.z
        return (len(z.head_counts()) > 1 and not z.drop and not z.attn_drop
                and has_capability(resolve_coupling(self.cm.config), "additive"))

    def reverse_backward(self, i: int, y1: str, y2: str, dy1: str, dy2: str, owned_y: bool,
                         owned_dy: bool) -> tuple[str, str, str, str]:
        """Rebuild (x1, x2) in (y1, y2)'s memory and the cotangents in (dy1, dy2)'s; returns all four."""
        z, t = self.z, self.t
        pre = f"L{i}.r."
        held: list[str] = []
        if not owned_y:  # someone else may still read the outputs: the engine works on copies (measured:
            held = [y1, y2]  # the originals' storage stays until this layer's node returns)
            y1 = t.alloc(pre + "y1", z.A * z.s, "streams")
            y2 = t.alloc(pre + "y2", z.A * z.s, "streams")
        if not owned_dy:  # cotangents from autograd: copies, the originals kept until this node returns
            held += [dy1, dy2]
            dy1 = t.alloc(pre + "dy1", z.A * z.s, "streams")
            dy2 = t.alloc(pre + "dy2", z.A * z.s, "streams")
        # G half, over the FFN's own chunks (chunked_half): G(y1) recomputed with grad per chunk.
        rows_list = z.ffn_rows()
        du_full = t.alloc(pre + "du_full", z.A * z.s, "recompute") if len(rows_list) > 1 else None
        new_dy2 = None
        for c, rows in enumerate(rows_list):
            g = f"{pre}G{c}."
            gy = self.ffn_transform(g, y1, True, "recompute", i, rows)  # vjp on the chunk
            self.exit_autocast()
            self.inverse_in_place(g, rows)  # y2 -= G(y1), in place
            dx, dfx = self.coupling_vjp(g, dy2, rows)
            if dfx is None:
                dfx = dy2
            ct = t.alloc(g + "ct", rows * z.fx * z.c, "recompute") if z.c != z.s else dfx
            t.hold(ct)  # an argument of autograd.grad: alive until the pullback returns
            if ct == dfx:
                t.hold(ct)  # and the owner the block's backward consumes
            du = self.ffn_transform_backward(g, ct, y1, i, "recompute", rows)  # the pullback
            t.free(ct, gy, dfx if dfx != dy2 else None)  # half_backward returns: out and dbu go
            if dx != dy2 and len(rows_list) > 1:
                t.free(dx)  # copied into dy2's chunk
            elif dx != dy2:
                new_dy2 = dx  # one chunk: half_backward's dx becomes dx2; dy2 goes with the locals
            if du_full:
                t.free(du)  # copied into du's chunk
        if du_full:
            du = du_full
        t.free(du)  # dz1 = dy1 += du, in place
        f = pre + "F."
        kept = self.kept.pop(i, None)
        if kept is not None or self.head_chunked_half():
            # y1 -= F(y2) and dz1 = dy1 stays (additive); dx2 += dx2_from_f, in place
            t.free(self.attn_half_backward_chunked(f, i, y2, kept))
            if new_dy2:
                t.free(dy2)
                dy2 = new_dy2
            t.free(*held)
            return y1, y2, dy1, dy2
        fx = self.attn_forward(f, y2, True, "recompute", i)
        self.exit_autocast()
        self.inverse_in_place(f, z.N)  # y1 -= F(x2), in place
        dx1, dfx = self.coupling_vjp(f, dy1, z.N)
        if dfx is None:
            dfx = dy1
        ct = t.alloc(f + "ct", z.N * z.fx * z.c, "recompute") if z.c != z.s else dfx
        t.hold(ct)
        if ct == dfx:
            t.hold(ct)
        dx2f = self.attn_backward(f, ct, y2, i, "recompute")
        t.free(ct, fx, dfx if dfx != dy1 else None)
        t.free(dx2f)  # dx2 += dx2_from_f, in place
        if dx1 != dy1:  # affine: dx1 is new; backward_step returns it and dy1 goes with the locals
            t.free(dy1)
            dy1 = dx1
        if new_dy2:
            t.free(dy2)
            dy2 = new_dy2
        t.free(*held)
        return y1, y2, dy1, dy2

    # --- layers ---------------------------------------------------------------------------------------
    def layer_forward(self, i: int, policy: str, x1: str, x2: str) -> tuple[str, str]:
        """ReversibleLayer's forward_step under ``policy`` (run_layers), plus the block checkpoints."""
        t, N = self.t, self.z.N
        pre = f"L{i}."
        if policy_table.BY_NAME[policy].recomputes == "layer":
            if policy == "checkpoint":  # torch.utils.checkpoint saves the layer's inputs, drops the rest
                t.hold(x1, saved=True)
                t.hold(x2, saved=True)
            if policy in policy_table.KEEPING_ATTENTION:
                fx = self.attn_forward_chunked(pre + "F.", x2, False, "activations", i, keeping=True)
            else:
                fx = self.attn_forward(pre + "F.", x2, False, "activations", i)
            y1 = self.couple(pre + "cf.", x1, fx, False, "activations", N)
            gy = self.ffn_forward(pre + "G.", y1, False, "activations", i)
            return y1, self.couple(pre + "cg.", x2, gy, False, "activations", N)
        keep_f, keep_g = policy != "recompute_attention", policy != "recompute_ffn"
        if not keep_f:
            t.hold(x2, saved=True)
        fx = self.attn_forward(pre + "F.", x2, keep_f, "activations", i)
        y1 = self.couple(pre + "cf.", x1, fx, True, "activations", N)
        if not keep_g:
            t.hold(y1, saved=True)
        gy = self.ffn_forward(pre + "G.", y1, keep_g, "activations", i)
        return y1, self.couple(pre + "cg.", x2, gy, True, "activations", N)

    def store_backward(self, i: int, policy: str, x1: str, x2: str, y1: str, dy1: str,
                       dy2: str) -> tuple[str, str]:
        """Autograd through a stored, checkpointed or block-checkpointed layer; consumes dy, returns dx."""
        t, N = self.t, self.z.N
        pre = f"L{i}."
        cat = "activations" if policy == "store" else "recompute"
        if policy == "checkpoint":  # the first unpack recomputes the layer (early stop: not the last coupling)
            fx = self.attn_forward(pre + "F.", x2, True, cat, i)
            y1 = self.couple(pre + "cf.", x1, fx, True, cat, N)
            gy = self.ffn_forward(pre + "G.", y1, True, cat, i, early_stop=True)
            self.exit_autocast()
            t.free(gy, y1)  # the recomputed y1 lives on as G's saved input
        dx2, dgy = self.couple_backward(pre + "cg.", dy2, x2, cat)
        if policy == "recompute_ffn":
            t.free(self.ffn_forward(pre + "G.", y1, True, cat, i, early_stop=True))
            self.exit_autocast()
        dg = self.ffn_backward(pre + "G.", dgy, y1, i, cat)
        if policy == "recompute_ffn":
            t.free(y1)  # the checkpoint's saved input
        dz1 = self.accumulate(pre + "dz1", dy1, dg, "streams")
        dx1, dfx = self.couple_backward(pre + "cf.", dz1, x1, cat)
        if policy == "recompute_attention":
            t.free(self.attn_forward(pre + "F.", x2, True, cat, i))
            self.exit_autocast()
        df = self.attn_backward(pre + "F.", dfx, x2, i, cat)
        if policy == "recompute_attention":
            t.free(x2)
        dx2 = self.accumulate(pre + "dx2", dx2, df, "streams")
        if policy == "checkpoint":
            t.free(x1, x2)  # the saved inputs
        return dx1, dx2


@dataclass(frozen=True)
class LayerCost:
    """What one layer costs under a policy: bytes it keeps from forward to backward (beyond the other
    layers' plan), the transient of its backward above the step's baseline, and its relative compute."""

    policy: str
    saved: int
    transient: int
    time: float


def check_priced(config: ModelConfig) -> None:
    """BackendFeatureError for a config whose step this replay does not mirror: Rational-Fourier attention
    (``attention_kind="rf"``) keeps per-chunk feature sums, not softmax's tensors, and is not replayed yet, so
    a price would be softmax's, i.e. wrong."""
    if getattr(config, "attention_kind", "softmax") != "softmax":
        from revnet_core.errors import BackendFeatureError

        raise BackendFeatureError(
            f"attention_kind={config.attention_kind!r}: the torch cost model replays softmax attention only; "
            "Rational-Fourier attention's memory is not priced yet (measure it: revnet_torch.bench.BenchmarkSuite)")


class CostModel:
    """Predicted bytes and compute of one training step of ``config`` under ``workload``.

    >>> seed = ModelConfig(num_layers=24, d_model=1024, num_heads=16, d_ff=4096, vocab_size=50257)
    >>> cm = CostModel(seed, Workload(seq_len=262144))
    >>> round(cm.static_bytes() / 2**30, 2)   # parameters, gradients and AdamW state
    6.04
    """

    def __init__(self, config: ModelConfig, workload: Workload | None = None, **workload_fields):
        check_priced(config)
        self.config = config
        base = workload if workload is not None else Workload()
        self.workload = replace(base, **workload_fields) if workload_fields else base
        if self.workload.attention not in (None, *ATTENTION_KERNELS):
            raise ValueError(f"attention={self.workload.attention!r} is not one of {list(ATTENTION_KERNELS)}")
        self.sizes = _sizes(config, self.workload)
        self._memo: dict[tuple, StepMemory] = {}

    def kernel_alternatives(self) -> list[tuple[str, str, ModelConfig]]:
        """(category, suggestion, config) for each torch option whose better choice saves memory (the
        advisor weighs them): today the fused attention kernels where the config pins slower ones."""
        opts = options(self.config)
        if opts.attention == "sdpa" and opts.use_flash_attention:
            return []
        fused = with_backend_options(self.config, "torch", TorchOptions, attention="sdpa", use_flash_attention=True)
        return [("attention", "use the fused attention kernels (backend_options={'torch': {'attention': 'sdpa', "
                 "'use_flash_attention': True}}): no (T, T) score matrix is stored", fused)]

    def with_workload(self, **changes) -> "CostModel":
        return CostModel(self.config, replace(self.workload, **changes))

    # --- parameters and state -------------------------------------------------------------------------
    def norm_parameter_count(self) -> int:
        return 2 * self.config.d_model if self.config.norm == "layernorm" else self.config.d_model

    def layer_parameter_count(self) -> int:
        """qkv (3d x d), proj (fx x d), up (f or 2f x d), down (fx x f) and two norms."""
        z = self.sizes
        return 3 * z.d * z.d + z.fx * z.d + z.ffu * z.d + z.fx * z.ff + 2 * self.norm_parameter_count()

    def parameter_count(self) -> int:
        """Layers, token embedding, untied LM head, final norm."""
        z = self.sizes
        return self.config.num_layers * self.layer_parameter_count() + 2 * z.V * z.d + self.norm_parameter_count()

    def parameter_bytes(self) -> int:
        return self.parameter_count() * self.sizes.p

    def gradient_bytes(self) -> int:
        return self.parameter_count() * self.sizes.p

    def optimizer_bytes(self) -> int:
        """AdamW keeps exp_avg and exp_avg_sq shaped like each parameter; plain SGD keeps nothing."""
        return 2 * self.parameter_bytes() if self.workload.optimizer == "adamw" else 0

    def static_bytes(self) -> int:
        """Parameters, gradients and optimizer state: alive at the end of every backward."""
        return self.parameter_bytes() + self.gradient_bytes() + self.optimizer_bytes()

    def optimizer_peak_bytes(self, policies: Sequence[str] | str, option: str = "adamw", block_size: int = 256) -> int:
        """Peak bytes of a step under an optimizer option (8-bit moments, the step inside the backward, bf16
        weights: ``revnet_torch.optim_cost.OPTIMIZER_OPTIONS``); "adamw" is ``peak_bytes``."""
        from .optim_cost import optimizer_peak_bytes  # priced on this replay's tape

        return optimizer_peak_bytes(self, policies, option, block_size)

    def choose_optimizer(self, policies: Sequence[str], budget: int, accumulating: bool = False):
        """(option, {option: peak}): the preferred optimizer option with room in ``budget``
        (``revnet_torch.optim_cost.LADDER``), and how to run it: ``optim_cost.HOW[option]``."""
        from .optim_cost import HOW, choose_optimizer

        name, peaks = choose_optimizer(self, policies, budget, accumulating)
        return name, peaks, HOW[name]

    def with_optimizer(self, option: str):
        """This cost model with its peaks priced under an optimizer option (the planner's view)."""
        from .optim_cost import WithOptimizer

        return self if option == "adamw" else WithOptimizer(self, option)

    def stream_bytes(self) -> int:
        """One stream tensor (B, T, d) in the stream dtype; the two streams and their cotangents are four."""
        return self.sizes.A * self.sizes.s

    def rope_table_bytes(self) -> int:
        """Rotary's cached cos and sin, (T, hd/2) each in the rotation's dtype (fp32, fp64 in fp64 runs)."""
        z = self.sizes
        return 2 * z.T * (z.d // z.H // 2) * max(z.c, 4)

    def autocast_cache_bytes(self) -> int:
        """Autocast's compute-dtype copies of every layer weight, alive until the forward's autocast exits."""
        z = self.sizes
        if not z.wcast:
            return 0
        per_layer = self.layer_parameter_count() - 2 * self.norm_parameter_count()
        return self.config.num_layers * per_layer * z.c

    # --- the simulated step ---------------------------------------------------------------------------
    def _plan(self, policies: Sequence[str] | str) -> list[str]:
        if isinstance(policies, str):
            policies = [policies] * self.config.num_layers
        policies = list(policies)
        if len(policies) != self.config.num_layers:
            raise ValueError(f"got {len(policies)} policies for {self.config.num_layers} layers")
        for p in policies:
            if p not in policy_table.BY_NAME:
                raise ValueError(f"policy={p!r} is not one of {list(policy_table.NAMES)}")
        return policies

    def simulate(self, policies: Sequence[str] | str, record: bool = False) -> StepMemory:
        """Run one training step on a tape. ``policies``: one per layer, or one name for all."""
        policies = self._plan(policies)
        key = tuple(policies)
        if not record and key in self._memo:
            return self._memo[key]
        tape = Tape(record=record)
        st = _Step(self, tape)
        self._step(policies, st)
        saved = sum(tape.saved.values()) + (self.rope_table_bytes() if st.rope_saved else 0)
        result = StepMemory(tape.peak, tape.peak_label, tape.peak_by_category, saved, tape.phase_peaks,
                            tape.phase_starts, tape.log)
        if not record:
            self._memo[key] = result
        return result

    def _step(self, policies: list[str], st: _Step) -> None:
        z, w, t = self.sizes, self.workload, st.t
        L = self.config.num_layers
        # Step >= 2 starts with parameters and optimizer state; zero_grad(set_to_none) left no gradients.
        t.set_label("start")
        t.alloc("parameters", self.parameter_bytes(), "parameters")
        t.alloc("optimizer_state", self.optimizer_bytes(), "optimizer_state")
        t.alloc("rope_tables", self.rope_table_bytes(), "embedding")  # cached since the first step
        ids = t.alloc("ids", z.N * 8, "embedding")  # the caller's int64 batch
        t.set_label("forward")
        t.hold(ids, saved=True)  # the embedding saves the ids
        x = t.alloc("emb", z.A * z.p, "streams")
        if z.s != z.p:
            t.free(x)
            x = t.alloc("emb_s", z.A * z.s, "streams")
        t.hold(x)  # hidden()'s locals keep it until hidden returns; run_layers' loop holds the other
        x1 = x2 = x
        ins, outs = [], []
        seg_top: tuple[str, str] | None = None
        for i, policy in enumerate(policies):
            t.set_label(f"forward layer {i}")
            y1, y2 = st.layer_forward(i, policy, x1, x2)
            if policy in policy_table.REVERSING:  # the segment keeps its top outputs
                t.hold(y1)
                t.hold(y2)
                if seg_top is not None:
                    t.free(*seg_top)
                seg_top = (y1, y2)
            else:
                seg_top = None
            t.free(*((x1,) if x1 == x2 else (x1, x2)))  # the loop rebinds its names
            ins.append((x1, x2))
            outs.append((y1, y2))
            x1, x2 = y1, y2
        t.set_label("final norm")  # norm(y1 * 0.5 + y2 * 0.5), less e * 0.5 under stream_merge="sum"
        h1, h2 = t.alloc("half1", z.A * z.s, "streams"), t.alloc("half2", z.A * z.s, "streams")
        mean = t.alloc("mean", z.A * z.s, "streams")
        t.free(h1, h2)
        merge_sum = self.config.stream_merge == "sum"
        if merge_sum:  # the embedding looked up again, subtracted in place, dropped
            e = t.alloc("emb_again", z.A * z.p, "streams")
            if z.s != z.p:
                t.free(e)
                e = t.alloc("emb_again_s", z.A * z.s, "streams")
            t.free(e)
        h = st.layer_norm("final.", mean, True, "outputs", z.N)  # returned as last_hidden_state
        t.free(mean, x1, x2, x)  # hidden() returns
        t.set_label("loss head forward")
        self._loss_forward(t, h)
        if not w.hold_outputs:
            t.free(h)  # forward's local, unless returned (return_hidden=True) and kept by the caller
        t.set_label("forward end")  # model(...) has returned; the caller's autocast has not exited yet
        st.exit_autocast()  # the caller's autocast ends with the forward
        # Backward.
        t.forward = False
        t.set_label("loss head backward")
        if z.loss_fused:  # dh and dW scaled in place, dW cast to the parameter dtype (free when fp32)
            dh2 = "dh"
            if z.p == 4:
                t.free("dw")  # becomes the head's .grad: the padded buffer, sliced
                t.alloc("grad.head", fused_ce_layout(z.V, z.N)[1] * z.d * 4, "gradients")
            else:
                t.alloc("grad.head", z.V * z.d * z.p, "gradients")
                t.free("dw")
        else:  # the same in place scaling; dW is the head's .grad when already in the parameter dtype
            dh2 = "dh"
            if max(z.c, 4) == z.p:
                t.free("dw")
                t.alloc("grad.head", z.V * z.d * z.p, "gradients")
            else:
                t.alloc("grad.head", z.V * z.d * z.p, "gradients")
                t.free("dw")
        t.set_label("final norm backward")
        dmean = st.ln_backward("final.", dh2, mean, z.N, "streams", "final_norm")
        if merge_sum:  # SubBackward's -0.5 * dmean runs first (the newest node): the lookup's gradient
            de = t.alloc("demb_again", z.A * z.s, "embedding")
            if z.s != z.p:
                t.free(de)
                de = t.alloc("demb_again_p", z.A * z.p, "embedding")
            t.alloc("grad.embed", z.V * z.d * z.p, "gradients")  # becomes .grad, held to the end
            t.free(de)
        dy2 = t.alloc("dy2_top", z.A * z.s, "streams")  # each MulBackward(0.5): a buffer per stream
        dy1 = t.alloc("dy1_top", z.A * z.s, "streams")
        t.free(dmean)
        above = None
        for i in reversed(range(L)):
            policy = policies[i]
            t.set_label(f"backward layer {i}")
            (x1, x2), (y1, y2) = ins[i], outs[i]
            if policy in policy_table.REVERSING:
                # hidden() passes private_outputs=True: the last segment owns its top outputs and their
                # cotangents; a segment under a stored layer owns neither (the engine copies them).
                owned = above in policy_table.REVERSING or above is None
                r1, r2, dy1, dy2 = st.reverse_backward(i, y1, y2, dy1, dy2, owned_y=owned, owned_dy=owned)
                if i > 0 and policies[i - 1] in policy_table.REVERSING:
                    outs[i - 1] = (r1, r2)  # the segment hands the rebuilt inputs down
                else:
                    t.free(r1, r2)
            else:
                dy1, dy2 = st.store_backward(i, policy, x1, x2, y1, dy1, dy2)
            above = policy
        t.set_label("embedding backward")
        demb = st.accumulate("demb", dy1, dy2, "embedding") if dy1 != dy2 else dy1
        if z.s != z.p:
            d2 = t.alloc("demb_p", z.A * z.p, "embedding")
            t.free(demb)
            demb = d2
        if merge_sum:  # a second dense gradient, added into .grad in place
            t.free(t.alloc("grad.embed_part", z.V * z.d * z.p, "gradients"))
        else:
            t.alloc("grad.embed", z.V * z.d * z.p, "gradients")
        t.free(demb, ids)
        t.set_label("optimizer step")  # fused AdamW and SGD update in place: no step temporaries
        t.free(h)

    def _loss_forward(self, t: Tape, h: str) -> None:
        targets = t.alloc("targets", self.sizes.N * 8, "loss_head")  # shift_targets: model.forward's local
        if self.sizes.loss_fused:
            self._fused_loss_forward(t)
        else:
            self._chunked_loss_forward(t)
        t.free(targets)  # model.forward returns

    def _fused_loss_forward(self, t: Tape) -> None:
        """revnet_kernels' linear_cross_entropy_forward (Triton): dh (N, d) and the padded fp32 dW kept on ctx
        (not saved tensors); a padded compute-dtype weight copy, one reused logits chunk and dW's per-chunk
        product live for the call. On CPU ("fused" asked) the registry runs its PyTorch chunked variant,
        which this counts as the Triton one."""
        z = self.sizes
        n, vp = fused_ce_layout(z.V, z.N)
        t.free(t.alloc("ce_valid", z.N, "loss_head"))  # (targets != ignore_index).sum()
        rows = t.alloc("ce_loss_rows", z.N * 4, "loss_head")
        dh = t.alloc("dh", z.A * z.s, "loss_head")
        dw = t.alloc("dw", vp * z.d * 4, "loss_head")
        w = t.alloc("ce_w", vp * z.d * z.c, "loss_head") if (vp != z.V or z.c != z.p) else None
        lg = t.alloc("ce_logits", n * vp * z.c, "loss_head")
        part = t.alloc("ce_dw_part", vp * z.d * z.c, "loss_head") if z.c != 4 else None
        prev = None
        for k in range(min(math.ceil(z.N / n), 2)):  # the second chunk shows the steady state
            hc = t.alloc(f"ce_hc{k}", n * z.d * z.c, "loss_head") if z.c != z.s else None
            t.free(prev)  # rebinding hc frees the previous chunk's
            if z.c != z.s:  # dh[s:s + n] = z @ wc: a product in the compute dtype, then copied
                t.free(t.alloc(f"ce_dh{k}", n * z.d * z.c, "loss_head"))
            prev = hc
        t.free(prev, rows, w, lg, part)
        t.hold(dh)
        t.hold(dw)  # ctx.grads
        t.free(dh, dw)

    def _chunked_loss_forward(self, t: Tape) -> None:
        """revnet_kernels' chunked linear cross-entropy (``cross_entropy._chunked_forward``): dh (N, d) and dW
        (V, d) in the accumulation dtype (fp32, fp64 in fp64 runs) kept on ctx (not saved tensors); a
        compute-dtype weight copy for the call; one chunk's tensors at a time (``_chunk_pass`` returns before
        the next chunk starts), so the first, full chunk shows the peak."""
        z = self.sizes
        a = max(z.c, 4)  # promote_types(compute dtype, fp32)
        n = min(z.head_chunk, z.N)
        valid = t.alloc("ce_valid", z.N, "loss_head")
        dh = t.alloc("dh", z.A * z.s, "loss_head")
        dw = t.alloc("dw", z.V * z.d * a, "loss_head")
        w = t.alloc("ce_w", z.V * z.d * z.c, "loss_head") if z.c != z.p else None
        hc = t.alloc("ce_hc", n * z.d * z.c, "loss_head") if z.c != z.s else None
        lg = t.alloc("ce_logits_c", n * z.V * z.c, "loss_head")  # hc @ wc.T, then .to(acc)
        if z.c != a:
            la = t.alloc("ce_logits", n * z.V * a, "loss_head")
            t.free(lg)
            lg = la
        # logsumexp: the row max, then exp(logits - max) as one (n, V) temporary to sum
        mx = t.alloc("ce_max", n * a, "loss_head")
        sub = t.alloc("ce_lse_sub", n * z.V * a, "loss_head")
        lse = t.alloc("ce_lse", n * a, "loss_head")
        t.free(sub, mx)
        safe_t = t.alloc("ce_safe_t", n * 8, "loss_head")  # the targets with ignored rows at 0 (int64)
        # the gradient overwrites the logits in place; its compute-dtype copy feeds the two matmuls
        g = t.alloc("ce_g", n * z.V * z.c, "loss_head") if z.c != a else None
        t.free(t.alloc("ce_dh_mm", n * z.d * z.c, "loss_head"))  # g @ wc, copied into dh's rows
        if z.c != a:  # dw += g.T @ hc: the product in the compute dtype; CPU casts it to a temporary to add
            part = t.alloc("ce_dw_part", z.V * z.d * z.c, "loss_head")
            t.free(t.alloc("ce_dw_cast", z.V * z.d * a, "loss_head") if z.device == "cpu" else None, part)
        t.free(hc, lg, lse, safe_t, g)  # _chunk_pass returns
        t.hold(dh)
        t.hold(dw)  # ctx.grads
        t.free(valid, w, dh, dw)  # locals go when forward returns

    # --- what the planner and the tests ask -----------------------------------------------------------
    def saved_bytes(self, policies: Sequence[str] | str) -> int:
        """What autograd saves in the forward (parameters excluded): ``saved_tensor_bytes``'s measure."""
        return self.simulate(policies).saved_bytes

    def peak_bytes(self, policies: Sequence[str] | str) -> int:
        """Peak allocated bytes of a training step (step >= 2: optimizer state exists)."""
        return self.simulate(policies).peak

    def layer_saved_bytes(self, policy: str) -> int:
        """Bytes one middle layer adds to the saved set under ``policy`` when its neighbours reverse."""
        L = self.config.num_layers
        base = ["reverse"] * L
        plan = list(base)
        plan[L // 2] = policy
        return self.saved_bytes(plan) - self.saved_bytes(base)

    def layer_transient_bytes(self, policy: str = "reverse") -> int:
        """Bytes the backward of one middle layer under ``policy`` adds above what was alive when it began
        (its recompute, the rebuilt streams' copies, the gradient temporaries)."""
        L = self.config.num_layers
        plan = ["reverse"] * L
        plan[L // 2] = policy
        return self.simulate(plan).transient(f"backward layer {L // 2}")

    def components(self, policies: Sequence[str] | str = "reverse") -> dict[str, int]:
        """The pieces of a step's memory, in bytes: fixed costs, streams, what one layer keeps and needs under
        each policy, the loss head's forward, the embedding, autocast's weight cache, and the plan's peak."""
        z = self.sizes
        sim = self.simulate(policies)
        out = {
            "parameters": self.parameter_bytes(),
            "gradients": self.gradient_bytes(),
            "optimizer_state": self.optimizer_bytes(),
            "streams_and_grads": 4 * self.stream_bytes(),
            "loss_head": sim.transient("loss head forward"),
            "embedding": z.N * 8 + z.A * z.s + self.rope_table_bytes(),  # ids, the streams' start, rotary
            "autocast_cache": self.autocast_cache_bytes(),
            "peak": sim.peak,
        }
        for p in policy_table.WHOLE_LAYER:
            out[f"layer_saved_{p}"] = self.layer_saved_bytes(p)
            out[f"layer_transient_{p}"] = self.layer_transient_bytes(p)
        return out

    def layer_cost(self, policy: str) -> LayerCost:
        return LayerCost(policy, self.layer_saved_bytes(policy), self.layer_transient_bytes(policy),
                         self.layer_time(policy))

    # --- compute --------------------------------------------------------------------------------------
    def block_flops(self) -> dict[str, float]:
        """Forward FLOPs of one layer's blocks, 2 per multiply-add: the attention block's matmuls and its
        attention (QK^T and PV over half the scores when causal, all of them with ``causal=False``), and the
        FFN's two matmuls."""
        z = self.sizes
        scores = 0.5 if z.causal else 1.0  # the share of the (T, T) score matrix computed
        return {"attention_matmuls": 2.0 * z.N * z.d * (3 * z.d + z.fx),
                "attention_core": 4.0 * scores * z.B * z.T * z.T * z.d,
                "ffn": 2.0 * z.N * z.d * z.ffu + 2.0 * z.N * z.ff * z.fx}

    def layer_time(self, policy: str) -> float:
        """FLOPs of one layer's forward + backward under ``policy``: backward is 2x the matmuls and 2.5x the
        fused attention core; recomputing a block adds its forward once more (reverse_keep_attention: all
        but the attention core, whose backward starts from the kept output)."""
        f = self.block_flops()
        attn = f["attention_matmuls"] + f["attention_core"]
        base = 3 * (f["attention_matmuls"] + f["ffn"]) + 3.5 * f["attention_core"]
        again = {"": 0.0, "layer": attn + f["ffn"], "attention": attn, "ffn": f["ffn"]}
        if policy_table.BY_NAME[policy].keeps_attention:  # the kernel's forward is not run again
            return base + f["attention_matmuls"] + f["ffn"]
        return base + again[policy_table.BY_NAME[policy].recomputes]

    def head_time(self) -> float:
        """The chunked loss head computes logits, dh and dW in the forward: three (N, d, V) matmuls."""
        z = self.sizes
        return 6.0 * z.N * z.d * z.V

    def step_time(self, policies: Sequence[str] | str) -> float:
        """Step FLOPs of a plan (layers and loss head); compare plans by ratio."""
        return sum(self.layer_time(p) for p in self._plan(policies)) + self.head_time()

    def relative_step_time(self, policies: Sequence[str] | str) -> float:
        """Step compute relative to storing every layer (1.0: no recompute)."""
        return self.step_time(policies) / self.step_time("store")
