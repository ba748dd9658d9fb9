"""The built-in kernels, registered through the same ``register_kernels`` hook plugins use.

Priorities (highest accepted wins) follow the H100 measurements in docs/benchmarks/kernels.md: for plain
causal attention torch's SDPA (cuDNN backend first) beat our Triton kernel at every length and head dim
(forward+backward 430-560 TFLOP/s against 270-370), so ``sdpa`` outranks ``triton`` wherever it applies;
the Triton kernel serves what SDPA cannot: sliding windows and the log-sum-exp output.
Importing this module imports neither torch nor triton.
"""

from revnet_core.hookspecs import hookimpl

from .registry import KernelImpl

GPU = frozenset({"cuda", "rocm"})
TRITON_DTYPES = frozenset({"float16", "bfloat16", "float32"})


def _flash_shapes(meta) -> bool:
    d = meta.get("head_dim", 0)
    return 16 <= d <= 256 and d & (d - 1) == 0


def _sdpa_shapes(meta) -> bool:
    return meta.get("window") is None and not meta.get("return_lse", False)


def _norm_shapes(meta) -> bool:
    from .norms import MAX_HIDDEN

    return meta.get("hidden", 0) <= MAX_HIDDEN


BUILTIN_KERNELS = (
    KernelImpl("attention", "triton", "revnet_kernels.attn_triton:triton_impl", GPU, TRITON_DTYPES,
               _flash_shapes, priority=20, requires=("triton",),
               description="flash attention forward+backward with lse, window, GQA"),
    KernelImpl("attention", "sdpa", "revnet_kernels.attn:sdpa_impl", supports=_sdpa_shapes, priority=30,
               description="torch scaled_dot_product_attention (no window, no lse)"),
    KernelImpl("attention", "reference", "revnet_kernels.attn:reference_impl", is_reference=True,
               description="plain matmuls, (T, T) scores"),
    KernelImpl("layer_norm", "triton", "revnet_kernels.norms_triton:triton_layer_norm", GPU, TRITON_DTYPES,
               _norm_shapes, priority=20, requires=("triton",)),
    KernelImpl("layer_norm", "reference", "revnet_kernels.norms:reference_layer_norm", is_reference=True),
    KernelImpl("rms_norm", "triton", "revnet_kernels.norms_triton:triton_rms_norm", GPU, TRITON_DTYPES,
               _norm_shapes, priority=20, requires=("triton",)),
    KernelImpl("rms_norm", "reference", "revnet_kernels.norms:reference_rms_norm", is_reference=True),
    KernelImpl("activation", "triton", "revnet_kernels.activations_triton:triton_activation", GPU, TRITON_DTYPES,
               priority=20, requires=("triton",)),
    KernelImpl("activation", "reference", "revnet_kernels.activations:reference_activation", is_reference=True),
    KernelImpl("linear_cross_entropy", "triton", "revnet_kernels.cross_entropy_triton:triton_impl", GPU,
               TRITON_DTYPES, priority=20, requires=("triton",),
               description="chunked rows, fused softmax + gradient pass, no full logits"),
    KernelImpl("linear_cross_entropy", "chunked", "revnet_kernels.cross_entropy:chunked_impl", priority=10,
               description="PyTorch over row chunks, gradients in the forward"),
    KernelImpl("linear_cross_entropy", "reference", "revnet_kernels.cross_entropy:reference_impl",
               is_reference=True, description="full logits, autograd"),
)


@hookimpl
def register_kernels(register):
    for impl in BUILTIN_KERNELS:
        register(impl)
