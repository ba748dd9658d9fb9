"""The LM head and next-token loss over sequence chunks, never holding full-length logits.

Chunking under ordinary autograd would still save every chunk's logits for the backward. Instead the
forward computes each chunk's loss *and* its gradients (with respect to the hidden states and the head
weight) on the spot and keeps only those gradients: (N, d) and (V, d), no (N, V) tensor outlives a chunk.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return h.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size: int):
        # h: (N, d) float, weight: (V, d), targets: (N,) int64 with IGNORE_INDEX for no target.
        cdtype = _compute_dtype(h)
        acc = torch.promote_types(cdtype, torch.float32)  # softmax and sums: fp32, or fp64 in fp64 runs
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        total = torch.zeros((), dtype=acc, device=h.device)
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        w = weight.to(cdtype)
        scale = 1.0 / count.clamp(min=1).to(acc)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_size):
                hc = h[start:start + chunk_size]
                tc = targets[start:start + chunk_size]
                vc = valid[start:start + chunk_size]
                logits = (hc.to(cdtype) @ w.T).to(acc)  # (n, V)
                lse = torch.logsumexp(logits, dim=-1)
                safe_t = tc.clamp(min=0)
                picked = logits.gather(1, safe_t[:, None]).squeeze(1)
                total += ((lse - picked) * vc).sum()
                if need_grad:
                    # d loss / d logits = (softmax - onehot) / count on rows with a target, 0 elsewhere.
                    g = torch.exp(logits - lse[:, None])
                    g[torch.arange(g.shape[0], device=g.device), safe_t] -= 1.0
                    g *= (vc.to(acc) * scale)[:, None]
                    del logits
                    gc = g.to(cdtype)
                    if dh is not None:
                        dh[start:start + chunk_size] = (gc @ w).to(h.dtype)
                    if dw is not None:
                        dw += (gc.T @ hc.to(cdtype)).to(acc)
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        dh = dh * grad_loss.to(dh.dtype) if dh is not None else None
        dw = (dw * grad_loss).to(ctx.weight_dtype) if dw is not None else None
        return dh, dw, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024):
    """Mean next-token cross-entropy. hidden (B, T, d), weight (V, d), targets (B, T) -> scalar, fp32 (fp64 in
    fp64 runs)."""
    return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_size)


def uses_fused_head(kernel: str, device_type: str) -> bool:
    """The ``loss_kernel`` rule: "fused" always, "auto" on CUDA (ROCm included), "chunked" never."""
    return kernel == "fused" or (kernel == "auto" and device_type == "cuda")


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
            kernel: str = "auto"):
    """The model's loss head: mean next-token cross-entropy of hidden (B, T, d) @ weight (V, d).T against
    targets (B, T) -> scalar fp32. ``kernel``: "fused" asks revnet_kernels' linear cross-entropy (the
    registry's choice: Triton on CUDA/ROCm; 0.34 against 0.96 GiB above the inputs and 3.5x faster than the
    chunked head at 32k tokens on an H100, docs/kernels.md); "chunked" runs chunked_lm_loss; "auto" the
    fused one on CUDA (ROCm included), the chunked one elsewhere."""
    if uses_fused_head(kernel, hidden.device.type):
        from revnet_kernels.cross_entropy import linear_cross_entropy

        return linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX)
    return chunked_lm_loss(hidden, weight, targets, chunk_size)


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets for position t are labels[t + 1]; the last position has none. (B, T) -> (B, T) int64."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out
