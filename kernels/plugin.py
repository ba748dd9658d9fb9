"""The built-in kernels, registered through the same ``register_kernels`` hook plugins use.

Priorities (highest accepted wins) follow the H100 measurements in docs/benchmarks/kernels.md: for plain
causal attention torch's SDPA (cuDNN backend first) beat our Triton kernel at every length and head dim
(forward+backward 430-560 TFLOP/s against 270-370), so ``sdpa`` outranks ``triton`` wherever it applies;
the Triton kernel serves what SDPA cannot: sliding windows and the log-sum-exp output. Norms and
activations: see the comment above their records.
Importing this module imports neither torch nor triton.
"""

from revnet_core.hookspecs import hookimpl

from .registry import KernelImpl

GPU = frozenset({"cuda", "rocm"})
TRITON_DTYPES = frozenset({"float16", "bfloat16", "float32"})
JAX = frozenset({"jax"})


def _flash_shapes(meta) -> bool:
    d = meta.get("head_dim", 0)
    return 16 <= d <= 256 and d & (d - 1) == 0


def _sdpa_shapes(meta) -> bool:
    return meta.get("window") is None and not meta.get("return_lse", False)


def _norm_shapes(meta) -> bool:
    from .norms import MAX_HIDDEN

    return meta.get("hidden", 0) <= MAX_HIDDEN


def _triton_activation_kinds(meta) -> bool:
    from .activations import TRITON_KINDS

    return meta.get("kind") in TRITON_KINDS


def _triton_activation_rank(meta) -> int:
    """Above the torch ops for the gated kinds, below them otherwise. Forward+backward on an H200, bf16
    (benchmarks/norm_act_bench.py, docs/benchmarks/kernels/norm_act_h200.json): GeGLU/SwiGLU 3.8 -> 1.0 ms
    at 65,536 rows of 8,192 and 17.8 -> 4.1 ms at 262,144 rows, with 40% less memory (it saves only u);
    GELU level with the torch op, so the torch op keeps the plain kinds."""
    from .activations import GATED

    return 40 if meta.get("kind") in GATED else 20


BUILTIN_KERNELS = (
    KernelImpl("attention", "triton", "revnet_kernels.attn_triton:triton_impl", GPU, TRITON_DTYPES,
               _flash_shapes, priority=20, requires=("triton",),
               description="flash attention forward+backward with lse, window, GQA"),
    KernelImpl("attention", "sdpa", "revnet_kernels.attn:sdpa_impl", supports=_sdpa_shapes, priority=30,
               description="torch scaled_dot_product_attention (no window, no lse)"),
    KernelImpl("attention", "reference", "revnet_kernels.attn:reference_impl", is_reference=True,
               description="plain matmuls, (T, T) scores"),
    # Norms and activations: "torch" is the eager ops the blocks ran before they called the registry (so on
    # CPU nothing changed, bit for bit). Measured on an H200 (benchmarks/norm_act_bench.py, forward+backward,
    # bf16, docs/benchmarks/kernels/norm_act_h200.json): torch's norms win at 65,536 rows (0.57 vs 0.95 ms)
    # and lose at 262,144 (1.45 vs 0.93 ms); the crossover is not located, so torch keeps them. Triton's
    # gated activations win at both sizes (ranked by _triton_activation_rank).
    KernelImpl("layer_norm", "torch", "revnet_kernels.norms:torch_layer_norm", priority=30,
               description="F.layer_norm, as nn.LayerNorm calls it"),
    KernelImpl("layer_norm", "triton", "revnet_kernels.norms_triton:triton_layer_norm", GPU, TRITON_DTYPES,
               _norm_shapes, priority=20, requires=("triton",)),
    KernelImpl("layer_norm", "reference", "revnet_kernels.norms:reference_layer_norm", is_reference=True),
    KernelImpl("rms_norm", "torch", "revnet_kernels.norms:torch_rms_norm", priority=30,
               description="F.rms_norm, as nn.RMSNorm calls it"),
    KernelImpl("rms_norm", "triton", "revnet_kernels.norms_triton:triton_rms_norm", GPU, TRITON_DTYPES,
               _norm_shapes, priority=20, requires=("triton",)),
    KernelImpl("rms_norm", "reference", "revnet_kernels.norms:reference_rms_norm", is_reference=True),
    KernelImpl("activation", "torch", "revnet_kernels.activations:torch_activation", priority=30,
               description="the torch blocks' eager ops, every kind"),
    KernelImpl("activation", "triton", "revnet_kernels.activations_triton:triton_activation", GPU, TRITON_DTYPES,
               _triton_activation_kinds, priority=20, ranked=_triton_activation_rank, requires=("triton",),
               description="GELU-tanh, SiLU, GeGLU, SwiGLU fused with the gate"),
    KernelImpl("activation", "reference", "revnet_kernels.activations:reference_activation", is_reference=True),
    # JAX attention (framework "jax": the JAX blocks' arrays are (B, T, H, D)). XLA's
    # jax.nn.dot_product_attention (cuDNN on GPU where it applies) outranks the Pallas kernel until
    # benchmarks/jax_vs_torch.py's attention table measures the kernel faster on a device; then give the
    # Pallas record a ``ranked`` crossover from that measurement. REVNET_KERNELS=attention=pallas forces it.
    KernelImpl("attention", "xla", "revnet_kernels.attn_pallas:xla_impl", priority=30, requires=("jax",),
               frameworks=JAX,
               description="jax.nn.dot_product_attention (cuDNN on GPU for bf16/fp16, else XLA)"),
    KernelImpl("attention", "pallas", "revnet_kernels.attn_pallas:pallas_impl", GPU, TRITON_DTYPES,
               _flash_shapes, priority=10, requires=("jax",), frameworks=JAX,
               description="Pallas flash attention forward+backward, causal, window (not measured yet)"),
    KernelImpl("attention", "reference", "revnet_kernels.attn_pallas:reference_impl", is_reference=True,
               requires=("jax",), frameworks=JAX, description="plain jax.numpy, (T, T) scores"),
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
