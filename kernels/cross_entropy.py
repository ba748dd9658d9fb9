"""Linear + cross-entropy (the LM head and its loss) without full-length logits: entry point and references.

hidden (..., d), weight (V, d), targets (...) int64, rows whose target is ``ignore_index`` skipped:

    z = h W^T,   loss = (1/C) sum_{rows with a target} (logsumexp(z_r) - z_r[t_r]),   C = max(1, #targets)
    g = (softmax(z) - onehot(t)) / C on rows with a target, 0 elsewhere;   dh = g W,   dW = g^T h

Implementations: ``reference`` (full logits, autograd: the ground truth), ``chunked`` (PyTorch, rows in
chunks, gradients computed in the forward so no chunk's logits outlive it), ``triton`` (the same chunking
with one fused Triton pass per chunk; in ``cross_entropy_triton``). Matmuls run in the compute dtype
(autocast's when it is on), the softmax in fp32.
"""

from __future__ import annotations

from .registry import dispatch
from .utils import compute_dtype

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
    targets (...) int -> scalar fp32. ``chunk_size`` rows per chunk (default: ``default_chunk_rows(V)``)."""
    check_ce_inputs(hidden, weight, targets)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{chunk_size=} must be >= 1")
    h2, t2 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()
    kwargs = {"ignore_index": ignore_index, "chunk_size": chunk_size or default_chunk_rows(weight.shape[0])}
    return dispatch("linear_cross_entropy", (h2, weight, t2), kwargs, device=hidden.device,
                    dtype=compute_dtype(hidden), meta={"hidden": weight.shape[1], "vocab": weight.shape[0]},
                    impl=impl)


def reference_linear_cross_entropy(hidden, weight, targets, ignore_index: int = IGNORE_INDEX):
    """The ground truth: full (N, V) logits in fp32 (fp64 for fp64 inputs), differentiable by autograd."""
    import torch

    acc = torch.promote_types(hidden.dtype, torch.float32)
    cdt = compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        logits = (hidden.reshape(-1, hidden.shape[-1]).to(cdt) @ weight.to(cdt).T).to(acc)  # (N, V)
    t = targets.reshape(-1)
    valid = t != ignore_index
    picked = logits.gather(1, t.masked_fill(~valid, 0)[:, None]).squeeze(1)  # other negatives raise
    per_row = (torch.logsumexp(logits, dim=-1) - picked) * valid
    return (per_row.sum() / valid.sum().clamp(min=1)).float()


def reference_impl(hidden, weight, targets, *, ignore_index=IGNORE_INDEX, chunk_size=None):
    """Registry entry for the reference (``chunk_size`` is ignored: it holds all logits)."""
    return reference_linear_cross_entropy(hidden, weight, targets, ignore_index)


def _chunked_forward(h, w, targets, ignore_index: int, chunk_size: int, need_dh: bool, need_dw: bool):
    """(loss, dh, dw) by plain PyTorch over row chunks; dw in fp32. Mirrors the Triton host loop."""
    import torch

    cdt = compute_dtype(h)
    valid = targets != ignore_index
    inv_count = 1.0 / valid.sum().clamp(min=1).float()
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_dh else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
    with torch.autocast(h.device.type, enabled=False):
        wc = w.to(cdt)
        for s in range(0, h.shape[0], chunk_size):
            hc, tc, vc = h[s:s + chunk_size].to(cdt), targets[s:s + chunk_size], valid[s:s + chunk_size]
            logits = (hc @ wc.T).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)
            safe_t = tc.masked_fill(~vc, 0)  # a negative target other than ignore_index still raises
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            total += ((lse - picked) * vc).sum()
            if need_dh or need_dw:
                g = torch.exp(logits.sub_(lse[:, None]))  # softmax, reusing the logits' memory
                g[torch.arange(g.shape[0], device=g.device), safe_t] -= 1.0
                g = (g * (vc.float() * inv_count)[:, None]).to(cdt)
                if dh is not None:
                    dh[s:s + chunk_size] = g @ wc
                if dw is not None:
                    dw += (g.T @ hc).float()
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
                raise RuntimeError("linear_cross_entropy: backward ran twice. Its gradients are computed in the "
                                   "forward and scaled in place by the first backward (retain_graph is not supported)")
            (dh, dw), ctx.grads = ctx.grads, None
            # In place: a scaled copy of dW (fp32, vocab x d) would be the largest tensor of the whole loss.
            dh = dh.mul_(grad_loss.to(dh.dtype)) if dh is not None else None
            dw = dw.mul_(grad_loss).to(ctx.w_dtype) if dw is not None else None
            return dh, dw, None, None, None, None

    return LinearCrossEntropy


_FUNCTION = None


def linear_ce_function():
    """The autograd Function shared by the chunked and Triton implementations (built on first use)."""
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _linear_ce_function()
    return _FUNCTION


def chunked_impl(hidden, weight, targets, *, ignore_index=IGNORE_INDEX, chunk_size=1024):
    """Registry entry for the PyTorch chunked implementation: hidden (N, d), targets (N,)."""
    return linear_ce_function().apply(hidden, weight, targets, ignore_index, chunk_size, _chunked_forward)
