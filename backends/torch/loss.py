"""The LM head and next-token loss over sequence chunks, never holding full-length logits.

Chunking under ordinary autograd would still save every chunk's logits for the backward. Instead the
forward computes each chunk's loss *and* its gradients (with respect to the hidden states and the head
weight) on the spot and keeps only those gradients: (N, d) and (V, d), no (N, V) tensor outlives a chunk.
Both heads are revnet_kernels' linear cross-entropy (``revnet_kernels.cross_entropy``): the chunked PyTorch
one and the fused Triton one; this module picks between them.
"""

from __future__ import annotations

import torch

from revnet_kernels.cross_entropy import IGNORE_INDEX, chunked_linear_cross_entropy


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024):
    """Mean next-token cross-entropy over chunks of ``chunk_size`` rows (revnet_kernels' ``chunked``
    implementation). hidden (B, T, d), weight (V, d), targets (B, T) int64 -> scalar, fp32 (fp64 in fp64 runs)."""
    return chunked_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                        IGNORE_INDEX, chunk_size)


def uses_fused_head(kernel: str, device_type: str) -> bool:
    """The ``loss_kernel`` rule: "fused" always, "auto" on CUDA (ROCm included), "chunked" never."""
    return kernel == "fused" or (kernel == "auto" and device_type == "cuda")


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
            kernel: str = "auto"):
    """The model's loss head: mean next-token cross-entropy of hidden (B, T, d) @ weight (V, d).T against
    targets (B, T) -> scalar fp32 (fp64 in fp64 runs). ``kernel``: "fused" asks revnet_kernels' linear
    cross-entropy (the registry's choice: Triton on CUDA/ROCm; 0.34 against 0.96 GiB above the inputs and
    3.5x faster than the chunked head at 32k tokens on an H100, docs/kernels.md); "chunked" runs
    chunked_lm_loss; "auto" the fused one on CUDA (ROCm included), the chunked one elsewhere."""
    if uses_fused_head(kernel, hidden.device.type):
        from revnet_kernels.cross_entropy import linear_cross_entropy

        return linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX)
    return chunked_lm_loss(hidden, weight, targets, chunk_size)


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets for position t are labels[t + 1]; the last position has none. (B, T) -> (B, T) int64."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out
