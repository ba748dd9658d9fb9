"""Linear + cross-entropy (the LM head and its loss) without full-length logits: entry point and references.

hidden (..., d), weight (V, d), targets (...) int64, rows whose target is ``ignore_index`` skipped:

    z = h W^T,   loss = (1/C) sum_{rows with a target} (logsumexp(z_r) - z_r[t_r]),   C = max(1, #targets)
    g = (softmax(z) - onehot(t)) / C on rows with a target, 0 elsewhere;   dh = g W,   dW = g^T h

Implementations: ``reference`` (full logits, autograd: the ground truth), ``chunked`` (PyTorch, rows in
chunks, gradients computed in the forward so no chunk's logits outlive it; also the torch model's chunked
loss head, ``revnet_torch.loss.chunked_lm_loss``), ``triton`` (the same chunking with one fused Triton pass
per chunk; in ``cross_entropy_triton``). Matmuls run in the compute dtype (autocast's when it is on), the
softmax and sums in fp32 (fp64 for fp64 inputs in the reference and ``chunked``). Neither ``chunked`` nor
``triton`` computes a gradient when none can be asked for (grad mode off, or no input requires grad).
"""

from __future__ import annotations

from .registry import dispatch
from .utils import add_matmul, compute_dtype

IGNORE_INDEX = -100
LOGITS_BUDGET = 1 << 26  # elements of one chunk's logits: 128 MiB in bf16 (vocab 50257: 1024 rows)


def default_chunk_rows(vocab: int) -> int:
    """The largest power of two of rows whose logits fit LOGITS_BUDGET, within [16, 8192]."""
    rows = max(LOGITS_BUDGET // max(vocab, 1), 1)
    return min(max(1 << (rows.bit_length() - 1), 16), 8192)


PAD_MULTIPLE = 64  # the fused head pads the vocabulary to a multiple of this when it is not one


def fused_layout(vocab: int, rows: int, pad_vocab: bool | None = None,
                 chunk_size: int | None = None) -> tuple[int, int, bool]:
    """(rows per chunk, padded vocabulary, padded?) of the fused linear cross-entropy over ``rows`` rows: the
    weight is zero-padded to a multiple of PAD_MULTIPLE when V is not one, and the default chunk then halved
    (the padded copy takes the memory of half a chunk's logits)."""
    pad = vocab % PAD_MULTIPLE != 0 if pad_vocab is None else pad_vocab
    chunk = chunk_size or default_chunk_rows(vocab) // (2 if pad else 1)
    padded = -(-vocab // PAD_MULTIPLE) * PAD_MULTIPLE
    return min(max(chunk, 1), max(rows, 1)), padded, pad


def check_ce_inputs(hidden, weight, targets) -> None:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be (V, d) with d = hidden's last dim; got {tuple(weight.shape)=}, "
                         f"{tuple(hidden.shape)=}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must be shaped like hidden without its last dim, {tuple(hidden.shape[:-1])}; "
                         f"got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex:
        raise ValueError(f"targets must be integers; got dtype={targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"hidden, weight, targets must be on one device; got {hidden.device}, {weight.device}, "
                         f"{targets.device}")


def linear_cross_entropy(hidden, weight, targets, *, ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None,
                         impl: str | None = None):
    """Mean cross-entropy of softmax(hidden @ weight.T) against targets: hidden (..., d), weight (V, d),
    targets (...) int -> scalar fp32 (fp64 for fp64 inputs, which no Triton kernel takes). ``chunk_size`` rows
    per chunk (default: ``default_chunk_rows(V)``)."""
    check_ce_inputs(hidden, weight, targets)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{chunk_size=} must be >= 1")
    h2, t2 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()
    kwargs = {"ignore_index": ignore_index, "chunk_size": chunk_size or default_chunk_rows(weight.shape[0])}
    return dispatch("linear_cross_entropy", (h2, weight, t2), kwargs, device=hidden.device,
                    dtype=compute_dtype(hidden), meta={"hidden": weight.shape[1], "vocab": weight.shape[0]},
                    impl=impl)


def reference_linear_cross_entropy(hidden, weight, targets, ignore_index: int = IGNORE_INDEX):
    """The ground truth: full (N, V) logits in fp32 (fp64 for fp64 inputs), differentiable by autograd.
    Returns a scalar in that dtype."""
    import torch

    acc = torch.promote_types(hidden.dtype, torch.float32)
    cdt = compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        logits = (hidden.reshape(-1, hidden.shape[-1]).to(cdt) @ weight.to(cdt).T).to(acc)  # (N, V)
    t = targets.reshape(-1)
    valid = t != ignore_index
    picked = logits.gather(1, t.masked_fill(~valid, 0)[:, None]).squeeze(1)  # other negatives raise
    per_row = (torch.logsumexp(logits, dim=-1) - picked) * valid
    return per_row.sum() / valid.sum().clamp(min=1)


def reference_impl(hidden, weight, targets, *, ignore_index=IGNORE_INDEX, chunk_size=None):
    """Registry entry for the reference (``chunk_size`` is ignored: it holds all logits)."""
    return reference_linear_cross_entropy(hidden, weight, targets, ignore_index)


def _chunk_pass(hc, wc, tc, vc, inv_count, dh, dw):
    """One chunk of rows: hc (n, d) and wc (V, d) in the compute dtype, tc (n,) targets, vc (n,) bool (has a
    target), inv_count 1/C in the accumulation dtype. Returns the chunk's loss sum (scalar, accumulation
    dtype); writes dL/dh into dh (the chunk's (n, d) rows) and adds dL/dW into dw (V, d), each when not None.
    A function of its own so that the chunk's (n, V) tensors are freed before the next chunk's exist."""
    import torch

    z = (hc @ wc.T).to(inv_count.dtype)  # (n, V) logits in the accumulation dtype
    lse = torch.logsumexp(z, dim=-1)
    safe_t = tc.masked_fill(~vc, 0)  # a negative target other than ignore_index still raises
    loss = ((lse - z.gather(1, safe_t[:, None]).squeeze(1)) * vc).sum()
    if dh is None and dw is None:
        return loss
    # dL/dz = (softmax(z) - onehot(t)) / C on rows with a target, 0 elsewhere; in the logits' memory
    g = z.sub_(lse[:, None]).exp_()
    g[torch.arange(g.shape[0], device=g.device), safe_t] -= 1.0
    g = g.mul_((vc.to(g.dtype) * inv_count)[:, None]).to(hc.dtype)
    if dh is not None:
        dh.copy_(g @ wc)
    if dw is not None:
        add_matmul(dw, g.T, hc)
    return loss


def _chunked_forward(h, w, targets, ignore_index: int, chunk_size: int, need_dh: bool, need_dw: bool):
    """(loss, dh, dw) by plain PyTorch over chunks of ``chunk_size`` rows, no autograd: h (N, d), w (V, d),
    targets (N,) int64. Matmuls in the compute dtype; logits, softmax, sums and dw in the accumulation dtype
    promote_types(compute dtype, fp32) (fp64 in fp64 runs): loss scalar and dw (V, d) in it, dh (N, d) in
    h's dtype (None when not needed)."""
    import torch

    cdt = compute_dtype(h)
    acc = torch.promote_types(cdt, torch.float32)
    valid = targets != ignore_index
    inv_count = 1.0 / valid.sum().clamp(min=1).to(acc)
    total = torch.zeros((), dtype=acc, device=h.device)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_dh else None
    dw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_dw else None
    with torch.autocast(h.device.type, enabled=False):
        wc = w.to(cdt)
        for s in range(0, h.shape[0], chunk_size):
            rows = slice(s, s + chunk_size)
            total += _chunk_pass(h[rows].to(cdt), wc, targets[rows], valid[rows], inv_count,
                                 dh[rows] if dh is not None else None, dw)
    return total * inv_count, dh, dw


def _linear_ce_function():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Gradients are computed in the forward and only (N, d) and (V, d) are kept for the backward."""

        @staticmethod
        def forward(ctx, h, w, targets, ignore_index, chunk_size, forward_fn):
            loss, dh, dw = forward_fn(h, w, targets, ignore_index, chunk_size, ctx.needs_input_grad[0],
                                      ctx.needs_input_grad[1])
            ctx.grads, ctx.w_dtype = (dh, dw), w.dtype
            return loss

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_loss):
            if ctx.grads is None:
                # the error a reversible layer gives for the same misuse, so a model's user sees one kind
                from revnet_core.errors import ReversibilityError

                raise ReversibilityError("linear_cross_entropy: backward ran twice. Its gradients are computed in "
                                         "the forward and scaled in place by the first backward (retain_graph is "
                                         "not supported)")
            (dh, dw), ctx.grads = ctx.grads, None
            # In place: a scaled copy of dW (fp32, vocab x d) would be the largest tensor of the whole loss.
            dh = dh.mul_(grad_loss.to(dh.dtype)) if dh is not None else None
            dw = dw.mul_(grad_loss.to(dw.dtype)).to(ctx.w_dtype) if dw is not None else None
            return dh, dw, None, None, None, None

    return LinearCrossEntropy


_FUNCTION = None


def linear_ce_function():
    """The autograd Function shared by the chunked and Triton implementations (built on first use)."""
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _linear_ce_function()
    return _FUNCTION


def apply_linear_ce(hidden, weight, targets, ignore_index: int, chunk_size, forward_fn):
    """The loss of ``forward_fn`` (``_chunked_forward``'s signature) through the shared autograd Function, or,
    when no gradient can be asked for (grad mode off, or neither hidden nor weight requires grad), straight
    from ``forward_fn`` without computing any: inside a Function's forward grad mode is always off and
    ``needs_input_grad`` ignores it, so only the caller can tell."""
    import torch

    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return linear_ce_function().apply(hidden, weight, targets, ignore_index, chunk_size, forward_fn)
    return forward_fn(hidden, weight, targets, ignore_index, chunk_size, False, False)[0]


def chunked_linear_cross_entropy(hidden, weight, targets, ignore_index: int = IGNORE_INDEX, chunk_size: int = 1024):
    """Differentiable mean cross-entropy by PyTorch over chunks of ``chunk_size`` rows: hidden (N, d), weight
    (V, d), targets (N,) int64 -> scalar fp32 (fp64 for fp64 inputs). No input checks (the entry point's)."""
    return apply_linear_ce(hidden, weight, targets, ignore_index, chunk_size, _chunked_forward)


def chunked_impl(hidden, weight, targets, *, ignore_index=IGNORE_INDEX, chunk_size=1024):
    """Registry entry for the PyTorch chunked implementation: hidden (N, d), targets (N,)."""
    return chunked_linear_cross_entropy(hidden, weight, targets, ignore_index, chunk_size)
